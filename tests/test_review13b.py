"""Review of the mid-point cancel (core/passes.py _batch_starts, core/compute.py _tiles).

A forward sets (or waits for) the cancel in the middle of a point of a later tile; what
the stream, the widget's worker and a later computation then see is checked against the
float64 per-point oracle (tests/oracle.py) and the headless API.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from oracle import naive_eval
from torch import nn

import landscape_widget as lw
from landscape_widget.core import plans
from landscape_widget.widget.protocol import Spec

CALLS: list[int] = []  # forward calls (module-level: the engine's copies share it)
CALLS_AFTER: list[int] = []
TRIGGER: dict = {}  # {"at": call count, "event": Event[, "hold": Event]}


def _tick(h):
    """Count a forward call (and cancel at one of them); ``torch.fx.wrap``-ped, so that a
    traced forward (the stem's suffix, core/stem.py) still calls it at every pass."""
    CALLS.append(int(h.shape[0]))
    if TRIGGER and len(CALLS) == TRIGGER["at"]:
        TRIGGER["event"].set()  # a cancel arriving during this pass
        if "hold" in TRIGGER:  # the widget case: wait for the superseding job
            TRIGGER["hold"].wait(60)
    return h


torch.fx.wrap("_tick")


class _Net(nn.Module):
    """A 6-12-3 MLP whose forward counts its calls and can cancel at one of them."""

    def __init__(self, bn: bool = False):
        super().__init__()
        self.a, self.b = nn.Linear(6, 12), nn.Linear(12, 3)
        self.norm = nn.BatchNorm1d(12) if bn else nn.Identity()

    def forward(self, x):
        return self.b(torch.tanh(self.norm(_tick(self.a(x)))))


AXIS = np.linspace(-1, 1, 5)


def _setup(bn: bool = False, n: int = 64):
    torch.manual_seed(0)
    model = _Net(bn).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return model, x, y, lw.random_directions(model, 2, seed=0)


def _coords(flat: np.ndarray) -> np.ndarray:
    iy, ix = np.unravel_index(flat, (5, 5))
    return np.stack([AXIS[ix], AXIS[iy]], axis=1)


def _cancel_in_second_tile(model, x, y, grid, passes=3):
    """Iterate ``grid``'s stream, cancelling ``passes`` passes into its second tile."""
    event = threading.Event()
    CALLS.clear()
    TRIGGER.clear()
    stream = lw.iter_tiles(model, (x, y), cancel=event, **grid)
    tiles = []
    for tile in stream:
        tiles.append(tile)
        if len(tiles) == 1:
            TRIGGER.update(at=len(CALLS) + passes, event=event)
    TRIGGER.clear()
    return stream, tiles, event


def test_widget_job_cancelled_mid_point_then_superseded(worker_factory):
    """A slider move during a point of a later tile: the old job ends 'cancelled' with no
    further pass, the new one equals the headless API, and the worker is idle after."""
    model, x, y, _ = _setup()
    data = (x, y)
    reached, hold, first_tile = threading.Event(), threading.Event(), threading.Event()
    worker, rec = worker_factory(model, data, tile_points=4,
                                 evaluator_options={"strategy": "loop", "batch_size": 8})
    CALLS.clear()
    TRIGGER.clear()

    def hook(msg):  # on the worker thread, before its next pass
        if msg["kind"] == "tile" and msg["id"] == "old" and not first_tile.is_set():
            first_tile.set()
            TRIGGER.update(at=len(CALLS) + 3, event=reached, hold=hold)
        if msg["kind"] == "cancelled" and msg["id"] == "old":
            CALLS_AFTER[:] = CALLS[TRIGGER["at"]:]  # the old job's calls after the cancel

    rec.hook = hook
    old = worker.submit("old", Spec(resolution=21, seed=3))
    assert reached.wait(60)  # the worker is in the middle of a point
    new = worker.submit("new", Spec(resolution=5, seed=3))  # supersedes: old.cancel set
    hold.set()
    assert worker.wait(60)
    TRIGGER.clear()
    assert old.cancel.is_set() and not new.cancel.is_set()
    assert rec.of("old", "cancelled") and not rec.of("old", "done")
    assert rec.of("new", "done") and worker.current is None and not worker.busy
    dirs = lw.random_directions(model, 2, ignore="biasbn", norm="filter", seed=3)
    ref = lw.compute_surface(model, data, directions=dirs, x=(-1, 1, 5), y=(-1, 1, 5),
                             progress=False, evaluator_options={"batch_size": 8})
    np.testing.assert_allclose(worker.latest.loss, ref.loss, rtol=1e-6, atol=1e-7)
    # The old job ran no pass after the one that saw the cancel (3 points of 8 were left).
    assert CALLS_AFTER == [], CALLS_AFTER


CASES = {
    "stem": ({"strategy": "loop", "batch_size": 8, "stem": True}, {}),
    "stem-lanes": ({"strategy": "loop", "batch_size": 8, "stem": True, "lanes": 2}, {}),
    "bn-batch": ({"strategy": "loop"}, {"bn": "batch", "bn_batch_size": 8}),
    "bf16": ({"strategy": "loop", "batch_size": 8, "precision": "bf16"}, {}),
    "vmap-bn-batch": ({"strategy": "vmap"}, {"bn": "batch", "bn_batch_size": 8}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cancel_mid_point_then_a_fresh_call(case):
    """Cancelled mid-point, then the same grid again in the same process (cached plan):
    the finished tile and the fresh grid equal the oracle."""
    options, kw = CASES[case]
    bn = kw.get("bn") == "batch"
    model, x, y, dirs = _setup(bn=bn)
    plans.forget_plans()
    grid = {"directions": dirs, "x": (-1, 1, 5), "y": (-1, 1, 5), "tile_points": 4,
            "evaluator_options": options, "metrics": ("loss",), **kw}
    stream, tiles, event = _cancel_in_second_tile(model, x, y, grid)
    assert event.is_set() and len(tiles) == 1, len(tiles)
    oracle = {"bn": kw.get("bn", "eval"), "bn_batch_size": kw.get("bn_batch_size")}
    tol = {"rtol": 2e-2, "atol": 2e-2} if "precision" in options else {"rtol": 1e-5,
                                                                         "atol": 1e-6}
    want, _ = naive_eval(model, x, y, dirs, _coords(tiles[0].flat), **oracle)
    np.testing.assert_allclose(tiles[0].values["loss"], want, **tol)
    again = lw.compute_surface(model, (x, y), progress=False, **grid)
    want, _ = naive_eval(model, x, y, dirs, _coords(np.arange(25)), **oracle)
    np.testing.assert_allclose(again.loss.ravel(), want, **tol)



def test_a_cancel_during_the_precision_check_leaves_its_points_unchecked():
    """bf16: the cancel lands in the fp32 passes that check the second tile's point. Its
    point was counted as checked all the same, so the stream iterated again measured
    ``precision_error`` on 2 of its first 3 points (core/precision.py)."""
    model, x, y, dirs = _setup()
    plans.forget_plans()
    grid = {"directions": dirs, "x": (-1, 1, 5), "y": (-1, 1, 5), "tile_points": 1,
            "metrics": ("loss",),
            "evaluator_options": {"strategy": "loop", "batch_size": 8, "precision": "bf16"}}
    # The second tile: its point's 8 bf16 passes, then 8 fp32 passes checking it.
    stream, tiles, event = _cancel_in_second_tile(model, x, y, grid, passes=11)
    ev = stream.evaluator
    assert len(tiles) == 1 and len(ev._error_pairs) == 1
    event.clear()
    tiles = list(stream)  # again, to the end
    assert len(tiles) == 25
    # Each of the first ERROR_POINTS points evaluated is checked against fp32.
    # ERROR_POINTS (3) points checked in all: the first tile's twice (once per iteration),
    # then the second tile's, whose check the cancel had cut short.
    assert len(ev._error_pairs) == 3, ev._error_pairs
    fp32, _ = naive_eval(model, x, y, dirs, _coords(np.concatenate([t.flat for t in tiles])))
    checked = [b for _, b in ev._error_pairs]
    np.testing.assert_allclose(checked, fp32[[0, 0, 1]], rtol=1e-5, atol=1e-6)
    gaps = [abs(a - b) for a, b in ev._error_pairs]
    assert stream.result().spec["precision_error"] == pytest.approx(max(gaps))


def test_the_cancel_is_not_left_on_the_evaluator_between_tiles():
    """The tile runner handed its cancel event to the evaluator for good once the first
    tile was done: with the stream paused between tiles (an iterator held, not closed),
    a direct ``stream.evaluator.evaluate`` after the cancel raised Cancelled, though no
    tile was computing (core/compute.py, LocalRunner._tiles)."""
    model, x, y, dirs = _setup()
    plans.forget_plans()
    event = threading.Event()
    stream = lw.iter_tiles(model, (x, y), directions=dirs, x=(-1, 1, 5), y=(-1, 1, 5),
                           tile_points=4, cancel=event, metrics=("loss",),
                           evaluator_options={"strategy": "loop", "batch_size": 8})
    tiles = iter(stream)
    next(tiles), next(tiles)  # paused after the second tile
    event.set()
    coords = _coords(np.arange(25))
    got = stream.evaluator.evaluate(coords)["loss"]
    want, _ = naive_eval(model, x, y, dirs, coords)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert list(tiles) == []  # the stream itself stops before its next tile


def test_the_widget_cancel_mid_point_then_a_new_resolution():
    """The widget end to end (no browser): Cancel during a point, then a new resolution.
    The status says cancelled, the widget is idle, and the next grid equals the headless
    API on the same directions."""
    from widget_cases import Recorder

    from landscape_widget import LandscapeWidget

    model, x, y, _ = _setup()
    reached, hold, first = threading.Event(), threading.Event(), threading.Event()
    w = LandscapeWidget(model, (x, y), autostart=False, resolution=21, seed=3)
    try:
        w._worker.tile_points = 4
        w._worker.evaluator_options = {"strategy": "loop", "batch_size": 8}
        CALLS.clear()
        TRIGGER.clear()

        def hook(msg):
            if msg["kind"] == "tile" and not first.is_set():
                first.set()
                TRIGGER.update(at=len(CALLS) + 3, event=reached, hold=hold)

        rec = Recorder(hook)
        w.send = lambda content, buffers=None: rec(content, buffers or [])
        w.compute()
        assert reached.wait(60)
        w.cancel()
        hold.set()
        w.wait(60)
        TRIGGER.clear()
        assert w.status["state"] == "cancelled" and not w.busy
        assert rec.messages[-1][0]["kind"] == "cancelled"
        w.resolution = 5
        got = w.wait(60)
        assert w.status["state"] == "done" and not w.busy
        dirs = lw.random_directions(model, 2, ignore="biasbn", norm="filter", seed=3)
        ref = lw.compute_surface(model, (x, y), directions=dirs, x=(-1, 1, 5), y=(-1, 1, 5),
                                 progress=False)
        np.testing.assert_allclose(got.loss, ref.loss, rtol=1e-6, atol=1e-7)
        assert not np.isnan(got.loss).any()
    finally:
        w.close()


@pytest.mark.parametrize("stage", ["subset", "exact"])
def test_samples_auto_cancelled_mid_point_in_a_stage(worker_factory, stage):
    """samples='auto' on 4,096 samples: a subset stage of 256, then the exact one. A job
    superseded during a point of either stage runs no pass after it and starts no later
    stage; the next job equals the headless API."""
    model, x, y, _ = _setup(n=4096)
    reached, hold, armed = threading.Event(), threading.Event(), threading.Event()
    after = 0 if stage == "subset" else 81 + 8  # into the exact stage of 2 x 81 points

    def hook(msg):
        if (msg["kind"] == "progress" and msg["id"] == "old" and not armed.is_set()
                and msg["done"] > after):
            armed.set()
            TRIGGER.update(at=len(CALLS) + 2, event=reached, hold=hold)
        if msg["kind"] == "cancelled" and msg["id"] == "old":
            CALLS_AFTER[:] = CALLS[TRIGGER["at"]:]

    worker, rec = worker_factory(model, (x, y), hook=hook, tile_points=4,
                                 evaluator_options={"strategy": "loop", "batch_size": 64})
    CALLS.clear()
    TRIGGER.clear()
    worker.submit("old", Spec(resolution=9, seed=3, samples="auto"))
    assert reached.wait(120)
    worker.submit("new", Spec(resolution=5, seed=3, samples="exact"))
    hold.set()
    assert worker.wait(120)
    TRIGGER.clear()
    assert CALLS_AFTER == [], CALLS_AFTER
    assert rec.of("old", "cancelled") and not rec.of("old", "done")
    assert max(p["done"] for p, _ in rec.of("old", "progress")) < 162
    dirs = lw.random_directions(model, 2, ignore="biasbn", norm="filter", seed=3)
    ref = lw.compute_surface(model, (x, y), directions=dirs, x=(-1, 1, 5), y=(-1, 1, 5),
                             progress=False)
    np.testing.assert_allclose(worker.latest.loss, ref.loss, rtol=1e-6, atol=1e-7)
