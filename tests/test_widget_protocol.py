"""Inbound messages: every malformed or hostile one becomes an ``error`` message, never an
exception in the kernel, and the widget keeps working afterwards.

The widget is driven through ipywidgets' own entry point for custom messages
(``Widget._handle_custom_msg``), with ``send`` replaced by a recorder: a fake front end.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from widget_cases import FakeFrontEnd, Unprintable
from widget_cases import model_data as _model_data

from landscape_widget import LandscapeWidget
from landscape_widget.widget import protocol
from landscape_widget.widget.protocol import MAX_1D, MAX_2D, ProtocolError, Spec, parse_spec

VALID = Spec(resolution=5).to_dict()


def spec_with(**changes):
    return {"kind": "compute", "id": "req-1", "spec": {**VALID, **changes}}


MALFORMED = {
    "not a dict (list)": [1, 2, 3],
    "not a dict (str)": "compute",
    "not a dict (None)": None,
    "not a dict (int)": 7,
    "empty dict": {},
    "unknown kind": {"kind": "launch_missiles", "id": "a"},
    "kind of wrong type": {"kind": ["compute"], "id": "a"},
    "kind is None": {"kind": None, "id": "a"},
    "missing id": {"kind": "cancel"},
    "empty id": {"kind": "cancel", "id": ""},
    "id not a string": {"kind": "cancel", "id": 12},
    "id far too long": {"kind": "cancel", "id": "x" * 100_000},
    "extra field on cancel": {"kind": "cancel", "id": "a", "spec": VALID},
    "extra field on compute": {**spec_with(), "priority": "high"},
    "non-string extra keys": {"kind": "cancel", "id": "a", 1: 2, (3,): 4},
    "missing spec": {"kind": "compute", "id": "a"},
    "spec not a dict": {"kind": "compute", "id": "a", "spec": [VALID]},
    "spec missing a field": {"kind": "compute", "id": "a",
                             "spec": {k: v for k, v in VALID.items() if k != "seed"}},
    "spec unknown field": spec_with(evil="__import__('os')"),
    "spec non-string keys": {"kind": "compute", "id": "a", "spec": {**VALID, 5: 1, None: 2}},
    "huge resolution": spec_with(resolution=10**9),
    "resolution above 2D cap": spec_with(resolution=MAX_2D + 1),
    "resolution above 1D cap": spec_with(mode="1d", resolution=MAX_1D + 1),
    "resolution 1": spec_with(resolution=1),
    "negative resolution": spec_with(resolution=-5),
    "resolution float": spec_with(resolution=5.0),
    "resolution string": spec_with(resolution="5"),
    "resolution bool": spec_with(resolution=True),
    "seed bool": spec_with(seed=False),
    "seed negative": spec_with(seed=-1),
    "seed huge": spec_with(seed=2**64),
    "ignore_biasbn int": spec_with(ignore_biasbn=1),
    "mode unknown": spec_with(mode="3d"),
    "direction unknown": spec_with(direction="pca"),
    "interpolation without model_b": spec_with(direction="interpolation"),
    "norm unknown": spec_with(norm="batch"),
    "norm None": spec_with(norm=None),
    "bn unknown": spec_with(bn="train"),
    "quantity unknown": spec_with(quantity="hessian"),
    "curvature in 1D": spec_with(quantity="curvature", mode="1d"),
    "curvature too fine": spec_with(quantity="curvature", resolution=33),
    "pca without trajectory": spec_with(direction="pca"),
    "saddle in 1D": spec_with(direction="saddle", mode="1d"),
    "wine-bottle in 1D": spec_with(direction="wine-bottle", mode="1d"),
    "shape type misspelt": spec_with(direction="w-peak"),
    "x_range NaN": spec_with(x_range=[math.nan, 1.0]),
    "x_range inf": spec_with(x_range=[-1.0, math.inf]),
    "y_range -inf": spec_with(y_range=[-math.inf, 1.0]),
    "x_range huge int": spec_with(x_range=[0, 10**400]),
    "x_range too wide": spec_with(x_range=[-1e7, 1.0]),
    "x_range reversed": spec_with(x_range=[1.0, -1.0]),
    "x_range empty": spec_with(x_range=[0.5, 0.5]),
    "x_range three entries": spec_with(x_range=[-1, 0, 1]),
    "x_range string": spec_with(x_range="-1,1"),
    "x_range bools": spec_with(x_range=[False, True]),
    "x_range strings": spec_with(x_range=["-1", "1"]),
    "x_range nested": spec_with(x_range=[[-1], [1]]),
    "y_range None": spec_with(y_range=None),
    "spec is a dict of garbage": {"kind": "compute", "id": "a", "spec": {"": Unprintable()}},
    "hostile repr value": spec_with(mode=Unprintable()),
}


@pytest.mark.parametrize("message", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_message_gives_one_error_and_no_exception(widget, message):
    front = FakeFrontEnd(widget)
    widget._handle_custom_msg(message, [])
    assert front.kinds() == ["error"]
    err = front.errors()[0]
    assert isinstance(err["message"], str) and 0 < len(err["message"]) <= 2000
    assert widget.status["state"] == "error"
    assert not widget.busy


def test_error_reply_carries_a_usable_id(widget):
    front = FakeFrontEnd(widget)
    widget.handle_message(spec_with(resolution=10**9))
    assert front.errors()[0]["id"] == "req-1"
    widget.handle_message({"kind": "cancel", "id": "y" * 1000})
    assert front.errors()[1]["id"] is None
    assert "resolution" in front.errors()[0]["message"]


def _mutations(rng: random.Random):
    """Messages that each break the protocol in one random way."""
    junk = [None, True, 0, -1, 2**70, 1.5, math.nan, math.inf, "", "x" * 5000, [], {}, [None],
            {"kind": "compute"}, b"bytes", (1, 2)]
    while True:
        base = {"kind": "compute", "id": f"f{rng.randrange(10**6)}", "spec": dict(VALID)}
        choice = rng.randrange(7)
        if choice == 0:  # replace the whole message
            yield rng.choice(junk)
        elif choice == 1:  # break the envelope
            key = rng.choice(["kind", "id"])
            base[key] = rng.choice([v for v in junk if not isinstance(v, str) or v == ""])
            yield base
        elif choice == 2:  # drop something
            if rng.random() < 0.5:
                del base[rng.choice(["kind", "id", "spec"])]
            else:
                del base["spec"][rng.choice(sorted(VALID))]  # every field is required
            yield base
        elif choice == 3:  # extra field somewhere
            target = base if rng.random() < 0.5 else base["spec"]
            target[rng.choice(["extra", "__proto__", "constructor", "Kind"])] = rng.choice(junk)
            yield base
        elif choice == 4:  # a spec field of the wrong type or out of range
            key = rng.choice(sorted(VALID))
            bad = {
                "mode": ["3d", "", 2],
                "direction": ["pca", "interpolation", 0, "Saddle", "mined: w-peak"],
                "norm": ["l2", None], "ignore_biasbn": [1, "true", None],
                "x_range": [[math.nan, 1], [1, -1], [0, 0], "(-1, 1)", [0, 1e9]],
                "y_range": [[-math.inf, 0], [None, 1], [1]],
                "resolution": [0, 1, MAX_2D + 1, 10**12, 3.0, "9", True],
                "seed": [-1, 2**31, 1.0, None, True], "bn": ["train", True],
                "quantity": ["hessian", None, 1, "Curvature"],
                "vertices": [["sgd"], "sgd", [1], None, ["a", "b", "c", "d"]],
                "precision": ["half", "FP32", None, 16],
                "samples": ["2k", "Auto", "", None, 1000, True],
            }[key]
            base["spec"][key] = rng.choice(bad)
            yield base
        elif choice == 5:  # spec replaced by junk
            base["spec"] = rng.choice([v for v in junk if not isinstance(v, dict) or not v])
            yield base
        else:  # unknown kind
            base["kind"] = rng.choice(["tile", "done", "COMPUTE", "compute ", "error", "eval"])
            yield base


def test_fuzz_250_malformed_messages_raise_nothing_and_widget_survives(widget):
    front = FakeFrontEnd(widget)
    rng = random.Random(1234)
    gen = _mutations(rng)
    for i in range(250):
        msg = next(gen)
        before = len(front.sent)
        widget._handle_custom_msg(msg, [])  # must not raise
        replies = [m for m, _ in front.sent[before:]]
        assert [m["kind"] for m in replies] == ["error"], (i, msg)
    assert not widget.busy
    # The widget still computes after the storm.
    front.sent.clear()
    widget._handle_custom_msg({"kind": "compute", "id": "ok", "spec": VALID}, [])
    surface = widget.wait(60)
    assert surface.loss.shape == (5, 5) and front.kinds()[-1] == "done"


def test_valid_messages_are_accepted(widget):
    front = FakeFrontEnd(widget)
    widget.handle_message({"kind": "compute", "id": "c1", "spec": {**VALID, "resolution": 7}})
    widget.wait(60)
    assert widget.resolution == 7  # the controls follow the request
    assert front.errors() == []
    widget.handle_message({"kind": "cancel", "id": "c1"})  # nothing running: a no-op
    widget.handle_message({"kind": "sync", "id": "s1"})  # nothing running: no reply needed
    assert front.errors() == []


def test_parse_spec_round_trip_and_types():
    spec = parse_spec(VALID)
    assert spec.to_dict() == VALID and spec.shape == (5, 5)
    assert parse_spec({**VALID, "mode": "1d", "resolution": MAX_1D}).shape == (MAX_1D,)
    assert parse_spec({**VALID, "x_range": (-2, 3)}).x_range == (-2.0, 3.0)
    with pytest.raises(ProtocolError, match="direction"):
        parse_spec({**VALID, "direction": "interpolation"}, directions=("random",))
    assert parse_spec({**VALID, "direction": "interpolation"}).direction == "interpolation"


def test_error_text_of_hostile_values_is_short():
    with pytest.raises(ProtocolError) as info:
        parse_spec({**VALID, "mode": "m" * 10**6})
    assert len(str(info.value)) < 300
    assert protocol.short(Unprintable()) == "<Unprintable>"


def test_constructor_refuses_unknown_keywords_and_bad_values():
    model, data = _model_data()
    with pytest.raises(TypeError, match="resolutoin"):
        LandscapeWidget(model, data, resolutoin=5, autostart=False)
    with pytest.raises(ValueError, match="resolution"):
        LandscapeWidget(model, data, resolution=5000, autostart=False)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        LandscapeWidget("not a model", data, autostart=False)


def test_invalid_trait_from_python_is_reported_not_raised(widget):
    front = FakeFrontEnd(widget)
    widget.x_range = [1.0, -1.0]  # as a front end could send while typing
    widget.wait(10)
    assert front.kinds() == ["error"] and "x_range" in front.errors()[0]["message"]
    assert widget.status["state"] == "error"


# --- the %landscape magic: the other front door -------------------------------------
def test_magic_builds_the_widget_from_notebook_names():
    from landscape_widget.magic import MagicError, load_ipython_extension, widget_from_line

    model, data = _model_data()

    class Holder:
        net = model

    ns = {"model": model, "data": data, "trainer": Holder(), "other": _model_data()[0]}
    w = widget_from_line("trainer.net data --model-b other --resolution 5", ns)
    try:
        assert w.resolution == 5
        assert "interpolation" in [d["direction"] for d in w.direction_types]
        assert w.wait(60).loss.shape == (5, 5)
    finally:
        w.close()
    import landscape_widget as lw

    traj = lw.Trajectory()
    for i in range(3):
        traj.record({k: v + 0.1 * i * torch.ones_like(v) for k, v in model.state_dict().items()})
    ns["traj"] = traj
    w = widget_from_line("model data --trajectory traj --test-data data --resolution 3", ns)
    try:
        assert "pca" in [d["direction"] for d in w.direction_types]
    finally:
        w.close()
    for line, match in [("model nope", "no variable named 'nope'"),
                        ("model", "required: data"),
                        ("model data --bogus 1", "unrecognized"),
                        ("model data --resolution many", "invalid int"),
                        ("model 'data", "quotation"),
                        ("trainer.missing data", "no attribute 'missing'")]:
        with pytest.raises(MagicError, match=match):
            widget_from_line(line, ns)

    registered = {}

    class FakeShell:
        def register_magic_function(self, fn, magic_kind, magic_name):
            registered[magic_name] = (fn, magic_kind)

    load_ipython_extension(FakeShell())
    fn, kind = registered["landscape"]
    assert kind == "line" and "Usage" in fn.__doc__


@pytest.mark.parametrize("state", [{"resolution": "many"}, {"x_range": [None, 1.0]},
                                   {"ignore_biasbn": "yes"}, {"status": 5}, {"seed": 1.5}])
def test_front_end_trait_update_of_wrong_type_is_an_error_message(widget, state):
    front = FakeFrontEnd(widget)
    widget.set_state(state)  # what ipywidgets runs for a state update from the browser
    assert front.kinds() == ["error"] and "Refused a control value" in front.errors()[0]["message"]
    assert widget.resolution == 5 and widget.x_range == [-1.0, 1.0]
