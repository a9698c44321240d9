"""Loss forms (review items M3, M6): KLDivLoss(reduction="batchmean") with ``samples=``, and
the hint of a loss that fails on the first samples.

Oracles: a float64 loop over the subset's samples (each sample's KL divergence summed over
its entries: batchmean is their mean), the closed-form standard error of a mean of those
per-sample values, and torch's own ``F.kl_div(..., reduction="batchmean")`` in float64.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscape_widget as lw
from landscape_widget.core.subset import SubsetError, subset_indices

GRID = dict(x=(-1.0, 1.0, 3), y=(-0.5, 0.5, 3), metrics=("loss",), progress=False)
N = 60


def _kl_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3), nn.LogSoftmax(-1))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 5, generator=g)
    y = (2 * torch.randn(N, 3, generator=g)).softmax(-1)  # target distributions
    return model, x, y


def _per_sample_kl(model, dirs, xs, ys, x, y) -> np.ndarray:
    """``(ny, nx, n)``: each sample's KL divergence (summed over classes), float64."""
    out = np.zeros((len(ys), len(xs), len(y)))
    base = {k: v.detach().double() for k, v in model.state_dict().items()}
    for iy, b in enumerate(ys):
        for ix, a in enumerate(xs):
            params = {k: v + a * dirs[0][k].double() + b * dirs[1][k].double()
                      for k, v in base.items()}
            with torch.no_grad():
                logp = torch.func.functional_call(model.double(), params, (x.double(),))
                model.float()
            y64 = y.double()
            out[iy, ix] = (y64 * (y64.log() - logp)).sum(-1).numpy()
    return out


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch: no vmap rule
@pytest.mark.parametrize("form", ["module", "partial"])
def test_kldiv_batchmean_with_samples_matches_the_float64_subset_loop(form):
    """M3: batchmean (sum over entries / batch size) was refused with samples=, with a hint
    to use reduction='mean', another value. Its per-sample form is the row sum."""
    model, x, y = _kl_problem()
    loss = (nn.KLDivLoss(reduction="batchmean") if form == "module"
            else functools.partial(F.kl_div, reduction="batchmean"))
    dirs = lw.random_directions(model, 2, seed=4)
    n, seed = 20, 3
    s = lw.compute_surface(model, (x, y), loss_fn=loss, directions=dirs, samples=n,
                           sample_seed=seed, **GRID)
    idx = subset_indices(N, n, seed)
    per = _per_sample_kl(model, dirs, s.x, s.y, x[idx], y[idx])
    np.testing.assert_allclose(s.loss, per.mean(-1), rtol=1e-5, atol=1e-8)
    se = per.std(-1, ddof=1) / np.sqrt(n) * np.sqrt((N - n) / (N - 1))
    np.testing.assert_allclose(s.loss_se, se, rtol=1e-4, atol=1e-10)
    assert (s.loss_se > 0).all()
    if form == "module":
        assert loss.reduction == "batchmean"  # the user's module is not changed
    # All samples: the exact batchmean (torch's own, float64), standard error 0.
    every = lw.compute_surface(model, (x, y), loss_fn=loss, directions=dirs, samples=N,
                               **GRID)
    with torch.no_grad():
        want = float(F.kl_div(model.double()(x.double()), y.double(), reduction="batchmean"))
        model.float()
    assert every.loss[1, 1] == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(every.loss_se, 0, atol=1e-12)


def test_a_loss_without_per_sample_values_is_refused_with_batchmean_in_the_fix():
    model, x, y = _kl_problem()
    with pytest.raises(SubsetError, match="'batchmean' for KL divergence"):
        lw.compute_surface(model, (x, y), samples=10, **GRID,
                           loss_fn=lambda o, t: F.kl_div(o, t, reduction="batchmean"))


class _Picky(nn.Module):
    """A user loss that raises for a reason of its own (shapes and dtypes are fine)."""

    def forward(self, out, y):
        if not hasattr(self, "scale"):
            raise ValueError("_Picky needs .scale set before use")
        return F.cross_entropy(out, y) * self.scale


@pytest.mark.filterwarnings("ignore:Using a target size")  # the "shape" case's broadcast
@pytest.mark.parametrize("case", ["own", "shape", "class-index", "dtype"])
def test_a_failing_loss_gets_a_hint_that_fits_its_error(case):
    """M6: the hint said "check that loss_fn takes these shapes and dtypes" whatever the
    error; a loss that raises for its own reasons gets pointed at its traceback instead."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    loss_fn, want, not_want = {
        "own": (_Picky(), "loss_fn itself raised it", "shapes"),
        "shape": (lambda out, t: F.mse_loss(out, t[:, None].float().expand(-1, 2)),
                  "takes these shapes", "itself raised"),
        "class-index": (lambda out, t: F.cross_entropy(out, t + 3), "not a class index",
                        "itself raised"),
        "dtype": (lambda out, t: F.binary_cross_entropy_with_logits(out[:, 0], t),
                  "pass y.float()", "itself raised"),
    }[case]
    with pytest.raises(ValueError, match="failed on the first samples") as info:
        lw.compute_surface(model, (x, y), loss_fn=loss_fn, **GRID)
    text = str(info.value)
    hint = text.split("; ", 1)[1].split(" (", 1)[0]
    assert want in hint and not_want not in hint, text
    assert info.value.__cause__ is not None  # the user's own traceback is kept
