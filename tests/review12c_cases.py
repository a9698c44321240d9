"""Shared by test_review12c.py and test_review12c_grad.py: a small model, its data, every
public entry point as ``name -> fn(model)``, and the float64 oracles (a ``functional_call``
loop on a copy; torch's dense Hessian)."""

from __future__ import annotations

import copy
import functools

import numpy as np
import torch
import torch.nn.functional as F
from cases import classification_data, reinit
from torch import nn
from torch.func import functional_call

import landscape_widget as lw


def mlp() -> nn.Module:
    return reinit(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), 0).eval()


def orthogonal_net() -> nn.Module:
    """6 -> 8 -> 3 whose last layer is torch's ``orthogonal`` with its Householder map
    (the default for its 3 x 8 weight): signs on the diagonal of ``original``."""
    from torch.nn.utils.parametrizations import orthogonal

    model = reinit(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), 5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        orthogonal(model[2])
    return model.eval()


def data():
    return classification_data(16, (6,), 3, 1)


def calls(data):
    """Every public entry point on ``model``, as ``name -> fn(model)``."""
    grid = {"x": (-1, 1, 3), "y": (-1, 1, 3), "progress": False}
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    return {
        "random_directions": lambda m: lw.random_directions(m, 2, seed=0),
        "compute_surface": lambda m: lw.compute_surface(m, data, **grid),
        "compute_curve": lambda m: lw.compute_curve(m, data, x=(-1, 1, 3), progress=False),
        "iter_tiles": lambda m: list(lw.iter_tiles(m, data, x=(-1, 1, 3), y=(-1, 1, 3))),
        "hessian_eigenpairs": lambda m: lw.hessian_eigenpairs(m, data, k=1),
        "hessian_trace": lambda m: lw.hessian_trace(m, data, samples=2),
        "hessian_density": lambda m: lw.hessian_density(m, data, steps=3, runs=1),
        "mine_direction": lambda m: lw.mine_direction(m, data, "w-peak"),
        "side_direction": lambda m: lw.side_direction(m, data),
        "permutation_direction": lambda m: lw.permutation_direction(m, data=data),
        "compare_optimizers": lambda m: lw.compare_optimizers(m, data, {"sgd": sgd},
                                                              epochs=1, progress=False),
        "triangle_surface": lambda m: lw.triangle_surface(m, m, m, data, resolution=2,
                                                          progress=False),
    }


def oracle_surface(model, x, y, d1, d2, xs, ys) -> np.ndarray:
    """Float64 loop: ``functional_call`` on a copy at ``theta + a d1 + b d2``."""
    ref = copy.deepcopy(model).double().eval()
    theta = {k: p.detach().double() for k, p in ref.named_parameters()}
    out = np.zeros((len(ys), len(xs)))
    for i, b in enumerate(ys):
        for j, a in enumerate(xs):
            point = {k: v + a * d1[k].double() + b * d2[k].double() for k, v in theta.items()}
            with torch.no_grad():
                logits = functional_call(ref, point, (x.double() if x.is_floating_point()
                                                      else x,))
            logits = getattr(logits, "logits", logits)
            out[i, j] = float(F.cross_entropy(logits, y))
    return out


def oracle_curve(model, x, y, d, ts) -> np.ndarray:
    ref = copy.deepcopy(model).double().eval()
    theta = {k: p.detach().double() for k, p in ref.named_parameters()}
    out = []
    for t in ts:
        with torch.no_grad():
            logits = functional_call(ref, {k: v + t * d[k].double() for k, v in theta.items()},
                                     (x.double(),))
        out.append(float(F.cross_entropy(logits, y)))
    return np.array(out)


def flat_loss(ref: nn.Module, keys: list[str], x, y):
    """``(loss, size)``: the float64 mean cross-entropy of ``ref`` (a float64 copy) moved
    by a flat vector over ``keys``, and that vector's length."""
    theta = {k: p.detach().double() for k, p in ref.named_parameters()}
    sizes = [theta[k].numel() for k in keys]

    def loss(flat):
        point = dict(theta)
        for k, part in zip(keys, torch.split(flat, sizes), strict=True):
            point[k] = theta[k] + part.reshape(theta[k].shape)
        return F.cross_entropy(functional_call(ref, point, (x.double(),)), y)

    return loss, sum(sizes)


def dense_hessian(model, x, y) -> tuple[list[str], torch.Tensor]:
    """torch's dense float64 Hessian of the mean loss over the parameters of dim > 1."""
    ref = copy.deepcopy(model).double().eval()
    keys = [k for k, v in ref.named_parameters() if v.dim() > 1]
    loss, size = flat_loss(ref, keys, x, y)
    return keys, torch.autograd.functional.hessian(loss, torch.zeros(size,
                                                                     dtype=torch.float64))
