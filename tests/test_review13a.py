"""Review 13a: the no-grad probe (core/reach.py) on the models researchers bring.

A half-precision loss rounds the probe's change away: moving a bfloat16 or float16 layer
run under ``torch.no_grad()`` by 10 % of its size changed the loss by less than one unit of
its rounding, so the layer passed as unused and the Hessian tools returned the rest's
curvature with no sign of it. The probe now grows its move while the loss stays put (an
unused parameter leaves it as it was at any size) and counts a loss made inf by the move as
a change. Oracles: torch's dense float64 Hessian of the loss with autograd everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import classification_data, reinit
from public_cases import Untouched
from reach_cases import PartNet, dense
from torch import nn

import landscape_widget as lw
from landscape_widget.core.reach import check_reached


def _dense(model, x, y, keys):
    return dense(model, x, y, keys)[2]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(10))
def test_a_half_precision_part_without_autograd_is_refused(dtype, seed):
    """Before: some of these passed the probe (the loss moved by under one ulp)."""
    torch.manual_seed(seed)  # nn.Linear's own initialisation: small logits, a flat loss
    model = PartNet("no_grad").to(dtype).eval()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    keys = ["a.weight", "b.weight"]
    dense = _dense(model, x.to(dtype), y, keys)
    a = model.a.weight.numel()
    assert float(dense[:a, :a].abs().max()) > 1e-4  # the part's curvature is not negligible
    with Untouched(model), pytest.raises(ValueError, match="does not compute") as err:
        lw.hessian_eigenpairs(model, (x.to(dtype), y), k=1)
    assert "'a.weight'" in str(err.value) and "aux" not in str(err.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_unused_head_is_not_refused(dtype):
    """The grown moves leave an unused head's loss as it was: no false refusal."""
    model = reinit(PartNet("autograd"), 3).to(dtype).eval()
    x, y = classification_data(16, (6,), 3, 1)
    with Untouched(model):
        vals, vecs = lw.hessian_eigenpairs(model, (x.to(dtype), y), k=1)
    dense = _dense(model, x.to(dtype), y, ["a.weight", "b.weight", "aux.weight"])
    top = float(torch.linalg.eigvalsh(dense)[-1])
    np.testing.assert_allclose(vals[0], top, rtol=0.1)  # half-precision products
    assert float(vecs[0]["aux.weight"].abs().max()) == 0


def test_frozen_by_requires_grad_is_not_refused_and_in_the_hessian():
    """requires_grad_(False) is not no_grad: the derivatives are taken on a private copy."""
    model = reinit(PartNet("autograd"), 4).eval()
    model.a.requires_grad_(False)
    x, y = classification_data(16, (6,), 3, 1)
    with Untouched(model):
        vals, _ = lw.hessian_eigenpairs(model, (x, y), k=2)
        trace = lw.hessian_trace(model, (x, y), samples=400, seed=0)
    dense = _dense(model, x, y, ["a.weight", "b.weight", "aux.weight"])
    np.testing.assert_allclose(vals, torch.linalg.eigvalsh(dense).numpy()[::-1][:2],
                               rtol=1e-4, atol=1e-6)
    assert abs(trace.value - float(torch.trace(dense))) < 4 * trace.stderr + 1e-6


def test_a_move_that_makes_the_loss_inf_counts():
    """A part read through a threshold: small moves leave the loss, a large one makes it
    inf; the loss depends on it (an unused parameter cannot make it inf)."""
    def loss_of(p):
        return 1.0 / (p["v"].abs().max() < 5).float() + p["w"].sum()

    params = {"w": torch.ones(3), "v": torch.zeros(4)}
    with pytest.raises(ValueError, match="'v'"):
        check_reached(loss_of, params, ["v"], "the Hessian")
    check_reached(lambda p: p["w"].sum(), params, ["v"], "the Hessian")  # unused


class _NoGradFirst(nn.Module):
    """The widget's data (6 features, 3 classes) through a no-grad first layer."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        with torch.no_grad():
            h = torch.tanh(self.a(x))
        return self.b(h)


def test_the_widget_curvature_job_reports_the_refusal_and_runs_on(worker_factory):
    """The refusal is the job's error status; the worker runs the next job."""
    from widget_cases import worker_data

    from landscape_widget.widget.protocol import Spec

    model, statuses = reinit(_NoGradFirst(), 5).eval(), []
    worker, rec = worker_factory(model, worker_data(), on_status=statuses.append)
    worker.submit("c", Spec(quantity="curvature", resolution=3, seed=2))
    assert worker.wait(120)
    errors = [m for m in statuses if m.get("id") == "c" and m["state"] == "error"]
    assert errors and "'a.weight'" in errors[-1]["message"]
    assert not rec.of("c", "done")
    worker.submit("s", Spec(resolution=3, seed=2))  # a surface needs no derivatives
    assert worker.wait(120) and rec.of("s", "done")


@pytest.mark.parametrize("method", ["jvp", "backward"])
def test_a_first_batch_without_counted_targets_does_not_skip_the_check(method):
    """The probe compared the first batch's loss, a NaN mean when all its targets are
    ignored: the check passed, and method='backward' returned the rest's curvature (jvp
    failed as 'not symmetric', blamed on weight_norm)."""
    model = reinit(PartNet("no_grad"), 6).eval()
    x, y = classification_data(16, (6,), 3, 2)
    y[:4] = -100

    def loss_fn(out, t):
        return F.cross_entropy(out, t, ignore_index=-100)

    with Untouched(model), pytest.raises(ValueError, match="does not compute") as err:
        lw.hessian_eigenpairs(model, (x, y), k=1, loss_fn=loss_fn, method=method,
                              batch_size=4)
    assert "'a.weight'" in str(err.value) and "aux" not in str(err.value)


def test_a_first_batch_without_counted_targets_with_an_unused_head_runs():
    """The check moves to the next batch: no false refusal, and the dense Hessian's values."""
    model = reinit(PartNet("autograd"), 6).eval()
    x, y = classification_data(16, (6,), 3, 2)
    y[:4] = -100
    with Untouched(model):
        vals, _ = lw.hessian_eigenpairs(model, (x, y), k=2, method="backward", batch_size=4)
    dense = _dense(model, x, y, ["a.weight", "b.weight", "aux.weight"])
    np.testing.assert_allclose(vals, torch.linalg.eigvalsh(dense).numpy()[::-1][:2],
                               rtol=1e-4, atol=1e-6)
