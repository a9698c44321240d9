"""Review 12b: researchers' own loss-landscape files (directions and surfaces), both ways.

Files are written here the way tomgoldstein/loss-landscape writes them (``h5_util.write_list``:
datasets ``'0'..'n-1'`` in ``parameters()`` or ``state_dict()`` order, no attributes), and
the oracle applies them the way its ``net_plotter.set_weights`` / ``set_states`` do, in
float64, sharing no code with the engine.
"""

from __future__ import annotations

import copy

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import tied_data, tied_mlp
from snapshots import assert_same_snapshot, snapshot

import landscape_widget as lw


def write_list(f, name, tensors) -> None:
    """h5_util.write_list: one dataset per tensor, named by its position."""
    g = f.create_group(name)
    for i, t in enumerate(tensors):
        g.create_dataset(str(i), data=np.asarray(t))


def ll_states_loss(model, x, y, dirs, step) -> float:
    """net_plotter.set_states in float64: a deepcopy of the state_dict, each entry += its
    change (zip over the file's order), then load_state_dict; the mean cross-entropy."""
    net = copy.deepcopy(model).double().eval()
    new = copy.deepcopy(net.state_dict())
    assert len(new) == len(dirs[0])  # set_states asserts the same
    for i, (_, v) in enumerate(new.items()):
        change = sum(s * torch.as_tensor(d[i]).double() for s, d in zip(step, dirs, strict=True))
        v.add_(change.to(v.dtype))
    net.load_state_dict(new)
    with torch.no_grad():
        return float(F.cross_entropy(net(x.double()), y))


def test_states_file_of_a_tied_model_moves_the_tensor_by_all_its_entries(tmp_path):
    """A tied weight is in state_dict twice; loss-landscape's set_states moves it by the sum
    of both entries (its deepcopy keeps the sharing). Reading only the first entry gave
    losses 3-19 % off with no error."""
    model = tied_mlp().eval()
    x, y = tied_data()
    state = model.state_dict()
    assert len(state) > len(list(model.parameters()))  # the tie is in state_dict twice
    g = torch.Generator().manual_seed(1)
    dirs = [[torch.randn(v.shape, generator=g) for v in state.values()] for _ in range(2)]
    with h5py.File(tmp_path / "d.h5", "w") as f:
        write_list(f, "xdirection", dirs[0])
        write_list(f, "ydirection", dirs[1])
    before = snapshot(model)
    d1, d2 = lw.load_directions(tmp_path / "d.h5", model)
    for sx, sy in ((0.3, -0.2), (-0.5, 0.4)):
        s = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(sx, sx, 1),
                               y=(sy, sy, 1), progress=False)
        want = ll_states_loss(model, x, y, dirs, (sx, sy))
        assert s.loss[0, 0] == pytest.approx(want, rel=1e-5)
    assert_same_snapshot(before, snapshot(model))
