"""The pattern editor's kernel side: fit messages validated, fits streamed, stopped, resumed.

A fake front end (``send`` replaced by a recorder) drives the widget through ipywidgets'
own entry point for custom messages, as in test_widget_protocol.py.
"""

from __future__ import annotations

import math
import random
import threading

import numpy as np
import pytest
from snapshots import assert_same_snapshot, snapshot
from widget_cases import FakeFrontEnd, Unprintable
from widget_cases import model_data as _model_data

import landscape_widget as lw
from landscape_widget import LandscapeWidget
from landscape_widget.widget.protocol import decode_buffer

CHECKER = lw.checkerboard(4).astype(int).tolist()
FIT = {"mask": CHECKER, "steps": 6, "lr": 3e-3, "tau": 2.5, "cells_per_step": 50,
       "batch_size": 16, "seed": 0, "every": 2, "resume": False}


def fit_msg(id="f1", **changes):
    return {"kind": "fit", "id": id, "spec": {**FIT, **changes}}


@pytest.fixture
def widget():
    model, data = _model_data()
    test = (data[0][:20] + 0.1, data[1][:20])
    w = LandscapeWidget(model, data, test_data=test, autostart=False, resolution=5)
    yield w
    w.close()


def updates(front):
    return [(m, b) for m, b in front.sent if m["kind"] == "fit_update"]


MALFORMED = {
    "missing spec": {"kind": "fit", "id": "a"},
    "extra field": {**fit_msg(), "priority": 1},
    "spec not a dict": {"kind": "fit", "id": "a", "spec": [FIT]},
    "spec unknown field": fit_msg(evil=1),
    "spec missing field": {"kind": "fit", "id": "a",
                           "spec": {k: v for k, v in FIT.items() if k != "tau"}},
    "mask not a list": fit_msg(mask="0101"),
    "mask one row": fit_msg(mask=[[0, 1, 0]]),
    "mask 65 rows": fit_msg(mask=[[0, 1]] * 65),
    "mask ragged": fit_msg(mask=[[0, 1], [1]]),
    "mask rows not lists": fit_msg(mask=[1, 0]),
    "mask value 2": fit_msg(mask=[[0, 2], [1, 0]]),
    "mask value float": fit_msg(mask=[[0, 1.0], [1, 0]]),
    "mask value bool": fit_msg(mask=[[0, True], [1, 0]]),
    "mask value None": fit_msg(mask=[[0, None], [1, 0]]),
    "mask hostile": fit_msg(mask=[[0, Unprintable()], [1, 0]]),
    "steps 0": fit_msg(steps=0),
    "steps huge": fit_msg(steps=10**12),
    "steps float": fit_msg(steps=3.0),
    "lr NaN": fit_msg(lr=math.nan),
    "lr inf": fit_msg(lr=math.inf),
    "lr negative": fit_msg(lr=-1.0),
    "lr huge int": fit_msg(lr=10**400),
    "tau string": fit_msg(tau="2.5"),
    "tau bool": fit_msg(tau=True),
    "seed negative": fit_msg(seed=-1),
    "every 0": fit_msg(every=0),
    "resume int": fit_msg(resume=1),
    "cells_per_step huge": fit_msg(cells_per_step=10**9),
    "empty pattern": fit_msg(mask=[[0] * 4] * 4),
    "all drawn": fit_msg(mask=[[1] * 4] * 4),
    "fit_stop with spec": {"kind": "fit_stop", "id": "a", "spec": FIT},
}


@pytest.mark.parametrize("message", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_fit_message_gives_one_error(widget, message):
    front = FakeFrontEnd(widget)
    widget._handle_custom_msg(message, [])
    assert front.kinds() == ["error"], front.sent
    assert 0 < len(front.errors()[0]["message"]) <= 2000
    assert not widget._runner.busy and widget.pattern_fit is None


def test_fuzz_200_mutated_fit_messages(widget):
    front = FakeFrontEnd(widget)
    rng = random.Random(99)
    junk = [None, True, 0, -1, 2**70, 1.5, math.nan, math.inf, "", "x" * 3000, [], {}, [[]],
            [[0, 1]], [[0, 1], [1, 0, 1]]]
    for i in range(200):
        msg = fit_msg(f"z{i}")
        key = rng.choice(sorted(FIT))
        msg["spec"][key] = rng.choice(junk)
        before = len(front.sent)
        widget._handle_custom_msg(msg, [])
        replies = [m["kind"] for m, _ in front.sent[before:]]
        if replies != ["error"]:  # a junk value that happens to be valid starts a fit
            widget.stop_fit()
            widget.wait_fit(30)
    assert len(front.errors()) >= 190
    widget.wait_fit(30)
    front.sent.clear()
    widget._handle_custom_msg(fit_msg("ok"), [])
    assert widget.wait_fit(60).step == 6 and front.kinds()[-1] == "fit_done"


def test_fit_streams_heatmaps_of_both_splits(widget):
    front = FakeFrontEnd(widget)
    model_before = snapshot(widget._worker.model)
    widget._handle_custom_msg(fit_msg(), [])
    fit = widget.wait_fit(60)
    kinds = front.kinds()
    assert kinds[0] == "fit_start" and kinds[-1] == "fit_done"
    ups = updates(front)
    assert [m["step"] for m, _ in ups] == [0, 2, 4, 6]
    msg, bufs = ups[-1]
    assert (msg["rows"], msg["cols"], msg["splits"]) == (4, 4, ["train", "test"])
    arrays = [decode_buffer(b).reshape(4, 4) for b in bufs]
    x, y = _model_data()[1]
    ev = fit.evaluate((x[:256], y[:256]))
    np.testing.assert_allclose(arrays[0], ev["loss"], rtol=1e-6)
    np.testing.assert_allclose(arrays[1], ev["accuracy"])
    assert msg["scores"]["train"]["acc_diff"] == pytest.approx(fit.acc_diff(ev))
    assert np.isfinite(arrays[2]).all() and not np.allclose(arrays[2], arrays[0])
    assert widget.fit_status["state"] == "done" and widget.pattern_result["step"] == 6
    assert_same_snapshot(model_before, snapshot(widget._worker.model))


def test_stop_and_resume_continue_the_same_fit(widget):
    front = FakeFrontEnd(widget)
    gate = threading.Event()
    widget._handle_custom_msg(fit_msg(steps=5000, every=1), [])
    for _ in range(600):
        if len(updates(front)) >= 3:
            break
        gate.wait(0.05)
    widget._handle_custom_msg({"kind": "fit_stop", "id": "f1"}, [])
    fit = widget.wait_fit(30)
    stopped = fit.step
    assert 0 < stopped < 5000 and widget.fit_status["state"] == "stopped"
    assert front.sent[-1][0] == {**front.sent[-1][0], "kind": "fit_done", "stopped": True}
    widget._handle_custom_msg(fit_msg("f2", steps=4, resume=True), [])
    assert widget.wait_fit(30) is fit and fit.step == stopped + 4
    # A different mask starts a new fit even with resume.
    other = lw.checkerboard(4, 6).astype(int).tolist()
    widget._handle_custom_msg(fit_msg("f3", mask=other, steps=2, resume=True), [])
    new = widget.wait_fit(30)
    assert new is not fit and new.step == 2 and new.shape == (4, 6)


def test_a_new_fit_stops_the_running_one(widget):
    front = FakeFrontEnd(widget)
    widget._handle_custom_msg(fit_msg("long", steps=100000, every=50), [])
    widget._handle_custom_msg(fit_msg("short", steps=3), [])
    fit = widget.wait_fit(60)
    done = {m["id"]: m for m, _ in front.sent if m["kind"] == "fit_done"}
    assert done["long"]["stopped"] and not done["short"]["stopped"] and fit.step == 3


def test_python_api_and_pattern_trait(widget):
    widget.pattern = lw.text_mask("L", 8).astype(int).tolist()
    widget.fit_pattern(steps=3, batch_size=16)
    fit = widget.wait_fit(60)
    np.testing.assert_array_equal(fit.binary, widget.mask)
    with pytest.raises(ValueError, match="no good cell"):
        widget.fit_pattern(np.zeros((4, 4), int))
    widget.fit_pattern(lw.checkerboard(6), steps=2)
    assert widget.wait_fit(60).shape == (6, 6) and widget.mask.shape == (6, 6)


@pytest.mark.parametrize("state", [{"pattern": "0101"}, {"pattern": [[0, "a"]]},
                                   {"show_pattern": "yes"}])
def test_bad_pattern_trait_from_front_end_is_an_error_message(widget, state):
    front = FakeFrontEnd(widget)
    widget.set_state(state)
    assert front.kinds() == ["error"]


def test_model_fn_error_is_reported_and_the_widget_survives():
    model, data = _model_data()
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("cannot build")

    w = LandscapeWidget(model, data, model_fn=broken, autostart=False, resolution=5)
    try:
        front = FakeFrontEnd(w)
        w._handle_custom_msg(fit_msg(), [])
        w.wait_fit(30)
        assert "cannot build" in front.errors()[0]["message"]
        assert w.fit_status["state"] == "error"
        w._handle_custom_msg({"kind": "compute", "id": "c", "spec": {**w.spec().to_dict()}}, [])
        assert w.wait(60).loss.shape == (5, 5)
    finally:
        w.close()


def test_close_stops_a_running_fit():
    model, data = _model_data()
    w = LandscapeWidget(model, data, autostart=False)
    front = FakeFrontEnd(w)
    w._handle_custom_msg(fit_msg(steps=100000, every=100), [])
    for _ in range(600):
        if updates(front):
            break
        threading.Event().wait(0.05)
    w.close()
    assert w._runner.wait(30) and w.pattern_fit.step < 100000


def test_to_html_carries_the_pattern_heatmap(widget, tmp_path):
    widget.fit_pattern(lw.checkerboard(4), steps=2, every=1)
    widget.wait_fit(60)
    page = widget.to_html(tmp_path / "w.html")
    assert '"pattern_result"' in page and '"train_loss": "' in page
