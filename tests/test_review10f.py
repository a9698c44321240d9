"""Review 10f: the experiments' loss weighting, spec["precision"], the pattern editor's notes.

Each test checks a property against an independent oracle: the loss of one call on all
data in float64, torch's own flags, or the fit's own record.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from snapshots import assert_same_snapshot, snapshot
from torch import nn

N, T, V, C = 40, 6, 9, 5


class Tagger(nn.Module):
    """Token logits ``(N, T, C)`` from token ids ``(N, T)``."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.emb, self.head = nn.Embedding(V, 8), nn.Linear(8, C)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)))


def sequence_mean(out, y):
    """A per-sequence-mean token loss: each sequence's mean over its counted tokens."""
    tok = F.cross_entropy(out.transpose(1, 2), y, ignore_index=-100, reduction="none")
    keep = y != -100
    return (tok.sum(1) / keep.sum(1)).mean()


def padded_tokens():
    """Sequences sorted by length (full ones first), padded with -100."""
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, V, (N, T), generator=g)
    y = torch.randint(0, C, (N, T), generator=g)
    lengths = torch.linspace(T, 1, N).round().long()
    for i, n in enumerate(lengths.tolist()):
        y[i, n:] = -100
    return x, y


def whole(model, x, y) -> float:
    """The oracle: one call of the loss on all data, in float64."""
    with torch.no_grad():
        return float(sequence_mean(copy.deepcopy(model).double()(x), y))


def test_mining_objective_weighs_chunks_of_a_per_sequence_mean_by_sequences():
    # full_loss weighed its chunks by counted tokens whatever the loss: a mean of
    # per-sequence means over chunks of long and of short sequences came out wrong.
    from landscape_widget.experiments._objective import _Objective

    model, (x, y) = Tagger(), padded_tokens()
    before = snapshot(model)
    want = whole(model, x, y)
    obj = _Objective(model, (x, y), loss_fn=sequence_mean, bn="eval", ignore=None)
    with torch.no_grad(), obj.session():
        for chunk in (7, 16, N):
            assert float(obj.full_loss({}, chunk=chunk)) == pytest.approx(want, rel=1e-5)
    assert_same_snapshot(before, snapshot(model))


def test_mining_objective_still_weighs_a_token_mean_by_counted_tokens():
    # The other reading: torch's ignore_index mean over all counted tokens.
    from landscape_widget.experiments._objective import _Objective

    model, (x, y) = Tagger(), padded_tokens()

    def token_mean(out, t):
        return F.cross_entropy(out.transpose(1, 2), t, ignore_index=-100)

    with torch.no_grad():
        want = float(token_mean(copy.deepcopy(model).double()(x), y))
    obj = _Objective(model, (x, y), loss_fn=token_mean, bn="eval", ignore=None)
    with torch.no_grad(), obj.session():
        assert float(obj.full_loss({}, chunk=7)) == pytest.approx(want, rel=1e-5)


def test_optimizer_evaluation_weighs_batches_of_a_per_sequence_mean_by_sequences():
    from landscape_widget.experiments.optimizers import _evaluate

    model, (x, y) = Tagger(), padded_tokens()
    got, _ = _evaluate(model, x, y, sequence_mean, batch=7)
    assert got == pytest.approx(whole(model, x, y), rel=1e-5)
