"""Parameters the loss depends on but autograd cannot reach: a partly no-grad forward.

A forward that runs part of the model under ``torch.no_grad()`` (a frozen feature
extractor: ``with torch.no_grad(): h = self.backbone(x)``), or detaches a part's output,
still has a loss with a graph, back to the rest. Autograd then reports no gradient for the
part's parameters (``allow_unused=True`` gives ``None``), exactly as for parameters the
forward never uses (an auxiliary head). For those a zero derivative is right; for the
part it is wrong: the loss as a function of the parameters depends on them, so the
Hessian's rows for them are not zero, and neither is the gradient. The Hessian tools read
``None`` as zero, so eigenvalues, traces and ratio maps were those of the rest of the
model with no sign of it, and :func:`~landscape_widget.side_direction` followed a gradient
without the part.

:func:`check_reached` tells the two apart by moving the unreached parameters (a forward
with no gradient): an unused parameter leaves the loss as it was, bit for bit where the
kernels are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import inf

import torch
from torch import Tensor

# How far the probe moves an unreached parameter, relative to its root mean square (a
# tensor of zeros moves by this much absolute), and the relative change of the loss above
# which it counts as used: far above float32 rounding of the same computation repeated,
# far below what moving a used layer's weights by 10 % does. A loss in bfloat16 or float16
# rounds such a change away (one ulp of a bfloat16 loss near 1 is 0.8 %, and moving a
# no-grad layer by 10 % changed it by less): where the loss stays put, the move grows by
# PROBE_GROWTH, up to PROBE_TRIES moves; an unused parameter leaves it as it was at any
# size. The tolerance is at least PROBE_ULPS units of the loss's own rounding (one
# ulp of a repeat that reduces in another order on a GPU is not a move).
PROBE_STEP = 0.1
PROBE_GROWTH = 10.0
PROBE_TRIES = 3
PROBE_TOL = 1e-6
PROBE_ULPS = 1
PROBE_NAMED = 8  # unreached parameters moved one by one to name the used ones


def unreached(loss: Tensor, leaves: dict[str, Tensor]) -> list[str]:
    """The names of ``leaves`` that ``loss`` has no autograd path to.

    Args:
        loss: A scalar computed from ``leaves`` with autograd on.
        leaves: Tensors that require grad, by name.

    Returns:
        The names whose gradient autograd reports as ``None``; all of them if the loss has
        no graph.

    Example:
        >>> a, b = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
        >>> unreached((a * 2).sum() + b.detach().sum(), {"a": a, "b": b})
        ['b']
    """
    if not loss.requires_grad:
        return list(leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True,
                                retain_graph=True)
    return [k for k, g in zip(leaves, grads, strict=True) if g is None]


@torch.no_grad()
def check_reached(loss_of: Callable[[dict[str, Tensor]], Tensor], params: dict[str, Tensor],
                  names: Sequence[str], what: str) -> None:
    """Refuse if the loss depends on parameters ``names`` that autograd does not reach.

    Args:
        loss_of: The loss at a dict of parameter values (the same data every call).
        params: The parameter values the derivatives are taken at.
        names: The names of ``params`` with no autograd path from the loss
            (:func:`unreached`); each is moved by :data:`PROBE_STEP` of its root mean
            square, all at once, ten times more while the loss stays put (up to
            :data:`PROBE_TRIES` moves); then the first :data:`PROBE_NAMED` one by one,
            to name those the loss depends on.
        what: What needs the derivatives, for the message.

    Raises:
        ValueError: If moving them changes the loss by more than :data:`PROBE_TOL`
            relative (and :data:`PROBE_ULPS` units of its rounding), or makes it inf or
            NaN, naming them, the likely cause and the fix.

    Example:
        >>> w, v = torch.ones(3), torch.ones(3)
        >>> loss_of = lambda p: (p["w"] * 2).sum() + p["v"].sum()
        >>> check_reached(loss_of, {"w": w, "v": v}, [], "the Hessian")
        >>> check_reached(loss_of, {"w": w, "v": v}, ["v"], "the Hessian")
        Traceback (most recent call last):
        ...
        ValueError: The loss depends on parameters whose gradient autograd does not ...
    """
    if not names:
        return
    g = torch.Generator().manual_seed(0)
    unit = {}
    for k in names:
        p = params[k]
        rms = float(p.detach().double().pow(2).mean().sqrt()) if p.numel() else 0.0
        unit[k] = (rms or 1.0) * torch.randn(p.shape, generator=g, dtype=torch.float64)
    first = loss_of(params)
    base = float(first)
    floating = isinstance(first, Tensor) and torch.is_floating_point(first)
    eps = torch.finfo(first.dtype).eps if floating else 0.0
    tol = max(PROBE_TOL, PROBE_ULPS * eps) * max(abs(base), 1e-30)

    def moves(keys, scale: float) -> float | None:
        after = float(loss_of({**params, **{
            k: params[k] + (scale * unit[k]).to(params[k].device, params[k].dtype)
            for k in keys}}))
        # A loss made inf or NaN by the move depends on them too (an unused one cannot).
        return after if abs(after - base) > tol or after != after or abs(after) == inf \
            else None

    if base != base or abs(base) == inf:  # a NaN loss: nothing to compare
        return
    scales = [PROBE_STEP * PROBE_GROWTH ** i for i in range(PROBE_TRIES)]
    found = next(((s, a) for s in scales if (a := moves(names, s)) is not None), None)
    if found is None:  # unused: the loss stays as it was at every size of move
        return
    scale, after = found
    # Which ones: the first few, one by one (an unused head may be among them).
    used = [k for k in names[:PROBE_NAMED]
            if any(moves([k], s) is not None for s in scales if s <= scale)] \
        or list(names[:1])
    shown = ", ".join(repr(k) for k in used)
    more = len(names) - PROBE_NAMED
    raise ValueError(
        f"The loss depends on parameters whose gradient autograd does not compute: {shown}"
        + (f" (of {len(names)} parameters without one, {more} not tested singly)"
           if more > 0 else "")
        + f". Moving them changes the loss from {base:.6g} to {after:.6g}, yet the loss has "
        f"no autograd path to them: the forward runs them under torch.no_grad() or "
        f"torch.inference_mode(), detaches their output (.detach(), .data), or uses them "
        f"only through an operation without a derivative (a comparison such as h > p), so {what} "
        "would take their derivatives as zero and be wrong. Run that part with autograd on "
        "(a frozen part can keep requires_grad_(False): the derivatives are taken on a "
        "private copy), or evaluate a model without that part.")
