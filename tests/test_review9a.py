"""Review 9a: the engine's performance paths with models the other tests do not cover.

Each test checks a property against an independent oracle: the float64 per-point loop of
tests/oracle.py, or a full snapshot of the user's model and data (tests/snapshots.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import naive_eval, surface_coords
from snapshots import assert_same_snapshot, snapshot
from torch import nn

import landscape_widget as lw


def _data(n: int = 16, features: int = 6, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


def _surface(model, x, y, **kw):
    dirs = lw.random_directions(model, 2, seed=1)
    s = lw.compute_surface(model, (x, y), directions=dirs, x=(-1, 1, 3), y=(-1, 1, 3),
                           progress=False, **kw)
    ref, _ = naive_eval(model, x, y, list(dirs), surface_coords(s.x, s.y))
    return s, ref.reshape(s.loss.shape)


class Temperature(nn.Module):
    """float32 layers after a float64 scalar parameter registered first."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.t = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x) * self.t.float()


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_a_float64_parameter_registered_first_does_not_set_the_input_dtype(strategy):
    # The engine cast the inputs to the dtype of the model's first tensor, the float64
    # scalar: "mat1 and mat2 must have the same dtype" from the float32 layer.
    model, (x, y) = Temperature(), _data()
    before = snapshot(model)
    s, ref = _surface(model, x, y, evaluator_options={"strategy": strategy})
    np.testing.assert_allclose(s.loss, ref, rtol=1e-5)
    assert_same_snapshot(before, snapshot(model))


class ScalesInput(nn.Module):
    """A forward that scales its input in place before the first layer."""

    def __init__(self, how: str):
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.fc, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        if self.how == "mul_":
            x.mul_(2)
        elif self.how == "setitem":
            x[:, 0] = 0
        else:
            x = self.act(x)
        return self.head(torch.tanh(self.fc(x)))


@pytest.mark.parametrize("how", ["mul_", "setitem", "relu_inplace"])
@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_a_forward_changing_its_input_in_place_is_refused_and_the_data_kept(how, strategy):
    # It changed the user's data tensor and every pass saw the data as the passes before
    # had left it: the loss of the 3x3 grid was off by up to 100 % (x.mul_(2)).
    model, (x, y) = ScalesInput(how), _data()
    data, before = x.clone(), snapshot(model)
    with pytest.raises(ValueError, match="changes its input in place.*out of place"):
        lw.compute_surface(model, (x, y), x=(-1, 1, 3), y=(-1, 1, 3), progress=False,
                           evaluator_options={"strategy": strategy})
    assert torch.equal(x, data)
    assert_same_snapshot(before, snapshot(model))
