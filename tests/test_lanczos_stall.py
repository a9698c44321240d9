"""Lanczos stops when its residuals stop shrinking (review 11b: a tolerance below float32's
rounding floor ran for 16 CPU-minutes of Lanczos, then ARPACK without a limit)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

import landscape_widget as lw
from landscape_widget.core.lanczos import STALL_STEPS, extreme_pairs


def _noisy_operator(n: int, noise: float):
    """``diag(1..n) v`` plus a fresh random vector of ``noise * n * |v|``: a floor of about
    ``noise`` on every relative residual, as rounding leaves one."""
    diag = torch.arange(1, n + 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)

    def matvec(v):
        return diag.to(v.dtype) * v + noise * n * v.norm() * torch.randn(
            n, generator=g, dtype=v.dtype)
    return matvec


def test_a_floor_above_tol_stops_the_run_as_stalled():
    n = 3000
    v0 = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # float32, as the floor of 1e-6 is one (in float64 rounding leaves no such floor).
    found = extreme_pairs(_noisy_operator(n, 1e-6), v0.float(), tol=1e-12)
    assert found["stalled"] and not found["converged"]
    assert found["products"] < 2 * STALL_STEPS + 200 < n  # well before the basis is full
    # What it reports is still the top eigenvalue, to the floor's accuracy.
    assert abs(found["largest"][0][0] - n) < 1e-3 * n
    # Without the floor the same tolerance converges: a stall is not a slow convergence.
    exact = extreme_pairs(_noisy_operator(n, 0.0), v0, tol=1e-8)
    assert exact["converged"] and not exact["stalled"]


def test_hessian_eigenpairs_below_float32s_floor_stops_and_says_why():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 32), nn.Tanh(), nn.Linear(32, 5))  # 1,477 params
    data = (torch.randn(64, 40), torch.randint(0, 5, (64,)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = lw.hessian_eigenpairs(model, data, k=1, tol=1e-12)
    assert not pairs.converged and pairs.solver == "lanczos"  # no unbounded ARPACK after
    assert pairs.products < 1477
    assert any("stopped shrinking" in str(w.message) and "float64" in str(w.message)
               for w in caught)
    # The value it gives is the float64 dense Hessian's top eigenvalue to float32 accuracy.
    dense = lw.hessian_eigenpairs(model.double(), (data[0].double(), data[1]), k=1,
                                  tol=1e-10)
    assert dense.converged
    np.testing.assert_allclose(pairs.values, dense.values, rtol=1e-5)


def test_a_slow_float64_run_is_not_taken_for_a_stall():
    # A dense top of the spectrum (1 - t**2): the second pair's residual takes more than
    # STALL_STEPS products to halve, far above float64's rounding. Before, the run stopped
    # as 'stalled' at 502 products (and hessian_eigenpairs skipped ARPACK); it converges
    # at 800.
    n = 800
    diag = 1 - torch.linspace(0, 1, n, dtype=torch.float64) ** 2
    v0 = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    found = extreme_pairs(lambda v: diag * v, v0, k=2, tol=1e-7, steps=560)
    assert not found["stalled"] and not found["converged"]
    assert found["products"] == 560


def test_a_float64_model_below_its_floor_is_not_told_to_use_float64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 24), nn.Tanh(), nn.Linear(24, 5)).double()
    data = (torch.randn(64, 20, dtype=torch.float64), torch.randint(0, 5, (64,)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = lw.hessian_eigenpairs(model, data, k=1, tol=1e-17, ignore=None)
    assert not pairs.converged and pairs.solver == "lanczos"
    said = [str(w.message) for w in caught if "stopped shrinking" in str(w.message)]
    assert said and "Raise tol" in said[0] and "model.double()" not in said[0]
    # The value is still the top eigenvalue of torch's own dense float64 Hessian (over
    # all parameters: ignore=None).
    params = dict(model.named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def loss(v):
        out, i = {}, 0
        for k, p in params.items():
            out[k] = v[i:i + p.numel()].view_as(p)
            i += p.numel()
        logits = torch.func.functional_call(model, out, (data[0],))
        return torch.nn.functional.cross_entropy(logits, data[1])
    dense = torch.autograd.functional.hessian(loss, flat)
    np.testing.assert_allclose(pairs.values[0], torch.linalg.eigvalsh(dense)[-1].item(),
                               rtol=1e-10)
