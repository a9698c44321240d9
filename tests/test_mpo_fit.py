"""Pattern fits end to end: (c4), evaluation against a float64 per-cell oracle, state, files."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import bn_res_cnn, cnn_data, mlp, mlp_data, resnet18, resnet_data, tied_data, tied_mlp
from conftest import report
from snapshots import assert_same_snapshot, snapshot
from torch import nn

import landscape_widget as lw


def fresh(build, start=100):
    seeds = iter(range(start, 10_000))
    return lambda: build(seed=next(seeds))


def naive_plane(template: nn.Module, weights: dict, shape, x, y):
    """Loss and accuracy of every cell, one float64 network per cell, all data in one batch.

    Shares no code with the fit: its own Gram-Schmidt, its own unflattening (order of
    ``named_parameters()``, BatchNorm scale = coordinate + 1), BatchNorm on batch statistics.
    """
    net = copy.deepcopy(template).double().eval()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = None
    w0, w1, w2 = (weights[k].double() for k in ("w0", "w1", "w2"))
    s = float(weights["s"])
    right = w1 - w0
    up = w2 - right * (w2 @ right) / (right @ right)
    up = up * right.norm() / up.norm()
    bn = {f"{n}.weight" for n, m in net.named_modules()
          if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    h, w = shape
    loss, acc = np.zeros(shape), np.zeros(shape)
    for i in range(h):
        for j in range(w):
            flat = w0 + s * ((i - h // 2) * up + (j - w // 2) * right)
            at = 0
            with torch.no_grad():
                for name, p in net.named_parameters():
                    k = p.numel()
                    p.copy_(flat[at:at + k].reshape(p.shape) + (1.0 if name in bn else 0.0))
                    at += k
                out = net(x.double())
            loss[i, j] = float(F.cross_entropy(out, y))
            acc[i, j] = float((out.argmax(1) == y).double().mean())
    return loss, acc


# --- (c4) ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_fit():
    train, test = lw.datasets.digits("train"), lw.datasets.digits("test")
    fit = lw.fit_pattern(lambda: lw.demo.mlp(seed=None), train, lw.checkerboard(4), steps=300,
                         lr=3e-3, tau=2.5, cells_per_step=50, seed=0, progress=False)
    return fit, train, test


def test_c4_checkerboard_acc_diff(digits_fit):
    fit, train, test = digits_fit
    tr, te = fit.scores(train), fit.scores(test)
    report(f"MPO 4x4 checkerboard, digits MLP, 300 steps: acc_diff train {tr['acc_diff']:.3f}, "
           f"test {te['acc_diff']:.3f} (good {te['good_acc']:.2f}, bad {te['bad_acc']:.2f})")
    assert tr["acc_diff"] > 0.4 and te["acc_diff"] > 0.3
    assert fit.acc_diff(test) == te["acc_diff"]
    # tau caps the bad cells' CE, not their accuracy.
    assert fit.history[-1]["bad_ce"] > 2.0 and fit.history[-1]["good_ce"] < 1.0


# --- evaluation against the oracle ---------------------------------------------------
CASES = {
    "mlp": (mlp, mlp_data),
    "tied": (tied_mlp, tied_data),
    "bn_dropout_residual_cnn": (bn_res_cnn, cnn_data),
}


@pytest.mark.parametrize("name", list(CASES))
def test_evaluate_matches_per_cell_float64_oracle(name):
    build, data = CASES[name]
    x, y = data()
    fit = lw.fit_pattern(fresh(build), (x, y), lw.checkerboard(3, 4), steps=4, seed=1,
                         progress=False, batch_size=len(x))
    ev = fit.evaluate((x, y), batch_size=len(x))
    assert ev["loss"].shape == (3, 4) == ev["accuracy"].shape
    loss, acc = naive_plane(build(seed=0), fit.weights, (3, 4), x, y)
    np.testing.assert_allclose(ev["loss"], loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(ev["accuracy"], acc, atol=1e-6)
    # A materialised cell is the same network.
    net = fit.materialize(2, 0)
    with torch.no_grad():
        assert float(F.cross_entropy(net(x), y)) == pytest.approx(loss[2, 0], rel=2e-5)


# --- state ---------------------------------------------------------------------------------
def test_fit_keeps_three_vectors_and_the_scale(digits_fit):
    fit = digits_fit[0]
    p = fit.layout.size
    assert p == 2410
    assert fit.state_size() == 3 * p + 1
    assert [tuple(t.shape) for t in fit.plane.parameters()] == [(p,), (p,), (p,), ()]
    # Adam keeps two moments per trainable number, nothing per cell.
    moments = sum(v.numel() for st in fit.optimizer.state.values() for k, v in st.items()
                  if k != "step")
    assert moments == 2 * (3 * p + 1)
    tensors = [v for v in vars(fit).values() if isinstance(v, torch.Tensor)]
    assert sum(t.numel() for t in tensors) <= 1400  # only the minibatch order


def test_user_module_as_model_fn_is_not_modified():
    model = bn_res_cnn(seed=0)
    x, y = cnn_data()
    before = snapshot(model)
    fit = lw.fit_pattern(model, (x, y), lw.checkerboard(3), steps=2, progress=False)
    fit.evaluate((x, y))
    assert_same_snapshot(before, snapshot(model))
    w = fit.weights
    assert not torch.equal(w["w0"], w["w1"]) and not torch.equal(w["w1"], w["w2"])


def test_global_rng_untouched_and_deterministic():
    x, y = mlp_data()
    state = torch.random.get_rng_state()
    runs = [lw.fit_pattern(fresh(mlp), (x, y), lw.checkerboard(4), steps=5, seed=7,
                           progress=False) for _ in range(2)]
    assert torch.equal(state, torch.random.get_rng_state())
    for a, b in zip(runs[0].weights.values(), runs[1].weights.values(), strict=True):
        assert torch.equal(a, b)


def test_resume_equals_one_run_and_cancel_stops():
    x, y = mlp_data()
    one = lw.fit_pattern(fresh(mlp), (x, y), lw.checkerboard(4), steps=6, seed=2,
                         batch_size=16, progress=False)
    two = lw.fit_pattern(fresh(mlp), (x, y), lw.checkerboard(4), steps=2, seed=2,
                         batch_size=16, progress=False)
    cancel = threading.Event()
    seen = []

    def stop_after_two(fit):
        seen.append(fit.step)
        if fit.step >= 4:
            cancel.set()

    two.train((x, y), 10, progress=False, callback=stop_after_two, every=1, cancel=cancel)
    assert two.step == 4 and seen == [3, 4]
    two.train((x, y), 2, progress=False)
    for a, b in zip(one.weights.values(), two.weights.values(), strict=True):
        assert torch.equal(a, b)


def test_save_load_round_trip_and_resume(tmp_path):
    x, y = mlp_data()
    ref = lw.fit_pattern(fresh(mlp), (x, y), lw.checkerboard(4), steps=6, seed=4,
                         batch_size=16, progress=False)
    fit = lw.fit_pattern(fresh(mlp), (x, y), lw.checkerboard(4), steps=3, seed=4,
                         batch_size=16, progress=False)
    fit.save(tmp_path / "plane.pt")
    back = lw.PatternFit.load(tmp_path / "plane.pt", trusted=True)
    assert back.step == 3 and back.history == fit.history
    np.testing.assert_array_equal(back.mask, fit.mask)
    np.testing.assert_allclose(back.evaluate((x, y))["loss"], fit.evaluate((x, y))["loss"])
    back.train((x, y), 3, progress=False)
    for a, b in zip(ref.weights.values(), back.weights.values(), strict=True):
        assert torch.equal(a, b)
    with_fn = lw.PatternFit.load(tmp_path / "plane.pt", model_fn=lambda: mlp(seed=0))
    assert torch.equal(with_fn.weights["w2"], fit.weights["w2"])
    with pytest.raises(ValueError, match="parameters"):
        lw.PatternFit.load(tmp_path / "plane.pt", model_fn=lambda: nn.Linear(3, 2))


def test_strategies_take_the_same_steps():
    x, y = mlp_data()
    fits = {s: lw.fit_pattern(fresh(mlp), (x, y), lw.checkerboard(4), steps=4, seed=5,
                              batch_size=16, progress=False, strategy=s)
            for s in ("vmap", "loop", "auto")}
    assert fits["vmap"].batched is True and fits["loop"].batched is False
    assert fits["auto"].batched in (True, False) and set(fits["auto"]._trial) == {True, False}
    for s in ("loop", "auto"):
        for a, b in zip(fits["vmap"].weights.values(), fits[s].weights.values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="strategy"):
        lw.fit_pattern(fresh(mlp), (x, y), lw.checkerboard(4), steps=1, strategy="gpu")


def test_to_plotly(digits_fit):
    fit, _, test = digits_fit
    fig = fit.to_plotly(test)
    assert len(fig.data) == 2 and fig.data[1].z.shape == (4, 4)
    np.testing.assert_allclose(fig.data[1].customdata, fit.last_evaluation["loss"])
    acc = fit.to_plotly(metric="accuracy")
    assert float(np.max(acc.data[1].z)) <= 1.0


def test_resnet18_goes_through():
    x, y = resnet_data()
    fit = lw.fit_pattern(fresh(resnet18), (x, y), lw.checkerboard(2), steps=1, progress=False)
    ev = fit.evaluate((x, y))
    assert np.isfinite(ev["loss"]).all() and fit.state_size() == 3 * fit.layout.size + 1


@pytest.mark.parametrize("kw, match", [
    ({"binary": np.zeros((4, 4))}, "no good cell"),
    ({"binary": np.ones((4, 4))}, "no good cell"),
    ({"tau": 0}, "tau"), ({"lr": -1.0}, "lr"), ({"cells_per_step": 0}, "cells_per_step"),
    ({"model_fn": 3}, "model_fn"), ({"model_fn": lambda: 3}, "nn.Module"),
    ({"model_fn": lambda: mlp(seed=0)}, "identical"), ({"plane": "diag"}, "plane"),
])
def test_bad_input(kw, match):
    x, y = mlp_data()
    args = {"model_fn": fresh(mlp), "binary": lw.checkerboard(4)}
    args.update(kw)
    with pytest.raises((ValueError, TypeError), match=match):
        lw.fit_pattern(args.pop("model_fn"), (x, y), args.pop("binary"), steps=1,
                       progress=False, **args)
