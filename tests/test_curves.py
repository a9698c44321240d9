"""Curve taxonomy (Li, Li & Zhan 2024): the classifier, permutation directions, curvature.

Oracles are independent of the code under test:

- ``classify_curve`` is run on analytic curves whose shape is known by construction, clean
  and with seeded Gaussian noise at 1 % of their range.
- ``permutation_direction`` is tested in tests/test_permute.py.
- ``rayleigh_quotient`` is compared with a closed form (linear least squares:
  ``H = (2/N) X^T X``) and with a dense float64 Hessian of the flattened parameters from
  ``torch.autograd.functional.hessian`` (reverse-over-reverse on one flat vector, a code
  path separate from the operator's per-tensor double backward).
- Every public call leaves the user's model bit-identical (tests/snapshots.py).
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import classification_data, reinit
from snapshots import assert_same_snapshot, snapshot
from torch import nn
from torch.func import functional_call

import landscape_widget as lw

A = np.linspace(*lw.SHAPE_X)  # the PAPERS window: 61 points on [-1.5, 1.5]
B = np.linspace(-0.5, 1.5, 41)  # the interpolation window of loss-landscape


def gauss(c: float, w: float, a=A):
    return np.exp(-((a - c) ** 2) / w)


# (name, alphas, losses, expected shape): analytic curves of known shape.
ANALYTIC = [
    ("abs", A, np.abs(A), "v-basin"),
    ("square", A, A**2, "v-basin"),
    ("shifted-right", A, (A - 0.8) ** 2, "v-side"),
    ("shifted-left", A, (A + 0.6) ** 2, "v-side"),
    # (alpha^2 - 1)^2 moved so theta sits at one minimum: ((2a - 1)^2 - 1)^2 has minima at 0
    # and 1. On [-1.5, 1.5] its quartic walls (225) dwarf the barrier (1), so it is shown on
    # the window where its two minima are visible.
    ("quartic-w-basin", B, ((2 * B - 1) ** 2 - 1) ** 2, "w-basin"),
    ("gauss-w-basin", A, 0.3 * (A - 0.5) ** 2 - gauss(0, 0.1) - gauss(1, 0.1), "w-basin"),
    ("quartic-w-peak", A, (A**2 - 1) ** 2, "w-peak"),
    ("gauss-w-peak", A, -gauss(1, 0.5) - gauss(-1, 0.5), "w-peak"),
    ("gauss-vvv", A, -gauss(-1, 0.05) - gauss(0, 0.05) - gauss(1, 0.05), "vvv-basin"),
    ("bowl-vvv", A, 0.3 * A**2 - gauss(-1, 0.1) - gauss(0, 0.1) - gauss(1, 0.1), "vvv-basin"),
]


@pytest.mark.parametrize("name,a,f,shape", ANALYTIC, ids=[c[0] for c in ANALYTIC])
def test_analytic_curves(name, a, f, shape):
    r = lw.classify_curve(a, f)
    assert r.shape == shape == str(r), r.reason
    assert r.dropped == 0
    assert r.theta_loss == pytest.approx(float(np.interp(0, a, f)))
    if shape in ("v-basin", "w-basin", "vvv-basin"):
        assert min(abs(m.alpha) for m in r.minima) < 1e-9  # theta sits exactly at one
    if shape == "w-peak":
        assert [round(m.alpha, 6) for m in r.minima] == [-1.0, 1.0]
        assert [round(m.alpha, 6) for m in r.maxima] == [0.0]


@pytest.mark.parametrize("name,a,f,shape", ANALYTIC, ids=[c[0] for c in ANALYTIC])
def test_noisy_analytic_curves(name, a, f, shape):
    """Seeded Gaussian noise with a standard deviation of 1 % of the curve's range."""
    for seed in range(10):
        noise = np.random.default_rng(seed).normal(0, 0.01 * np.ptp(f), f.size)
        assert lw.classify_curve(a, f + noise).shape == shape, seed


def test_extrema_are_reported():
    r = lw.classify_curve(A, -gauss(-1, 0.05) - gauss(0, 0.05) - gauss(1, 0.05))
    assert [round(m.alpha, 6) for m in r.minima] == [-1.0, 0.0, 1.0]
    assert [round(m.alpha, 6) for m in r.maxima] == [-0.5, 0.5]
    assert all(m.loss == pytest.approx(-1, abs=1e-6) for m in r.minima)
    assert all(m.prominence > 0.05 * r.span for m in r.minima + r.maxima)
    assert not any(m.edge for m in r.minima)


def test_flat_monotonic_and_concave_curves():
    """Documented choices: flat -> other; monotonic -> v-side (minimum at the edge)."""
    flat = lw.classify_curve(A, np.full(A.size, 0.3))
    assert flat.shape == "other" and "flat" in flat.reason
    assert lw.classify_curve(A, np.full(A.size, 0.3) + 1e-13 * A).shape == "other"
    for f, edge in ((A, -1.5), (-A, 1.5), (np.exp(A), -1.5)):
        r = lw.classify_curve(A, f)
        assert r.shape == "v-side"
        assert len(r.minima) == 1 and r.minima[0].edge and r.minima[0].alpha == edge
    # A cap (theta at a maximum, falling to both edges): minima at the edges.
    r = lw.classify_curve(A, -(A**2))
    assert r.shape == "w-peak" and all(m.edge for m in r.minima)


def test_other_shapes():
    four = -gauss(-1.2, 0.02) - gauss(-0.4, 0.02) - gauss(0.4, 0.02) - gauss(1.2, 0.02)
    assert lw.classify_curve(A, four).shape == "other"
    # Three minima, theta at an outer one.
    shifted = -gauss(0, 0.02) - gauss(0.6, 0.02) - gauss(1.2, 0.02) + 0.1 * A**2
    assert lw.classify_curve(A, shifted).shape == "other"
    # Two minima on one side of theta: theta on the slope, at neither minimum nor a peak.
    assert lw.classify_curve(A, 0.2 * A**2 - gauss(0.6, 0.02) - gauss(1.2, 0.02)).shape == (
        "other")


def test_nan_and_inf_are_left_out():
    f = A**2
    g = f.copy()
    g[[3, 17, 44]] = np.nan
    g[0] = np.inf
    r = lw.classify_curve(A, g)
    assert r.shape == "v-basin" and r.dropped == 4
    # A NaN at theta itself: f(0) is interpolated from its neighbours.
    g = f.copy()
    g[30] = np.nan
    r = lw.classify_curve(A, g)
    assert r.dropped == 1 and r.theta_loss == pytest.approx(0.0025)
    assert lw.classify_curve(A, np.full(A.size, np.nan)).shape == "other"
    g = f.copy()
    g[A < 0.1] = np.nan  # nothing finite left of theta
    assert lw.classify_curve(A, g).shape == "other"


def test_unsorted_input_and_curve_objects():
    order = np.random.default_rng(0).permutation(A.size)
    assert lw.classify_curve(A[order], ((A - 0.8) ** 2)[order]).shape == "v-side"
    curve = lw.Curve(A, (A**2 - 1) ** 2)
    assert lw.classify_curve(curve).shape == "w-peak"


@pytest.mark.parametrize("args,kwargs,err,match", [
    ((A, A[:-1]), {}, ValueError, "equal length"),
    ((np.linspace(0.1, 1, 11), np.ones(11)), {}, ValueError, "alpha = 0"),
    ((np.array([-1.0, 0.0, 0.0, 1.0]), np.ones(4)), {}, ValueError, "duplicates"),
    ((np.array([-1.0, 1.0]), np.ones(2)), {}, ValueError, "at least 3"),
    ((A, A**2), {"prominence": 0}, ValueError, "prominence"),
    ((A, A**2), {"center": -1}, ValueError, "center"),
    ((A,), {}, TypeError, "losses"),
    ((A, ["a"] * A.size), {}, TypeError, "numeric"),
    ((lw.Curve(A, None),), {}, ValueError, "no loss"),
])
def test_classifier_errors(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        lw.classify_curve(*args, **kwargs)


# --- Rayleigh quotient --------------------------------------------------------------------------
def _flat_hessian(model: nn.Module, data, loss_fn=F.cross_entropy) -> tuple[torch.Tensor, list]:
    """Dense Hessian of the mean loss w.r.t. all parameters, flattened, in float64."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().double().reshape(-1) for _, p in model.named_parameters()])
    ref = copy.deepcopy(model).double().eval()
    x, y = data
    x = x.double()

    def f(flat):
        parts, i = {}, 0
        for k, s in zip(names, shapes, strict=True):
            n = int(np.prod(s))
            parts[k] = flat[i:i + n].reshape(s)
            i += n
        return loss_fn(functional_call(ref, parts, (x,)), y)

    return torch.autograd.functional.hessian(f, flat0), names


def _flat(d: dict, names: list) -> torch.Tensor:
    return torch.cat([d[k].double().reshape(-1) for k in names])


def _random_dir(model: nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in
            model.named_parameters()}


def test_rayleigh_quotient_closed_form_least_squares():
    """L(w) = mean((Xw - y)^2) has H = (2/N) X^T X exactly."""
    x, _ = classification_data(30, (4,), 2, seed=20)
    y = torch.randn(30, 1, generator=torch.Generator().manual_seed(21))
    model = nn.Linear(4, 1, bias=False).double()
    d = {"weight": torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.float64)}
    hess = 2 / 30 * x.double().T @ x.double()
    v = d["weight"].reshape(-1)
    expected = float(v @ hess @ v / (v @ v))
    got = lw.rayleigh_quotient(model, (x.double(), y.double()), d, loss_fn=F.mse_loss)
    assert got == pytest.approx(expected, rel=1e-10)


def _bn_chain(seed: int) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                          nn.Linear(3 * 2 * 2, 3))
    return reinit(model, seed).eval()


@pytest.mark.parametrize("build,shape,classes", [
    (lambda: reinit(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)), 8, gain=2.0),
     (5,), 3),
    (lambda: _bn_chain(9), (2, 4, 4), 3),
])
def test_rayleigh_quotient_matches_dense_hessian(build, shape, classes):
    data = classification_data(24, shape, classes, seed=22)
    for dtype, rel in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        model = build().to(dtype)
        hess, names = _flat_hessian(model, data)
        for seed in range(3):
            d = _random_dir(model, seed)
            v = _flat(d, names)
            expected = float(v @ hess @ v / (v @ v))
            got = lw.rayleigh_quotient(model, (data[0].to(dtype), data[1]), d)
            assert got == pytest.approx(expected, rel=rel, abs=1e-7), (dtype, seed)


def test_rayleigh_quotient_scale_invariant_and_ignores_buffers():
    model = _bn_chain(10)
    data = classification_data(24, (2, 4, 4), 3, seed=23)
    d = _random_dir(model, 0)
    q = lw.rayleigh_quotient(model, data, d)
    assert lw.rayleigh_quotient(model, data, {k: -3 * v for k, v in d.items()}) == (
        pytest.approx(q, rel=1e-5))
    with_buffers = {**d, "1.running_mean": torch.ones(3)}
    assert lw.rayleigh_quotient(model, data, with_buffers) == pytest.approx(q, rel=1e-6)
    with pytest.raises(ValueError, match="zero on every parameter"):
        lw.rayleigh_quotient(model, data, {k: torch.zeros_like(v) for k, v in d.items()})
    with pytest.raises(ValueError, match="no data"):
        lw.rayleigh_quotient(model, None, d)
    with pytest.raises(ValueError, match="missing keys"):
        lw.rayleigh_quotient(model, data, {"0.weight": d["0.weight"]})


# --- the user's model stays bit-identical ---------------------------------------------------
class NoDeepcopy(nn.Sequential):
    def __deepcopy__(self, memo):
        raise TypeError("this model refuses deepcopy")


def _chain_cnn(cls=nn.Sequential) -> nn.Module:
    model = cls(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
                nn.Conv2d(4, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    model = reinit(model, 11).train()  # train mode: the calls must not switch it off
    params = list(model.parameters())
    params[0].requires_grad_(False)
    params[-1].grad = torch.randn(params[-1].shape, generator=torch.Generator().manual_seed(0))
    return model


def _cancelled_wine_bottle(m, data):
    cancel = threading.Event()

    def callback(step, total, loss):
        if step == 2:
            cancel.set()

    lw.mine_plane(m, data, "wine-bottle", steps=20, progress=False, cancel=cancel,
                  callback=callback)


def _failing_mining(m, data):
    calls = {"n": 0}

    def loss_fn(out, y):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("boom")
        return F.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        lw.mine_direction(m, data, "w-peak", steps=5, progress=False, loss_fn=loss_fn)


STATE_CALLS = {
    "mine-w-peak": lambda m, d: lw.mine_direction(m, d, "w-peak", steps=3, progress=False),
    "mine-vvv-batch-bn": lambda m, d: lw.mine_direction(m, d, "vvv-basin", steps=3, bn="batch",
                                                        progress=True),
    "mine-all-params": lambda m, d: lw.mine_direction(m, d, steps=2, ignore=None,
                                                      progress=False),
    "plane-saddle": lambda m, d: lw.mine_plane(m, d, "saddle", steps=3, progress=False),
    "plane-wine-cancelled": _cancelled_wine_bottle,
    "mining-fails": _failing_mining,
    "side": lambda m, d: lw.side_direction(m, d),
    "side-batch-bn": lambda m, d: lw.side_direction(m, d, bn="batch"),
    "permutation": lambda m, d: lw.permutation_direction(m),
    "rayleigh": lambda m, d: lw.rayleigh_quotient(m, d, lw.random_direction(m, seed=0)),
}


@pytest.mark.parametrize("call", list(STATE_CALLS))
@pytest.mark.parametrize("cls", [nn.Sequential, NoDeepcopy], ids=["copyable", "no-deepcopy"])
def test_model_untouched(call, cls):
    model = _chain_cnn(cls)
    data = classification_data(20, (3, 6, 6), 5, seed=24)
    before = snapshot(model)
    # A class refusing deepcopy is copied part by part (params.evaluation_copy), so the
    # Hessian operator takes it too.
    STATE_CALLS[call](model, data)
    after = snapshot(model)
    assert_same_snapshot(before, after)
    assert before["training"] == after["training"]
    assert before["track"] == after["track"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["grad"].keys() == after["grad"].keys()
    for k, g in before["grad"].items():
        assert (g is None) == (after["grad"][k] is None)
        assert g is None or torch.equal(g, after["grad"][k])


def test_flat_floor_and_exact_ties():
    """Found in review: the grid argmin wandering along a flat floor, and tied dips."""
    g = np.random.default_rng(0)
    for width in (0.3, 0.6, 1.0):  # theta on a floor, the noise 1e-6 of the span
        f = np.maximum(np.abs(A) - width, 0) ** 2
        labels = {lw.classify_curve(A, f + 1e-6 * g.standard_normal(A.size)).shape
                  for _ in range(20)}
        assert labels == {"v-basin"}, (width, labels)
    # Two equal, insignificant dips on a basin floor: one basin, however the tie falls.
    f = A**2 + 1.0
    dips = 1e-3 * (np.exp(-((A - 0.2) ** 2) / 1e-3) + np.exp(-((A + 0.2) ** 2) / 1e-3))
    for eps in (0.0, 1e-12, -1e-12):
        h = f - dips
        h[np.argmin(np.abs(A - 0.2))] -= eps
        assert lw.classify_curve(A, h).shape == "v-basin"
    # An exactly symmetric w-peak keeps both minima (the tie decides nothing).
    assert lw.classify_curve(A, (A**2 - 1) ** 2).shape == "w-peak"


def test_side_direction_near_convergence_is_still_a_v_side():
    """One tiny step already overshoots the minimum; the line search must shrink it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    w = torch.randn(1, 5, generator=g, dtype=torch.float64)
    net = nn.Linear(5, 1, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(w + 1e-5 * torch.randn(1, 5, generator=g, dtype=torch.float64))
    d = lw.side_direction(net, (x, x @ w.T), loss_fn=F.mse_loss)
    curve = lw.compute_curve(net, (x, x @ w.T), direction=d, x=lw.SHAPE_X,
                             loss_fn=F.mse_loss, progress=False)
    r = lw.classify_curve(curve)
    assert r.shape == "v-side" and r.minima[0].alpha == pytest.approx(0.75, abs=0.06)
