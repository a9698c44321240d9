"""A finished call frees its working memory at once, not when Python's cyclic collector runs.

The engine copies the model (100 MB for a ResNet-50, device memory on a GPU) and traces it.
A bound method stored on the evaluator (``self.loss_fn = self._default_loss``) and torch.fx's
graph modules and tracer are reference cycles: before the fix each call's copy stayed alive
until a full collection, so repeated calls piled up (a ResNet-50's process grew by 300 MB
per call). The oracle is Python's own collector: with automatic collection off, a manual
collection after the call must find no tensor left in unreachable cycles.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import landscape_widget as lw


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def _data(shape):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(32, *shape, generator=gen), torch.randint(0, 3, (32,), generator=gen)


GRID = {"x": (-1, 1, 3), "y": (-1, 1, 3), "progress": False}
CALLS = {
    "surface, vmap": lambda: lw.compute_surface(_mlp(), _data((6,)), **GRID),
    "surface, CNN (traced stem)": lambda: lw.compute_surface(_cnn(), _data((3, 6, 6)), **GRID),
    "surface, user loss": lambda: lw.compute_surface(_mlp(), _data((6,)),
                                                     loss_fn=nn.CrossEntropyLoss(), **GRID),
    "surface, CNN in lanes": lambda: lw.compute_surface(
        _cnn(), _data((3, 6, 6)), evaluator_options={"lanes": 2, "strategy": "loop"}, **GRID),
    "surface, subset": lambda: lw.compute_surface(_mlp(), _data((6,)), samples=16, **GRID),
    "curve": lambda: lw.compute_curve(_cnn(), _data((3, 6, 6)), x=(-1, 1, 3), progress=False),
    "hessian trace": lambda: lw.hessian_trace(_mlp(), _data((6,)), samples=4),
    "hessian eigenpairs": lambda: lw.hessian_eigenpairs(_cnn(), _data((3, 6, 6)), k=1),
}


def _tensors_in_cycles(call) -> int:
    """Elements of the tensors that only the cyclic collector would free after ``call``."""
    call()  # first: one-time costs (imports, caches) are not the call's garbage
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        gc.set_debug(gc.DEBUG_SAVEALL)
        result = call()
        del result
        gc.collect()
        return sum(t.numel() for t in gc.garbage if isinstance(t, torch.Tensor))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.collect()
        if enabled:
            gc.enable()


@pytest.mark.parametrize("name", list(CALLS))
def test_no_tensor_waits_for_the_cyclic_collector(name):
    assert _tensors_in_cycles(CALLS[name]) == 0


def test_the_oracle_sees_a_cycle():
    """The check is not vacuous: a tensor held in a cycle is found."""

    class Holder:
        def __init__(self):
            self.t = torch.zeros(5)
            self.me = self

    assert _tensors_in_cycles(Holder) == 5
