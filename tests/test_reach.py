"""Parameters the loss depends on but autograd cannot reach (core/reach.py).

A forward that runs a part under ``torch.no_grad()`` (a frozen backbone) or detaches its
output has a graph back to the rest only. The Hessian tools read the part's missing
gradient as zero: eigenvalues, traces, densities and curvature maps were the rest's, with
no sign of it (the trace below is 30 % off the dense Hessian's). They now refuse, naming
the part's parameters and the fix. Parameters the forward never uses (an auxiliary head)
have a zero gradient, rightly: they are not refused, and ``side_direction``, which failed
on them with torch's "appears to not have been used in the graph", now runs. Oracles:
torch's dense float64 Hessian and gradient of the loss as a function of every parameter
(computed with autograd on everywhere).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import reinit
from public_cases import Untouched
from reach_cases import PartNet
from reach_cases import dense as dense_derivatives
from review12c_cases import data
from torch import nn
from torch.func import functional_call

import landscape_widget as lw
from landscape_widget.core.reach import check_reached, unreached


def _net(part: str) -> nn.Module:
    return reinit(PartNet(part), 7).eval()


def _calls(x, y):
    d = lw.random_directions(_net("autograd"), 2, seed=0)
    return {
        "hessian_eigenpairs": lambda m: lw.hessian_eigenpairs(m, (x, y), k=1),
        "hessian_eigenpairs_jvp": lambda m: lw.hessian_eigenpairs(m, (x, y), k=1,
                                                                  method="jvp", batch_size=5),
        "hessian_eigenpairs_backward": lambda m: lw.hessian_eigenpairs(
            m, (x, y), k=1, method="backward", batch_size=5),
        "hessian_trace": lambda m: lw.hessian_trace(m, (x, y), samples=2),
        "hessian_density": lambda m: lw.hessian_density(m, (x, y), steps=3, runs=1),
        "rayleigh_quotient": lambda m: lw.rayleigh_quotient(m, (x, y), d[0]),
        "curvature_map": lambda m: lw.curvature_map(m, (x, y), d, x=(-1, 1, 2),
                                                    y=(-1, 1, 2), progress=False),
        "side_direction": lambda m: lw.side_direction(m, (x, y)),
    }


CALLS = ["hessian_eigenpairs", "hessian_eigenpairs_jvp", "hessian_eigenpairs_backward",
         "hessian_trace", "hessian_density", "rayleigh_quotient", "curvature_map",
         "side_direction"]


@pytest.mark.parametrize("part", ["no_grad", "detach"])
@pytest.mark.parametrize("call", CALLS)
def test_a_part_without_autograd_is_refused(part, call):
    x, y = data()
    model = _net(part)
    with Untouched(model), pytest.raises(ValueError, match="does not compute") as err:
        _calls(x, y)[call](model)
    message = str(err.value)
    assert "'a.weight'" in message and "aux" not in message, message  # the head is unused
    assert "torch.no_grad()" in message and "autograd on" in message


def test_what_the_refusal_prevents():
    """Before: the trace was the head's alone; the dense Hessian's is 30 % larger."""
    x, y = data()
    model = _net("no_grad")
    keys, _, dense = dense_derivatives(model, x, y)
    true_trace = float(torch.trace(dense))
    head = [i for i, k in enumerate(keys) if k == "b.weight"]
    at = sum(model.get_parameter(k).numel() for k in keys[:head[0]])
    n = model.b.weight.numel()
    head_trace = float(torch.trace(dense[at:at + n, at:at + n]))
    assert abs(true_trace - head_trace) > 0.1 * abs(true_trace)


@pytest.mark.parametrize("method", ["graph", "jvp", "backward"])
def test_an_unused_head_has_a_zero_hessian_row(method):
    x, y = data()
    model = _net("autograd")
    with Untouched(model):
        vals, vecs = lw.hessian_eigenpairs(model, (x, y), k=2,
                                           method=method, batch_size=16 if method == "graph"
                                           else 5)
    keys, _, dense = dense_derivatives(model, x, y)
    np.testing.assert_allclose(vals, torch.linalg.eigvalsh(dense).numpy()[::-1][:2],
                               rtol=1e-4, atol=1e-6)
    assert float(vecs[0]["aux.weight"].abs().max()) < 1e-6


def test_side_direction_with_an_unused_head_follows_the_gradient():
    """It failed with torch's "appears to not have been used in the graph"."""
    x, y = data()
    model = _net("autograd")
    with Untouched(model):
        d = lw.side_direction(model, (x, y), warn=False)
    keys, grad, _ = dense_derivatives(model, x, y)
    flat = torch.cat([d[k].double().reshape(-1) for k in keys])
    cos = float(flat @ grad) / float(flat.norm() * grad.norm())
    assert cos < -1 + 1e-5  # downhill, parallel to -grad
    assert torch.count_nonzero(d["aux.weight"]) == 0


@pytest.mark.parametrize("part", ["no_grad", "detach"])
def test_surfaces_and_training_of_a_part_without_autograd_still_run(part):
    """Only derivatives are refused: a surface needs none, and training a model whose
    backbone is frozen by no_grad is what the user asked for."""
    x, y = data()
    model = _net(part)
    d1, d2 = lw.random_directions(model, 2, seed=0)
    with Untouched(model):
        surf = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-1, 1, 3),
                                  y=(-1, 1, 3), progress=False, metrics=("loss",))
        lw.compare_optimizers(model, (x, y), {"sgd": lambda p: torch.optim.SGD(p, lr=0.1)},
                              epochs=1, progress=False)
    ref = copy.deepcopy(model).double()
    theta = {k: p.detach().double() for k, p in ref.named_parameters()}
    want = np.array([[float(F.cross_entropy(functional_call(
        ref, {k: v + a * d1[k].double() + b * d2[k].double() for k, v in theta.items()},
        (x.double(),)), y)) for a in surf.x] for b in surf.y])
    np.testing.assert_allclose(surf.loss, want, rtol=1e-5, atol=1e-6)


def test_unreached_and_check_reached_directly():
    w = torch.ones(3, requires_grad=True)
    v = torch.ones(3, requires_grad=True)
    u = torch.ones(3, requires_grad=True)
    loss = (w * 2).sum() + v.detach().sum()
    assert unreached(loss, {"w": w, "v": v, "u": u}) == ["v", "u"]
    assert unreached(torch.tensor(1.0), {"w": w}) == ["w"]  # no graph at all

    def loss_of(p):
        return (p["w"] * 2).sum() + p["v"].sum()

    params = {"w": w.detach(), "v": v.detach(), "u": u.detach()}
    check_reached(loss_of, params, ["u"], "x")  # unused: the loss stays as it was
    with pytest.raises(ValueError, match="'v'") as err:
        check_reached(loss_of, params, ["u", "v"], "x")
    assert "'u'" not in str(err.value).split(". Moving")[0]
    zero = {"z": torch.zeros(4)}  # a tensor of zeros still moves (by PROBE_STEP)
    with pytest.raises(ValueError, match="'z'"):
        check_reached(lambda p: p["z"].square().sum() + 1, zero, ["z"], "x")


@pytest.mark.parametrize("method", ["graph", "jvp", "backward"])
def test_a_loss_constant_on_every_batch_is_still_refused(method):
    """The check's forward builds the products' graph (``graph``): its losses count."""
    x, y = data()
    model = _net("autograd")
    with pytest.raises(ValueError, match="through autograd"):
        lw.hessian_eigenpairs(model, (x, y), k=1, ignore=None, method=method,
                              batch_size=16 if method == "graph" else 5,
                              loss_fn=lambda out, t: torch.zeros(()))
