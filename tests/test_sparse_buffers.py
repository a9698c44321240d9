"""Models with sparse buffers (a graph's adjacency, as GCN code stores it).

Oracles: the float64 per-point loop (tests/oracle.py), which loads each point into a fresh
copy of the model, and the dense form of each sparse tensor for the fingerprints.
"""

from __future__ import annotations

import numpy as np
import torch
from cases import GraphNet, graph_net, seq_data
from oracle import naive_eval
from snapshots import assert_same_snapshot, snapshot

import landscape_widget as lw
from landscape_widget.core.fingerprints import fingerprint, state_hash


def _coo(values, index, size=(3, 3)):
    return torch.sparse_coo_tensor(torch.tensor(index), torch.tensor(values), size)


def test_fingerprints_of_sparse_tensors_follow_their_contents():
    """Equal contents give equal fingerprints however the tensor was built (duplicate
    entries summed, another order); other values, another layout or pattern differ."""
    a = _coo([1.0, 2.0, 3.0], [[0, 1, 2], [1, 2, 0]])
    same = _coo([3.0, 1.0, 1.0, 1.0], [[2, 1, 1, 0], [0, 2, 2, 1]])  # duplicates, shuffled
    assert torch.equal(a.to_dense(), same.to_dense())
    assert fingerprint({"a": a}) == fingerprint({"a": same})
    assert state_hash({"a": a}) == state_hash({"a": same})
    other = _coo([1.0, 2.0, 3.5], [[0, 1, 2], [1, 2, 0]])
    moved = _coo([1.0, 2.0, 3.0], [[0, 1, 2], [2, 2, 0]])
    prints = {fingerprint({"a": t}) for t in (a, other, moved, a.to_dense(),
                                              a.to_sparse_csr())}
    assert len(prints) == 5
    csr = a.to_dense().to_sparse_csr()
    assert fingerprint({"a": csr}) == fingerprint({"a": a.to_sparse_csr()})


class InPlaceGraph(GraphNet):
    """A forward that rescales its sparse adjacency in place (a careless normalisation)."""

    def forward(self, x):
        out = super().forward(x)
        self.adj.mul_(0.5)
        return out


def test_sparse_buffer_changed_by_forward_is_put_back_for_every_point():
    """Each point starts from the user's adjacency: every value equals the oracle's, which
    loads each point into a fresh copy; the user's model is untouched."""
    torch.manual_seed(0)
    model = InPlaceGraph()
    ref = graph_net()  # same architecture, for its parameters
    model.load_state_dict(ref.state_dict())
    x, y = seq_data()
    before = snapshot(model)
    d1, d2 = lw.random_directions(model, 2, seed=3)
    s = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-1, 1, 3), y=(-1, 1, 3),
                           progress=False)
    assert_same_snapshot(before, snapshot(model))
    coords = [(float(a), float(b)) for b in s.y for a in s.x]
    want_loss, _ = naive_eval(ref, x, y, [d1, d2], coords)
    np.testing.assert_allclose(np.asarray(s.loss).ravel(), want_loss, rtol=1e-5)


def test_reuse_of_a_graph_models_surface():
    """reuse= fingerprints the sparse buffer: a surface of the same model and data is
    reused; the same model with another adjacency is refused."""
    model = graph_net()
    x, y = seq_data()
    d = lw.random_directions(model, 2, seed=0)
    small = lw.compute_surface(model, (x, y), directions=d, x=(-1, 1, 3), y=(-1, 1, 3),
                               progress=False)
    big = lw.compute_surface(model, (x, y), directions=d, x=(-1, 1, 5), y=(-1, 1, 5),
                             progress=False, reuse=small)
    assert big.spec["reused"] == 9
    other = graph_net()
    other.adj = (other.adj * 2).coalesce()
    try:
        lw.compute_surface(other, (x, y), directions=d, x=(-1, 1, 5), y=(-1, 1, 5),
                           progress=False, reuse=small)
    except lw.ReuseMismatch as err:
        assert "model" in str(err)
    else:
        raise AssertionError("another adjacency was reused")
