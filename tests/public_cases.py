"""Shared by test_public_cases.py and test_public_experiments.py: the cases every public
function runs on, and the oracles they are checked against.

The oracles are written without the library's code: a float64 forward through
``functional_call`` on a fresh model, a dense Hessian, the second derivative of
``t -> L(theta + t d)``; :class:`Untouched` fails if a call changed the user's model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from cases import REAL_CASES, TASK_CASES, _case, tied_data, tied_mlp
from snapshots import assert_same_snapshot, snapshot
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

_TASKS = {c["name"]: c for c in TASK_CASES}
# The real cases, tied weights, and the tasks beyond classification (their own loss).
CASES = [dict(c) for c in REAL_CASES] + [_case("tied", tied_mlp, tied_data)] + [
    {"name": n, "model": _TASKS[n]["model"], "data": _TASKS[n]["data"], "bn": "eval",
     "loss_fn": _TASKS[n]["loss_fn"], "output_fn": _TASKS[n]["output_fn"]}
    for n in ("regression-1", "multilabel-bce", "tokens-ignore-100", "dict-outputs")]
BY_NAME = {c["name"]: c for c in CASES}
IDS = list(BY_NAME)
# torch's second derivative of weight_norm is wrong (the library checks symmetry and says
# so); the stateful net's forward scales by a buffer it then changes in place, so torch
# cannot differentiate it at all (plain loss.backward() fails too).
NO_HVP = {"parametrizations": "weight_norm", "legacy-weight-norm": "weight_norm",
          "stateful-hooks": "changes a tensor in place after using it"}
DENSE_MAX = 700  # parameters of dim > 1 up to which the dense Hessian is the oracle


def load(case):
    """A fresh ``(model, (x, y))`` of ``case``, the model in eval mode."""
    model = case["model"]().eval()
    return model, case["data"]()


def kwargs(case, hessian: bool = False) -> dict:
    kw = {"bn": case["bn"]}
    if case.get("loss_fn") is not None:
        kw["loss_fn"] = case["loss_fn"]
    if hessian and case.get("output_fn") is not None:
        kw["output_fn"] = case["output_fn"]
    return kw


def oracle_loss(case, x, y, shift=None, t=None, frozen=False):
    """The mean loss over all data of a fresh float64 model (float32 for QAT) at
    ``theta + t * shift`` (``shift`` may move buffers too), computed in one forward;
    ``frozen``: QAT observers off, as in the Hessian tools (else they update, as in a
    surface's pass)."""
    net = case["model"]().eval()
    dtype = torch.float32 if case["name"] == "qat" else torch.float64
    net = net.to(dtype)
    if case["name"] == "qat" and frozen:
        for k, b in net.named_buffers():  # as the Hessian tools: the function, not its update
            if k.endswith("observer_enabled"):
                b.zero_()
    state = {k: v.detach().clone() for k, v in net.named_parameters()}
    state.update({k: b.clone() for k, b in net.named_buffers()})
    for k, v in (shift or {}).items():
        step = v.to(dtype) if t is None else t * v.to(dtype)
        state[k] = state[k] + step
    if case["bn"] == "batch":
        net.train()
    xd = x.to(dtype) if x.is_floating_point() else x
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no second derivative
        out = functional_call(net, state, (xd,))
    loss_fn = case.get("loss_fn")
    if loss_fn is None:
        return F.cross_entropy(out, y)
    if isinstance(loss_fn, torch.nn.Module):
        loss_fn = type(loss_fn)()  # same class, default settings (all cases' are default)
    return loss_fn(out, y.to(dtype) if y.is_floating_point() else y)


def second_derivative(case, x, y, d) -> float:
    """``d^2/dt^2 L(theta + t d)`` at ``t = 0`` by autograd on the scalar ``t``."""
    t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(oracle_loss(case, x, y, d, t, frozen=True), t,
                               create_graph=True)
    (h,) = torch.autograd.grad(g, t)
    return float(h)


def weights(model) -> dict:
    return {k: p.detach() for k, p in model.named_parameters() if p.dim() > 1}


def dense_hessian(case, x, y) -> torch.Tensor:
    """The dense Hessian of the oracle loss over the parameters of dim > 1."""
    keys = list(weights(case["model"]()))
    shapes = {k: v.shape for k, v in weights(case["model"]()).items()}
    sizes = [int(np.prod(shapes[k])) for k in keys]

    def f(flat):
        parts = torch.split(flat, sizes)
        return oracle_loss(case, x, y, {k: p.reshape(shapes[k])
                                        for k, p in zip(keys, parts, strict=True)}, frozen=True)

    dtype = torch.float32 if case["name"] == "qat" else torch.float64
    # Rows by vmap where the layers allow it (not the CPU LSTM/GRU kernels).
    vectorize = case["name"] not in ("lstm", "gru")
    return torch.autograd.functional.hessian(f, torch.zeros(sum(sizes), dtype=dtype),
                                             vectorize=vectorize)


class Untouched:
    """``with Untouched(model):`` fails if the block changed anything of ``model``."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.before = snapshot(self.model)

    def __exit__(self, *exc):
        assert_same_snapshot(self.before, snapshot(self.model))
