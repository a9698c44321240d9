"""The loop plans' point build (``PointPasses._point``): a kept row sum, one fused add.

Properties: a point's parameters equal ``theta + sum_j c_j d_j`` computed in float64 (to
float32 rounding); they do not depend on the order the points come in or on whether the
row sum was kept (bit for bit); and the row is kept only within its memory share.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import landscape_widget as lw
from landscape_widget.core import passes, plans
from landscape_widget.core.evaluate import Evaluator


def _setup(directions: int = 2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3)).eval()
    data = (torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,)))
    dirs = lw.random_directions(model, directions, seed=1)
    return model, data, dirs


def test_points_equal_the_float64_sum_whatever_the_order_or_the_cache(monkeypatch):
    model, data, dirs = _setup(3)
    ev = Evaluator(model, data, dirs, strategy="loop")
    rng = np.random.default_rng(0)
    rows = rng.uniform(-1, 1, (4, 2))
    coords = [torch.tensor([a, *row]) for row in rows for a in (-0.7, 0.1, 0.9)]
    first = [ev._point(c, "contiguous") for c in coords]
    theta = dict(model.named_parameters())
    for c, p in zip(coords, first, strict=True):
        for k in ev.keys:
            want = theta[k].double() + sum(float(c[j]) * dirs[j][k].double() for j in range(3))
            torch.testing.assert_close(p[k].double(), want, rtol=1e-6, atol=1e-6)
    # Reversed order (every row rebuilt) and no kept row at all: the same bits.
    again = [ev._point(c, "contiguous") for c in reversed(coords)][::-1]
    monkeypatch.setattr(passes, "ROW_SHARE", 0.0)
    cold = Evaluator(model, data, dirs, strategy="loop")
    uncached = [cold._point(c, "contiguous") for c in coords]
    assert cold._row is None and cold._row_fits is False
    for a, b, u in zip(first, again, uncached, strict=True):
        for k in ev.keys:
            assert torch.equal(a[k], b[k]) and torch.equal(a[k], u[k])


def test_the_row_is_kept_within_its_share_and_the_base_is_untouched():
    model, data, dirs = _setup()
    ev = Evaluator(model, data, dirs, strategy="loop")
    before = {k: v.clone() for k, v in ev.base.items()}
    ev._point(torch.tensor([0.5, 0.25]), "contiguous")
    assert ev._row is not None and ev._row[0] == ("contiguous", (0.25,))
    row_tensors = ev._row[1]
    ev._point(torch.tensor([-0.5, 0.25]), "contiguous")  # same row: the kept sum is reused
    assert ev._row[1] is row_tensors
    ev._point(torch.tensor([-0.5, 0.75]), "contiguous")  # a new row replaces it
    assert ev._row[0] == ("contiguous", (0.75,))
    for k, v in ev.base.items():
        assert torch.equal(v, before[k])


def test_a_surface_is_the_same_with_and_without_the_kept_row(monkeypatch):
    model, data, dirs = _setup()
    grid = {"directions": dirs, "x": (-1, 1, 5), "y": (-1, 1, 5), "progress": False,
            "evaluator_options": {"strategy": "loop"}}
    plans.forget_plans()
    kept = lw.compute_surface(model, data, **grid)
    monkeypatch.setattr(passes, "ROW_SHARE", 0.0)
    # The plan is reused (a new search might pick another layout: other rounding).
    rebuilt = lw.compute_surface(model, data, **grid)
    assert np.array_equal(kept.loss, rebuilt.loss)
