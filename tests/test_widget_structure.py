"""The widget package's shape: no import circle, one source for the spec, typed errors.

- ``widget/`` has no import cycle (module-level or lazy imports alike), and its wire and
  spec modules are leaves;
- the spec's fields, enumerations and limits exist once in Python: the traits, the wire
  check and the schema the front end reads agree with :class:`Spec` and with what
  :func:`parse_spec` accepts; the JS source holds no copy of them;
- failures are told apart by class (:mod:`landscape_widget.core.errors`), and a failed job
  keeps its traceback.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import torch
import traitlets
from torch import nn

import landscape_widget as lw
from landscape_widget import LandscapeWidget
from landscape_widget.core import errors, hessian, hvp
from landscape_widget.widget import spec as spec_module
from landscape_widget.widget.protocol import ProtocolError, Spec, parse_spec
from landscape_widget.widget.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
WIDGET = ROOT / "landscape_widget" / "widget"


def _imports(path: Path) -> set[str]:
    """The ``widget/`` modules ``path`` imports (``from . import x``, ``from .x import y``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(alias.name for alias in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    names = {p.stem for p in WIDGET.glob("*.py")} - {"__init__"}
    return {n: _imports(WIDGET / f"{n}.py") & names for n in names}


def test_widget_modules_form_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle in widget/: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert len(graph) >= 12, sorted(graph)  # the walk saw the package


def test_spec_and_protocol_are_leaves():
    graph = _graph()
    assert graph["spec"] == set()
    assert graph["fit_spec"] <= {"spec"}
    assert graph["protocol"] <= {"spec", "fit_spec"}


def test_the_start_message_is_built_in_one_place():
    built = [p.name for p in WIDGET.glob("*.py") if '"kind": "start"' in p.read_text()]
    assert built == ["protocol.py"], built


def test_traits_wire_types_and_schema_come_from_the_spec_dataclass():
    fields = [f.name for f in dataclasses.fields(Spec)]
    schema = LandscapeWidget.class_traits()["_spec_schema"].default()
    assert schema["fields"] == fields == list(spec_module.COMPUTE_TRAITS)
    assert list(spec_module.SPEC_FIELDS) == fields
    assert schema["defaults"] == Spec().to_dict()
    traits = LandscapeWidget.class_traits()
    for name in fields:
        assert traits[name].metadata.get("sync") is True, name
        assert traits[name].default() == Spec().to_dict()[name], name
    for name, values in schema["choices"].items():
        assert isinstance(traits[name], traitlets.Enum), name
        assert list(traits[name].values) == values, name


def test_schema_limits_are_what_parse_spec_accepts():
    """An independent check: each cap is accepted and cap + 1 refused by the validator."""
    schema = spec_module.schema()
    caps = schema["resolution"]
    base = Spec().to_dict()
    cases = {"2d": {}, "1d": {"mode": "1d"}, "curvature": {"quantity": "curvature"},
             "plane": {"direction": "plane", "vertices": ["a", "b", "c"],
                       "x_range": [-0.2, 1.2]}}
    for case, changes in cases.items():
        raw = {**base, **changes}
        models = ("a", "b", "c")
        assert parse_spec({**raw, "resolution": caps[case]}, models=models).resolution \
            == caps[case]
        with pytest.raises(ProtocolError):
            parse_spec({**raw, "resolution": caps[case] + 1}, models=models)
    low, high = schema["limits"]["seed"]
    assert parse_spec({**base, "seed": high}).seed == high
    for bad in (low - 1, high + 1):
        with pytest.raises(ProtocolError, match="seed"):
            parse_spec({**base, "seed": bad})
    for name, values in schema["choices"].items():
        if name != "direction":  # the directions need the widget's models, model_b...
            for v in values:
                assert getattr(parse_spec({**base, name: v}), name) == v
        with pytest.raises(ProtocolError, match="is not one of"):
            parse_spec({**base, name: "no-such-value"})


def test_js_source_has_no_copy_of_the_spec():
    src = {p.name: p.read_text() for p in (ROOT / "js" / "src").glob("*.js")}
    text = "\n".join(src.values())
    assert "COMPUTE_KEYS" not in text and "MAX_RES" not in text and "MAX_PLANE" not in text
    # No list of the compute fields, no retyped cap of the resolution or the seed.
    assert not re.search(r'"ignore_biasbn",\s*"x_range"', text)
    for number in (spec_module.MAX_2D, spec_module.MAX_1D):
        assert not re.search(rf"\b{number}\b", text), number
    assert "MAX_CURVATURE" not in text and "resolution: 31" not in text
    assert "2 ** 31" not in text
    assert "DEBOUNCE_MS" not in src["widget.js"]  # debounced once, in the kernel


def test_front_end_cannot_write_the_schema():
    model = nn.Linear(3, 2)
    data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    w = LandscapeWidget(model, data, autostart=False)
    try:
        sent = []
        w.send = lambda msg, buffers=None: sent.append(msg)
        before = dict(w._spec_schema)
        w.set_state({"_spec_schema": {"fields": []}})
        assert w._spec_schema == before
        assert sent and sent[-1]["kind"] == "error"
    finally:
        w.close()


def test_enum_control_refuses_a_value_outside_it():
    model = nn.Linear(3, 2)
    data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    with pytest.raises(ValueError, match="mode"):
        LandscapeWidget(model, data, mode="3d", autostart=False)


# --- typed errors -----------------------------------------------------------------------
def test_cancelled_lives_in_core_errors_and_old_imports_still_work():
    assert hvp.Cancelled is errors.Cancelled is hessian.Cancelled
    assert issubclass(errors.Cancelled, RuntimeError)


def test_reuse_of_another_model_is_a_reuse_mismatch_and_still_a_value_error():
    torch.manual_seed(0)
    model, other = nn.Linear(3, 2), nn.Linear(3, 2)
    data = (torch.randn(16, 3), torch.randint(0, 2, (16,)))
    dirs = lw.random_directions(model, 2, seed=0)
    first = lw.compute_surface(model, data, directions=dirs, x=(-1, 1, 3), y=(-1, 1, 3),
                               progress=False)
    with pytest.raises(errors.ReuseMismatch, match=r"^reuse= was computed with a different"):
        lw.compute_surface(other, data, directions=dirs, x=(-1, 1, 5), y=(-1, 1, 5),
                           reuse=first, progress=False)
    assert issubclass(errors.ReuseMismatch, ValueError)


def test_accuracy_asked_for_on_regression_is_accuracy_undefined():
    model = nn.Linear(3, 1)
    data = (torch.randn(16, 3), torch.randn(16, 1))
    with pytest.raises(errors.AccuracyUndefined, match="regression") as info:
        lw.compute_curve(model, data, x=(-1, 1, 3), loss_fn=nn.MSELoss(),
                         metrics=("loss", "accuracy"), progress=False)
    assert isinstance(info.value, ValueError)


def test_a_failed_job_keeps_its_traceback():
    def exploding_loss(outputs, targets):
        raise RuntimeError("boom from the user's loss")

    model = nn.Linear(3, 2)
    data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    statuses, sent = [], []
    worker = Worker(model, data, send=lambda m, b: sent.append(m), loss_fn=exploding_loss,
                    on_status=statuses.append)
    try:
        worker.submit("bad", Spec(resolution=3))
        assert worker.wait(30)
    finally:
        worker.close()
    (err,) = [m for m in sent if m["kind"] == "error"]
    # The engine names the failing call and keeps the user's error in its message.
    assert err["message"].startswith("ValueError: loss_fn(outputs, targets) failed")
    assert "RuntimeError: boom from the user's loss" in err["message"]
    final = statuses[-1]
    assert final["state"] == "error" and final["message"] == err["message"]
    tb = final["traceback"]
    assert tb.startswith("Traceback (most recent call last):")
    assert "exploding_loss" in tb and tb.rstrip().endswith(err["message"])


def test_widget_last_error_holds_the_traceback():
    def exploding_loss(outputs, targets):
        raise ValueError("bad targets")

    model = nn.Linear(3, 2)
    data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    w = LandscapeWidget(model, data, loss_fn=exploding_loss, resolution=3, autostart=False)
    try:
        assert w.last_error is None
        job = w.compute()
        w.wait(30)
        assert w.status["state"] == "error"
        last = w.last_error
        assert last["id"] == job and last["message"].startswith("ValueError: loss_fn")
        assert last["message"].endswith("(ValueError: bad targets)")
        assert "exploding_loss" in last["traceback"]
        assert w.status["traceback"] == last["traceback"]
    finally:
        w.close()


def test_one_direction_cache_for_every_type():
    model = nn.Linear(3, 2)
    data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    worker = Worker(model, data, send=lambda m, b: None)
    try:
        seen = set()
        for seed in range(12):
            d = worker.directions_for(Spec(seed=seed))
            seen.add(id(d))
        assert len(worker.directions) == 8  # the LRU keeps the last eight direction sets
        again = worker.directions_for(Spec(seed=11))
        assert id(again) in seen  # a hit returns the cached set itself
        expect = lw.random_directions(model, 2, seed=11)
        for got, want in zip(again, expect, strict=True):
            assert all(torch.equal(got[k], want[k]) for k in want)
    finally:
        worker.close()
