"""Directions for the curve shapes random directions never show (Li, Li & Zhan 2024).

PAPERS.md (d) steps 2, 3, 4, 5 and 6 (every recipe is a PROPOSAL: the paper's text was not
available). All losses are ``L(theta + shift)`` evaluated with
``torch.func.functional_call`` on a structural copy of the model that shares its tensors:
the model's parameters, buffers and flags are never written. Dropout is off (eval mode);
BatchNorm uses the running statistics of ``theta`` (``bn="eval"``, the engine's default, so
a mined curve looks the same in :func:`~landscape_widget.compute_curve`) or the batch's
statistics (``bn="batch"``); running statistics are never updated.

Mining is Adam on the direction only (``theta`` fixed), on minibatches drawn from a private
generator, with the direction projected back to its norm ``R`` after each step. ``R`` is
``scale`` times the norm of a filter-normalised Gaussian direction (biases and BatchNorm
entries zero with ``ignore="biasbn"``), so ``alpha = 1`` is as far from ``theta`` as a
random direction at ``alpha = scale``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..core.hessian import HessianOperator
from ..core.params import Params, check_direction, check_module
from ._objective import Callback, _adam, _check_common, _dot, _norm, _Objective

MINED_SHAPES = ("w-peak", "vvv-basin")
PLANE_SHAPES = ("saddle", "wine-bottle")
DEFAULT_STEPS = {"w-peak": 500, "vvv-basin": 800, "saddle": 500, "wine-bottle": 800}
DEFAULT_SCALE = {"w-peak": 0.5, "vvv-basin": 1.0, "saddle": 0.5, "wine-bottle": 0.5}
_BUILT = {"v-basin": "lw.random_direction(model)", "v-side": "lw.side_direction(model, data)",
          "w-basin": "lw.permutation_direction(model)"}


def mine_direction(model: nn.Module, data, shape: str = "w-peak", *, steps: int | None = None,
                   seed: int = 0, scale: float | None = None, lr: float = 1e-2,
                   batch_size: int = 256, loss_fn: Callable | None = None, bn: str = "eval",
                   ignore: str | None = "biasbn", device=None, progress: bool = True,
                   cancel: threading.Event | None = None,
                   callback: Callback | None = None) -> Params:
    """Mine a direction whose loss curve has the shape ``"w-peak"`` or ``"vvv-basin"``.

    Start: ``d0 = scale * lw.random_direction(model, seed=seed, ignore=ignore)``, and
    ``R = ||d0||``. Adam (``lr``) then minimises, on minibatches of ``batch_size``:

    - ``"w-peak"`` (PAPERS.md (d) step 3): ``(L(theta + d) + L(theta - d)) / 2``: both ends
      lower than ``theta``, which ends up on a ridge: ``theta`` at a peak between two minima
      at ``alpha = -1`` and ``+1``. Default 500 steps.
    - ``"vvv-basin"`` (step 4): the same minus
      ``(min(L(theta + d/2), c) + min(L(theta - d/2), c)) / 2`` with ``c = 2 L(theta) + 1``:
      also *raise* the loss half-way, into two peaks at ``alpha = +-0.5`` (capped, as in
      MPO), leaving minima at -1, 0 and 1. Default 800 steps.

    After each step ``d`` is rescaled to norm ``R`` (otherwise it would shrink back to
    ``theta`` or run off to where everything is flat). Default ``scale``: 0.5 for w-peak
    (PAPERS: at 1.0 the maximum drifted to ``alpha = 0.25``) and 1.0 for vvv-basin. PAPERS
    says "same settings" for vvv-basin, but its measured curve (0.021, 1.29, 0.028, 1.43,
    0.033) is what ``scale=1.0`` reproduces on its MLP (0.021, 1.54, 0.028, 1.44, 0.023),
    while at 0.5 two of three seeds collapse to a w-peak-like valley with no barriers
    (``L(+-0.5)`` below ``L(theta)``). ``lr`` is absolute (Adam's step per entry),
    calibrated on the digits MLP; scale it with the size of your weights.

    Args:
        model: The model (never modified: parameters, buffers and flags stay bit-identical).
        data: Training ``(inputs, targets)``, a ``Dataset`` or a ``DataLoader``.
        shape: ``"w-peak"`` or ``"vvv-basin"``. (v-basin, v-side and w-basin directions are
            built, not mined: see :func:`~landscape_widget.random_direction`,
            :func:`side_direction`, :func:`~landscape_widget.permutation_direction`.)
        steps: Adam steps (default 500 for w-peak, 800 for vvv-basin).
        seed: Seeds the start direction and the minibatch order (deterministic).
        scale: ``R`` as a multiple of a filter-normalised direction's norm (default: 0.5
            for w-peak, 1.0 for vvv-basin).
        lr: Adam learning rate.
        batch_size: Samples per step (all data if fewer).
        loss_fn: Mean loss of a batch, ``loss_fn(outputs, targets)``; cross-entropy default.
        bn: ``"eval"`` (running statistics of ``theta``) or ``"batch"``.
        ignore: ``"biasbn"``: mine only tensors of dim > 1 (biases and BatchNorm entries of
            ``d`` stay zero, as in random directions); ``None``: all parameters.
        device: Where to compute (default: the model's device).
        progress: Show a tqdm bar.
        cancel: A ``threading.Event``; once set, mining stops before the next step and the
            direction reached so far (after the last completed step, norm ``R``) is
            returned. No exception: the caller knows it cancelled.
        callback: Called as ``callback(step, total, objective)`` after every step.

    Returns:
        ``dict[str, Tensor]`` keyed like ``model.named_parameters()`` with ``||d|| = R``,
        for ``lw.compute_curve(model, data, direction=d)``.

    Raises:
        ValueError: On an unknown shape, missing data or bad settings.
    """
    if shape in _BUILT:
        raise ValueError(f"shape={shape!r} is built, not mined: use {_BUILT[shape]}.")
    if shape not in MINED_SHAPES:
        raise ValueError(f"shape={shape!r} is not a mined curve shape; choose one of "
                         f"{list(MINED_SHAPES)} (or 'saddle'/'wine-bottle' with lw.mine_plane).")
    steps = DEFAULT_STEPS[shape] if steps is None else steps
    scale = DEFAULT_SCALE[shape] if scale is None else scale
    _check_common(steps, scale, lr, seed)
    obj = _Objective(model, data, loss_fn=loss_fn, bn=bn, ignore=ignore, device=device)
    (d,) = obj.start(1, seed, scale)
    _mine_1d(obj, d, shape, steps=steps, seed=seed, lr=lr, batch_size=batch_size,
             progress=progress, cancel=cancel, callback=callback)
    return obj.direction(d)


def _mine_1d(obj: _Objective, d: Params, shape: str, *, steps: int, seed: int, lr: float,
             batch_size: int, progress: bool, cancel, callback) -> None:
    """Mine ``d`` in place (its norm is kept)."""
    radius = _norm(d)
    if not radius > 0:
        raise ValueError("the start direction is zero; the model's weights are all zero?")
    batches = obj.batches(batch_size, seed)
    with obj.session():
        cap = None
        if shape == "vvv-basin":
            with torch.no_grad():
                cap = 2 * float(obj.full_loss({})) + 1  # PAPERS' c = 2 L(theta) + 1

        def objective(_step: int) -> Tensor:
            x, y = next(batches)
            minus = {k: -v for k, v in d.items()}
            value = 0.5 * (obj.loss(d, x, y) + obj.loss(minus, x, y))
            if cap is not None:
                half = {k: 0.5 * v for k, v in d.items()}
                neg_half = {k: -0.5 * v for k, v in d.items()}
                value = value - 0.5 * (obj.loss(half, x, y).clamp(0, cap)
                                       + obj.loss(neg_half, x, y).clamp(0, cap))
            return value

        def project() -> None:
            factor = (radius / _norm(d)).item()
            for v in d.values():
                v.mul_(factor)

        _adam([d], objective, project, steps=steps, lr=lr, desc=f"mining {shape}",
              progress=progress, cancel=cancel, callback=callback)


def mine_plane(model: nn.Module, data, shape: str = "saddle", *, steps: int | None = None,
               seed: int = 0, scale: float | None = None, lr: float = 1e-2,
               batch_size: int = 256, angles: int = 4, loss_fn: Callable | None = None,
               bn: str = "eval", ignore: str | None = "biasbn", device=None,
               progress: bool = True, cancel: threading.Event | None = None,
               callback: Callback | None = None) -> tuple[Params, Params]:
    """Two orthogonal directions ``(u, v)`` of norm ``R`` spanning a saddle or a wine bottle.

    Both start from ``scale`` times two filter-normalised Gaussian directions drawn from
    ``seed`` (``lw.random_directions(model, 2, seed=seed)``); ``R`` is the first one's norm.

    - ``"saddle"`` (PAPERS.md (d) step 5): ``u`` is the first (random: a v-basin, the
      loss rises along it), ``v`` is mined from the second as a w-peak direction
      (:func:`mine_direction`, default 500 steps), then made orthogonal to ``u``
      (Gram-Schmidt) and rescaled to ``R``: the loss falls along ``v``.
    - ``"wine-bottle"``: ``u`` and ``v`` are mined jointly to minimise the mean of
      ``L(theta + cos(phi) u + sin(phi) v)`` over ``angles`` angles per step,
      re-orthonormalised (Gram-Schmidt, then both rescaled to ``R``) after each step
      (default 800 steps): a ring of low loss around ``theta``, the punt at the bottom of
      a wine bottle. The angles are equally spaced with a random offset (PAPERS draws 4
      independent ones): on the digits MLP, 5 seeds x 2 trainings, the highest loss on
      the ``r = 0.5`` ring fell from 0.93-1.00 to 0.85-0.93 times ``L(theta)`` (and on the
      ``r = 1`` ring from 0.70-0.90 to 0.57-0.67), so every ring point stays below
      ``L(theta)`` for every seed tried.

    Args:
        model: The model (never modified).
        data: Training ``(inputs, targets)``, a ``Dataset`` or a ``DataLoader``.
        shape: ``"saddle"`` or ``"wine-bottle"``.
        steps: Adam steps (defaults above).
        seed: Seeds the start directions, minibatches and angles (deterministic).
        scale: ``R`` as a multiple of a filter-normalised direction's norm (default 0.5).
        lr: Adam learning rate (absolute; see :func:`mine_direction`).
        batch_size: Samples per step.
        angles: Angles per step (wine bottle), equally spaced with a random offset.
        loss_fn: Mean loss of a batch; cross-entropy by default.
        bn: ``"eval"`` or ``"batch"``.
        ignore: ``"biasbn"`` (weights of dim > 1 only) or ``None``.
        device: Where to compute.
        progress: Show a tqdm bar.
        cancel: A ``threading.Event``; once set, mining stops and the directions reached so
            far (orthogonal, norm ``R``) are returned.
        callback: Called as ``callback(step, total, objective)`` after every step.

    Returns:
        ``(u, v)``, direction dicts for ``lw.compute_surface(model, data, directions=(u, v))``.

    Raises:
        ValueError: On an unknown shape, missing data or bad settings.
    """
    if shape not in PLANE_SHAPES:
        raise ValueError(f"shape={shape!r} is not a mined surface; choose one of "
                         f"{list(PLANE_SHAPES)}.")
    steps = DEFAULT_STEPS[shape] if steps is None else steps
    scale = DEFAULT_SCALE[shape] if scale is None else scale
    _check_common(steps, scale, lr, seed)
    if isinstance(angles, bool) or not isinstance(angles, int) or angles < 1:
        raise ValueError(f"angles must be an int >= 1, got {angles!r}.")
    obj = _Objective(model, data, loss_fn=loss_fn, bn=bn, ignore=ignore, device=device)
    u, v = obj.start(2, seed, scale)
    radius = _norm(u)

    def orthonormalise() -> None:
        c = (_dot(v, u) / _dot(u, u)).item()
        for k in v:
            v[k].sub_(c * u[k])
        for d in (u, v):
            factor = (radius / _norm(d)).item()
            for t in d.values():
                t.mul_(factor)

    if shape == "saddle":
        _mine_1d(obj, v, "w-peak", steps=steps, seed=seed, lr=lr, batch_size=batch_size,
                 progress=progress, cancel=cancel, callback=callback)
        with torch.no_grad():
            orthonormalise()
        return obj.direction(u), obj.direction(v)

    with torch.no_grad():
        orthonormalise()
    batches = obj.batches(batch_size, seed)
    gen = torch.Generator().manual_seed(seed)

    def objective(_step: int) -> Tensor:
        x, y = next(batches)
        # Stratified: equally spaced angles with a random offset. PAPERS draws them
        # independently; stratified ones sample the whole ring every step (lower variance).
        offset = float(torch.rand((), generator=gen, dtype=torch.float64)) * 2 * math.pi
        phis = [offset + 2 * math.pi * i / angles for i in range(angles)]
        total = 0.0
        for phi in phis:
            shift = {k: math.cos(phi) * u[k] + math.sin(phi) * v[k] for k in u}
            total = total + obj.loss(shift, x, y)
        return total / angles

    with obj.session():
        _adam([u, v], objective, orthonormalise, steps=steps, lr=lr, desc=f"mining {shape}",
              progress=progress, cancel=cancel, callback=callback)
    return obj.direction(u), obj.direction(v)


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
