"""The widget's curve shapes (Li, Li & Zhan 2024): mined and built directions, the 1D label.

Oracles are the headless experiments (``lw.mine_direction``, ``lw.mine_plane``,
``lw.permutation_direction``, ``lw.side_direction``, ``lw.classify_curve``) called with the
same settings, and ``lw.compute_curve`` / ``lw.compute_surface`` along what they return:
what is tested here is the plumbing (settings, caching, cancel, progress, labels), not
the experiments, which ``test_mining.py`` and ``test_curves.py`` check against analytic
oracles. Mining runs a few Adam steps (``mining_steps``) to keep the tests short.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
from snapshots import assert_same_snapshot, snapshot
from widget_cases import FakeFrontEnd
from widget_cases import worker_data as _data
from widget_cases import worker_model as _model

import landscape_widget as lw
from landscape_widget import LandscapeWidget
from landscape_widget.widget import shapes
from landscape_widget.widget.protocol import Spec

STEPS = 6
CURVE = dict(mode="1d", x_range=(-1.5, 1.5), resolution=31)


def _headless(model, data, direction: str, seed: int) -> list:
    """The directions of a curve-shape type, from the public API (the oracle)."""
    mined = dict(steps=STEPS, seed=seed, progress=False)
    if direction == "mined-w-peak":
        return [lw.mine_direction(model, data, "w-peak", **mined)]
    if direction == "mined-vvv-basin":
        return [lw.mine_direction(model, data, "vvv-basin", **mined)]
    if direction == "permutation":
        return [lw.permutation_direction(model, seed=seed)]
    if direction == "side":
        return [lw.side_direction(model, data)]
    return list(lw.mine_plane(model, data, direction, **mined))


@pytest.fixture
def bn_widget():
    """A widget on an MLP with BatchNorm (permutations move its statistics too)."""
    w = LandscapeWidget(_model(bn=True), _data(), autostart=False, mining_steps=STEPS, **CURVE)
    yield w
    w.close()


# Outside 0 <= alpha <= 1 the permutation direction can drive BatchNorm's running variance
# below zero: those points are NaN, in the widget and the oracle alike (the engine warns).
@pytest.mark.filterwarnings("ignore:.*non-finite loss:RuntimeWarning")
@pytest.mark.parametrize("direction", ["mined-w-peak", "mined-vvv-basin", "permutation", "side"])
def test_curve_types_equal_the_headless_api_and_carry_their_label(bn_widget, direction):
    model, data = bn_widget._worker.model, _data()
    before = snapshot(model)
    bn_widget.seed = 3
    bn_widget.direction = direction
    curve = bn_widget.wait(120)
    assert bn_widget.status["state"] == "done", bn_widget.status
    (d,) = _headless(model, data, direction, seed=3)
    (mine,) = bn_widget._worker.directions_for(bn_widget.spec())
    for k in d:
        torch.testing.assert_close(mine[k], d[k], rtol=0, atol=1e-7)
    ref = lw.compute_curve(model, data, direction=d, x=(-1.5, 1.5, 31), progress=False)
    np.testing.assert_allclose(curve.loss, ref.loss, rtol=1e-6, atol=1e-7)
    # The label and extrema sent equal classify_curve on the same curve.
    expected = lw.classify_curve(ref)
    sent = bn_widget.result["curve"]
    assert (sent["shape"], sent["reason"]) == (expected.shape, expected.reason)
    want = sorted([(e.alpha, "min") for e in expected.minima]
                  + [(e.alpha, "max") for e in expected.maxima])
    assert [(e["alpha"], e["kind"]) for e in sent["extrema"]] == want
    for e in sent["extrema"]:
        assert e["loss"] == pytest.approx(float(np.interp(e["alpha"], ref.x, ref.loss)), rel=1e-6)
    json.dumps(bn_widget.result["curve"], allow_nan=False)  # travels as JSON
    assert bn_widget.result["labels"][0].startswith("α (")
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("direction", ["saddle", "wine-bottle"])
def test_planes_equal_mine_plane(worker_factory, direction):  # noqa: F811
    model, data = _model(), _data()
    before = snapshot(model)
    worker, _ = worker_factory(model, data, mining_steps=STEPS)
    spec = Spec(direction=direction, norm="none", resolution=5, seed=1,
                x_range=(-1.5, 1.5), y_range=(-1.5, 1.5))
    worker.submit("p", spec)
    assert worker.wait(120) and worker.latest is not None
    u, v = _headless(model, data, direction, seed=1)
    ref = lw.compute_surface(model, data, directions=(u, v), x=(-1.5, 1.5, 5),
                             y=(-1.5, 1.5, 5), progress=False)
    np.testing.assert_allclose(worker.latest.loss, ref.loss, rtol=1e-6, atol=1e-7)
    assert worker.latest.spec["labels"][0].startswith("u (")
    assert_same_snapshot(before, snapshot(model))


def test_curve_type_in_2d_uses_an_independent_random_y(worker_factory):  # noqa: F811
    model, data = _model(), _data()
    worker, _ = worker_factory(model, data, mining_steps=STEPS)
    spec = Spec(direction="permutation", resolution=5, seed=2, norm="layer")
    worker.submit("q", spec)
    assert worker.wait(120)
    d = lw.permutation_direction(model, seed=2)
    # The seed's second draw: the first is where mining starts from.
    y = lw.random_directions(model, 2, norm="layer", seed=2)[1]
    ref = lw.compute_surface(model, data, directions=(d, y), x=(-1, 1, 5), y=(-1, 1, 5),
                             progress=False)
    np.testing.assert_allclose(worker.latest.loss, ref.loss, rtol=1e-6, atol=1e-7)
    assert worker.latest.spec["labels"][1] == "β (random direction)"


def test_mining_streams_progress_and_cancel_stops_it_quickly(worker_factory):  # noqa: F811
    statuses, mining = [], threading.Event()

    def on_status(status):
        statuses.append(status)
        if "mining step" in status.get("message", ""):
            mining.set()

    model = _model()
    before = snapshot(model)
    worker, rec = worker_factory(model, on_status=on_status, mining_steps=10**6)
    worker.submit("m", Spec(direction="mined-vvv-basin", **CURVE))
    assert mining.wait(60)
    t0 = time.perf_counter()
    worker.cancel()
    assert worker.wait(10)
    stopped_s = time.perf_counter() - t0
    assert stopped_s < 2, stopped_s
    assert rec.of("m", "cancelled") and not rec.of("m", "start")
    running = [s for s in statuses if "mining step" in s.get("message", "")]
    first = running[0]
    assert first["id"] == "m" and first["total"] == 10**6 and first["done"] >= 1
    assert "mined: vvv-basin" in first["message"] and "objective" in first["message"]
    assert statuses[-1]["state"] == "cancelled"
    assert not worker.directions.entries  # a half-mined direction is never kept
    # A new request cancels mining the same way, and runs.
    mining.clear()
    worker.submit("n", Spec(direction="mined-w-peak", **CURVE))
    assert mining.wait(60)
    worker.submit("r", Spec(**CURVE))
    assert worker.wait(30)
    assert rec.of("n", "cancelled") and rec.of("r", "done")
    assert_same_snapshot(before, snapshot(model))


def test_mined_directions_are_cached_across_windows_and_modes(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs["seed"])
        return lw.mine_direction(*args, **kwargs)

    monkeypatch.setattr(shapes, "mine_direction", counting)
    model = _model()
    w = LandscapeWidget(model, _data(), autostart=False, mining_steps=STEPS,
                        direction="mined-w-peak", **CURVE)
    try:
        front = FakeFrontEnd(w)
        w.compute()
        w.wait(60)
        for change in ({"resolution": 61}, {"x_range": [-1.0, 2.0]}, {"mode": "2d",
                                                                      "resolution": 5}):
            with w.hold_trait_notifications():
                for k, v in change.items():
                    setattr(w, k, v)
            w.wait(60)
            assert w.status["state"] == "done", w.status
        assert calls == [0]
        # 31 -> 61 points on one window: the first curve's points were reused.
        done = [m for m, _ in front.sent if m["kind"] == "done"]
        assert done[1]["reused"] == 31
        w.seed = 1  # a new seed is a new direction
        w.wait(60)
        assert calls == [0, 1]
        with torch.no_grad():  # the model trained further: new directions
            next(model.parameters()).add_(0.01)
        w.seed = 0
        w.wait(60)
        assert calls == [0, 1, 0]
    finally:
        w.close()


def test_permutation_of_a_residual_net_has_equal_ends():
    model = lw.demo.mlp((6, 8, 8, 3), residual=True)
    before = snapshot(model)
    w = LandscapeWidget(model, _data(), autostart=False, mode="1d", x_range=(0, 1),
                        resolution=5)
    try:
        w.direction = "permutation"
        curve = w.wait(60)
        assert w.status["state"] == "done"
        assert curve.loss[0] == pytest.approx(curve.loss[-1], rel=1e-5)
    finally:
        w.close()
    assert_same_snapshot(before, snapshot(model))


def test_permutation_with_nothing_to_permute_is_a_status_error():
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LayerNorm(4),
                                torch.nn.Linear(4, 3))
    before = snapshot(model)
    w = LandscapeWidget(model, _data(), autostart=False, resolution=5)
    try:
        front = FakeFrontEnd(w)
        w.direction = "permutation"
        w.wait(60)
        assert w.status["state"] == "error" and "LayerNorm" in w.status["message"]
        (err,) = front.errors()
        assert "no hidden unit can be permuted" in err["message"]
        w.direction = "random"  # the widget lives on
        assert w.wait(60).loss.shape == (5, 5) and w.status["state"] == "done"
    finally:
        w.close()
    assert_same_snapshot(before, snapshot(model))


def test_entries_windows_and_refusals():
    model, data = _model(), _data()
    w = LandscapeWidget(model, data, autostart=False, resolution=5)
    try:
        types = {d["direction"]: d for d in w.direction_types}
        assert types["permutation"]["label"] == "permutation (w-basin)"
        assert types["mined-w-peak"]["window"] == [-1.5, 1.5, 61]  # lw.SHAPE_X
        assert types["saddle"]["shape"] == "surface"
        front = FakeFrontEnd(w)
        for direction in ("saddle", "wine-bottle"):
            w.handle_message({"kind": "compute", "id": "x", "spec": {
                **Spec(direction=direction, mode="1d", resolution=5).to_dict()}})
        assert front.kinds() == ["error"] * 2
        assert "2D surface" in front.errors()[0]["message"]
    finally:
        w.close()
    for bad, err in ((-1, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(err, match="mining_steps"):
            LandscapeWidget(model, data, autostart=False, mining_steps=bad)


def test_only_complete_loss_curves_with_theta_are_labelled():
    a = np.linspace(-1.5, 1.5, 61)
    curve = lw.Curve(a, (a**2 - 1) ** 2)
    assert shapes.curve_info(curve, complete=True)["shape"] == "w-peak"
    assert shapes.curve_info(curve, complete=False) is None
    assert shapes.curve_info(lw.Curve(a + 2, a**2), complete=True) is None  # no alpha = 0
    assert shapes.curve_info(lw.Curve(a, None, a), complete=True) is None  # accuracy only
    flat = shapes.curve_info(lw.Curve(a, np.ones_like(a)), complete=True)
    assert flat["shape"] == "other" and flat["extrema"] == []
    w = LandscapeWidget(_model(), _data(), autostart=False, resolution=5)
    try:
        w.compute()
        w.wait(60)
        assert w.result["curve"] is None  # a 2D surface
        w.mode = "1d"
        curve = w.wait(60)
        assert w.result["curve"]["shape"] == lw.classify_curve(curve).shape
    finally:
        w.close()
