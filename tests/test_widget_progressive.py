"""Issue 15 (4): the widget draws a data-subset picture first, then the exact one.

The worker (``send`` injected, as in test_widget_worker.py) streams every point once per
stage: the subset stages' tiles carry compute_surface(samples=n)'s values and are labelled
in the progress messages; the last stage's tiles equal compute_surface's exact values.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch import nn
from traitlets import TraitError
from widget_cases import FakeFrontEnd, Recorder, assemble

import landscape_widget as lw
from landscape_widget.core import progressive
from landscape_widget.widget.protocol import Spec, decode_buffer
from landscape_widget.widget.spec import schema
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


# --- the samples control (spec.samples): auto, exact, or a fixed subset -------------------
@pytest.fixture
def subset_1k_is_100(monkeypatch):
    """The "1k" choice draws 100 samples (of the 600 here); the other limits unchanged."""
    monkeypatch.setitem(progressive.SUBSET_CHOICES, "1k", 100)


def _grid(model, n):
    dirs = lw.random_directions(model, 2, ignore="biasbn", seed=3)
    return dict(directions=dirs, x=(-1, 1, n), y=(-1, 1, n), progress=False)


def test_a_fixed_subset_is_the_answer_labelled_with_its_standard_error(subset_1k_is_100):
    model, data = _setup()
    statuses = []
    worker, rec = _run(model, data, Spec(resolution=5, seed=3, samples="1k"),
                       on_status=statuses.append)
    seen, loss, _, _ = assemble(rec, "j")
    assert (seen == 1).all()  # one stage: every point once
    progress = [p for p, _ in rec.of("j", "progress")]
    assert progress[-1]["done"] == progress[-1]["total"] == 25
    assert all(p["stage"].startswith(f"subset 100 of {N} samples (±") for p in progress)
    (done, _), = rec.of("j", "done")
    assert done["stats"].startswith(f"subset 100 of {N} samples (±")  # the status line
    ref = lw.compute_surface(model, data, samples=100, **_grid(model, 5))
    result = worker.latest
    assert result.spec["samples"] == {"n": 100, "of": N, "seed": 0}
    np.testing.assert_allclose(result.loss, ref.loss, rtol=1e-6)
    np.testing.assert_allclose(result.loss_se, ref.loss_se, rtol=1e-6)
    np.testing.assert_allclose(loss, ref.loss.astype(np.float32), rtol=1e-5)
    assert statuses[-1]["state"] == "done"


def test_exact_has_no_subset_stage_even_on_large_data(small_stages):
    model, data = _setup()
    worker, rec = _run(model, data, Spec(resolution=5, seed=3, samples="exact"))
    assert not any(p.get("stage") for p, _ in rec.of("j", "progress"))
    assert rec.of("j", "progress")[-1][0]["total"] == 25
    exact = lw.compute_surface(model, data, **_grid(model, 5))
    np.testing.assert_allclose(worker.latest.loss, exact.loss, rtol=1e-6, atol=1e-7)
    assert worker.latest.spec["samples"] is None and worker.latest.loss_se is None


def test_a_subset_is_reused_by_the_same_subset_only_never_as_exact(subset_1k_is_100):
    model, data = _setup()
    rec = Recorder()
    worker = Worker(model, data, send=rec, tile_points=5)
    try:
        for job, res, samples in (("a", 5, "1k"), ("b", 9, "1k"), ("c", 9, "exact"),
                                  ("d", 9, "auto")):
            worker.submit(job, Spec(resolution=res, seed=3, samples=samples))
            assert worker.wait(60)
            if job == "b":
                finer = worker.latest
    finally:
        worker.close()
    done = {job: rec.of(job, "done")[0][0] for job in "abcd"}
    assert done["b"]["reused"] == 25 and done["b"]["evaluated"] == 81 - 25
    ref = lw.compute_surface(model, data, samples=100, **_grid(model, 9))
    np.testing.assert_allclose(finer.loss, ref.loss, rtol=1e-6)
    np.testing.assert_allclose(finer.loss_se, ref.loss_se, rtol=1e-6)
    assert done["c"]["reused"] == 0 and done["c"]["evaluated"] == 81  # subset -> exact: none
    exact = lw.compute_surface(model, data, **_grid(model, 9))
    np.testing.assert_allclose(worker.latest.loss, exact.loss, rtol=1e-6, atol=1e-7)
    assert done["d"]["reused"] == 81  # auto ends exact: the exact points are reused


def test_a_fixed_subset_as_large_as_the_data_is_exact_and_says_so():
    model, data = _setup()
    statuses = []
    worker, rec = _run(model, data, Spec(resolution=5, seed=3, samples="10k"),
                       on_status=statuses.append)
    assert worker.latest.spec["samples"] is None
    assert not any(p.get("stage") for p, _ in rec.of("j", "progress"))
    assert "all of them were used (exact)" in statuses[-1]["message"]
    assert not rec.of("j", "done")[0][0]["stats"].startswith("subset")


def test_a_fixed_subset_that_cannot_be_drawn_is_an_error_with_the_fix(subset_1k_is_100):
    """auto falls back to exact for a loss without per-sample values; an explicit subset
    does not silently: the job fails with the engine's fix."""
    model, data = _setup()
    _, rec = _run(model, data, Spec(resolution=5, seed=3, samples="1k"),
                  loss_fn=lambda o, t: nn.functional.cross_entropy(o, t))
    (err, _), = rec.of("j", "error")
    assert "SubsetError" in err["message"] and "reduction='none'" in err["message"]


def data_fn():
    return _setup()[1]


def test_subset_stages_and_fixed_subsets_on_an_executor(small_stages, subset_1k_is_100):
    """With an executor the stages run on its workers; a data_fn's workers draw the
    subset themselves (its size comes back from them for the label)."""
    model, data = _setup()
    with ThreadPoolExecutor(2) as pool:
        _, rec = _run(model, data, Spec(resolution=5, seed=3), executor=pool)
        stages = _stage_values(rec, (5, 5))
        assert [s[0] for s in stages] == [f"subset 50 of {N} samples",
                                          f"subset 120 of {N} samples", ""]
        sub = lw.compute_surface(model, data, samples=50, **_grid(model, 5))
        np.testing.assert_allclose(stages[0][1].reshape(5, 5), sub.loss.astype(np.float32),
                                   rtol=1e-5)
        worker, rec = _run(model, data_fn, Spec(resolution=5, seed=3, samples="1k"),
                           executor=pool)
    (done, _), = rec.of("j", "done")
    assert done["stats"].startswith(f"subset 100 of {N} samples (±")
    ref = lw.compute_surface(model, data, samples=100, **_grid(model, 5))
    np.testing.assert_allclose(worker.latest.loss_se, ref.loss_se, rtol=1e-6)


def test_the_samples_control_is_validated_from_the_front_end(widget):
    front = FakeFrontEnd(widget)
    spec = {**Spec(resolution=5).to_dict(), "samples": "2k"}
    widget._handle_custom_msg({"kind": "compute", "id": "bad", "spec": spec}, [])
    (err,) = front.errors()
    assert "spec.samples='2k' is not one of" in err["message"] and "'10k'" in err["message"]
    with pytest.raises(TraitError):
        widget.samples = "all"
    widget.samples = "exact"
    assert widget.spec().samples == "exact"
    assert schema()["choices"]["samples"] == list(progressive.SAMPLE_MODES)


def test_the_plane_through_three_models_says_it_has_no_subset(subset_1k_is_100):
    torch.manual_seed(0)
    names = ("a", "b", "c")
    models = {n: nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
              for n in names}
    statuses = []
    spec = Spec(direction="plane", norm="none", resolution=3, x_range=(-0.2, 1.2),
                y_range=(-0.2, 1.2), vertices=names, samples="1k")
    worker, rec = _run(models["a"], _setup()[1], spec, models=models,
                       on_status=statuses.append)
    assert worker.latest.spec.get("samples") is None  # all data
    assert not any(p.get("stage") for p, _ in rec.of("j", "progress"))
    assert "plane through three models is computed on all data" in statuses[-1]["message"]
