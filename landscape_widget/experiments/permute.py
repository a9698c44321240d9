"""Permutation symmetry: the w-basin direction ``d = pi(theta) - theta`` (PAPERS.md (d) step 2).

Permuting the hidden units of a layer (rows of its weight and bias, the matching columns of
the next layer's weight, and the unit's BatchNorm entries) gives another point of
parameter space that computes exactly the same function. The segment from ``theta`` to
``pi(theta)`` therefore has the same loss at both ends and, in between, usually a barrier:
a two-minima "w-basin" curve with the model at one minimum.

The model's dataflow is read with ``torch.fx`` and its channels are sorted into
*permutation groups* by union-find, as weight-matching methods (Git Re-Basin's permutation
specs) do: every weight layer's outputs start a group; tensors that are added or
multiplied elementwise (a residual connection, a squeeze-and-excitation gate) must be
permuted alike, so their groups merge; a module called twice or a weight tied between
modules merges the groups it touches. Groups that reach the model's input or output stay
fixed, every other group gets one random permutation. So chains, ResNets (torchvision's
included, with their downsampling shortcuts), shared layers and tied weights all work.
An operation no permutation can follow (a concatenation, a grouped convolution, a layer
norm, a softmax over units, anything unknown) *pins* its inputs: they stay unpermuted,
which is sound for any deterministic operation, and the rest of the model still moves.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..core.params import (
    Params,
    check_direction,
    check_module,
    evaluation_copy,
    float_buffers_of,
    model_device,
    parameters_of,
)
from ..core.state import held_generators, plain_attributes, restore_attributes
from ._objective import _check_attempts, _Objective, _retry
from ._permutation_groups import FIXED, HELP, MIXING, Plan, trace
from .curves import ShapedDirection, classify_curve, warn_shortfall
from .mining import DEFAULT_ATTEMPTS

PERMUTATION_X = (-0.5, 1.5, 41)
"""The window the w-basin is checked on (and the widget shows): theta at 0, its permuted
twin at 1. On :data:`SHAPE_X` the far side (``alpha = -1.5``) often rises so high that the
barrier between the twins falls under the classifier's 5 % of the span."""
_ALPHAS = np.linspace(*PERMUTATION_X)


def _derangement(n: int, gen: torch.Generator) -> Tensor:
    """A uniform random permutation of ``n`` items that moves every item (``n >= 2``).

    Every unit moves, so ``d`` is non-zero on every hidden row; about ``1/e`` of the draws
    qualify, so the expected number of draws is under 3.

    Returns:
        A permutation tensor ``p`` of ``0..n-1`` with ``p[i] != i`` for every ``i``.
    """
    while True:
        p = torch.randperm(n, generator=gen)
        if not bool((p == torch.arange(n)).any()):
            return p


def _permute(t: Tensor, perm: Tensor, dim: int, flat: str | None, where: str) -> Tensor:
    """``t`` with its units along ``dim`` reordered by ``perm``.

    After a flatten each unit owns ``k = size / len(perm)`` entries: consecutive ones
    (``flat="blocks"``) or one in every ``len(perm)`` (``"interleaved"``).

    Returns:
        A new tensor: ``t`` with its slices along ``dim`` taken in the order ``perm`` (expanded to
        blocks or interleaved entries after a flatten).

    Raises:
        ValueError: If ``t``'s size along ``dim`` is not the number of units and (after a flatten)
            not a multiple of it; the message names the tensor (``where``).
    """
    size, c = t.shape[dim], perm.numel()
    if size != c:
        if flat is None or size % c:
            raise ValueError(f"{where} has {size} entries along dim {dim} where {c} units "
                             f"were expected; {HELP}.")
        k = size // c
        if flat == "blocks":
            perm = (perm[:, None] * k + torch.arange(k)).reshape(-1)
        else:
            perm = (torch.arange(k)[:, None] * c + perm[None, :]).reshape(-1)
    return t.index_select(dim, perm.to(t.device))


def _verify(model: nn.Module, d: Params, inputs: Tensor) -> None:
    """Raise if ``theta + d`` computes another function than ``theta`` on ``inputs``.

    Eval mode on a structural copy (the user's flags untouched); the outputs may be any
    nest of tensors.

    Raises:
        ValueError: If an output of ``theta + d`` differs from that of ``theta`` by more than 1e-4
            of the outputs' scale.
    """
    from torch.utils._pytree import tree_leaves

    module = evaluation_copy(model)
    modes = {m: m.training for m in module.modules()}
    # Copies: a forward writing to a buffer in place (self.seen += n) wrote into the
    # user's own; and each call starts from the copy's state as it was (attributes and
    # generators put back, as the engine's passes do): a call counter or a generator the
    # forward used made the twin "another function", refused as an unknown architecture.
    state = {k: v.clone() for k, v in {**parameters_of(model),
                                       **float_buffers_of(model)}.items()}
    end = {k: v + d[k] if k in d else v.clone() for k, v in state.items()}
    inputs = inputs.to(model_device(model))
    try:
        module.eval()
        # After eval(): the training flags are attributes too.
        attributes = plain_attributes(module)
        generators = held_generators(module)
        with torch.no_grad():
            # Copies of the state for each run: a forward that updates its buffers (QAT
            # observers) would write into the user's, and the second run would start from
            # the first one's state and compute another function.
            before = [t for t in tree_leaves(functional_call(
                module, {k: v.clone() for k, v in state.items()}, (inputs.clone(),)))
                      if isinstance(t, Tensor) and t.is_floating_point()]
            restore_attributes(attributes)
            for g, saved in generators:
                g.set_state(saved)
            after = [t for t in tree_leaves(functional_call(
                module, {k: v.clone() for k, v in end.items()}, (inputs.clone(),)))
                     if isinstance(t, Tensor) and t.is_floating_point()]
    finally:
        for m, training in modes.items():  # restored one by one: train() would recurse
            m.training = training
    for a, b in zip(before, after, strict=True):
        scale = max(1.0, float(a.abs().max()))
        diff = float((a - b).abs().max())
        if not diff <= 1e-4 * scale:
            raise ValueError(f"the permuted network computes another function on the check "
                             f"inputs (largest output difference {diff:.3g}, outputs up to "
                             f"{scale:.3g}): the model does something the permutation did not "
                             f"follow. Please report the architecture; {HELP}.")


def permutation_direction(model: nn.Module, *, seed: int = 0, buffers: bool = True,
                          check_inputs: Tensor | None = None, data=None,
                          loss_fn: Callable | None = None, bn: str = "eval", device=None,
                          attempts: int = DEFAULT_ATTEMPTS,
                          warn: bool = True) -> ShapedDirection:
    """The w-basin direction ``d = pi(theta) - theta`` for a random hidden-unit permutation.

    Every group of hidden units that can be permuted (see the module docstring: a layer's
    outputs, merged with whatever is added to them) gets its own random derangement (every
    unit moves); the model's inputs and outputs stay fixed. Biases and BatchNorm scale,
    shift and running statistics move with their units, so ``theta + 1 * d`` computes the
    same function as ``theta`` on every input (to float rounding), and both ends of
    ``lw.compute_curve(model, data, direction=d, x=(-0.5, 1.5, 41))`` have the same loss.
    In a ResNet the channels of each stage's residual stream form one group, the inner
    channels of each block another.

    Equal ends do not make a w-basin by themselves: a wide network may be linearly
    connected to its permuted twin, with no barrier between them. With ``data`` the shape
    is checked (:func:`classify_curve` of the loss over all data on :data:`PERMUTATION_X`,
    ``(-0.5, 1.5, 41)``, where the twin sits at ``alpha = 1``); a
    permutation that gives no w-basin is drawn again (seed ``seed + i``, ``attempts``
    tries), and if none does the one with the highest barrier is returned with
    ``success=False`` and a :class:`ShapeWarning`. Without ``data`` nothing is checked
    (``success`` is ``None``).

    BatchNorm: with ``buffers=True`` (default) ``d`` also holds every floating-point buffer
    (zero where nothing moves), as :func:`~landscape_widget.interpolation_direction` does,
    so the engine moves the running statistics along with the weights; without them the
    endpoint would normalise permuted channels with unpermuted statistics and be a
    different function. Interpolated running variances stay positive on ``0 <= alpha <= 1``;
    far outside it they may turn negative, giving NaN losses there.

    Args:
        model: The model (not modified), traceable by ``torch.fx``. Units are permuted
            through Linear/Conv1d-3d layers (ungrouped or depthwise), BatchNorm, PReLU,
            elementwise activations, dropout, pooling, flatten/``view(n, -1)``, spatial
            means, residual additions and elementwise products, shared layers and tied
            weights; any other operation keeps its inputs unpermuted.
        seed: Seed of the permutations (a private generator; the global RNG is untouched).
        buffers: Include the floating-point buffers (see above).
        check_inputs: Optional model inputs (a few samples): the two endpoints are run on
            them in eval mode and must give the same outputs (to 1e-4 of their scale), a
            check of the graph analysis on the real model. The widget passes 64 samples.
        data: Optional ``(inputs, targets)``, ``Dataset`` or ``DataLoader`` to check the
            curve's shape on (see above).
        loss_fn: Mean loss of a batch for the check; cross-entropy by default.
        bn: ``"eval"`` or ``"batch"``, for the check.
        device: Where to compute the check.
        attempts: Permutations to try when checking (default 3).
        warn: Issue the :class:`ShapeWarning` on failure.

    Returns:
        A :class:`~landscape_widget.experiments.curves.ShapedDirection`: ``dict[str,
        Tensor]`` keyed like ``model.named_parameters()`` (plus float buffers), each tensor
        on its parameter's device and dtype, carrying ``requested`` (``"w-basin"``),
        ``achieved``, ``success``, ``reason``, ``curve`` and ``attempts``.

    Raises:
        ValueError: If ``torch.fx`` cannot trace the model (data-dependent control flow),
            if it has fewer than two weight layers, or if no hidden unit can move (every
            group reaches the input or output, has a single unit, or feeds an operation that
            mixes units; the message names such operations).
        TypeError: If ``model`` is not an ``nn.Module`` or ``seed`` is not an int.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
        >>> d = permutation_direction(net, seed=0)
        >>> x = torch.randn(3, 4)
        >>> end = {k: p + d[k] for k, p in net.named_parameters()}
        >>> torch.allclose(torch.func.functional_call(net, end, (x,)), net(x), atol=1e-6)
        True
    """
    check_module(model)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
    _check_attempts(attempts)
    if data is None:
        out = ShapedDirection(_permutation(model, seed, buffers, check_inputs))
        out._set_outcome("w-basin", (), None)
        return out
    obj = _Objective(model, data, loss_fn=loss_fn, bn=bn, ignore=None, device=device)

    def run(settings: dict) -> Params:
        return _permutation(model, settings["seed"], buffers, check_inputs)

    def check(d: Params) -> dict:
        with obj.session():
            f = obj.curve(d, _ALPHAS)
        found = classify_curve(_ALPHAS, f)
        inside = (_ALPHAS >= 0) & (_ALPHAS <= 1)
        ends = max(np.interp(0.0, _ALPHAS, f), np.interp(1.0, _ALPHAS, f))
        barrier = float(np.nanmax(f[inside]) - ends)
        return {"achieved": found.shape, "reason": found.reason, "curve": found,
                "ok": found.shape == "w-basin",
                "score": -barrier if math.isfinite(barrier) else math.inf}

    plan = [{"seed": seed + i} for i in range(attempts)]
    d, tries, chosen, _ = _retry(run, check, plan, None)
    out = ShapedDirection(d)
    out._set_outcome("w-basin", tries, chosen)
    if warn and out.success is False:
        warn_shortfall(out, "permutation_direction", "The model may be linearly connected to "
                       "its permuted twin (no barrier between them: common for wide networks).")
    return out


def _permutation(model: nn.Module, seed: int, buffers: bool,
                 check_inputs: Tensor | None) -> Params:
    if isinstance(model, MIXING):
        raise ValueError(f"the model is a single {type(model).__name__} layer: a permutation "
                         "needs at least one hidden layer between two weight layers.")
    # fx runs the forward (and its hooks) on Proxies: on a private copy, so that the
    # forward reassigning attributes (self.calls += 1, self.prev = a Proxy) or a hook
    # storing its output (into the module or a closure) cannot reach the user's model.
    # (torch.fx also stores what it cannot trace, a generator, on the traced module.)
    copy = evaluation_copy(model)
    traced = trace(copy)
    plan = Plan(copy, traced)
    plan.follow(traced.graph)
    if len(plan.layers) < 2:
        raise ValueError(f"the model has {len(plan.layers)} Linear/Conv layer(s): a permutation "
                         "needs at least one hidden layer between two weight layers.")

    groups = plan.groups
    sizes_of: dict[int, set[int]] = {}  # each free group's layer widths (all must agree)
    for g in sorted(plan.size):  # in graph order: the same seed gives the same permutation
        sizes_of.setdefault(groups.find(g), set()).add(plan.size[g])
    sizes_of.pop(FIXED, None)
    perms: dict[int, Tensor] = {}
    gen = torch.Generator().manual_seed(seed)
    for root, sizes in sizes_of.items():
        if len(sizes) > 1:
            raise ValueError(f"layers with {sorted(sizes)} output units are added or "
                             f"multiplied together; {HELP}.")
        (n,) = sizes
        if n > 1:
            perms[root] = _derangement(n, gen)
    if not perms:
        pins = "; ".join(plan.pins[:3]) + (" ..." if len(plan.pins) > 3 else "")
        raise ValueError("no hidden unit can be permuted: every layer's outputs reach the "
                         "model's input or output (through residual connections, shared "
                         "layers or tied weights), are a single unit, or feed an operation "
                         "that mixes units" + (f" ({pins})" if pins else "") + f"; {HELP}.")

    params = parameters_of(model)
    bufs = float_buffers_of(model)
    new = {k: v.clone() for k, v in {**params, **bufs}.items()}
    for key, (g, flat) in plan.rows.items():
        perm = perms.get(groups.find(g))
        if perm is not None:
            new[key] = _permute(new[key], perm, 0, flat, f"tensor {key!r}")
    for key, units in plan.cols.items():
        perm = perms.get(groups.find(units.group))
        if perm is not None:
            new[key] = _permute(new[key], perm, 1, units.flat, f"the inputs of {key!r}")
    keys = list(params) + (list(bufs) if buffers else [])
    d = {k: new[k] - ({**params, **bufs})[k] for k in keys}
    check_direction(model, d)
    if check_inputs is not None:
        _verify(model, {**d, **{k: new[k] - bufs[k] for k in bufs}}, check_inputs)
    return d
