"""Review 11b: the public API on torchvision's classification zoo (small inputs).

- ``compare_optimizers`` on MNASNet: ``OptimizerRuns.model`` and ``switch`` rebuilt the
  network with ``load_state_dict`` from a checkpoint without the state dict's module
  versions (``_metadata``), which MNASNet's ``_load_from_state_dict`` requires ("version
  should be set to 1 or 2 instead of None"). Checked against torch's own state dict of
  the trained copy.
- Hessian tools on MobileNetV3's squeeze-excitation gate: torch cannot differentiate
  ``nn.Hardsigmoid`` twice (``hardsigmoid_backward`` has no derivative, no forward-mode
  one), so every Hessian product failed. The engine's private copy now computes it as
  ``clamp(x + 3, 0, 6) / 6``. Checked against torch's dense float64 Hessian of the same
  function written with ``relu6``. ``F.hardsigmoid`` called in a forward still cannot be
  differentiated twice: the error names the clamp form and no longer suggests
  ``method='backward'`` or ``'jvp'``, which fail on it alike.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from cases import classification_data, reinit
from snapshots import assert_same_snapshot, snapshot
from torch import nn
from torch.func import functional_call
from torchvision.ops import SqueezeExcitation

import landscape_widget as lw


def test_compare_optimizers_mnasnet_checkpoints_load():
    model = reinit(torchvision.models.mnasnet0_5(num_classes=10), 0)
    x, y = classification_data(8, (3, 32, 32), 10, 1)
    sgd = functools.partial(torch.optim.SGD, lr=0.01)
    runs = lw.compare_optimizers(model, (x, y), {"sgd": sgd}, epochs=2, batch_size=8,
                                 progress=False)
    run = runs.runs["sgd"]
    for epoch, state in enumerate(run.checkpoints):
        net = runs.model("sgd", epoch)
        assert isinstance(net, torchvision.models.MNASNet) and not net.training
        got = net.state_dict()
        assert got.keys() == state.keys()
        for k, v in state.items():
            assert torch.equal(got[k], v), (epoch, k)
    switched = runs.switch("sgd", "sgd", at_epoch=1, progress=False)
    assert len(switched.checkpoints) == 3
    # The switch's epoch 1 is the run's epoch 1, so the copy it trained on loaded it.
    for k, v in run.checkpoints[1].items():
        assert torch.equal(switched.checkpoints[1][k], v), k


def test_oracle_and_engine_agree_on_mnasnet():
    # The float64 oracle loads each point with load_state_dict: it must carry the state
    # dict's module versions too (it refused MNASNet before), then matches the engine.
    from oracle import naive_eval, surface_coords

    model = reinit(torchvision.models.mnasnet0_5(num_classes=10), 0)
    x, y = classification_data(6, (3, 32, 32), 10, 2)
    d1, d2 = lw.random_directions(model, 2, seed=0)
    before = snapshot(model)
    surf = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-0.2, 0.2, 3),
                              y=(-0.2, 0.2, 3), progress=False)
    assert_same_snapshot(before, snapshot(model))
    axis = np.linspace(-0.2, 0.2, 3)
    loss, acc = naive_eval(model, x, y, [d1, d2], surface_coords(axis, axis))
    np.testing.assert_allclose(np.asarray(surf.loss).ravel(), loss, rtol=1e-5)
    assert np.ptp(loss) > 1e-3  # the points differ: the comparison is not of constants


def _se_net(inplace: bool) -> nn.Module:
    """A conv, MobileNetV3's squeeze-excitation gate (Hardsigmoid) and a linear head."""
    torch.manual_seed(0)
    se = SqueezeExcitation(4, 2, scale_activation=functools.partial(nn.Hardsigmoid,
                                                                    inplace=inplace))
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardswish(), se, nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3))
    return reinit(net, 0, gain=2.0).eval()


def _dense_hessian(model: nn.Module, x, y) -> torch.Tensor:
    """The float64 Hessian of the mean cross-entropy over the weights of dim > 1, with
    torch's own ``autograd.functional.hessian`` (Hardsigmoid written as relu6(x + 3) / 6,
    which torch differentiates twice)."""
    ref = copy.deepcopy(model).double()
    ref[2].scale_activation = _Relu6Gate()
    params = dict(ref.named_parameters())
    keys = [k for k, p in params.items() if p.dim() > 1]

    def loss(*ws):
        return F.cross_entropy(functional_call(ref, {**params, **dict(zip(keys, ws, strict=True))},
                                               (x.double(),)), y)

    blocks = torch.autograd.functional.hessian(loss, tuple(params[k].detach() for k in keys))
    sizes = [params[k].numel() for k in keys]
    return torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j])
                                 for j in range(len(keys))], 1) for i in range(len(keys))])


class _Relu6Gate(nn.Module):
    def forward(self, x):
        return F.relu6(x + 3) / 6


@pytest.mark.parametrize("inplace", [False, True])
def test_hessian_of_hardsigmoid_gate(inplace):
    model = _se_net(inplace)
    x, y = classification_data(6, (3, 6, 6), 3, 1)
    before = snapshot(model)
    pairs = lw.hessian_eigenpairs(model, (x, y), k=2, tol=1e-6)
    assert_same_snapshot(before, snapshot(model))
    h = _dense_hessian(model, x, y)
    top = torch.linalg.eigvalsh(h).flip(0)[:2]
    np.testing.assert_allclose(pairs.values, top.numpy(), rtol=1e-4)
    keys = [k for k, p in model.named_parameters() if p.dim() > 1]
    for value, vec in zip(pairs.values, pairs.vectors, strict=True):
        v = torch.cat([vec[k].double().reshape(-1) for k in keys])
        assert float((h @ v - value * v).norm()) < 1e-4 * float(top[0])


class _FunctionalGate(nn.Module):
    """``F.hardsigmoid`` called in forward (not a layer the engine can swap)."""

    def __init__(self):
        super().__init__()
        self.hidden, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(F.hardsigmoid(self.hidden(x)))


@pytest.mark.parametrize("method", ["auto", "backward", "jvp"])
def test_functional_hardsigmoid_error_names_the_fix(method):
    model = reinit(_FunctionalGate(), 0)
    x, y = classification_data(8, (4,), 3, 1)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="hardsigmoid") as info:
        lw.hessian_eigenpairs(model, (x, y), k=1, method=method)
    message = str(info.value)
    assert "(x + 3).clamp(0, 6) / 6" in message
    assert "method='backward'" not in message and "method='jvp'" not in message
    assert_same_snapshot(before, snapshot(model))
    # The clamp form it names is what torch differentiates twice: the same products.
    assert (F.hardsigmoid(x) == (x + 3).clamp(0, 6) / 6).all()
