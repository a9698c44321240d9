"""Acceptance 1: surfaces and curves equal a naive float64 per-point loop (tests/oracle.py).

Each case (tests/cases.py) runs with every engine strategy it lists; the engine computes
in float32, the oracle in float64, so agreement to 1e-5 relative is the engine's own
rounding, not a shared shortcut.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from cases import (
    CASE_IDS,
    CASES,
    STRATEGY_CASE_IDS,
    STRATEGY_CASES,
    bn_res_cnn,
    build,
    cnn_data,
    engine_options,
    gaussian_direction,
    resnet18,
    resnet_data,
)
from oracle import linspace, naive_eval, naive_surface

import landscape_widget as lw

RTOL = 1e-5


def _directions(model):
    """One library direction (filter-normalised, biases zero) and one test-made Gaussian
    direction that also moves biases and BatchNorm scales."""
    return lw.random_direction(model, seed=1), gaussian_direction(model, seed=2)


@pytest.mark.parametrize(("case", "strategy"), STRATEGY_CASES, ids=STRATEGY_CASE_IDS)
def test_surface_matches_naive_loop(case, strategy):
    model, x, y, data = build(case)
    d1, d2 = _directions(model)
    surf = lw.compute_surface(
        model, data, directions=(d1, d2), x=case["x"], y=case["y"], loss_fn=case["loss_fn"],
        metrics=case["metrics"], bn=case["bn"], progress=False,
        evaluator_options=engine_options(case, strategy, len(y)),
    )
    xs, ys = linspace(case["x"]), linspace(case["y"])
    np.testing.assert_array_equal(surf.x, xs)
    np.testing.assert_array_equal(surf.y, ys)
    want_loss, want_acc = naive_surface(model, x, y, d1, d2, xs, ys, loss_fn=case["loss_fn"],
                                        bn=case["bn"])
    assert surf.loss.shape == (len(ys), len(xs))
    np.testing.assert_allclose(surf.loss, want_loss, rtol=RTOL, atol=0)
    if "accuracy" in case["metrics"]:
        assert surf.accuracy.shape == (len(ys), len(xs))
        np.testing.assert_allclose(surf.accuracy, want_acc, rtol=0, atol=1e-12)
    else:
        assert surf.accuracy is None
    # The landscape must not be flat, or the comparison would prove little.
    assert np.ptp(want_loss) > 1e-3 * np.abs(want_loss).max()


@pytest.mark.parametrize(("case", "strategy"), STRATEGY_CASES, ids=STRATEGY_CASE_IDS)
def test_curve_matches_naive_loop(case, strategy):
    model, x, y, data = build(case)
    d = gaussian_direction(model, seed=3)
    curve = lw.compute_curve(
        model, data, direction=d, x=case["curve_x"], loss_fn=case["loss_fn"],
        metrics=case["metrics"], bn=case["bn"], progress=False,
        evaluator_options=engine_options(case, strategy, len(y)),
    )
    xs = linspace(case["curve_x"])
    np.testing.assert_array_equal(curve.x, xs)
    want_loss, want_acc = naive_eval(model, x, y, [d], xs[:, None], loss_fn=case["loss_fn"],
                                     bn=case["bn"])
    assert curve.loss.shape == xs.shape
    np.testing.assert_allclose(curve.loss, want_loss, rtol=RTOL, atol=0)
    if "accuracy" in case["metrics"]:
        np.testing.assert_allclose(curve.accuracy, want_acc, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", [c for c in CASES if c["name"] in ("mlp", "cnn-bn-res", "tied")],
                         ids=["mlp", "cnn-bn-res", "tied"])
def test_default_directions_match_naive_loop(case):
    """directions=None draws ``random_directions(model, 2, seed=seed)``, d1 along x."""
    model, x, y, data = build(case)
    surf = lw.compute_surface(model, data, x=case["x"], y=case["y"], seed=7, progress=False)
    d1, d2 = lw.random_directions(model, 2, seed=7)
    for got, want in zip(surf.directions, (d1, d2), strict=True):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    want_loss, _ = naive_surface(model, x, y, d1, d2, surf.x, surf.y)
    np.testing.assert_allclose(surf.loss, want_loss, rtol=RTOL, atol=0)


def _naive_loss(model, x, y):
    return naive_eval(model, x, y, [], np.zeros((1, 0)))[0][0]


def _pair(factory, seeds, data):
    a, b = factory(seeds[0]).eval(), factory(seeds[1]).eval()
    x, y = data()
    return a, b, x, y


@pytest.mark.parametrize("strategy", ["auto", "vmap", "loop"])
def test_interpolation_endpoints_and_curve_with_bn(strategy):
    """PAPERS (a2): alpha = 0 and 1 give L(model_a) and L(model_b); running stats move too."""
    a, b, x, y = _pair(bn_res_cnn, (3, 30), cnn_data)
    d = lw.interpolation_direction(a, b)
    opts = {} if strategy == "auto" else {"strategy": strategy}
    curve = lw.compute_curve(a, (x, y), direction=d, x=(-0.5, 1.5, 9), progress=False,
                             evaluator_options=opts)
    assert curve.x[2] == 0.0 and curve.x[6] == 1.0
    np.testing.assert_allclose(curve.loss[2], _naive_loss(a, x, y), rtol=1e-6)
    np.testing.assert_allclose(curve.loss[6], _naive_loss(b, x, y), rtol=1e-6)
    want, want_acc = naive_eval(a, x, y, [d], curve.x[:, None])
    np.testing.assert_allclose(curve.loss, want, rtol=RTOL, atol=0)
    np.testing.assert_allclose(curve.accuracy, want_acc, rtol=0, atol=1e-12)


def test_interpolation_without_buffers_keeps_model_a_statistics():
    a, b, x, y = _pair(bn_res_cnn, (3, 30), cnn_data)
    d = lw.interpolation_direction(a, b, buffers=False)
    assert set(d) == {k for k, _ in a.named_parameters()}
    curve = lw.compute_curve(a, (x, y), direction=d, x=(0.0, 1.0, 2), progress=False)
    mixed = copy.deepcopy(a)  # b's parameters, a's running statistics
    mixed.load_state_dict({k: v for k, v in b.state_dict().items() if "running" not in k
                           and "num_batches" not in k}, strict=False)
    np.testing.assert_allclose(curve.loss[0], _naive_loss(a, x, y), rtol=1e-6)
    np.testing.assert_allclose(curve.loss[1], _naive_loss(mixed, x, y), rtol=1e-6)
    # The running statistics matter here, so this is not the same as reaching model_b.
    assert abs(_naive_loss(mixed, x, y) - _naive_loss(b, x, y)) > 1e-3


def test_interpolation_direction_contents():
    a, b, _, _ = _pair(bn_res_cnn, (3, 30), cnn_data)
    d = lw.interpolation_direction(a, b)
    sa, sb = a.state_dict(), b.state_dict()
    float_keys = {k for k, v in sa.items() if torch.is_floating_point(v)}
    assert set(d) == float_keys
    assert not any("num_batches_tracked" in k for k in d)
    for k in d:
        assert torch.equal(d[k], sb[k] - sa[k]), k


def test_interpolation_endpoints_resnet18():
    a, b, x, y = _pair(resnet18, (4, 40), resnet_data)
    d = lw.interpolation_direction(a, b)
    curve = lw.compute_curve(a, (x, y), direction=d, x=(0.0, 1.0, 2), progress=False,
                             evaluator_options={"strategy": "loop"})
    np.testing.assert_allclose(curve.loss[0], _naive_loss(a, x, y), rtol=1e-5)
    np.testing.assert_allclose(curve.loss[1], _naive_loss(b, x, y), rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_origin_is_the_model_itself(case):
    """PAPERS (a2): on an odd grid symmetric about 0 the centre value is L(theta) to 1e-6."""
    model, x, y, data = build(case)
    big = case["name"].startswith("resnet")
    grid = (-0.1, 0.1, 3) if big else (-1.0, 1.0, 5)
    surf = lw.compute_surface(model, data, x=grid, y=(0.0, 0.0, 1) if big else (-0.5, 0.5, 3),
                              loss_fn=case["loss_fn"],
                              metrics=case["metrics"], bn=case["bn"], seed=0, progress=False,
                              evaluator_options=engine_options(case, case["strategies"][0],
                                                               len(y)))
    cy, cx = surf.y.size // 2, grid[2] // 2
    assert surf.x[cx] == 0.0 and surf.y[cy] == 0.0
    want = naive_eval(model, x, y, [], np.zeros((1, 0)), loss_fn=case["loss_fn"], bn=case["bn"])
    np.testing.assert_allclose(surf.loss[cy, cx], want[0][0], rtol=1e-6)
