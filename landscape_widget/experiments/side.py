"""The v-side direction: straight downhill from theta (Li, Li & Zhan 2024, PAPERS.md (d) 2).

Evaluation follows :mod:`.mining`: ``functional_call`` on a copy, eval mode, the model
untouched.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..core.heap import holding_heap
from ..core.params import Params, outside_inference_mode
from ..core.reach import check_reached, unreached
from ._objective import _check_attempts, _norm, _Objective, _retry
from .curves import SHAPE_X, ShapedDirection, classify_curve, warn_shortfall

_ALPHAS = np.linspace(*SHAPE_X)


class _Stopped(Exception):
    """The line search was cancelled; carries the step it had reached."""

    def __init__(self, t: float):
        super().__init__(t)
        self.t = t


AT_FACTORS = (1.0, 1.5, 2.0)
"""Retries of :func:`side_direction` put the minimum at ``at`` times these (a shorter
direction, so the far side of the window rises less and the dip stands out more)."""


@outside_inference_mode
@holding_heap
def side_direction(model: nn.Module, data, *, at: float = 0.75, ignore: str | None = "biasbn",
                   loss_fn: Callable | None = None, bn: str = "eval", device=None,
                   cancel: threading.Event | None = None, attempts: int = len(AT_FACTORS),
                   warn: bool = True) -> ShapedDirection:
    """A v-side direction: straight downhill, scaled so the minimum lies at ``alpha = at``.

    ``d`` is parallel to ``-grad L(theta)`` (over all data; on weights of dim > 1 with
    ``ignore="biasbn"``). A line search finds ``t*``, the first minimum of
    ``L(theta - t g/||g||)``; then ``d = -(t* / at) g/||g||``, so the curve's minimum sits at
    ``alpha = at`` and ``theta`` is on its slope.

    PAPERS.md (d) step 2 proposes scaling ``-grad L`` to a filter-normalised norm. At a
    converged checkpoint the minimum along that much longer direction is at ``|alpha|`` of
    a few hundredths: a v-basin to the eye and to :func:`classify_curve`. Scaling by the
    line search gives a v-side at any checkpoint, trained or not.

    The line search doubles ``t`` from ``1e-4 ||theta||`` until the loss rises (at most up
    to ``||theta||``, the size of the weights themselves), then refines ``t*`` by golden
    section to 1e-3 relative. The step is relative to the weights and the direction's
    length comes from the loss itself, so nothing depends on the scale of the weights.

    Checked: :func:`classify_curve` labels the loss over all data along ``d`` on the
    taxonomy window :data:`~landscape_widget.SHAPE_X`. Near convergence the dip to the
    minimum can be too shallow next to the rise on the other side (a v-basin); the next
    tries put the minimum further out (``at`` times 1.5, then 2: a shorter direction). If
    no try gives a v-side the best one is returned with ``success=False`` and a
    :class:`ShapeWarning`.

    Args:
        model: The model (never modified).
        data: Training ``(inputs, targets)``, a ``Dataset`` or a ``DataLoader``.
        at: Where the minimum should lie on the curve (``> 0``; the v-side bound of
            :func:`classify_curve` is 0.25).
        ignore: ``"biasbn"`` (weights of dim > 1 only) or ``None`` (all parameters).
        loss_fn: Mean loss of a batch; cross-entropy by default.
        bn: ``"eval"`` or ``"batch"``.
        device: Where to compute.
        cancel: A ``threading.Event``, checked before every loss evaluation of the line
            search; once set, the direction of the best step so far is returned unchecked
            (``cancelled=True``; the widget drops it).
        attempts: Tries (positions ``at``, ``1.5 at``, ``2 at``), 1 to 3.
        warn: Issue the :class:`ShapeWarning` on failure.

    Returns:
        A :class:`~landscape_widget.experiments.curves.ShapedDirection` (a direction dict
        keyed like ``model.named_parameters()``) carrying ``requested`` (``"v-side"``),
        ``achieved``, ``success``, ``reason``, ``curve`` and ``attempts``.

    Raises:
        ValueError: If the gradient is zero (``theta`` is a stationary point: no downhill)
            or the settings are bad.
        TypeError: If ``cancel`` has no callable ``is_set``.
    """
    if cancel is not None and not callable(getattr(cancel, "is_set", None)):
        raise TypeError(f"cancel must be a threading.Event (or None), got {cancel!r}.")
    if (isinstance(at, bool) or not isinstance(at, int | float) or not at > 0
            or not math.isfinite(at)):
        raise ValueError(f"at must be a positive number (where the minimum lies), got {at!r}.")
    _check_attempts(attempts)
    if attempts > len(AT_FACTORS):
        raise ValueError(f"attempts must be 1 to {len(AT_FACTORS)} for side_direction (one "
                         f"per position of the minimum), got {attempts}.")
    obj = _Objective(model, data, loss_fn=loss_fn, bn=bn, ignore=ignore, device=device)
    with obj.session():
        zero = {k: torch.zeros_like(obj.theta[k], requires_grad=True) for k in obj.keys}
        with torch.enable_grad():
            loss = obj.full_loss(zero)
            missing = unreached(loss, zero)
            grads = torch.autograd.grad(loss, list(zero.values()), allow_unused=True)
        # A parameter the forward never uses (an auxiliary head) has a zero gradient; one
        # it uses without autograd (a no_grad backbone) is refused, not read as zero.
        theta = {k: obj.theta[k] for k in obj.keys}  # moved relative to their own size
        check_reached(lambda p: obj.full_loss({k: p[k] - theta[k] for k in p}), theta,
                      missing, "the gradient direction")
        g = {k: t if t is not None else torch.zeros_like(zero[k])
             for k, t in zip(obj.keys, grads, strict=True)}
        gnorm = _norm(g).item()
        if not gnorm > 0 or not math.isfinite(gnorm):
            raise ValueError(f"the gradient at theta has norm {gnorm}: theta is a stationary "
                             "point (or the loss is not finite), so there is no downhill side.")
        unit = {k: -t / gnorm for k, t in g.items()}

        best = [0.0, math.inf]

        @torch.no_grad()
        def line(t: float) -> float:
            if cancel is not None and cancel.is_set():
                raise _Stopped(best[0])
            value = float(obj.full_loss({k: t * v for k, v in unit.items()}))
            if value < best[1]:
                best[:] = [t, value]
            return value

        stopped = False
        try:
            t_star = _line_search(line, float(_norm({k: obj.theta[k] for k in obj.keys})))
        except _Stopped as stop:
            t_star = stop.t or 1e-4 * float(_norm({k: obj.theta[k] for k in obj.keys}))
            stopped = True

        def run(settings: dict) -> Params:
            return {k: v * (t_star / settings["at"]) for k, v in unit.items()}

        def check(d: Params) -> dict:
            found = classify_curve(_ALPHAS, obj.curve(d, _ALPHAS))
            dip = (found.theta_loss - min(m.loss for m in found.minima)) / found.span \
                if found.minima and found.span > 0 else 0.0
            return {"achieved": found.shape, "reason": found.reason, "curve": found,
                    "ok": found.shape == "v-side",
                    "score": -dip if math.isfinite(dip) else math.inf}

        plan = [{"at": at * f} for f in AT_FACTORS[:attempts]]
        if stopped:
            d, tries, chosen, cancelled = run(plan[0]), [], None, True
        else:
            d, tries, chosen, cancelled = _retry(run, check, plan, cancel)
    out = ShapedDirection(obj.direction(d))
    out._set_outcome("v-side", tries, chosen, cancelled=cancelled)
    if warn and out.success is False:
        warn_shortfall(out, "side_direction", "The model may sit at a minimum along its "
                       "gradient (converged): no downhill side stands out in this window.")
    return out


def _line_search(f: Callable[[float], float], size: float) -> float:
    """The first local minimum of ``f`` on ``t > 0`` (``f`` decreasing at 0), up to ``size``."""
    f0 = f(0.0)
    lo, t, ft = 0.0, 1e-4 * size, f(1e-4 * size)
    # Near convergence even the first step can overshoot the minimum: shrink it until the
    # loss drops (the gradient says it must, for a small enough step), then bracket.
    for _ in range(40):
        if ft < f0:
            break
        t /= 4
        ft = f(t)
    else:
        # Fake quantisation (QAT) rounds the weights: its loss is piecewise constant, the
        # gradient (straight-through) says nothing of small steps, and this was reported
        # as a minimum alone.
        raise ValueError("no step along -grad L lowers the loss (down to 1e-28 of ||theta||): "
                         "theta is numerically a minimum along the gradient, or the loss is "
                         "piecewise constant in the weights (fake quantisation rounds them, "
                         "so small steps change nothing); either way there is no downhill "
                         "side to put it on.")
    prev = lo
    while True:
        nxt = min(2 * t, size)
        fn = f(nxt)
        if not fn < ft or nxt >= size:
            if fn < ft:
                return nxt  # still descending at the cap: the minimum lies beyond it
            lo, hi = prev, nxt
            break
        prev, t, ft = t, nxt, fn
    ratio = (math.sqrt(5) - 1) / 2
    a, b = lo + (1 - ratio) * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = f(a), f(b)
    while hi - lo > 1e-3 * hi:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - ratio) * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = f(b)
    return (lo + hi) / 2
