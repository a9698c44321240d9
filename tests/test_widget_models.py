"""The widget with several named models: "interpolate A → B" and the plane through three.

Oracles are independent of the widget's streaming: the plane is compared with the headless
``lw.triangle_surface`` (same models and data) and its vertices, like the ends of an
interpolation, with each model called directly (``model(inputs)`` under ``no_grad``), which
shares no code with the vmapped engine.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import traitlets as t
from snapshots import assert_same_snapshot, snapshot
from widget_cases import FakeFrontEnd, Recorder, assemble
from widget_cases import worker_data as _data
from widget_cases import worker_model as _model

import landscape_widget as lw
from landscape_widget import LandscapeWidget
from landscape_widget.experiments.triangle import lattice
from landscape_widget.widget.protocol import ProtocolError, Spec, parse_spec

NAMES = ("sgd", "adam", "rmsprop")


def _models(bn: bool = True) -> dict:
    """Three models of one architecture (with BatchNorm: its statistics are part of a point)."""
    return {name: _model(bn=bn, seed=i) for i, name in enumerate(NAMES)}


def _direct(model, data) -> float:
    """The model's mean cross-entropy, calling it directly (eval mode, as the widget's bn)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(data[0]), data[1]))
    finally:
        model.train(was)


def _plane_spec(**changes) -> dict:
    spec = Spec(direction="plane", norm="none", resolution=5, x_range=(-0.2, 1.2),
                y_range=(-0.2, 1.2), vertices=NAMES).to_dict()
    return {**spec, **changes}


@pytest.fixture
def widget():
    w = LandscapeWidget(models=_models(), data=_data(), autostart=False, resolution=5)
    yield w
    w.close()


def _record(widget) -> Recorder:
    rec = Recorder()
    widget.send = lambda content, buffers=None: rec(content, buffers or [])
    return rec


def test_plane_streams_the_triangle_surface(widget):
    models, data = _models(), _data()
    rec = _record(widget)
    widget.handle_message({"kind": "compute", "id": "p", "spec": _plane_spec()})
    tri = widget.wait(60)
    (start, _), = rec.of("p", "start")
    assert start["plane"]["names"] == list(NAMES) and start["plane"]["margin"] == 0.2
    seen, loss, acc, x = assemble(rec, "p")
    assert (seen == 1).all()  # every lattice point exactly once, the region's outside as NaN
    ref = lw.triangle_surface(*models.values(), data, resolution=5, margin=0.2,
                              names=NAMES, progress=False)
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(ref.loss))
    np.testing.assert_allclose(loss, ref.loss, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(acc, ref.accuracy, atol=1e-6)
    np.testing.assert_array_equal(x, ref.alpha[0].astype(np.float32))
    assert isinstance(tri, lw.TriangleSurface) and tri.names == list(NAMES)
    np.testing.assert_allclose(tri.loss, ref.loss, rtol=1e-12, equal_nan=True)
    for i, model in enumerate(models.values()):
        direct = _direct(model, data)
        assert tri.loss_at_model(i) == pytest.approx(direct, rel=1e-6)
        r, c = tri.vertex_index(i)
        assert loss[r, c] == pytest.approx(direct, rel=1e-6)
    inside = int(np.isfinite(ref.loss).sum())
    (done, _), = rec.of("p", "done")
    assert (done["evaluated"], done["reused"]) == (inside, 0)  # the outside is no "reuse"
    assert widget.vertices == list(NAMES) and widget.direction == "plane"
    # The plane survives a re-render and the static HTML export.
    page = widget.to_html()
    state = json.loads(page.split('id="lw-state">')[1].split("</script>")[0])
    assert state["result"]["plane"]["names"] == list(NAMES)
    assert state["vertices"] == list(NAMES)


def test_plane_arrives_in_several_tiles_coarse_first(worker_factory):  # noqa: F811
    models, data = _models(bn=False), _data()
    worker, rec = worker_factory(models["sgd"], data, models=models, tile_points=8)
    spec = parse_spec(_plane_spec(resolution=8), models=NAMES)
    worker.submit("t", spec)
    assert worker.wait(60)
    tiles = rec.of("t", "tile")
    assert len(tiles) > 3
    assert tiles[0][0]["level"] > tiles[-1][0]["level"]  # coarse to fine
    seen, loss, _, _ = assemble(rec, "t")
    assert (seen == 1).all() and loss.shape == spec.shape == (8 + 3 + 1,) * 2


def test_a_joining_view_gets_the_plane_and_its_names(worker_factory):  # noqa: F811
    """The replay for a view that joins mid-computation carries the live start's extras."""
    from landscape_widget.widget.encode import snapshot_messages

    models, data = _models(bn=False), _data()
    replayed = []
    holder = {}

    def hook(msg):
        if msg["kind"] == "tile" and not replayed:
            snap = holder["worker"].snapshot()
            if snap is not None:
                replayed.append(snapshot_messages(*snap)[0][0])

    worker, rec = worker_factory(models["sgd"], data, models=models, tile_points=8, hook=hook)
    holder["worker"] = worker
    worker.submit("t", parse_spec(_plane_spec(resolution=8), models=NAMES))
    assert worker.wait(60) and replayed
    (live, _), = rec.of("t", "start")
    assert replayed[0]["plane"] == live["plane"] and replayed[0]["plane"]["names"] == list(NAMES)
    assert set(live) - {"kind"} <= set(replayed[0])


@pytest.mark.parametrize("mode", ["1d", "2d"])
def test_interpolate_ends_are_models_a_and_b(widget, mode):
    models, data = _models(), _data()
    rec = _record(widget)
    spec = {**Spec(mode=mode, direction="interpolate", resolution=5, x_range=(-0.5, 1.5),
                   vertices=("adam", "rmsprop")).to_dict()}
    widget.handle_message({"kind": "compute", "id": "i", "spec": spec})
    result = widget.wait(60)
    (start, _), = rec.of("i", "start")
    assert start["labels"][0] == "α (adam → rmsprop)"
    assert [m["name"] for m in start["marks"]] == ["adam", "rmsprop"]
    _, loss, _, x = assemble(rec, "i")
    np.testing.assert_array_equal(x, [-0.5, 0, 0.5, 1, 1.5])
    row = loss if mode == "1d" else loss[2]  # y = 0 is the middle row
    assert row[1] == pytest.approx(_direct(models["adam"], data), rel=1e-5)
    assert row[3] == pytest.approx(_direct(models["rmsprop"], data), rel=1e-5)
    assert result.loss.shape == ((5,) if mode == "1d" else (5, 5))
    # Finer along the same directions: the points in common are reused.
    rec.messages.clear()
    widget.handle_message({"kind": "compute", "id": "j", "spec": {**spec, "resolution": 9}})
    widget.wait(60)
    (done, _), = rec.of("j", "done")
    assert done["reused"] == (5 if mode == "1d" else 25)


def test_switching_between_types_from_python(widget):
    widget.vertices = ["rmsprop", "sgd", "adam"]
    widget.x_range = [-0.1, 1.1]
    widget.direction = "plane"
    tri = widget.wait(60)
    assert tri.names == ["rmsprop", "sgd", "adam"] and tri.loss.shape == (5 + 0 + 1,) * 2
    # A margin of 0.1 is half a lattice step at resolution 5: the region stops at the triangle.
    assert tri.spec["margin"] == 0.0
    widget.direction = "random"  # the vertices stay, ignored
    assert widget.wait(60).loss.shape == (5, 5) and widget.status["state"] == "done"


def _error(widget, spec) -> str:
    front = FakeFrontEnd(widget)
    widget.handle_message({"kind": "compute", "id": "bad", "spec": spec})
    assert front.kinds() == ["error"], front.sent
    assert widget.status["state"] == "error" and not widget.busy
    return front.errors()[0]["message"]


BAD = {
    "unknown name": ({"vertices": ["sgd", "lion", "adam"]}, "unknown model(s) ['lion']"),
    "unknown name, interpolate": ({"direction": "interpolate", "norm": "filter",
                                   "vertices": ["sgd", "lamb"]}, "'sgd', 'adam', 'rmsprop'"),
    "a name twice": ({"vertices": ["sgd", "sgd", "adam"]}, "repeats a model"),
    "two for the plane": ({"vertices": ["sgd", "adam"]}, "needs 3 distinct models"),
    "three to interpolate": ({"direction": "interpolate", "vertices": list(NAMES)},
                             "needs 2 distinct models"),
    "not names": ({"vertices": [1, 2, 3]}, "list of at most three model names"),
    "not a list": ({"vertices": "sgd,adam,rmsprop"}, "spec.vertices must be of type list"),
    "a very long name": ({"vertices": ["x" * 10_000]}, "model names"),
    "plane in 1D": ({"mode": "1d"}, "2D loss map"),
    "plane curvature": ({"quantity": "curvature"}, "2D loss map"),
    "plane too fine": ({"resolution": 60}, "steps per unit"),
    "plane margin": ({"x_range": [-1.5, 1.0]}, "margin"),
    "plane positive start": ({"x_range": [0.5, 1.0]}, "margin"),
    "interpolate curvature": ({"direction": "interpolate", "vertices": ["sgd", "adam"],
                               "quantity": "curvature"}, "centred on the widget's model"),
}


@pytest.mark.parametrize("changes, match", list(BAD.values()), ids=list(BAD))
def test_bad_specs_from_the_front_end_are_clear_errors(widget, changes, match):
    before = {name: snapshot(m) for name, m in widget._worker.models.items()}
    message = _error(widget, _plane_spec(**changes))
    assert match in message, message
    assert len(message) < 400
    for name, m in widget._worker.models.items():
        assert_same_snapshot(before[name], snapshot(m))


def test_widget_without_models_refuses_vertices_and_the_new_types():
    model, data = _model(), _data()
    w = LandscapeWidget(model, data, autostart=False, resolution=5)
    try:
        assert not {"interpolate", "plane"} & {d["direction"] for d in w.direction_types}
        msg = _error(w, {**Spec(resolution=5).to_dict(), "vertices": ["sgd"]})
        assert "no named models" in msg and "models=" in msg
        assert "is not one of" in _error(w, _plane_spec())
    finally:
        w.close()
    two = LandscapeWidget(models=dict(list(_models().items())[:2]), data=data,
                          autostart=False, resolution=5)
    try:
        assert [d["direction"] for d in two.direction_types].count("interpolate") == 1
        assert "plane" not in [d["direction"] for d in two.direction_types]
        assert "is not one of" in _error(two, _plane_spec(vertices=[]))
    finally:
        two.close()


def test_invalid_vertices_from_python_are_reported_not_raised(widget):
    front = FakeFrontEnd(widget)
    widget.direction = "plane"
    widget.vertices = ["sgd", "nope", "adam"]
    widget.wait(10)
    assert front.kinds() == ["error"] and "unknown model(s) ['nope']" in front.errors()[0][
        "message"]


def test_constructor_forms_and_errors():
    models, data = _models(), _data()
    w = LandscapeWidget(models=models, data=data, autostart=False, resolution=5)
    try:
        # The first model is the centre of the other direction types.
        assert w._worker.model is models["sgd"]
        entry = next(d for d in w.direction_types if d["direction"] == "plane")
        assert entry["models"] == list(NAMES) and entry["count"] == 3
        assert w.wait(60) is None
        ref = lw.compute_surface(models["sgd"], data, x=(-1, 1, 5), y=(-1, 1, 5), seed=0,
                                 progress=False)
        w.compute()
        got = w.wait(60)
        assert got is not None, w.status  # the status names an error, if the job had one
        np.testing.assert_allclose(got.loss, ref.loss, rtol=1e-6)
    finally:
        w.close()
    other = _model(bn=True, seed=7)
    w = LandscapeWidget(other, data, models=models, autostart=False)
    try:
        assert w._worker.model is other
    finally:
        w.close()
    with pytest.raises(TypeError, match="needs a model"):
        LandscapeWidget(data=data, autostart=False)
    with pytest.raises(TypeError, match="needs data"):
        LandscapeWidget(models=models, autostart=False)
    with pytest.raises(TypeError, match="non-empty dict"):
        LandscapeWidget(models=list(models.values()), data=data, autostart=False)
    with pytest.raises(TypeError, match="non-empty dict"):
        LandscapeWidget(models={}, data=data, autostart=False)
    with pytest.raises(TypeError, match="model names"):
        LandscapeWidget(models={1: models["sgd"]}, data=data, autostart=False)
    with pytest.raises(TypeError, match=r"models\['adam'\] must be a torch.nn.Module"):
        LandscapeWidget(models={"sgd": models["sgd"], "adam": "weights.pt"}, data=data,
                        autostart=False)
    # Another architecture is accepted for the compare panel (tests/test_widget_compare.py),
    # without the types that mix the models' weights.
    other = LandscapeWidget(models={"sgd": models["sgd"], "small": torch.nn.Linear(6, 3)},
                            data=data, autostart=False)
    assert "interpolate" not in [d["direction"] for d in other.direction_types]
    other.close()
    with pytest.raises(ValueError, match="vertices"):
        LandscapeWidget(models=models, data=data, direction="plane", vertices=["x"],
                        autostart=False)


def test_models_of_other_layers_are_compared_only_and_other_dtypes_refused():
    data = _data()
    a = _models(bn=False)["sgd"]
    b = copy.deepcopy(a)
    b[1] = torch.nn.Tanh() if isinstance(a[1], torch.nn.ReLU) else torch.nn.ReLU()
    other = LandscapeWidget(models={"a": a, "b": b}, data=data, autostart=False)
    assert other.compare_models == ["a", "b"]  # compared, not interpolated
    assert "interpolate" not in [d["direction"] for d in other.direction_types]
    other.close()
    with pytest.raises(ValueError, match="dtypes"):
        LandscapeWidget(models={"a": a, "b": copy.deepcopy(a).double()}, data=data,
                        autostart=False)


def test_user_models_are_bit_identical_after_everything():
    models, data = _models(), _data()
    models["adam"].train()  # a training flag that must survive too
    before = {name: snapshot(m) for name, m in models.items()}
    w = LandscapeWidget(models=models, data=data, autostart=False, resolution=5)
    try:
        w.handle_message({"kind": "compute", "id": "p", "spec": _plane_spec()})
        w.wait(60)
        for mode in ("1d", "2d"):
            spec = Spec(mode=mode, direction="interpolate", resolution=5,
                        vertices=("adam", "sgd")).to_dict()
            w.handle_message({"kind": "compute", "id": f"i{mode}", "spec": spec})
            w.wait(60)
        w.handle_message({"kind": "compute", "id": "b",
                          "spec": _plane_spec(resolution=12, bn="batch")})
        w.cancel()  # cancelled mid-way
        w.wait(60)
        w.handle_message({"kind": "compute", "id": "x", "spec": _plane_spec(vertices=["?"])})
        w.wait(60)
        w.to_html()
    finally:
        w.close()
    for name, m in models.items():
        assert_same_snapshot(before[name], snapshot(m))


def test_spec_shape_of_the_plane_is_its_lattice():
    for resolution in (2, 5, 20, 50):
        for margin in (0.0, 0.1, 0.2, 0.25, 1 / 3, 1.0):
            spec = parse_spec(_plane_spec(resolution=resolution, x_range=[-margin, 1 + margin]),
                              models=NAMES)
            n = lattice(resolution, margin).size
            assert spec.shape == (n, n) and n <= 201
    with pytest.raises(ProtocolError, match="needs 3"):
        parse_spec(_plane_spec(vertices=[]), models=NAMES[:2])
    assert parse_spec(_plane_spec(vertices=[]), models=NAMES).vertices == NAMES
    assert math.isclose(parse_spec(_plane_spec(), models=NAMES).margin, 0.2)


def test_magic_models_option():
    from landscape_widget.magic import MagicError, widget_from_line

    models, data = _models(), _data()
    ns = {**models, "data": data}
    w = widget_from_line("sgd data --models sgd,adam,rmsprop --resolution 5", ns)
    try:
        assert w._model_names == NAMES
        assert "plane" in [d["direction"] for d in w.direction_types]
    finally:
        w.close()
    with pytest.raises(MagicError, match="no variable named 'lion'"):
        widget_from_line("sgd data --models sgd,lion", ns)
    with pytest.raises(MagicError, match="--models needs names"):
        widget_from_line("sgd data --models ,", ns)


def test_review_edge_cases_of_the_widget(widget):
    """Found in review: leftover vertices, bools for ints, a non-dict state update."""
    front = FakeFrontEnd(widget)
    widget.handle_message({"kind": "compute", "id": "p", "spec": _plane_spec()})
    widget.wait(60)
    assert len(widget.vertices) == 3
    widget.direction = "interpolate"  # the plane's three vertices: the first two are used
    curve = widget.wait(60)
    assert widget.status["state"] == "done" and curve is not None
    for bad in ({"resolution": True}, {"seed": False}):
        with pytest.raises(t.TraitError, match="must be an int"):
            setattr(widget, *next(iter(bad.items())))
    widget.set_state("not a dict")  # reported, not raised
    assert any("state update" in e["message"] for e in front.errors())


def test_magic_refuses_repeated_model_names():
    from landscape_widget.magic import MagicError, widget_from_line

    ns = {**_models(), "data": _data()}
    with pytest.raises(MagicError, match="more than once"):
        widget_from_line("sgd data --models sgd,sgd,adam", ns)


def test_side_direction_stops_when_cancelled():
    import threading

    model, data = _model(), _data()
    stop = threading.Event()
    stop.set()
    d = lw.side_direction(model, data, cancel=stop)  # returns at once, the widget drops it
    assert set(d) == {k for k, _ in model.named_parameters()}
    with pytest.raises(TypeError, match="threading.Event"):
        lw.side_direction(model, data, cancel=True)


def test_plane_computes_at_the_widgets_precision():
    """The plane through three models uses the widget's ``precision`` like the main grid:
    its values are the headless plane's at that precision (not fp32's), and the result
    records the precision and its measured error."""
    models, data = _models(), _data()
    w = LandscapeWidget(models=models, data=data, autostart=False, resolution=5,
                        precision="bf16")
    try:
        w.handle_message({"kind": "compute", "id": "p", "spec": _plane_spec(precision="bf16")})
        tri = w.wait(60)
        assert w.status["state"] == "done", w.status
    finally:
        w.close()
    kw = dict(resolution=5, margin=0.2, names=NAMES, progress=False)
    low = lw.triangle_surface(*models.values(), data, precision="bf16", **kw)
    exact = lw.triangle_surface(*models.values(), data, **kw)
    assert low.spec["precision"] == "bf16" and exact.spec["precision"] == "fp32"
    np.testing.assert_allclose(tri.loss, low.loss, rtol=1e-6, equal_nan=True)
    assert np.nanmax(np.abs(tri.loss - exact.loss)) > 1e-5, "computed in fp32"
    np.testing.assert_allclose(tri.loss, exact.loss, rtol=3e-2, equal_nan=True)
    assert tri.spec["precision"] == "bf16"
    assert 0 < tri.spec["precision_error"] <= np.nanmax(np.abs(low.loss - exact.loss)) + 1e-6
    with pytest.raises(TypeError, match="given twice"):
        lw.triangle_surface(*models.values(), data, precision="bf16",
                            evaluator_options={"precision": "fp32"}, **kw)
