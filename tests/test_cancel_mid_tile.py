"""A cancel lands at the next batch of a point, not after the tile (core/passes.py).

Before, a cancel was checked between tiles only: a tile of the loop plan is at least one
point, and a point is one pass over all the data, seconds for 50,000 images on a CPU, so
the widget's Cancel (or a slider move superseding the grid) waited for every pass of the
tile's points. Now, once the first tile has chosen the plan, every pass checks the cancel
event first. The forward here sets the event itself in the middle of a point of the second
tile (as the widget's message thread would), and counts the passes that follow: none.
The tiles that finished are the float64 per-point oracle's, and a fresh call afterwards,
with the cached plan, computes the whole grid right (no plan marked failed, no lane
dropped).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from oracle import naive_eval
from public_cases import Untouched
from torch import nn

import landscape_widget as lw
from landscape_widget.core import plans

CALLS: list[int] = []  # forward calls, module-level: the engine's copies share it
TRIGGER: dict = {}  # {"at": call count, "event": Event}: set the event at that call


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 12), nn.Linear(12, 3)

    def forward(self, x):
        CALLS.append(x.shape[0])
        if TRIGGER and len(CALLS) == TRIGGER["at"]:
            TRIGGER["event"].set()  # a cancel arriving during this pass
        return self.b(torch.tanh(self.a(x)))


AXIS = np.linspace(-1, 1, 5)


def _coords(flat: np.ndarray) -> np.ndarray:
    """``(alpha, beta)`` of flat indices of the 5x5 grid (rows = y)."""
    iy, ix = np.unravel_index(flat, (5, 5))
    return np.stack([AXIS[ix], AXIS[iy]], axis=1)


def _setup():
    torch.manual_seed(0)
    model = _Counting().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)
    return model, x, y, lw.random_directions(model, 2, seed=0)


@pytest.mark.parametrize("options", [
    {"strategy": "loop", "batch_size": 8},
    {"strategy": "loop", "batch_size": 8, "lanes": 2},
    {"strategy": "vmap", "batch_size": 8},
], ids=["loop", "lanes", "vmap"])
def test_a_cancel_stops_the_passes_of_the_point_in_progress(options):
    model, x, y, dirs = _setup()
    plans.forget_plans()
    event = threading.Event()
    grid = {"directions": dirs, "x": (-1, 1, 5), "y": (-1, 1, 5), "tile_points": 4,
            "evaluator_options": options, "metrics": ("loss",)}
    CALLS.clear()
    TRIGGER.clear()
    tiles = []
    with Untouched(model):
        stream = lw.iter_tiles(model, (x, y), cancel=event, **grid)
        for tile in stream:
            tiles.append(tile)
            if len(tiles) == 1:  # the plan is chosen: cancel 3 passes into the next tile
                TRIGGER.update(at=len(CALLS) + 3, event=event)
    assert stream.evaluator.plan.label.startswith(options["strategy"])
    if options.get("lanes"):
        assert stream.evaluator.plan.lanes == 2
    assert len(tiles) == 1, "the second tile was finished despite the cancel"
    # The pass that saw the cancel set was the last: each lane stops at its next batch.
    after = len(CALLS) - TRIGGER["at"]
    assert after <= options.get("lanes", 1) - 1, after
    # A whole tile of 4 points x 8 passes would have run without the check.
    first = tiles[0]
    coords = _coords(first.flat)
    want, _ = naive_eval(model, x, y, dirs, coords)
    np.testing.assert_allclose(first.values["loss"], want, rtol=1e-5, atol=1e-6)

    # The same set-up again, no cancel: every point right.
    TRIGGER.clear()
    # (Not necessarily the same plan: a search cut short by its time budget is not served
    # from the plan cache, and a new one may pick another plan on timing.)
    again = lw.compute_surface(model, (x, y), progress=False, **grid)
    coords = np.array([(a, b) for b in again.y for a in again.x])
    want, _ = naive_eval(model, x, y, dirs, coords)
    np.testing.assert_allclose(again.loss.ravel(), want, rtol=1e-5, atol=1e-6)


def test_the_first_tile_is_not_cancelled_mid_point():
    """While the plan is being chosen the passes run on: a cancel then stops the stream
    before its next tile, as before (tuning half done must never be cached)."""
    model, x, y, dirs = _setup()
    plans.forget_plans()
    event = threading.Event()
    CALLS.clear()
    TRIGGER.clear()
    stream = lw.iter_tiles(model, (x, y), directions=dirs, x=(-1, 1, 5), y=(-1, 1, 5),
                           tile_points=4, cancel=event, metrics=("loss",),
                           evaluator_options={"strategy": "loop", "batch_size": 8})
    TRIGGER.update(at=len(CALLS) + 2, event=event)  # after the set-up: while tuning
    tiles = list(stream)
    assert len(CALLS) > TRIGGER["at"] + 1  # the first tile ran on after the cancel
    assert len(tiles) == 1 and stream.evaluator.plan is not None
    want, _ = naive_eval(model, x, y, dirs, _coords(tiles[0].flat))
    np.testing.assert_allclose(tiles[0].values["loss"], want, rtol=1e-5, atol=1e-6)
    TRIGGER.clear()
