"""Acceptance 6: bad input fails at once with a message that names the fix; NaN/inf losses
are kept as NaN with exactly one warning."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import bn_res_cnn, cnn_data, mlp, mlp_data
from snapshots import assert_same_snapshot, snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import landscape_widget as lw


def _model():
    return mlp().eval()


def _dirs(model, **changes):
    d1, d2 = lw.random_directions(model, 2, seed=0)
    d1 = dict(d1)
    for k, v in changes.items():
        if v is None:
            del d1[k]
        else:
            d1[k] = v
    return d1, d2


def _surface(**kw):
    model = kw.pop("model") if "model" in kw else _model()
    data = kw.pop("data") if "data" in kw else mlp_data()
    kw.setdefault("x", (-1, 1, 3))
    kw.setdefault("y", (-1, 1, 3))
    return lw.compute_surface(model, data, progress=False, **kw)


def _empty_loader():
    return DataLoader(TensorDataset(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long)),
                      batch_size=4)


m0 = _model()
BAD = [
    # directions
    ("direction-missing-key", lambda: _surface(directions=_dirs(m0, **{"0.weight": None}),
                                               model=m0), ValueError, r"missing.*0\.weight"),
    ("direction-unknown-key", lambda: _surface(directions=_dirs(m0, **{"extra.w": torch.ones(3)}),
                                               model=m0), ValueError, r"unknown.*extra\.w"),
    ("direction-wrong-shape", lambda: _surface(
        directions=_dirs(m0, **{"0.weight": torch.ones(3, 3)}), model=m0),
     ValueError, r"0\.weight.*shape \(3, 3\)"),
    ("direction-not-tensor", lambda: _surface(directions=_dirs(m0, **{"0.bias": [0.0] * 16}),
                                              model=m0), TypeError, "Tensor"),
    ("direction-not-finite", lambda: _surface(
        directions=_dirs(m0, **{"0.bias": torch.full((16,), math.nan)}), model=m0),
     ValueError, "finite"),
    ("direction-integer", lambda: _surface(
        directions=_dirs(m0, **{"0.bias": torch.zeros(16, dtype=torch.long)}), model=m0),
     TypeError, "floating"),
    ("directions-not-a-pair", lambda: _surface(directions=lw.random_direction(m0), model=m0),
     TypeError, r"pair"),
    ("direction-not-a-dict", lambda: lw.compute_curve(m0, mlp_data(), direction=[torch.ones(3)],
                                                      progress=False), TypeError, "dict"),
    ("direction-of-other-model", lambda: lw.compute_curve(
        m0, mlp_data(), direction=lw.random_direction(bn_res_cnn()), progress=False),
     ValueError, "random_direction"),
    # data
    ("empty-tensors", lambda: _surface(data=(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long))),
     ValueError, "at least one sample"),
    ("empty-dataset", lambda: _surface(
        data=TensorDataset(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long))),
     ValueError, "at least one sample"),
    ("empty-loader", lambda: _surface(data=_empty_loader()), ValueError, "at least one sample"),
    ("data-length-mismatch", lambda: _surface(data=(torch.zeros(5, 10), torch.zeros(4).long())),
     ValueError, "match"),
    ("data-not-a-pair", lambda: _surface(data=torch.zeros(5, 10)), TypeError, "inputs, targets"),
    ("data-triple", lambda: _surface(data=(torch.zeros(5, 10),) * 3), TypeError,
     "inputs, targets"),
    # ranges
    ("range-inf", lambda: _surface(x=(-math.inf, 1, 5)), ValueError, "finite"),
    ("range-nan", lambda: _surface(y=(-1, math.nan, 5)), ValueError, "finite"),
    ("range-too-fine", lambda: _surface(x=(-1, 1, lw.MAX_AXIS_POINTS + 1)), ValueError,
     rf"{lw.MAX_AXIS_POINTS}.*fewer points"),
    ("curve-too-fine", lambda: lw.compute_curve(m0, mlp_data(), x=(-1, 1, 10**6),
                                                progress=False), ValueError, "fewer points"),
    ("range-zero-points", lambda: _surface(x=(-1, 1, 0)), ValueError, "num"),
    ("range-float-num", lambda: _surface(x=(-1, 1, 5.0)), TypeError, "int"),
    ("range-not-a-tuple", lambda: _surface(x=np.linspace(-1, 1, 5)), TypeError,
     r"\(start, stop, num\)"),
    ("range-empty", lambda: _surface(x=(1, 1, 5)), ValueError, "non-empty range"),
    ("surface-without-y", lambda: _surface(y=None), ValueError, "compute_curve"),
    # device
    ("device-meta", lambda: _surface(device="meta"), ValueError, r"model\.to"),
    ("device-cuda", lambda: _surface(device="cuda"), ValueError, r"model\.to"),
    ("device-cuda-1", lambda: _surface(device=torch.device("cuda", 1)), ValueError,
     r"model\.to"),
    # model
    ("model-is-function", lambda: lw.compute_surface(lambda x: x, mlp_data(), progress=False),
     TypeError, r"nn\.Module"),
    ("model-is-state-dict", lambda: lw.compute_surface(m0.state_dict(), mlp_data(),
                                                       progress=False), TypeError, r"nn\.Module"),
    ("direction-of-function", lambda: lw.random_direction(lambda x: x), TypeError, r"nn\.Module"),
    ("interpolation-of-non-module", lambda: lw.interpolation_direction(m0, "model_b.pt"),
     TypeError, r"nn\.Module"),
    ("model-without-parameters", lambda: _surface(model=nn.Flatten()), ValueError, "parameter"),
    # options
    ("norm", lambda: lw.random_direction(m0, norm="l2"), ValueError, r"norm.*filter"),
    ("ignore", lambda: lw.random_direction(m0, ignore="bias"), ValueError, r"ignore.*biasbn"),
    ("seed", lambda: lw.random_direction(m0, seed="1"), TypeError, "seed"),
    ("bn", lambda: _surface(bn="train"), ValueError, r"bn.*'eval'.*'batch'"),
    ("metrics-unknown", lambda: _surface(metrics=("f1",)), ValueError, r"metrics.*accuracy"),
    ("metrics-empty", lambda: _surface(metrics=()), ValueError, "metrics"),
    ("strategy", lambda: _surface(evaluator_options={"strategy": "fast"}), ValueError, "strategy"),
    ("loss-not-callable", lambda: _surface(loss_fn="mse"), TypeError, "callable"),
    ("loss-not-scalar", lambda: _surface(
        loss_fn=lambda o, t: F.cross_entropy(o, t, reduction="none")),
     ValueError, "reduction='mean'"),
    ("accuracy-for-regression", lambda: _surface(data=(torch.zeros(5, 10), torch.rand(5, 4)),
                                                 loss_fn=F.mse_loss, metrics=("loss", "accuracy")),
     ValueError, r"regression.*metrics=\('loss',\)"),
    ("interpolation-other-architecture", lambda: lw.interpolation_direction(m0, bn_res_cnn()),
     ValueError, "same architecture"),
    ("unknown-keyword", lambda: _surface(colour="red"), TypeError, "colour"),
]


@pytest.mark.parametrize(("call", "exc", "match"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_names_the_fix(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bad_input_leaves_model_alone():
    before = snapshot(m0)
    for _, call, _exc, _match in BAD:
        try:
            call()
        except Exception:  # noqa: BLE001 - every one of them raises; only the model matters
            pass
    assert_same_snapshot(before, snapshot(m0))


# --- non-finite losses ---------------------------------------------------------------------
class Line(nn.Module):
    """One weight w (1 x 1); the output is w * x. With x = 1 the output at coordinate a is a."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1, 1))

    def forward(self, x):
        return x @ self.w


def exp_loss(outputs, targets):
    """exp(100 * a): finite in float32 up to a = 0.887, inf beyond (normal, not denormal,
    down to a = -0.87)."""
    return torch.exp(100 * outputs).mean()


def _count_runtime_warnings(fn):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in rec if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("strategy", ["auto", "vmap", "loop"])
def test_inf_loss_kept_as_nan_with_one_warning(strategy):
    model = Line()
    data = (torch.ones(4, 1), torch.zeros(4, dtype=torch.long))
    d = {"w": torch.ones(1, 1)}
    curve, warned = _count_runtime_warnings(lambda: lw.compute_curve(
        model, data, direction=d, x=(-0.5, 1, 7), loss_fn=exp_loss, metrics=("loss",),
        progress=False, evaluator_options=None if strategy == "auto" else {"strategy": strategy}))
    assert len(warned) == 1, [str(w.message) for w in warned]
    assert "NaN" in str(warned[0].message)
    bad = curve.x > 0.887
    assert bad.sum() == 1
    assert np.all(np.isnan(curve.loss[bad]))
    want = np.exp(100 * curve.x[~bad].astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(curve.loss[~bad], want, rtol=1e-5)


def test_nan_surface_points_not_filled():
    """A 2D grid with a diverging corner: NaN exactly there, nothing averaged in, one warning."""
    model = Line()
    data = (torch.ones(4, 1), torch.zeros(4, dtype=torch.long))
    dirs = ({"w": torch.ones(1, 1)}, {"w": torch.ones(1, 1)})
    with pytest.warns(RuntimeWarning, match="non-finite") as rec:
        surf = lw.compute_surface(model, data, directions=dirs, x=(-0.25, 1, 6), y=(-0.5, 1, 7),
                                  loss_fn=exp_loss, metrics=("loss",), progress=False)
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    a = surf.x[None, :] + surf.y[:, None]
    np.testing.assert_array_equal(np.isnan(surf.loss), a.astype(np.float32) > 0.887)
    ok = ~np.isnan(surf.loss)
    np.testing.assert_allclose(surf.loss[ok], np.exp(100 * a[ok].astype(np.float32)), rtol=1e-5)


def test_model_overflow_gives_nan_cross_entropy():
    """Logits that overflow to inf make the default cross-entropy NaN: kept as NaN, one warning."""

    class Exploding(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            with torch.no_grad():
                self.lin.weight.zero_()
                self.lin.bias.zero_()

        def forward(self, x):
            return torch.exp(self.lin(x) * 100)

    model = Exploding().eval()
    data = (torch.ones(6, 3), torch.tensor([0, 1, 0, 1, 0, 1]))
    d = {"lin.weight": torch.ones(2, 3), "lin.bias": torch.zeros(2)}
    curve, warned = _count_runtime_warnings(lambda: lw.compute_curve(
        model, data, direction=d, x=(-1, 1, 5), progress=False))
    assert len(warned) == 1
    assert np.isnan(curve.loss[-1]) and np.all(np.isfinite(curve.loss[:3]))


def test_finite_surface_gives_no_warning():
    model = bn_res_cnn().eval()
    surf, warned = _count_runtime_warnings(lambda: lw.compute_surface(
        model, cnn_data(), x=(-1, 1, 3), y=(-1, 1, 3), progress=False))
    assert warned == []
    assert np.all(np.isfinite(surf.loss))


def test_a_forward_failing_on_the_data_says_which_inputs_and_what_to_check():
    """torch's words name the layer ('Output size is too small'), not that the images are
    smaller than the model takes (torchvision's AlexNet at 32 px)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(4, 2))
    data = (torch.randn(6, 3, 4, 4), torch.randint(0, 2, (6,)))
    before = snapshot(model)
    with pytest.raises(RuntimeError) as info:
        lw.compute_surface(model, data, x=(-1, 1, 3), y=(-1, 1, 3), progress=False)
    text = str(info.value)
    assert text.startswith("The model's forward failed on the first 6 samples")
    assert "(6, 3, 4, 4)" in text and "input size" in text
    assert str(info.value.__cause__).rstrip(".") in text  # torch's own words kept
    assert_same_snapshot(before, snapshot(model))
