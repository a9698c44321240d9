"""Issue 15 (4): the widget draws a data-subset picture first, then the exact one.

The worker (``send`` injected, as in test_widget_worker.py) streams every point once per
stage: the subset stages' tiles carry compute_surface(samples=n)'s values and are labelled
in the progress messages; the last stage's tiles equal compute_surface's exact values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from widget_cases import Recorder

import landscape_widget as lw
from landscape_widget.core import progressive
from landscape_widget.widget.protocol import Spec, decode_buffer
from landscape_widget.widget.worker import Worker

N = 600


@pytest.fixture
def small_stages(monkeypatch):
    monkeypatch.setattr(progressive, "PROGRESSIVE_MIN_SAMPLES", 500)
    monkeypatch.setattr(progressive, "PROGRESSIVE_STAGES", (50, 120))


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    g = torch.Generator().manual_seed(1)
    data = torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g)
    return model, data


def _run(model, data, spec, **kw):
    rec = Recorder()
    worker = Worker(model, data, send=rec, tile_points=5, **kw)
    try:
        worker.submit("j", spec)
        assert worker.wait(120)
    finally:
        worker.close()
    return worker, rec


def _stage_values(rec, shape):
    """The loss each stage sent, by stage label order: [(label, (ny, nx) array)]."""
    msgs = rec.of("j")
    stages, label = [], None
    size = int(np.prod(shape))
    for i, (m, b) in enumerate(msgs):
        if m["kind"] != "tile":
            continue
        progress = next(p for p, _ in msgs[i + 1:] if p["kind"] == "progress")
        now = progress.get("stage", "").split(" (")[0]  # the ± changes tile by tile
        if not stages or now != label:
            stages.append((now, np.full(size, np.nan, np.float32), np.zeros(size, int)))
            label = now
        idx = decode_buffer(b[0], "<i4")
        stages[-1][1][idx] = decode_buffer(b[1])
        stages[-1][2][idx] += 1
    return stages


def test_subset_stages_first_then_exact_values(small_stages):
    model, data = _setup()
    spec = Spec(resolution=7, seed=3)
    worker, rec = _run(model, data, spec)
    kinds = [m["kind"] for m, _ in rec.of("j")]
    assert kinds[0] == "start" and kinds[-1] == "done"
    stages = _stage_values(rec, (7, 7))
    labels = [s[0] for s in stages]
    assert labels == [f"subset 50 of {N} samples", f"subset 120 of {N} samples", ""]
    for _, _, seen in stages:
        assert (seen == 1).all()  # every point once per stage
    progress = [p for p, _ in rec.of("j", "progress")]
    assert progress[0]["plan"].startswith("subset 50 of 600 samples (±")  # the status line
    done = [p["done"] for p in progress]
    assert done == sorted(done) and done[-1] == 3 * 49 == progress[-1]["total"]
    dirs = lw.random_directions(model, 2, ignore="biasbn", seed=3)
    grid = dict(directions=dirs, x=(-1, 1, 7), y=(-1, 1, 7), progress=False)
    exact = lw.compute_surface(model, data, **grid)
    for n, (_, loss, _) in zip((50, 120), stages, strict=False):
        sub = lw.compute_surface(model, data, samples=n, **grid)
        np.testing.assert_allclose(loss.reshape(7, 7), sub.loss.astype(np.float32), rtol=1e-5)
    np.testing.assert_allclose(stages[2][1].reshape(7, 7), exact.loss.astype(np.float32),
                               rtol=1e-5, atol=1e-6)
    result = worker.latest  # the final result is the exact one, no subset left in it
    np.testing.assert_allclose(result.loss, exact.loss, rtol=1e-6, atol=1e-7)
    assert result.spec["samples"] is None and result.loss_se is None


def test_small_data_skips_the_subset_stages(small_stages, monkeypatch):
    model, data = _setup()
    monkeypatch.setattr(progressive, "PROGRESSIVE_MIN_SAMPLES", N + 1)
    _, rec = _run(model, data, Spec(resolution=5, seed=3))
    assert not any(p.get("stage") for p, _ in rec.of("j", "progress"))
    assert rec.of("j", "progress")[-1][0]["done"] == 25


def test_a_finer_grid_reusing_exact_points_skips_the_subset_stages(small_stages):
    model, data = _setup()
    rec = Recorder()
    worker = Worker(model, data, send=rec, tile_points=5)
    try:
        worker.submit("a", Spec(resolution=5, seed=3))
        assert worker.wait(60)
        worker.submit("b", Spec(resolution=9, seed=3))
        assert worker.wait(60)
    finally:
        worker.close()
    assert any(p.get("stage") for p, _ in rec.of("a", "progress"))
    assert not any(p.get("stage") for p, _ in rec.of("b", "progress"))
    (done, _), = rec.of("b", "done")
    assert done["reused"] == 25 and done["evaluated"] == 81 - 25


def test_a_loss_without_per_sample_values_goes_straight_to_exact(small_stages):
    model, data = _setup()
    _, rec = _run(model, data, Spec(resolution=5, seed=3),
                  loss_fn=lambda o, t: nn.functional.cross_entropy(o, t))
    assert not any(p.get("stage") for p, _ in rec.of("j", "progress"))
    assert [m["kind"] for m, _ in rec.of("j")][-1] == "done"


def test_cancel_during_a_subset_stage_starts_no_later_stage(small_stages):
    model, data = _setup()
    rec = Recorder()
    worker = Worker(model, data, send=rec, tile_points=3)

    def hook(msg):
        if msg["kind"] == "tile":
            worker.cancel("j")

    rec.hook = hook
    try:
        worker.submit("j", Spec(resolution=9, seed=3))
        assert worker.wait(60)
    finally:
        worker.close()
    kinds = [m["kind"] for m, _ in rec.of("j")]
    assert kinds[-1] == "cancelled" and kinds.count("tile") <= 2
    assert worker.latest.spec["samples"]["n"] == 50  # the partial subset result
