"""The worker thread and the widget around it, without a front end.

``send`` is injected (a recorder), so every test sees exactly the messages a browser would.
Results are checked against the headless API (``lw.compute_surface`` / ``lw.compute_curve``
on the same directions), which shares the engine: what is tested here is the streaming
(every point exactly once, float32 buffers, order), cancellation, reuse and error handling,
not the maths.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from widget_cases import Recorder, assemble
from widget_cases import worker_data as _data
from widget_cases import worker_model as _model

import landscape_widget as lw
from landscape_widget import LandscapeWidget
from landscape_widget.widget.protocol import Spec


@pytest.mark.parametrize("norm", ["filter", "layer", "none"])
def test_tiles_cover_grid_once_and_equal_compute_surface(worker_factory, norm):
    model, data = _model(), _data()
    worker, rec = worker_factory(model, data, tile_points=7)
    spec = Spec(resolution=9, norm=norm, x_range=(-1.0, 0.5), seed=3)
    worker.submit("j", spec)
    assert worker.wait(60)
    kinds = [m["kind"] for m, _ in rec.of("j")]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("tile") >= 81 // 7
    seen, loss, acc, x = assemble(rec, "j")
    assert (seen == 1).all()  # every point exactly once
    dirs = lw.random_directions(model, 2, norm=None if norm == "none" else norm,
                                ignore="biasbn", seed=3)
    ref = lw.compute_surface(model, data, directions=dirs, x=(-1.0, 0.5, 9), y=(-1, 1, 9),
                             progress=False)
    np.testing.assert_allclose(x, ref.x.astype(np.float32))
    np.testing.assert_allclose(loss, ref.loss.astype(np.float32), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acc, ref.accuracy.astype(np.float32), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(worker.latest.loss, ref.loss, rtol=1e-6, atol=1e-7)
    done = [p["done"] for p, _ in rec.of("j", "progress")]
    assert done == sorted(done) and done[-1] == 81


def test_curve_and_interpolation_to_model_b(worker_factory):
    model, model_b, data = _model(seed=0), _model(seed=5), _data()
    worker, rec = worker_factory(model, data, model_b=model_b)
    worker.submit("c", Spec(mode="1d", direction="interpolation", x_range=(0.0, 1.0),
                            resolution=5))
    assert worker.wait(60)
    curve = worker.latest
    assert isinstance(curve, lw.Curve) and curve.loss.shape == (5,)
    seen, loss, _, _ = assemble(rec, "c")
    assert (seen == 1).all()
    with torch.no_grad():
        end = nn.functional.cross_entropy(model_b(data[0]), data[1]).item()
    assert curve.loss[-1] == pytest.approx(end, rel=1e-5)  # alpha = 1 is model_b
    worker.submit("s", Spec(direction="interpolation", resolution=3))
    assert worker.wait(60) and rec.of("s", "done")


def test_cancel_from_the_front_end_stops_within_one_tile(worker_factory):
    tiles_at_cancel = []

    def hook(msg):
        if msg["kind"] == "tile" and msg["id"] == "big" and not tiles_at_cancel:
            if msg["done"] >= 3 * 4:
                tiles_at_cancel.append(len(rec.of("big", "tile")))
                cancelled.set()
                # Hold the worker until the main thread has cancelled, so a loaded machine
                # (a slow main thread) cannot let it run tiles ahead.
                resumed.wait(60)

    cancelled, resumed = threading.Event(), threading.Event()
    worker, rec = worker_factory(hook=hook, tile_points=4)
    worker.submit("big", Spec(resolution=41))
    assert cancelled.wait(60)
    worker.cancel()  # from the main thread, while the worker is between two tiles
    resumed.set()
    assert worker.wait(60)
    tiles = len(rec.of("big", "tile"))
    assert tiles - tiles_at_cancel[0] <= 1
    assert rec.messages[-1][0]["kind"] == "cancelled"
    part = worker.latest
    assert np.isnan(part.loss).sum() > 41 * 41 - 4 * (tiles + 2)
    # The worker takes the next job.
    worker.submit("next", Spec(resolution=3))
    assert worker.wait(60) and rec.of("next", "done")


def test_new_job_cancels_running_one(worker_factory):
    started = threading.Event()
    worker, rec = worker_factory(hook=lambda m: m["kind"] == "tile" and started.set(),
                                 tile_points=4)
    worker.submit("old", Spec(resolution=101))
    assert started.wait(60)
    worker.submit("new", Spec(resolution=5))
    assert worker.wait(60)
    assert rec.of("old", "cancelled") and not rec.of("old", "done")
    assert rec.of("new", "done")
    assert worker.latest.loss.shape == (5, 5) and not np.isnan(worker.latest.loss).any()


def test_loss_fn_error_is_reported_and_next_job_works(worker_factory):
    state = {"raise_at": 0, "calls": 0}

    def loss_fn(out, y):
        state["calls"] += 1
        if state["raise_at"] and state["calls"] >= state["raise_at"]:
            raise RuntimeError("boom in the user's loss")
        if state.get("after_tile_of") and rec.of(state["after_tile_of"], "tile"):
            raise RuntimeError("boom in the user's loss")
        return nn.functional.cross_entropy(out, y)

    statuses = []
    worker, rec = worker_factory(loss_fn=loss_fn, on_status=statuses.append, tile_points=5)
    state["raise_at"] = 1  # fails at once (the set-up check calls the loss)
    worker.submit("a", Spec(resolution=5))
    assert worker.wait(60)
    (err, _), = rec.of("a", "error")
    assert "boom in the user's loss" in err["message"] and "RuntimeError" in err["message"]
    assert statuses[-1]["state"] == "error" and "boom" in statuses[-1]["message"]
    state.update(raise_at=0, calls=0)
    worker.submit("b", Spec(resolution=5))
    assert worker.wait(60) and rec.of("b", "done")
    # Fails in the middle of the stream: once its first tile is out (a count of loss calls
    # calibrated on job b depended on how many calls the plan's tuning makes).
    state.update(raise_at=0, calls=0, after_tile_of="c")
    worker.submit("c", Spec(resolution=9, seed=4))
    assert worker.wait(60)
    assert rec.of("c", "tile") and rec.of("c", "error") and not rec.of("c", "done")
    state["after_tile_of"] = None
    worker.submit("d", Spec(resolution=5, seed=4))
    assert worker.wait(60) and rec.of("d", "done")


def test_reuse_on_n_to_2n_minus_1_evaluates_only_new_points(worker_factory):
    model, data = _model(), _data()
    worker, rec = worker_factory(model, data)
    for job, n in (("n5", 5), ("n9", 9), ("n17", 17)):
        worker.submit(job, Spec(resolution=n, x_range=(-0.5, 1.0)))
        assert worker.wait(60)
        (done, _), = rec.of(job, "done")
        old = ((n + 1) // 2) ** 2 if n > 5 else 0
        assert (done["reused"], done["evaluated"]) == (old, n * n - old)
    dirs = lw.random_directions(model, 2, seed=0)
    ref = lw.compute_surface(model, data, directions=dirs, x=(-0.5, 1.0, 17), y=(-1, 1, 17),
                             progress=False)
    np.testing.assert_allclose(worker.latest.loss, ref.loss, rtol=1e-6, atol=1e-7)
    worker.submit("other-seed", Spec(resolution=17, x_range=(-0.5, 1.0), seed=1))
    assert worker.wait(60)
    assert rec.of("other-seed", "done")[0][0]["reused"] == 0


def test_regression_task_falls_back_to_loss_only(worker_factory):
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g))
    worker, rec = worker_factory(_model(), (data[0], data[1][:, :1]),
                                 loss_fn=lambda o, y: ((o[:, :1] - y) ** 2).mean())
    worker.submit("r", Spec(resolution=5))
    assert worker.wait(60) and rec.of("r", "done")
    assert rec.of("r", "start")[0][0]["metrics"] == ["loss"] and worker.latest.accuracy is None


def test_model_state_dict_is_bitwise_unchanged(worker_factory):
    model = _model(bn=True)
    model.train()  # a flag the worker must not flip
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(out, y):
        raise ValueError("failing loss")

    started = threading.Event()
    worker, rec = worker_factory(model, hook=lambda m: m["kind"] == "tile" and started.set(),
                                 tile_points=4)
    worker.submit("done", Spec(resolution=5, bn="batch"))
    worker.wait(60)
    worker.submit("eval", Spec(resolution=5, bn="eval", norm="none", ignore_biasbn=False))
    worker.wait(60)
    worker.submit("cancelled", Spec(resolution=61))
    assert started.wait(60)
    worker.cancel()
    worker.wait(60)
    worker.loss_fn = boom
    worker.submit("failed", Spec(resolution=5, seed=9))
    worker.wait(60)
    assert rec.of("done", "done") and rec.of("eval", "done") and rec.of("failed", "error")
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    assert model.training and all(m.training for m in model.modules())


# --- the widget around the worker ------------------------------------------------------
@pytest.fixture
def widget_factory():
    made = []

    def make(*args, **kwargs):
        w = LandscapeWidget(*args, **kwargs)
        rec = Recorder()
        w.send = lambda content, buffers=None: rec(content, buffers or [])
        made.append(w)
        return w, rec

    yield make
    for w in made:
        w.close()


def test_trait_round_trip_while_a_large_grid_computes(widget_factory):
    def slow_loss(out, y):
        time.sleep(0.002)  # makes the big grid take many seconds whatever the machine
        return nn.functional.cross_entropy(out, y)

    w, rec = widget_factory(_model(), _data(), loss_fn=slow_loss, autostart=False)
    w._worker.tile_points = 16
    w.resolution = 201  # a trait change schedules the job (debounced)
    deadline = time.time() + 60
    while not [m for m, _ in rec.messages if m["kind"] == "tile"] and time.time() < deadline:
        time.sleep(0.01)
    assert w.busy
    t0 = time.perf_counter()
    w.set_state({"metric": "accuracy", "log_scale": True})  # what a front-end update runs
    w.handle_message({"kind": "sync", "id": "view-2"})  # a custom message round trip
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, elapsed
    assert w.metric == "accuracy" and w.log_scale
    starts = [m for m, _ in rec.messages
              if m["kind"] == "start" and m["id"] == w._worker.current.id]
    assert len(starts) == 2  # the job's own start, and the replay for the new view
    assert w.busy and w.status["state"] == "running"  # still computing the big grid
    w.cancel()
    w.wait(60)
    assert w.status["state"] == "cancelled"


def test_python_drives_the_widget(widget_factory):
    w, rec = widget_factory(_model(), _data(), resolution=5)  # autostart
    s = w.wait(60)
    assert isinstance(s, lw.Surface) and s.loss.shape == (5, 5)
    assert w.result["shape"] == [5, 5] and w.result["complete"]
    loss = np.frombuffer(w.result["loss"], dtype="<f4").reshape(5, 5)
    np.testing.assert_allclose(loss, s.loss.astype(np.float32))
    first = w._worker.latest
    w.resolution = 9  # debounced, then computed with reuse
    assert w.busy
    s = w.wait(60)
    assert s.loss.shape == (9, 9) and s is not first
    assert rec.messages[-1][0]["reused"] == 25
    w.mode = "1d"
    c = w.wait(60)
    assert isinstance(c, lw.Curve) and c.loss.shape == (9,) and w.result["y"] is None
    html = w.to_html()
    assert "lw-state" in html and "DecompressionStream" in html and "</script" not in \
        html.split('id="lw-state">')[1].split("</script>")[0]


def test_to_html_writes_a_page(widget_factory, tmp_path):
    w, _ = widget_factory(_model(), _data(), resolution=3)
    w.wait(60)
    page = tmp_path / "landscape.html"
    text = w.to_html(page, title="<demo>")
    assert page.read_text() == text and "&lt;demo&gt;" in text
    assert len(text) < 4_000_000
    # The page carries the very bundle the notebook loads, and the result arrays.
    esm = re.search(r'bytes\("([A-Za-z0-9+/=]+)"\)', text).group(1)
    static = Path(lw.widget.widget.STATIC)
    assert gzip.decompress(base64.b64decode(esm)) == (static / "widget.js").read_bytes()
    state = json.loads(text.split('id="lw-state">')[1].split("</script>")[0])
    loss = np.frombuffer(base64.b64decode(state["result"]["loss"]), dtype="<f4")
    np.testing.assert_allclose(loss, w.surface.loss.ravel().astype(np.float32))
    assert state["_static"] and state["resolution"] == 3


EXIT_SCRIPT = """
import torch, landscape_widget as lw
from torch import nn
class R(nn.Module):
    def __init__(s):
        super().__init__(); s.rnn = nn.LSTM(5, 16, batch_first=True); s.head = nn.Linear(16, 3)
    def forward(s, x): return s.head(s.rnn(x)[0][:, -1])
torch.manual_seed(0)
m = R(); x = torch.randn(1000, 12, 5); y = torch.randint(0, 3, (1000,))
w = lw.LandscapeWidget(m, (x, y))  # starts computing in its thread
print("made", flush=True)
"""


def test_interpreter_exit_while_computing_is_clean(tmp_path):
    """A script (or a kernel shutting down) that ends while a widget computes exits cleanly:
    before the workers were stopped at exit, the daemon thread, still inside torch's LSTM,
    aborted the process with "terminate called without an active exception"."""
    import os
    import subprocess
    import sys

    # Two threads: the abort came from torch's intra-op (OpenMP) threads at teardown.
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", EXIT_SCRIPT], capture_output=True,
                          text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.stdout.strip() == "made"
    assert "terminate called" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stderr[-2000:]
