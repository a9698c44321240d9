"""Review 10a: precision= and compile= on models and paths not tested before.

Each test checks a property against an independent oracle: the float64 per-point loop of
tests/oracle.py, or the model run by hand in the precision asked for.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from oracle import naive_surface
from snapshots import assert_same_snapshot, snapshot
from torch import nn

import landscape_widget as lw
from landscape_widget.core import _remote

XS = np.linspace(-1, 1, 3)


class Det(nn.Module):
    """A determinant between two layers: oneDNN has no bf16 LU, so bf16 fails on a CPU."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b = nn.Linear(6, 8), nn.Linear(2, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        return self.b(torch.det(self.a(x).reshape(-1, 2, 2, 2)))


def det_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(30, 6, generator=g), torch.randint(0, 3, (30,), generator=g)


class FreshWorkers(ThreadPoolExecutor):
    """Every task on a new "worker": this process's cached evaluators are forgotten first.

    As on a cluster, where the first tile's worker chooses the plan and each other worker
    builds its own evaluator and adopts that plan; deterministic, unlike two processes.
    """

    def __init__(self):
        super().__init__(1)

    def submit(self, fn, /, *args, **kwargs):
        def task():
            with _remote._CACHE_LOCK:
                _remote._EVALUATORS.clear()
            return fn(*args, **kwargs)

        return super().submit(task)


def test_executor_workers_adopt_the_first_workers_precision_fallback():
    # The first tile's worker fell back to fp32 (bf16 failed on the model) and every other
    # worker adopted its plan, but computed under bf16 autocast: the grid raised
    # NotImplementedError ("lu_cpu" not implemented for 'BFloat16') as soon as a second
    # worker took a tile. The fallback's warning went to the worker's stderr only.
    model, (x, y) = Det().eval(), det_data()
    d1, d2 = lw.random_directions(model, 2, seed=1)
    before = snapshot(model)
    with FreshWorkers() as pool, pytest.warns(RuntimeWarning, match="precision='bf16' failed"):
        s = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-1, 1, 3), y=(-1, 1, 3),
                               precision="bf16", executor=pool, tile_points=2, progress=False)
    assert_same_snapshot(before, snapshot(model))
    assert s.spec["executor"]["tiles"] == 5
    assert s.spec["precision"] == "fp32" and "bf16 failed" in s.spec["plan"]["precision_note"]
    assert s.spec["precision_error"] is None
    want, _ = naive_surface(model, x, y, d1, d2, XS, XS)
    np.testing.assert_allclose(s.loss, want, rtol=1e-5)


def mlp():
    torch.manual_seed(3)  # the tests' models never depend on the global generator's state
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).eval()


def test_executor_precision_error_is_the_largest_over_all_workers():
    # Each worker measures |bf16 - fp32| on the first points it computes, and spec took the
    # latest tile's worker's alone: another worker's larger error (or overflow) was lost.
    # With one point per new worker, every point is measured: the grid's largest gap.
    model, (x, y) = mlp(), det_data()
    d1, d2 = lw.random_directions(model, 2, seed=1)
    with FreshWorkers() as pool:
        s = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-1, 1, 3), y=(-1, 1, 3),
                               precision="bf16", executor=pool, tile_points=1, progress=False)
    assert s.spec["precision"] == "bf16" and s.spec["executor"]["tiles"] == 9
    want, _ = naive_surface(model, x, y, d1, d2, XS, XS)
    gap = np.abs(s.loss - want).max()
    assert gap > 1e-4  # bf16 differs measurably here
    assert s.spec["precision_error"] == pytest.approx(gap, abs=1e-5 * np.abs(want).max())


def test_precision_error_is_inf_where_bf16_overflows_away_from_the_checked_points():
    # precision_error was measured on the first 3 points only (the diagonal of a 3 x 3
    # grid, in its order); bf16 overflowing at another point (NaN there, finite in fp32)
    # left it at the diagonal's small error.
    model = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    x, y = torch.ones(1, 2), torch.ones(1, dtype=torch.long)
    k = 1.7e38  # at (1, -1) the first logit is 1 + 2k: finite in float32, inf in bf16
    d1 = {"weight": torch.tensor([[k, 0.0], [0.0, 0.0], [0.0, 0.0]])}
    d2 = {"weight": torch.tensor([[0.0, -k], [0.0, 0.0], [0.0, 0.0]])}
    kw = dict(directions=(d1, d2), x=(-1, 1, 3), y=(-1, 1, 3), progress=False)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        s = lw.compute_surface(model, (x, y), precision="bf16", **kw)
    logit = torch.tensor([[1 + a * k - b * k for a in XS] for b in XS])
    want = torch.nn.functional.cross_entropy(  # by hand, in float32
        torch.stack([logit, torch.zeros_like(logit), torch.zeros_like(logit)], -1).reshape(9, 3),
        torch.ones(9, dtype=torch.long), reduction="none").reshape(3, 3)
    assert torch.isfinite(want).all()
    assert np.isnan(s.loss[0, 2]) and np.isfinite(np.diag(s.loss)).all()
    assert s.spec["precision_error"] == float("inf")
    # fp32 is finite at every point (the engine agrees with the float32 oracle).
    exact = lw.compute_surface(model, (x, y), precision="fp32", **kw)
    np.testing.assert_allclose(exact.loss, want.numpy(), rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_the_note_says_a_bf16_or_float64_model_computes_in_its_own_dtype(dtype):
    # precision="fp32" (the default) on a bf16 model said "true fp32 (TF32 off ...)" while
    # every forward ran in bfloat16 (far from the float64 oracle), and on a float64 model
    # while it ran in float64.
    model = mlp().to(dtype)
    x, y = det_data()
    d1, d2 = lw.random_directions(model, 2, seed=1)
    s = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-1, 1, 3), y=(-1, 1, 3),
                           progress=False)
    want, _ = naive_surface(model, x, y, d1, d2, XS, XS)
    rel = np.abs(s.loss - want).max() / np.abs(want).max()
    name = str(dtype).removeprefix("torch.")
    note = s.spec["plan"]["precision_note"]
    assert "true fp32" not in note and f"computed in {name}" in note
    if dtype == torch.bfloat16:
        assert rel > 1e-4  # not fp32: bf16 rounding
    else:
        assert rel < 1e-12


def test_compile_true_compiles_every_model_of_a_session():
    # Every evaluator compiled the same inner function, whose code object dynamo caches
    # graphs on: past torch._dynamo.config.recompile_limit (8) models or precisions in one
    # session it ran eagerly, silently, while spec said "compiled". The limit is 1 here,
    # so the second model is the one past it. Dynamo's own counter says what it compiled.
    from torch._dynamo.utils import counters

    x, y = det_data()
    with torch._dynamo.config.patch(recompile_limit=1):
        for width in (5, 7):
            torch.manual_seed(width)
            model = nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 3)).eval()
            d1, d2 = lw.random_directions(model, 2, seed=1)
            before = counters["stats"]["unique_graphs"]
            s = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-1, 1, 3),
                                   y=(-1, 1, 3), compile=True, progress=False)
            assert s.spec["plan"]["compiled"]
            assert counters["stats"]["unique_graphs"] > before, width
            want, _ = naive_surface(model, x, y, d1, d2, XS, XS)
            np.testing.assert_allclose(s.loss, want, rtol=1e-5)
        # Again (the cached plan, compiled): it measured no eager pass, so it names no eager
        # time (it gave the first call's compiled s/point as "eager").
        again = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-1, 1, 3),
                                   y=(-1, 1, 3), compile=True, progress=False)
        assert again.spec["plan"]["compiled"]
        assert "eager" not in again.spec["plan"]["compile_note"]
        np.testing.assert_allclose(again.loss, want, rtol=1e-5)


class OwnAutocast(nn.Module):
    """A float32 model whose forward runs under its own bf16 autocast."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.net = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.net(x)


@pytest.mark.parametrize("stem", [True, "auto"])
def test_a_forward_under_its_own_autocast_is_computed_and_noted_as_bf16(stem):
    # precision="fp32" said "true fp32" for a model whose forward is bf16 by its own
    # autocast (the engine leaves it, as it should: it is the model's arithmetic). With
    # stem=True the linear stem's safety net raised "Float did not match BFloat16": its
    # traced suffix had lost the autocast. (One point at a time: K points under vmap
    # round bf16 otherwise than the model's own call, by 5e-4 here.)
    model = OwnAutocast().eval()
    x, y = det_data()
    d1, d2 = lw.random_directions(model, 2, seed=1)
    before = snapshot(model)
    s = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-1, 1, 3), y=(-1, 1, 3),
                           progress=False, evaluator_options={"strategy": "loop", "stem": stem})
    assert_same_snapshot(before, snapshot(model))
    # The oracle: the model itself at each point (its autocast on), logits to float64.
    ref = OwnAutocast().eval()
    want = []
    for b in XS:
        for a in XS:
            ref.load_state_dict({k: (v.double() + a * d1[k].double() + b * d2[k].double())
                                 .float() for k, v in model.state_dict().items()})
            with torch.no_grad():
                want.append(float(torch.nn.functional.cross_entropy(ref(x).double(), y)))
    np.testing.assert_allclose(s.loss.ravel(), want, rtol=1e-5)
    exact, _ = naive_surface(model, x, y, d1, d2, XS, XS)  # float64: autocast leaves it
    assert np.abs(s.loss - exact).max() > 1e-4  # bf16, not fp32
    note = s.spec["plan"]["precision_note"]
    assert "forward returns bfloat16" in note and "compute in bfloat16" in note


class Noisy(nn.Module):
    """Draws noise in its forward (eval mode too), as a VAE's sampling does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h + 0.5 * torch.randn_like(h))


def test_compile_true_draws_the_same_noise_as_the_eager_points():
    # Inductor generated its own random numbers: the compiled points of a grid saw other
    # noise than the eager ones its plan trials computed (and than compile=False), off by
    # 0.08 of a loss of 1.2, a grid mixing two noise draws.
    from landscape_widget.core.rng import FORWARD_SEED

    model = Noisy().eval()
    x, y = det_data()
    d1, d2 = lw.random_directions(model, 2, seed=1)
    before = snapshot(model)
    s = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-1, 1, 3), y=(-1, 1, 3),
                           compile=True, progress=False)
    assert_same_snapshot(before, snapshot(model))
    assert s.spec["plan"]["compiled"] and s.spec["plan"]["batch"] == len(x)
    # The oracle: the model at each point, its draws seeded as documented (core/rng.py:
    # FORWARD_SEED + the batch's first sample, here one batch of all samples).
    ref = Noisy().eval()
    want = []
    for b in XS:
        for a in XS:
            ref.load_state_dict({k: (v.double() + a * d1[k].double() + b * d2[k].double())
                                 .float() for k, v in model.state_dict().items()})
            with torch.no_grad(), torch.random.fork_rng():
                torch.manual_seed(FORWARD_SEED)
                want.append(float(torch.nn.functional.cross_entropy(ref(x).double(), y)))
    np.testing.assert_allclose(s.loss.ravel(), want, rtol=1e-5)
