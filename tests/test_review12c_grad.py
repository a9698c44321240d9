"""Review 12c, derivatives and directions of model kinds beyond the suite's cases.

- torch's ``orthogonal`` parametrization with its Householder map (the default for a
  non-square weight) reads the diagonal of ``original`` as signs, through ``.int()``:
  random directions moved it, so every default surface and curve had a spike at the model
  itself (``int(-0.99) == 0`` zeroes a column). Random directions are now zero there;
  the curve is continuous at theta, checked on a float64 ``functional_call`` loop.
  Hessian eigenvectors kept ~1e-5 of their random Lanczos start there, enough for the same
  spike along them: the start vector is zero there now (no product moves those entries).
- A forward decorated with ``@torch.no_grad()``: ``hessian_eigenpairs`` returned 0 and
  ``hessian_trace`` 0 (the ``jvp`` fallback differentiated a loss with no graph), mining
  and ``side_direction`` failed with "element 0 of tensors does not require grad". Now a
  ``ValueError`` naming the decorator and the fix. With ``@torch.inference_mode()``
  surfaces failed ("Inference tensors do not track version counter", reading the
  outputs' version counters); they now run (checked against the float64 loop).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import reinit
from public_cases import Untouched
from review12c_cases import (
    calls,
    data,
    dense_hessian,
    mlp,
    oracle_curve,
    oracle_surface,
    orthogonal_net,
)
from torch import nn

import landscape_widget as lw


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_directions_leave_householder_signs_alone(seed):
    model = orthogonal_net()
    x, y = data()
    original = model[2].parametrizations.weight.original
    with Untouched(model):
        d1, d2 = lw.random_directions(model, 2, seed=seed)
        curve = lw.compute_curve(model, (x, y), direction=d1, x=(-0.02, 0.02, 5),
                                 progress=False, metrics=("loss",))
        surf = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-1, 1, 3),
                                  y=(-1, 1, 3), progress=False, metrics=("loss",))
    key = "2.parametrizations.weight.original"
    assert torch.count_nonzero(d1[key].diagonal()) == 0 and d1[key].abs().sum() > 0
    assert torch.equal(original.detach().diagonal().abs(), torch.ones(3))  # signs
    ref = oracle_curve(model, x, y, d1, curve.x)
    np.testing.assert_allclose(curve.loss, ref, rtol=1e-5, atol=1e-6)
    # Continuous at theta: a step of 0.01 changes the loss by about slope * 0.01 (a
    # moved sign changed it by ~0.04 whatever the step).
    slope = abs(ref[3] - ref[1]) / 0.02
    assert max(abs(ref[1] - ref[2]), abs(ref[3] - ref[2])) < 0.01 * slope + 1e-3
    np.testing.assert_allclose(surf.loss, oracle_surface(model, x, y, d1, d2, surf.x,
                                                          surf.y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_hessian_eigenvectors_leave_householder_signs_alone(which):
    model = orthogonal_net()
    x, y = data()
    with Untouched(model):
        vals, vecs = lw.hessian_eigenpairs(model, (x, y), k=2, which=which)
    keys, dense = dense_hessian(model, x, y)
    key = "2.parametrizations.weight.original"
    # The dense Hessian's eigenvalues without the sign entries' rows and columns (zero).
    sizes = [model.get_parameter(k).numel() for k in keys]
    at = sum(sizes[:keys.index(key)])
    diagonal = [at + i * 8 + i for i in range(3)]  # (3, 8): entries (i, i)
    assert float(dense[diagonal].abs().max()) == 0.0
    keep = [i for i in range(len(dense)) if i not in diagonal]
    spectrum = torch.linalg.eigvalsh(dense[keep][:, keep]).numpy()
    want = spectrum[::-1][:2] if which == "largest" else spectrum[:2]
    np.testing.assert_allclose(vals, want, rtol=1e-4, atol=1e-6)
    for v in vecs:
        assert torch.count_nonzero(v[key].diagonal()) == 0
        ref = oracle_curve(model, x, y, v, [-0.01, 0.0, 0.01])
        curvature = abs(ref[0] - 2 * ref[1] + ref[2]) / 1e-4  # ~ |lambda| along v
        assert curvature < 10 * max(abs(float(vals[0])), abs(float(vals[-1]))) + 1.0


class _NoGradForward(nn.Module):
    def __init__(self, inference: bool = False):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        self.mode = torch.inference_mode if inference else torch.no_grad

    def forward(self, x):
        with self.mode():
            return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("inference", [False, True], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("call", ["hessian_eigenpairs", "hessian_trace", "hessian_density",
                                  "mine_direction", "side_direction", "compare_optimizers"])
def test_forward_without_autograd_is_refused_by_derivative_tools(inference, call):
    model = reinit(_NoGradForward(inference), 6).eval()
    with Untouched(model), pytest.raises(ValueError, match="through autograd") as err:
        calls(data())[call](model)
    assert "Remove the decorator" in str(err.value)


@pytest.mark.parametrize("method", ["jvp", "backward"])
def test_derivative_check_passes_differentiable_batched_products(method):
    """The check holds inside torch.func transforms and batch by batch (no false alarm)."""
    model = mlp()
    x, y = data()
    vals, _ = lw.hessian_eigenpairs(model, (x, y), k=1, method=method, batch_size=4)
    keys, dense = dense_hessian(model, x, y)
    np.testing.assert_allclose(vals, torch.linalg.eigvalsh(dense).numpy()[-1:], rtol=1e-4)


@pytest.mark.parametrize("inference", [False, True], ids=["no_grad", "inference_mode"])
def test_surfaces_of_a_forward_without_autograd(inference):
    model = reinit(_NoGradForward(inference), 6).eval()
    x, y = data()
    d1, d2 = lw.random_directions(model, 2, seed=0)
    with Untouched(model):
        surf = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-1, 1, 3),
                                  y=(-1, 1, 3), progress=False)
    ref = oracle_surface(model, x, y, d1, d2, surf.x, surf.y)
    np.testing.assert_allclose(surf.loss, ref, rtol=1e-5, atol=1e-6)
