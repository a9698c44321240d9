"""Issue 14, items 4-6: any output, any loss, metrics that mean something.

Every task case (tests/cases.py, TASK_CASES) is checked against a float64 oracle that
evaluates all data in one call (tests/oracle.py, naive_values), with every strategy and
several forced engine batch sizes: the engine's batching must not show in the values
(ignored targets, class weights, user metrics). Then the refusals: accuracy where it means
nothing, sums, unfingerprintable losses under reuse=, NaN data, wrong label dtypes.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import (
    TASK_CASES,
    TASK_IDS,
    DictOut,
    Regressor,
    TupleOut,
    gaussian_direction,
    mlp,
    mlp_data,
    regression_data,
    reinit,
)
from oracle import linspace, naive_values, surface_coords
from torch import nn
from torch.utils.data import Dataset

import landscape_widget as lw

RTOL = 1e-5
X, Y = (-1.0, 1.0, 5), (-0.5, 0.5, 3)


def _build(case):
    model = case["model"]().eval()
    x, y = case["data"]()
    return model, x, y


def _opts(strategy, batch):
    opts = {"strategy": strategy}
    if batch is not None:
        opts["batch_size"] = batch
    return opts


@pytest.mark.parametrize("case", TASK_CASES, ids=TASK_IDS)
def test_task_surface_matches_float64_oracle(case):
    model, x, y = _build(case)
    d1, d2 = gaussian_direction(model, seed=1), gaussian_direction(model, seed=2)
    want = naive_values(model, x, y, [d1, d2], surface_coords(linspace(X), linspace(Y)),
                        loss_fn=case["loss_fn"], metrics={k: v for k, v in case["oracle"].items()
                                                          if k != "loss"})
    assert np.ptp(want["loss"]) > 1e-3 * np.abs(want["loss"]).max()
    for strategy in case["strategies"]:
        for batch in case["batches"]:
            surf = lw.compute_surface(
                model, (x, y), directions=(d1, d2), x=X, y=Y, loss_fn=case["loss_fn"],
                metrics=case["metrics"], output_fn=case["output_fn"], progress=False,
                evaluator_options=_opts(strategy, batch))
            for name, values in want.items():
                got = surf.values(name).ravel()
                tol = {"rtol": RTOL, "atol": 0} if name == "loss" else {"rtol": 0,
                                                                          "atol": 1e-12}
                np.testing.assert_allclose(got, values, **tol,
                                           err_msg=f"{name} {strategy} B={batch}")
            assert set(surf.spec["metrics"]) == set(case["metrics"])


@pytest.mark.parametrize("outputs", [1, 3])
def test_regression_has_no_accuracy(outputs):
    model, (x, y) = reinit(Regressor(outputs), 3), regression_data(outputs)()
    surf = lw.compute_surface(model, (x, y), loss_fn=F.mse_loss, x=(-1, 1, 3), y=(-1, 1, 3),
                              progress=False)
    assert surf.accuracy is None and "regression" in surf.spec["metrics_dropped"]["accuracy"]
    with pytest.raises(ValueError, match="accuracy.*regression") as err:
        surf.values("accuracy")
    with pytest.raises(ValueError, match=r"regression.*\(30, " + str(outputs) + r"\)"):
        lw.compute_surface(model, (x, y), loss_fn=F.mse_loss, metrics=("loss", "accuracy"),
                           x=(-1, 1, 3), y=(-1, 1, 3), progress=False)
    assert "(8," not in str(err.value)  # the data's shape, not the probe's


def test_one_output_with_class_targets_is_refused_with_data_shape():
    model = reinit(Regressor(1), 4)
    x, y = torch.randn(30, 5), torch.zeros(30, dtype=torch.long)
    with pytest.raises(ValueError, match=r"at least 2 classes.*\(30, 1\)"):
        lw.compute_curve(model, (x, y), loss_fn=lambda o, t: F.mse_loss(o[:, 0], t.float()),
                         metrics=("loss", "accuracy"), x=(-1, 1, 3), progress=False)


def test_multilabel_with_unknown_loss_asks_for_the_threshold():
    model = reinit(nn.Sequential(nn.Linear(10, 4)), 5)
    x, y = torch.randn(20, 10), (torch.rand(20, 4) < 0.5).float()
    loss = lambda o, t: F.binary_cross_entropy_with_logits(o, t)  # noqa: E731 - a lambda
    with pytest.raises(ValueError, match="multilabel_accuracy"):
        lw.compute_curve(model, (x, y), loss_fn=loss, metrics=("loss", "accuracy"),
                         x=(-1, 1, 3), progress=False)
    curve = lw.compute_curve(model, (x, y), loss_fn=loss, x=(-1, 1, 3), progress=False,
                             metrics={"loss": None, "accuracy": lw.multilabel_accuracy(0.0)})
    ref = lw.compute_curve(model, (x, y), loss_fn=nn.BCEWithLogitsLoss(), x=(-1, 1, 3),
                           metrics=("loss", "accuracy"), progress=False)
    np.testing.assert_allclose(curve.accuracy, ref.accuracy, rtol=0, atol=1e-12)


def test_outputs_without_findable_logits():
    x, y = mlp_data()
    model = reinit(TupleOut(), 6)
    loss = lambda o, t: F.cross_entropy(o[1], t)  # noqa: E731
    # Only the loss asked: the raw tuple goes to loss_fn, no logits needed.
    curve = lw.compute_curve(model, (x, y), loss_fn=loss, metrics=("loss",), x=(-1, 1, 3),
                             progress=False)
    assert np.isfinite(curve.loss).all()
    with pytest.raises(ValueError, match="output_fn="):
        lw.compute_curve(model, (x, y), loss_fn=loss, metrics=("loss", "accuracy"),
                         x=(-1, 1, 3), progress=False)
    assert "accuracy" in lw.compute_curve(model, (x, y), loss_fn=loss, x=(-1, 1, 3),
                                          progress=False).spec["metrics_dropped"]
    with pytest.raises(ValueError, match="output_fn"):  # the default loss needs logits too
        lw.compute_curve(model, (x, y), x=(-1, 1, 3), progress=False)
    dict_model = reinit(DictOut(), 6)  # "logits" found: the default loss works
    curve = lw.compute_curve(dict_model, (x, y), x=(-1, 1, 3), progress=False)
    assert curve.accuracy is not None


@pytest.mark.parametrize("loss", [
    lambda o, t: F.cross_entropy(o, t, reduction="sum"),
    nn.CrossEntropyLoss(reduction="sum"),
])
def test_sum_reduction_is_refused_with_the_fix(loss):
    x, y = mlp_data()
    with pytest.raises(ValueError, match="sum over the batch.*reduction='mean'"):
        lw.compute_curve(mlp(), (x, y), loss_fn=loss, x=(-1, 1, 3), progress=False)
    # In one batch of all data the sum is well defined: accepted and exact.
    curve = lw.compute_curve(mlp(), (x, y), loss_fn=loss, x=(0, 0, 1), progress=False,
                             evaluator_options={"batch_size": len(y)})
    with torch.no_grad():
        want = float(F.cross_entropy(mlp().double()(x.double()), y, reduction="sum"))
    np.testing.assert_allclose(curve.loss, [want], rtol=1e-5)


def test_non_decomposable_loss_is_refused():
    x, y = mlp_data()
    with pytest.raises(ValueError, match="not a mean over samples"):
        lw.compute_curve(mlp(), (x, y), loss_fn=lambda o, t: F.cross_entropy(o, t) ** 2,
                         x=(-1, 1, 3), progress=False)


def test_batch_of_only_ignored_targets_adds_nothing():
    x, y = mlp_data()
    y = y.clone()
    y[:8] = -100
    curve = lw.compute_curve(mlp(), (x, y), x=(-1, 1, 3), progress=False,
                             evaluator_options={"batch_size": 4, "strategy": "loop"})
    with torch.no_grad():
        want = float(F.cross_entropy(mlp()(x), y))
    assert np.isfinite(curve.loss).all()
    np.testing.assert_allclose(curve.loss[1], want, rtol=1e-5)
    with pytest.raises(ValueError, match="every target equals ignore_index"):
        lw.compute_curve(mlp(), (x, torch.full_like(y, -100)), x=(-1, 1, 3), progress=False)


def _reuse_pair(loss_a, loss_b):
    x, y = mlp_data()
    model = mlp()
    first = lw.compute_curve(model, (x, y), loss_fn=loss_a, x=(-1, 1, 3), progress=False)
    return lw.compute_curve(model, (x, y), loss_fn=loss_b, x=(-1, 1, 5), progress=False,
                            reuse=first)


@pytest.mark.parametrize(("a", "b"), [
    (lambda o, t: F.cross_entropy(o, t), lambda o, t: F.cross_entropy(o, t, label_smoothing=.3)),
    (nn.CrossEntropyLoss(), nn.CrossEntropyLoss(label_smoothing=0.3)),
    (nn.CrossEntropyLoss(weight=torch.ones(4)), nn.CrossEntropyLoss(weight=torch.ones(4) * 2)),
], ids=["lambdas", "modules", "class-weights"])
def test_reuse_refuses_another_loss_with_the_same_name(a, b):
    with pytest.raises(ValueError, match="reuse=.*loss"):
        _reuse_pair(a, b)


def test_reuse_accepts_the_same_loss_rebuilt():
    def make(smoothing):
        return lambda o, t: F.cross_entropy(o, t, label_smoothing=smoothing)

    curve = _reuse_pair(make(0.1), make(0.1))
    assert curve.spec["reused"] == 3
    with pytest.raises(ValueError, match="reuse="):
        _reuse_pair(make(0.1), make(0.2))  # same code, other closure
    curve = _reuse_pair(nn.CrossEntropyLoss(label_smoothing=0.3),
                        nn.CrossEntropyLoss(label_smoothing=0.3))
    assert curve.spec["reused"] == 3


def test_reuse_refused_when_the_loss_cannot_be_fingerprinted():
    lock = threading.Lock()

    def loss(o, t):
        with lock:
            return F.cross_entropy(o, t)

    with pytest.raises(ValueError, match="cannot be fingerprinted"):
        _reuse_pair(loss, loss)


def test_reuse_keys_on_user_metric_code():
    x, y = mlp_data()
    model = mlp()
    first = lw.compute_curve(model, (x, y), x=(-1, 1, 3), progress=False,
                             metrics={"loss": None, "m": lambda o, t: o[:, 0]})
    with pytest.raises(ValueError, match="reuse="):
        lw.compute_curve(model, (x, y), x=(-1, 1, 5), progress=False, reuse=first,
                         metrics={"loss": None, "m": lambda o, t: o[:, 1]})
    again = lw.compute_curve(model, (x, y), x=(-1, 1, 5), progress=False, reuse=first,
                             metrics={"loss": None, "m": lambda o, t: o[:, 0]})
    assert again.spec["reused"] == 3
    np.testing.assert_array_equal(again.extra_metrics["m"][::2], first.extra_metrics["m"])


@pytest.mark.parametrize("where", ["inputs", "targets"])
def test_nan_in_the_data_is_named(where):
    x, y = regression_data(1)()
    x, y = x.clone(), y.clone()
    (x if where == "inputs" else y)[7, 0] = float("nan")
    with pytest.raises(ValueError, match=f"the {where} hold 1 NaN/inf value.*sample 7"):
        lw.compute_curve(reinit(Regressor(1), 3), (x, y), loss_fn=F.mse_loss, x=(-1, 1, 3),
                         progress=False)


def test_wrong_label_dtypes_get_the_fix():
    x, y = mlp_data()
    with pytest.raises(ValueError, match=r"y\.long\(\)"):
        lw.compute_curve(mlp(), (x, y.float()), x=(-1, 1, 3), progress=False)
    with pytest.raises(ValueError, match=r"y\.long\(\)"):
        lw.compute_curve(mlp(), (x, y.int()), x=(-1, 1, 3), progress=False)
    with pytest.raises(ValueError, match=r"y\.float\(\)"):
        lw.compute_curve(mlp(), (x, torch.randint(0, 2, (40, 4))),
                         loss_fn=nn.BCEWithLogitsLoss(), x=(-1, 1, 3), progress=False)


def test_dataset_is_named_a_dataset():
    class Dicts(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"x": torch.zeros(10), "y": 0}

    with pytest.raises(TypeError, match="the Dataset yields dicts"):
        lw.compute_curve(mlp(), Dicts(), x=(-1, 1, 3), progress=False)


def test_user_metric_shape_is_checked():
    x, y = mlp_data()
    with pytest.raises(ValueError, match=r"per-sample values of shape \(8,\)"):
        lw.compute_curve(mlp(), (x, y), x=(-1, 1, 3), progress=False,
                         metrics={"loss": None, "m": lambda o, t: o.mean()})


def test_user_metrics_saved_and_loaded(tmp_path):
    x, y = mlp_data()
    surf = lw.compute_surface(mlp(), (x, y), x=(-1, 1, 3), y=(-1, 1, 2), progress=False,
                              metrics={"loss": None, "accuracy": None,
                                       "first": lambda o, t: o[:, 0]})
    surf.save(tmp_path / "s.h5")
    back = lw.Surface.load(tmp_path / "s.h5")
    np.testing.assert_array_equal(back.values("first"), surf.values("first"))
    assert back.values("first").shape == (2, 3)


# --- the widget ----------------------------------------------------------------------
def _widget_surface(model, data, **kwargs):
    sent = []
    w = lw.LandscapeWidget(model, data, resolution=5, **kwargs)
    w.send = lambda content, buffers=None: sent.append(content)
    try:
        surf = w.wait(120)
        return surf, w, sent
    finally:
        w.close()


def test_widget_regression_offers_no_accuracy():
    model, (x, y) = reinit(Regressor(3), 3), regression_data(3)()
    surf, w, sent = _widget_surface(model, (x, y), loss_fn=F.mse_loss, metric="accuracy")
    assert surf.accuracy is None and w.metric == "loss"  # the menu falls back to the loss
    assert w.result["metrics"] == ["loss"]
    assert "no accuracy" in w.status["message"] and "regression" in w.status["message"]
    start = next(m for m in sent if m["kind"] == "start")
    assert start["metrics"] == ["loss"] and "accuracy" in start["metrics_dropped"]
    want = naive_values(model, x, y, surf.directions, surface_coords(surf.x, surf.y),
                        loss_fn=F.mse_loss, metrics={})
    np.testing.assert_allclose(surf.loss.ravel(), want["loss"], rtol=RTOL)


def test_widget_token_tagging_accuracy_skips_ignored_targets():
    case = next(c for c in TASK_CASES if c["name"] == "tokens-ignore-100")
    model, x, y = _build(case)
    surf, w, _ = _widget_surface(model, (x, y), loss_fn=case["loss_fn"], metric="accuracy")
    assert w.metric == "accuracy" and w.result["metrics"] == ["loss", "accuracy"]
    want = naive_values(model, x, y, surf.directions, surface_coords(surf.x, surf.y),
                        loss_fn=case["loss_fn"], metrics={"accuracy": case["oracle"]["accuracy"]})
    np.testing.assert_allclose(surf.loss.ravel(), want["loss"], rtol=RTOL)
    np.testing.assert_allclose(surf.accuracy.ravel(), want["accuracy"], rtol=0, atol=1e-12)


def test_executor_carries_user_metrics_and_dropped_accuracy():
    from concurrent.futures import ThreadPoolExecutor

    from cases import dict_ce, top2_per_sample

    x, y = mlp_data()
    model = reinit(DictOut(), 8)
    kw = dict(loss_fn=dict_ce, x=(-1, 1, 5), progress=False,
              metrics={"loss": None, "accuracy": None, "top2": top2_per_sample})
    local = lw.compute_curve(model, (x, y), **kw)
    with ThreadPoolExecutor(1) as pool:
        remote = lw.compute_curve(model, (x, y), executor=pool, **kw)
        np.testing.assert_allclose(remote.loss, local.loss, rtol=1e-6)
        np.testing.assert_array_equal(remote.accuracy, local.accuracy)
        np.testing.assert_array_equal(remote.extra_metrics["top2"], local.extra_metrics["top2"])
        rx, ry = regression_data(1)()
        reg = lw.compute_curve(reinit(Regressor(1), 3), (rx, ry), loss_fn=F.mse_loss,
                               x=(-1, 1, 3), progress=False, executor=pool)
    assert reg.accuracy is None and "regression" in reg.spec["metrics_dropped"]["accuracy"]
