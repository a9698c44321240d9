"""Models researchers bring (issue 14): recurrent nets, a Transformer, ResNet-18 with
BatchNorm, QAT, parametrizations, legacy weight_norm, stateful forwards and hooks,
class-sorted data.

Each case is checked against the float64 per-point oracle (``tests/oracle.py``) and a
full-state snapshot of the user's model (``tests/snapshots.py``: attributes, all buffers,
hooks and their state, flags, classes; not only ``state_dict``) after a successful, a
failed and a cancelled call, in the API (``compute_surface``, ``compute_curve``,
``iter_tiles``) and in the widget's worker thread.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import REAL_CASE_IDS, REAL_CASES, gaussian_direction
from oracle import linspace, naive_eval, naive_surface
from snapshots import assert_same_snapshot, snapshot

import landscape_widget as lw
from landscape_widget.core import plans, tuning
from landscape_widget.core.state import BN_BATCH_SIZE
from landscape_widget.widget.protocol import Spec
from landscape_widget.widget.worker import Worker

# float32 engine against the float64 oracle; fake quantisation compares float32 with
# float32 (a weight one ulp away can land in the neighbouring quantisation bin).
RTOL, ATOL = 1e-5, 1e-6


def _build(case):
    model = case["model"]()
    x, y = case["data"]()
    return model, x, y


def _oracle_kw(case):
    kw = {"bn": case["bn"], "bn_batch_size": case.get("bn_batch_size"),
          "dtype": case.get("oracle_dtype", torch.float64)}
    if case.get("template"):
        kw["template"] = case["model"]()
    return kw


def _tol(case):
    return (2e-4, 2e-5) if case.get("oracle_dtype") == torch.float32 else (RTOL, ATOL)


def _bn_kw(case):
    return {"bn": case["bn"], "bn_batch_size": case.get("bn_batch_size")} if (
        case["bn"] == "batch") else {}


@pytest.mark.parametrize("case", REAL_CASES, ids=REAL_CASE_IDS)
def test_surface_matches_oracle_and_model_untouched(case):
    model, x, y = _build(case)
    d1, d2 = gaussian_direction(model, 1, 0.3), gaussian_direction(model, 2, 0.3)
    before = snapshot(model)
    surf = lw.compute_surface(model, (x, y), directions=(d1, d2), x=case["x"], y=case["y"],
                              progress=False, **_bn_kw(case))
    assert_same_snapshot(before, snapshot(model))
    loss, acc = naive_surface(model, x, y, d1, d2, linspace(case["x"]), linspace(case["y"]),
                              **_oracle_kw(case))
    rtol, atol = _tol(case)
    np.testing.assert_allclose(surf.loss, loss, rtol=rtol, atol=atol)
    np.testing.assert_allclose(surf.accuracy, acc, atol=1e-12)
    plan = surf.spec["plan"]
    if case.get("vmap_fails"):  # vmap failed (and says why), or was not worth a trial
        assert plan["strategy"] == "loop" and (plan["vmap_error"] or not plan["complete"]), plan
    assert surf.spec["bn_batch_size"] == (case.get("bn_batch_size") if case["bn"] == "batch"
                                          else None)


@pytest.mark.parametrize("strategy", ["auto", "vmap", "loop"])
@pytest.mark.parametrize("case", REAL_CASES[:4], ids=REAL_CASE_IDS[:4])
def test_curve_every_strategy_matches_oracle(case, strategy):
    """Whatever strategy is asked for, the result is the oracle's; a vmap that cannot run
    falls back to the loop, with a warning only when vmap was asked for explicitly."""
    model, x, y = _build(case)
    d = gaussian_direction(model, 3, 0.3)
    before = snapshot(model)
    opts = {} if strategy == "auto" else {"strategy": strategy}
    if strategy == "vmap" and case.get("vmap_fails"):
        with pytest.warns(RuntimeWarning, match="point"):
            curve = lw.compute_curve(model, (x, y), direction=d, x=case["curve_x"],
                                     progress=False, evaluator_options=opts)
    else:
        curve = lw.compute_curve(model, (x, y), direction=d, x=case["curve_x"],
                                 progress=False, evaluator_options=opts)
    assert_same_snapshot(before, snapshot(model))
    loss, _ = naive_eval(model, x, y, [d], linspace(case["curve_x"])[:, None],
                         **_oracle_kw(case))
    rtol, atol = _tol(case)
    np.testing.assert_allclose(curve.loss, loss, rtol=rtol, atol=atol)
    plan = curve.spec["plan"]
    if case.get("vmap_fails") and strategy == "vmap":
        assert plan["vmap_error"]
    if case.get("vmap_fails") and strategy == "auto":  # or vmap was not worth a trial
        assert plan["vmap_error"] or not plan["complete"], plan


class Boom(Exception):
    """The user's own exception class."""


@pytest.mark.parametrize("case", REAL_CASES, ids=REAL_CASE_IDS)
def test_failed_call_leaves_model_untouched(case):
    """A loss_fn failing mid-grid: the user's error arrives, the model is as before (QAT
    observers, counters and hooks included)."""
    model, x, y = _build(case)
    calls = {"n": 0}

    def failing(outputs, targets):
        calls["n"] += 1
        if calls["n"] >= 4:
            raise Boom("loss_fn failed")
        return F.cross_entropy(outputs, targets)

    before = snapshot(model)
    with pytest.raises(Boom):
        lw.compute_surface(model, (x, y), x=(-1, 1, 5), y=(-1, 1, 5), loss_fn=failing,
                           progress=False, **_bn_kw(case))
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("case", REAL_CASES, ids=REAL_CASE_IDS)
def test_cancelled_stream_leaves_model_untouched(case):
    model, x, y = _build(case)
    before = snapshot(model)
    cancel = threading.Event()
    stream = lw.iter_tiles(model, (x, y), x=(-1, 1, 9), y=(-1, 1, 9), cancel=cancel,
                           tile_points=4, **_bn_kw(case))
    for i, _ in enumerate(stream):
        if i == 1:
            cancel.set()
    assert 0 < stream.evaluated < stream.total
    assert_same_snapshot(before, snapshot(model))


def _worker(model, x, y, case, **kw):
    sent = []
    return Worker(model, (x, y), send=lambda m, b: sent.append(m), tile_points=4, **kw), sent


@pytest.mark.parametrize("case", REAL_CASES[:7], ids=REAL_CASE_IDS[:7])
def test_widget_worker_matches_oracle_and_never_flips_flags(case, monkeypatch):
    """The worker thread computes on a private copy: the user's model stays in train mode
    throughout (read from this thread while it computes), and is untouched afterwards."""
    # Every candidate is timed, however loaded the machine: whether vmap's trial fits the
    # tuning allowance must not decide whether its failure is reported (a loaded machine
    # skipped it, and the vmap_error asserted below was then empty).
    monkeypatch.setattr(tuning, "TUNING_FLOOR", 1e3)
    plans.forget_plans()
    model, x, y = _build(case)
    model.train()
    before = snapshot(model)
    worker, sent = _worker(model, x, y, case)
    flags = []
    try:
        worker.submit("a", Spec(resolution=5, x_range=(-0.5, 0.5), y_range=(-0.5, 0.5),
                                bn=case["bn"]))
        while worker.busy:
            flags.append(all(m.training for m in model.modules()))
        assert worker.wait(120)
        result = worker.latest
        assert [m for m in sent if m["kind"] == "error"] == []
        assert all(flags) and flags
        assert_same_snapshot(before, snapshot(model))
        ref = model.eval()  # the oracle evaluates in eval mode, as the engine does
        loss, _ = naive_surface(ref, x, y, *result.directions, result.x, result.y,
                                **{**_oracle_kw(case), "bn_batch_size": (
                                    BN_BATCH_SIZE if case["bn"] == "batch"
                                    else None)})
        rtol, atol = _tol(case)
        np.testing.assert_allclose(result.loss, loss, rtol=rtol, atol=atol)
        if case.get("vmap_fails"):
            assert result.spec["plan"]["vmap_error"]
            assert any("(no vmap)" in (m.get("plan") or "") for m in sent
                       if m["kind"] == "progress")
    finally:
        worker.close()


@pytest.mark.parametrize("case", [REAL_CASES[0], REAL_CASES[3], REAL_CASES[6]],
                         ids=[REAL_CASE_IDS[0], REAL_CASE_IDS[3], REAL_CASE_IDS[6]])
def test_widget_worker_cancel_and_failure_leave_model_untouched(case):
    model, x, y = _build(case)
    before = snapshot(model)
    worker, sent = _worker(model, x, y, case)
    try:
        job = worker.submit("big", Spec(resolution=41))
        while not any(m["kind"] == "tile" for m in sent):
            assert worker.busy
        worker.cancel(job.id)
        assert worker.wait(60)
        assert job.state == "cancelled"
        assert_same_snapshot(before, snapshot(model))
    finally:
        worker.close()

    def failing(outputs, targets):
        raise Boom("no loss here")

    worker, sent = _worker(model, x, y, case, loss_fn=failing)
    try:
        worker.submit("bad", Spec(resolution=5))
        assert worker.wait(60)
        assert any(m["kind"] == "error" and "Boom" in m["message"] for m in sent)
        assert_same_snapshot(before, snapshot(model))
    finally:
        worker.close()
