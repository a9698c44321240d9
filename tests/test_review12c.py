"""Review 12c: model kinds researchers bring beyond the suite's cases.

- TorchScript (``torch.jit.script`` / ``torch.jit.trace``, a scripted submodule of an eager
  model): every public function failed with torch's words ("register_forward_hook is not
  supported on ScriptModules", or "The stateless API can't be used with Jitted modules"
  dressed as a double-backward problem with a wrong fix). Now a ``TypeError`` naming the
  scripted module and the fix (the eager module), before anything runs; the model is
  untouched.
- Complex parameters: ``random_directions`` made complex directions that
  ``compute_surface`` then refused, and the Hessian tools failed with "value cannot be
  converted to type double without overflow". Now a ``TypeError`` naming the parameter
  and the fix (a real parameter viewed as complex in forward).
"""

from __future__ import annotations

import functools

import pytest
import torch
from cases import classification_data, reinit
from public_cases import Untouched
from torch import nn

import landscape_widget as lw


def _mlp() -> nn.Module:
    return reinit(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), 0).eval()


def _data():
    return classification_data(16, (6,), 3, 1)


class _Outer(nn.Module):
    """An eager model with a scripted block, as code that scripts its hot layer has."""

    def __init__(self):
        super().__init__()
        self.body = torch.jit.script(_mlp())
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _calls(data):
    """Every public entry point on ``model``, as ``name -> fn(model)``."""
    grid = {"x": (-1, 1, 3), "y": (-1, 1, 3), "progress": False}
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    return {
        "random_directions": lambda m: lw.random_directions(m, 2, seed=0),
        "compute_surface": lambda m: lw.compute_surface(m, data, **grid),
        "compute_curve": lambda m: lw.compute_curve(m, data, x=(-1, 1, 3), progress=False),
        "iter_tiles": lambda m: list(lw.iter_tiles(m, data, x=(-1, 1, 3), y=(-1, 1, 3))),
        "hessian_eigenpairs": lambda m: lw.hessian_eigenpairs(m, data, k=1),
        "hessian_trace": lambda m: lw.hessian_trace(m, data, samples=2),
        "hessian_density": lambda m: lw.hessian_density(m, data, steps=3, runs=1),
        "mine_direction": lambda m: lw.mine_direction(m, data, "w-peak"),
        "side_direction": lambda m: lw.side_direction(m, data),
        "permutation_direction": lambda m: lw.permutation_direction(m, data=data),
        "compare_optimizers": lambda m: lw.compare_optimizers(m, data, {"sgd": sgd},
                                                              epochs=1, progress=False),
        "triangle_surface": lambda m: lw.triangle_surface(m, m, m, data, resolution=2,
                                                          progress=False),
    }


_KINDS = {
    "script": lambda: torch.jit.script(_mlp()),
    "trace": lambda: torch.jit.trace(_mlp(), _data()[0][:2]),
    "scripted-submodule": _Outer,
}


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")
@pytest.mark.parametrize("kind", list(_KINDS))
@pytest.mark.parametrize("call", list(_calls(None)))
def test_torchscript_is_refused_naming_the_fix(kind, call):
    model = _KINDS[kind]()
    with Untouched(model), pytest.raises(TypeError, match="TorchScript") as err:
        _calls(_data())[call](model)
    assert "eager nn.Module" in str(err.value)
    if kind == "scripted-submodule":
        assert "model.body" in str(err.value)  # names the scripted block


class _ComplexNet(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(0.3 * torch.randn(6, 8, dtype=torch.cfloat, generator=g))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out((x.to(torch.cfloat) @ self.w).abs())


@pytest.mark.parametrize("call", ["random_directions", "compute_surface",
                                  "hessian_eigenpairs", "hessian_trace", "mine_direction"])
def test_complex_parameter_is_refused_naming_the_fix(call):
    model = _ComplexNet()
    with Untouched(model), pytest.raises(TypeError, match="'w' is complex") as err:
        _calls(_data())[call](model)
    assert "view_as_complex" in str(err.value)
