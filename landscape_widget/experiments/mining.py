"""Directions for the curve shapes random directions never show (Li, Li & Zhan 2024).

PAPERS.md (d) steps 2, 3, 4, 5 and 6 (every recipe is a PROPOSAL: the paper's text was not
available). All losses are ``L(theta + shift)`` evaluated with
``torch.func.functional_call`` on a structural copy of the model that shares its tensors:
the model's parameters, buffers and flags are never written. Dropout is off (eval mode);
BatchNorm uses the running statistics of ``theta`` (``bn="eval"``, the engine's default, so
a mined curve looks the same in :func:`~landscape_widget.compute_curve`) or the batch's
statistics (``bn="batch"``); running statistics are never updated.

Mining is Adam on the direction only (``theta`` fixed), on minibatches drawn from a private
generator, with the direction projected back to its size ``R`` after each step. ``R`` is
that of ``scale`` times a filter-normalised Gaussian direction (biases and BatchNorm
entries zero with ``ignore="biasbn"``), so ``alpha = 1`` is as far from ``theta`` as a
random direction at ``alpha = scale``. Sizes and steps are in units of the weights (each
tensor's RMS), so mining is scale-free. Every method checks the shape it reached on the
loss over all data, retries within a budget and reports what it achieved
(:class:`~landscape_widget.experiments.curves.ShapeOutcome`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..core.heap import holding_heap
from ..core.hessian import HessianOperator
from ..core.params import Params, check_direction, check_module, outside_inference_mode
from ._objective import (
    Callback,
    _adam,
    _check_attempts,
    _check_common,
    _norm,
    _Objective,
    _retry,
)
from .curves import SHAPE_X, ShapedDirection, classify_curve, warn_shortfall

MINED_SHAPES = ("w-peak", "vvv-basin")
PLANE_SHAPES = ("saddle", "wine-bottle")
DEFAULT_STEPS = {"w-peak": 500, "vvv-basin": 800, "saddle": 500, "wine-bottle": 800}
DEFAULT_SCALE = {"w-peak": 0.5, "vvv-basin": 1.0, "saddle": 0.5, "wine-bottle": 0.5}
DEFAULT_LR = 0.025
"""Adam's learning rate relative to each tensor's RMS weight: on PAPERS' digits MLP (RMS
0.36 and 0.44) it is the absolute 1e-2 the recipes were calibrated with."""
DEFAULT_ATTEMPTS = 3
"""Tries before a method gives up: try ``i`` uses seed ``seed + i``, and ``scale`` and
``lr`` divided by ``2**i`` (near convergence a w-peak is often found only closer to
theta: on an MNIST-1D MLP at 0.125 but at neither 0.5 nor 0.25). vvv-basin retries keep
``scale`` and floor the ends' loss at ``L(theta)`` instead (see :func:`_mine_1d`)."""
_BUILT = {"v-basin": "lw.random_direction(model)", "v-side": "lw.side_direction(model, data)",
          "w-basin": "lw.permutation_direction(model)"}
_ALPHAS = np.linspace(*SHAPE_X)
_HINT = ("More steps=, other seeds or a smaller scale= may reach it; a model at a sharp, "
         "isolated minimum may have no such direction nearby.")


def _settings(shape: str, steps, scale, lr, seed, attempts) -> tuple[int, float]:
    """``steps`` and ``scale`` (the shape's defaults where ``None``), every setting checked.

    Returns:
        ``(steps, scale)`` with the shape's defaults filled in.

    Raises:
        TypeError: If ``seed`` is not an int.
        ValueError: If a setting is out of range.
    """
    steps = DEFAULT_STEPS[shape] if steps is None else steps
    scale = DEFAULT_SCALE[shape] if scale is None else scale
    _check_common(steps, scale, lr, seed)
    _check_attempts(attempts)
    return steps, scale


def _plan(seed: int, scale: float, lr: float, attempts: int, shape: str = "") -> list[dict]:
    if shape == "vvv-basin":
        # Its failure is a cap, not a too-large radius (an early-stopped MLP: L(theta) 1.28,
        # ends 0.52, no barriers): retries keep the radius and floor the ends at L(theta).
        return [{"seed": (seed + i) % 2**63, "scale": scale, "lr": lr / 2**i,
                 "floor": i > 0} for i in range(attempts)]
    return [{"seed": (seed + i) % 2**63, "scale": scale / 2**i, "lr": lr / 2**i}
            for i in range(attempts)]


@outside_inference_mode
@holding_heap
def mine_direction(model: nn.Module, data, shape: str = "w-peak", *, steps: int | None = None,
                   seed: int = 0, scale: float | None = None, lr: float = DEFAULT_LR,
                   batch_size: int = 256, attempts: int = DEFAULT_ATTEMPTS,
                   loss_fn: Callable | None = None, bn: str = "eval",
                   ignore: str | None = "biasbn", device=None, progress: bool = True,
                   cancel: threading.Event | None = None, callback: Callback | None = None,
                   warn: bool = True) -> ShapedDirection:
    """Mine a direction whose loss curve has the shape ``"w-peak"`` or ``"vvv-basin"``.

    Start: ``d0 = scale * lw.random_direction(model, seed=seed, ignore=ignore)``. Adam then
    minimises, on minibatches of ``batch_size``:

    - ``"w-peak"`` (PAPERS.md (d) step 3): ``(L(theta + d) + L(theta - d)) / 2``: both ends
      lower than ``theta``, which ends up on a ridge: ``theta`` at a peak between two minima
      at ``alpha = -1`` and ``+1``. Default 500 steps.
    - ``"vvv-basin"`` (step 4): the same minus
      ``(min(L(theta + d/2), c) + min(L(theta - d/2), c)) / 2`` with ``c = 2 L(theta) + 1``:
      also *raise* the loss half-way, into two peaks at ``alpha = +-0.5`` (capped, as in
      MPO), leaving minima at -1, 0 and 1. Default 800 steps.

    Scale-free: sizes are measured in units of the weights. Each tensor ``k`` steps with
    learning rate ``lr * rms(theta_k)``, and after each step ``d`` is rescaled to keep
    ``sqrt(sum_k ||d_k||^2 / rms(theta_k)^2)`` at its start value (otherwise it would
    shrink back to ``theta`` or run off to where everything is flat). Rescaling a layer
    (``W1 * c``, ``W2 / c`` in a ReLU net, the same function) rescales the mined direction
    with it, and the defaults need no retuning for the size of the weights. Default
    ``scale``: 0.5 for w-peak (PAPERS: at 1.0 the maximum drifted to ``alpha = 0.25``) and
    1.0 for vvv-basin (PAPERS' measured curve; at 0.5 two of three seeds collapsed to a
    valley without barriers).

    Checked: the loss over all data along the result on the taxonomy window
    :data:`~landscape_widget.SHAPE_X` is labelled by :func:`classify_curve`. If it is not
    the requested shape, mining starts again (up to ``attempts`` tries: seed ``seed + i``,
    ``lr`` divided by ``2**i``, and ``scale`` too for w-peak; for vvv-basin the ends then
    earn nothing below ``L(theta)``, so that far from convergence the barriers are raised
    instead of theta being left on a cap). If no try succeeds the best one (lowest
    objective over all data) is returned with ``success=False`` and a :class:`ShapeWarning`.

    Args:
        model: The model (never modified: parameters, buffers and flags stay bit-identical).
        data: Training ``(inputs, targets)``, a ``Dataset`` or a ``DataLoader``.
        shape: ``"w-peak"`` or ``"vvv-basin"``. (v-basin, v-side and w-basin directions are
            built, not mined: see :func:`~landscape_widget.random_direction`,
            :func:`side_direction`, :func:`~landscape_widget.permutation_direction`.)
        steps: Adam steps per try (default 500 for w-peak, 800 for vvv-basin).
        seed: Seeds the start direction and the minibatch order of the first try.
        scale: The radius as a multiple of a filter-normalised direction's (default: 0.5
            for w-peak, 1.0 for vvv-basin).
        lr: Adam's learning rate relative to each tensor's RMS weight (default
            :data:`DEFAULT_LR`).
        batch_size: Samples per step (all data if fewer).
        attempts: Tries before giving up (default 3; 1 for no retry).
        loss_fn: Mean loss of a batch, ``loss_fn(outputs, targets)``; cross-entropy default.
        bn: ``"eval"`` (running statistics of ``theta``) or ``"batch"``.
        ignore: ``"biasbn"``: mine only tensors of dim > 1 (biases and BatchNorm entries of
            ``d`` stay zero, as in random directions); ``None``: all parameters.
        device: Where to compute (default: the model's device).
        progress: Show a tqdm bar.
        cancel: A ``threading.Event``; once set, mining stops before the next step and the
            direction reached so far (after the last completed step, on the constraint) is
            returned unchecked (``cancelled=True``, ``success=None``). No exception: the
            caller knows it cancelled.
        callback: Called as ``callback(step, total, objective)`` after every step of every
            try (``step`` restarts at 1 on a retry).
        warn: Issue the :class:`ShapeWarning` on failure (the widget reports it instead).

    Returns:
        A :class:`~landscape_widget.experiments.curves.ShapedDirection`: a ``dict[str,
        Tensor]`` keyed like ``model.named_parameters()``, for
        ``lw.compute_curve(model, data, direction=d)``, carrying ``requested``,
        ``achieved``, ``success``, ``reason``, ``curve`` (the :class:`CurveShape`) and
        ``attempts``.

    Raises:
        ValueError: On an unknown shape, missing data or bad settings.
    """
    if shape in _BUILT:
        raise ValueError(f"shape={shape!r} is built, not mined: use {_BUILT[shape]}.")
    if shape not in MINED_SHAPES:
        raise ValueError(f"shape={shape!r} is not a mined curve shape; choose one of "
                         f"{list(MINED_SHAPES)} (or 'saddle'/'wine-bottle' with lw.mine_plane).")
    steps, scale = _settings(shape, steps, scale, lr, seed, attempts)
    obj = _Objective(model, data, loss_fn=loss_fn, bn=bn, ignore=ignore, device=device)
    scales = obj.scales()

    def run(settings: dict) -> Params:
        (d,) = obj.start(1, settings["seed"], settings["scale"])
        _mine_1d(obj, d, shape, scales, steps=steps, seed=settings["seed"],
                 lr=settings["lr"], batch_size=batch_size, progress=progress, cancel=cancel,
                 callback=callback, floor=settings.get("floor", False))
        return d

    def check(d: Params) -> dict:
        with obj.session():
            f = obj.curve(d, _ALPHAS)
        return _curve_check(f, shape)

    d, tries, chosen, cancelled = _retry(run, check, _plan(seed, scale, lr, attempts, shape),
                                         cancel)
    out = ShapedDirection(obj.direction(d))
    out._set_outcome(shape, tries, chosen, cancelled=cancelled)
    if warn and out.success is False:
        warn_shortfall(out, "mine_direction", _HINT)
    return out


def _curve_check(f: np.ndarray, shape: str) -> dict:
    """The label of ``f`` on ``_ALPHAS`` and the mining objective read off it (the score)."""
    found = classify_curve(_ALPHAS, f)
    at = {a: float(np.interp(a, _ALPHAS, f)) for a in (-1.0, -0.5, 0.0, 0.5, 1.0)}
    score = (at[-1.0] + at[1.0]) / 2
    if shape == "vvv-basin":
        cap = 2 * at[0.0] + 1
        score -= (min(max(at[-0.5], 0), cap) + min(max(at[0.5], 0), cap)) / 2
    return {"achieved": found.shape, "reason": found.reason, "curve": found,
            "ok": found.shape == shape, "score": score if math.isfinite(score) else math.inf}


def _mine_1d(obj: _Objective, d: Params, shape: str, scales: dict[str, float], *, steps: int,
             seed: int, lr: float, batch_size: int, progress: bool, cancel,
             callback, floor: bool = False) -> None:
    """Mine ``d`` in place (its scaled norm is kept).

    ``floor`` (vvv-basin retries): the ends earn nothing below ``L(theta)``. Far from
    convergence the ends can fall far below ``L(theta)`` and that gain outweighs the capped
    barriers, leaving theta on a cap (a w-peak); with the floor the barriers take over.

    Raises:
        ValueError: If the start direction ``d`` has zero norm (a model whose moved weights are all
            zero).
    """
    radius = _norm(d, scales)
    if not radius > 0:
        raise ValueError("the start direction is zero; the model's weights are all zero?")
    batches = obj.batches(batch_size, seed)
    with obj.session():
        cap, low = None, None
        if shape == "vvv-basin":
            with torch.no_grad():
                l0 = float(obj.full_loss({}))
            cap = 2 * l0 + 1  # PAPERS' c = 2 L(theta) + 1
            low = l0 if floor else None

        def objective(_step: int) -> Tensor:
            x, y = next(batches)
            minus = {k: -v for k, v in d.items()}
            ends = [obj.loss(d, x, y), obj.loss(minus, x, y)]
            if low is not None:
                ends = [e.clamp(min=low) for e in ends]
            value = 0.5 * (ends[0] + ends[1])
            if cap is not None:
                half = {k: 0.5 * v for k, v in d.items()}
                neg_half = {k: -0.5 * v for k, v in d.items()}
                value = value - 0.5 * (obj.loss(half, x, y).clamp(0, cap)
                                       + obj.loss(neg_half, x, y).clamp(0, cap))
            return value

        def project() -> None:
            factor = (radius / _norm(d, scales)).item()
            for v in d.values():
                v.mul_(factor)

        _adam([d], objective, project, steps=steps, lr=lr, desc=f"mining {shape}",
              progress=progress, cancel=cancel, callback=callback, scales=scales)


@outside_inference_mode
def rayleigh_quotient(model: nn.Module, data, direction: Params, *,
                      loss_fn: Callable | None = None, bn: str = "eval",
                      batch_size: int | None = None, device=None) -> float:
    """The curvature ``d^T H d / ||d||^2`` of the loss along ``d`` at ``theta``.

    ``f''(0) = d^T H d`` for ``f(alpha) = L(theta + alpha d)``, so the sign says whether the
    curve bends up (a v-basin) or down (the peak of a w-peak) at the model. One exact
    Hessian-vector product (:class:`~landscape_widget.core.hessian.HessianOperator`, over
    *all* parameters) on the mean loss over all data, in float64 accumulation.

    Entries of ``d`` for buffers (BatchNorm running statistics, as in permutation
    directions) are ignored: the Hessian is taken over parameters only.

    Args:
        model: The model (never modified).
        data: ``(inputs, targets)``, a ``Dataset`` or a ``DataLoader``.
        direction: A direction dict keyed like ``model.named_parameters()``.
        loss_fn: Mean loss of a batch; cross-entropy by default.
        bn: ``"eval"`` or ``"batch"``.
        batch_size: Samples per pass (default: all, at most 2048).
        device: Where to compute.

    Returns:
        The Rayleigh quotient as a float.

    Raises:
        ValueError: If ``direction`` does not fit the model or is zero on every parameter.

    Example:
        Least squares ``mean((X w)^2)`` has ``H = (2/N) X^T X = diag(1, 4)`` here:

        >>> net = nn.Linear(2, 1, bias=False)
        >>> data = (torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 1))
        >>> d = {"weight": torch.tensor([[0.0, 3.0]])}
        >>> round(rayleigh_quotient(net, data, d, loss_fn=nn.functional.mse_loss), 6)
        4.0
    """
    check_module(model)
    if data is None:
        raise ValueError("no data: pass data=(inputs, targets); the Hessian is that of the "
                         "loss over these samples.")
    check_direction(model, direction)
    op = HessianOperator(model, data, loss_fn=loss_fn, ignore=None, bn=bn,
                         batch_size=batch_size, device=device)
    v = op.flatten(direction).double()
    nn2 = float(v @ v)
    if nn2 == 0:
        raise ValueError("the direction is zero on every parameter; its curvature is undefined.")
    return float(v @ op.matvec(v).double()) / nn2
