"""The compare panel: surfaces of models of different architectures on one colour scale.

Oracles: ``lw.compute_surface`` of each model with its own random directions (drawn here
with ``lw.random_directions`` from the widget's seed), a per-point loss of a hand-perturbed
copy of the model (``theta + a d1 + b d2`` written into the copy, called directly, float64
cross-entropy), ``numpy`` min/max over both grids, and ``lw.landscape_stats`` per surface.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_widget_protocol import FakeFrontEnd
from torch import nn

import landscape_widget as lw
from landscape_widget import LandscapeWidget
from landscape_widget.models import resnet
from landscape_widget.widget.compare import parse_compare_message, same_architecture
from landscape_widget.widget.protocol import ProtocolError, decode_buffer

RES, X, Y = 5, (-0.5, 1.0), (-1.0, 0.5)


def _digits(n: int = 64):
    x, y = lw.datasets.digits_images("train")
    return x[:n], y[:n]


def _zoo() -> dict[str, nn.Module]:
    """ResNet-8 with and without shortcuts, and a small MLP: three different networks."""
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    torch.manual_seed(3)
    for p in mlp.parameters():
        nn.init.normal_(p, std=0.2)
    return {"resnet8": resnet(8, shortcut=True, in_channels=1, base=4, seed=0).eval(),
            "resnet8-noshort": resnet(8, shortcut=False, in_channels=1, base=4, seed=1).eval(),
            "mlp": mlp.eval()}


@pytest.fixture
def setup():
    models, data = _zoo(), _digits()
    before = {n: copy.deepcopy(m.state_dict()) for n, m in models.items()}
    w = LandscapeWidget(models=models, data=data, autostart=False, resolution=RES,
                        x_range=list(X), y_range=list(Y), seed=7)
    yield w, models, data, before
    w.close()


def _perturbed_loss(model, dirs, a: float, b: float, data) -> float:
    """The loss at ``theta + a d1 + b d2``, by writing the point into a copy (float64)."""
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.add_(a * dirs[0][name].double() + b * dirs[1][name].double())
        return float(nn.functional.cross_entropy(net(data[0].double()), data[1]))


def test_surfaces_of_different_architectures_match_their_own_oracles(setup):
    w, models, data, before = setup
    assert not same_architecture(models)
    types = [d["direction"] for d in w.direction_types]
    assert "interpolate" not in types and "plane" not in types  # weights cannot be mixed
    assert w.compare_models == list(models)
    front = FakeFrontEnd(w)
    w.handle_message({"kind": "compare", "id": "c1", "names": list(models)})
    surfaces = w.wait_compare(120)
    assert front.errors() == []
    assert list(surfaces) == list(models)
    assert w.compare_status["state"] == "done" and w.compare_status["done"] == 3
    result = w.compare_result
    assert result["id"] == "c1" and result["complete"] and result["computed"] == list(models)
    x, y = np.linspace(*X, RES), np.linspace(*Y, RES)
    np.testing.assert_allclose(decode_buffer(result["x"]), x, rtol=1e-6)
    np.testing.assert_allclose(decode_buffer(result["y"]), y, rtol=1e-6)
    lo, hi = np.inf, -np.inf
    for name, model in models.items():
        dirs = lw.random_directions(model, 2, norm="filter", ignore="biasbn", seed=7)
        oracle = lw.compute_surface(model, data, directions=dirs, x=(*X, RES), y=(*Y, RES),
                                    metrics=("loss",), progress=False, seed=None)
        got = surfaces[name]
        np.testing.assert_allclose(got.x, x)
        np.testing.assert_allclose(got.loss, oracle.loss, rtol=1e-5, atol=1e-6)
        # Independently of the engine: two grid points, by hand, in float64.
        for i, j in ((0, 0), (RES - 1, 2)):
            direct = _perturbed_loss(model, dirs, x[j], y[i], data)
            assert got.loss[i, j] == pytest.approx(direct, rel=1e-4), (name, i, j)
        np.testing.assert_allclose(decode_buffer(result["loss"][name]).reshape(RES, RES),
                                   got.loss, rtol=1e-6)
        stats = lw.landscape_stats(got)
        row = result["stats"][name]
        assert row["minima"] == stats.minima and row["summary"] == stats.summary()
        assert row["roughness"] == pytest.approx(stats.roughness)
        assert row["nonconvex_fraction"] == pytest.approx(stats.nonconvex_fraction)
        lo, hi = min(lo, float(np.nanmin(got.loss))), max(hi, float(np.nanmax(got.loss)))
    assert result["zmin"] == pytest.approx(lo) and result["zmax"] == pytest.approx(hi)
    # The surfaces really differ (own directions, own weights), and nothing was touched.
    assert not np.allclose(surfaces["resnet8"].loss, surfaces["resnet8-noshort"].loss)
    for name, model in models.items():
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[name][key]), (name, key)
        assert not model.training


def test_compare_api_subset_and_view_controls(setup):
    w, models, data, _ = setup
    w.compare(["mlp", "resnet8"], wait=True, timeout=120)
    assert list(w.compared) == ["mlp", "resnet8"]
    assert w.compare_result["names"] == ["mlp", "resnet8"]
    both = np.concatenate([s.loss.ravel() for s in w.compared.values()])
    assert w.compare_result["zmin"] == pytest.approx(float(both.min()))
    assert w.compare_result["zmax"] == pytest.approx(float(both.max()))
    with pytest.raises(ValueError, match="no model named 'vgg'"):
        w.compare(["vgg"])
    with pytest.raises(ValueError, match="distinct"):
        w.compare(["mlp", "mlp"])
    w.compare_layout = "side"
    w.compare_shown = "mlp"
    front = FakeFrontEnd(w)
    w.set_state({"compare_layout": "grid"})
    w.set_state({"compare_shown": "vgg"})
    assert len(front.errors()) == 2 and w.compare_layout == "side"
    assert w.compare_shown == "mlp"


BAD = {
    "unknown field": {"kind": "compare", "id": "a", "names": ["mlp"], "spec": {}},
    "no names": {"kind": "compare", "id": "a"},
    "names not a list": {"kind": "compare", "id": "a", "names": "mlp"},
    "empty names": {"kind": "compare", "id": "a", "names": []},
    "unknown name": {"kind": "compare", "id": "a", "names": ["mlp", "vgg"]},
    "name not a string": {"kind": "compare", "id": "a", "names": [3]},
    "duplicate": {"kind": "compare", "id": "a", "names": ["mlp", "mlp"]},
    "too many": {"kind": "compare", "id": "a", "names": ["mlp"] * 9},
    "bad id": {"kind": "compare", "id": 5, "names": ["mlp"]},
    "long id": {"kind": "compare", "id": "x" * 65, "names": ["mlp"]},
    "stop with names": {"kind": "compare_stop", "id": "a", "names": ["mlp"]},
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_compare_messages_are_refused(case):
    with pytest.raises(ProtocolError):
        parse_compare_message(BAD[case], ("resnet8", "mlp"))


def test_malformed_messages_reach_the_widget_as_errors(setup):
    w = setup[0]
    front = FakeFrontEnd(w)
    for msg in BAD.values():
        w.handle_message(msg)
    assert len(front.errors()) == len(BAD)
    assert w.compare_status["state"] == "idle" and w.compare_result is None


def test_stop_keeps_finished_models_and_one_architecture_still_interpolates():
    models, data = _zoo(), _digits(32)
    w = LandscapeWidget(models=models, data=data, autostart=False, resolution=9)
    try:
        w.handle_message({"kind": "compare", "id": "c2", "names": list(models)})
        w.handle_message({"kind": "compare_stop", "id": "s"})
        w.wait_compare(60)
        assert w.compare_status["state"] in ("cancelled", "done")
        assert set(w.compared) <= set(models)
        assert w.compare_status["done"] == len(w.compared)
    finally:
        w.close()
    single = LandscapeWidget(models["mlp"], data, autostart=False)
    try:
        assert single.compare_models == []  # no panel without named models
        with pytest.raises(ValueError, match="needs named models"):
            single.compare()
    finally:
        single.close()
    same = {"a": models["mlp"], "b": copy.deepcopy(models["mlp"])}
    w = LandscapeWidget(models=same, data=data, autostart=False)
    try:
        assert same_architecture(same)
        assert "interpolate" in [d["direction"] for d in w.direction_types]
    finally:
        w.close()


class _Overflow(nn.Module):
    """Finite parameters, infinite outputs: the loss is NaN at every point."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        return self.lin(x.flatten(1)) * float("inf")


@pytest.mark.filterwarnings("ignore:9 grid point.s. gave a non-finite loss")
def test_a_model_without_finite_losses_is_reported_not_a_silent_nan():
    """M4: a model whose loss is NaN/inf everywhere ended "done" with NaN statistics and no
    note; the panel's status and its row now say which model and why, the other models are
    unaffected (their statistics, the colour range), and points that diverge are counted.
    A model whose own weights hold NaN is an error naming it and the tensor."""
    from landscape_widget.widget.compare import nonfinite_note

    zoo, data = _zoo(), _digits(32)
    broken = copy.deepcopy(zoo["mlp"])
    with torch.no_grad():
        broken[1].weight[0, 0] = float("nan")
    models = {"mlp": zoo["mlp"], "overflow": _Overflow(), "broken": broken}
    w = LandscapeWidget(models=models, data=data, autostart=False, resolution=3)
    try:
        front = FakeFrontEnd(w)
        w.compare(["mlp", "overflow"], wait=True, timeout=120)
        surfaces, status, result = w.compared, w.compare_status, w.compare_result
        assert front.errors() == [] and status["state"] == "done" and status["done"] == 2
        assert np.isnan(surfaces["overflow"].loss).all()
        note = result["notes"]["overflow"]
        assert list(result["notes"]) == ["overflow"]
        assert note.startswith("overflow: no finite loss at any of the 9 points")
        assert status["message"] == note and result["stats"]["overflow"]["summary"] == note
        mlp = lw.landscape_stats(surfaces["mlp"])
        assert result["stats"]["mlp"]["summary"] == mlp.summary()  # no note, no change
        assert result["zmin"] == pytest.approx(np.min(surfaces["mlp"].loss))
        assert result["precision"] == {"mlp": "fp32", "overflow": "fp32"}

        w.compare(["mlp", "broken"], wait=True, timeout=120)
        status = w.compare_status
        assert status["state"] == "error" and status["done"] == 1 and status["model"] == "broken"
        assert status["message"].startswith("broken: ValueError: the model's own '1.weight' "
                                            "holds NaN/inf"), status
        assert list(w.compared) == ["mlp"]
    finally:
        w.close()
    # Some points diverging (not all): counted, and the statistics stay.
    part = copy.deepcopy(surfaces["mlp"])
    part.loss[0, :2] = [np.nan, np.inf]
    assert nonfinite_note("mlp", zoo["mlp"], part).startswith(
        "mlp: 2 of 9 points gave a non-finite loss")
    assert nonfinite_note("mlp", zoo["mlp"], surfaces["mlp"]) == ""


def _compare_on_1k(models, data):
    """The compare panel's surfaces (3x3) with the samples control on "1k", and its status."""
    w = LandscapeWidget(models=models, data=data, autostart=False, resolution=3,
                        x_range=list(X), y_range=list(Y), seed=7, samples="1k")
    try:
        w.compare(wait=True, timeout=120)
        status, surfaces = w.compare_status, w.compared
    finally:
        w.close()
    assert status["state"] == "done", status
    return status, surfaces


def test_a_fixed_subset_of_the_samples_control_is_used_and_said():
    # With samples="1k" the plane computes on a 1,000-sample subset and says so; the
    # compare panel computed on all data and said nothing.
    x, y = lw.datasets.digits_images("train")
    assert x.shape[0] > 1000
    models = dict(list(_zoo().items())[1:])
    status, surfaces = _compare_on_1k(models, (x, y))
    assert f"subset of 1,000 of {x.shape[0]:,} samples" in status["message"]
    for name, model in models.items():
        dirs = lw.random_directions(model, 2, norm="filter", ignore="biasbn", seed=7)
        oracle = lw.compute_surface(model, (x, y), directions=dirs, x=(*X, 3), y=(*Y, 3),
                                    metrics=("loss",), progress=False, seed=None,
                                    samples=1000)
        assert surfaces[name].spec["samples"]["n"] == 1000
        np.testing.assert_allclose(surfaces[name].loss, oracle.loss, rtol=1e-6)
        # The samples themselves: the documented draw (1,000 indices without replacement
        # from sample_seed 0, in data order), by hand on a perturbed copy in float64.
        idx = lw.core.subset.subset_indices(x.shape[0], 1000, 0)
        assert idx.unique().numel() == 1000 and bool((idx[1:] > idx[:-1]).all())
        xs, ys = np.linspace(*X, 3), np.linspace(*Y, 3)
        got = surfaces[name].loss
        assert got[2, 1] == pytest.approx(
            _perturbed_loss(model, dirs, xs[1], ys[2], (x[idx], y[idx])), rel=1e-4)
        assert got[2, 1] != pytest.approx(
            _perturbed_loss(model, dirs, xs[1], ys[2], (x, y)), rel=1e-4)


def test_data_no_larger_than_the_subset_is_computed_exactly_and_said():
    models = dict(list(_zoo().items())[2:])
    status, surfaces = _compare_on_1k(models, _digits(64))
    assert "data holds at most 1,000 samples, so all of them were used" in status["message"]
    assert not surfaces["mlp"].spec.get("samples")
