"""Planes of the surface shapes random planes never show: saddles and wine bottles.

Li, Li & Zhan 2024, PAPERS.md (d) steps 5 and 6 (a PROPOSAL, as every mining recipe): the
plane counterpart of :func:`~landscape_widget.experiments.mining.mine_direction`, with the
same objective, sizes, retries and report (see the module docstring of
:mod:`~landscape_widget.experiments.mining`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..core.heap import holding_heap
from ..core.params import Params, outside_inference_mode
from ._objective import (
    Callback,
    _adam,
    _dot,
    _norm,
    _Objective,
    _retry,
)
from .curves import ShapedPlane, classify_curve, warn_shortfall
from .mining import (
    _ALPHAS,
    _HINT,
    DEFAULT_ATTEMPTS,
    DEFAULT_LR,
    PLANE_SHAPES,
    _curve_check,
    _mine_1d,
    _plan,
    _settings,
)


@outside_inference_mode
@holding_heap
def mine_plane(model: nn.Module, data, shape: str = "saddle", *, steps: int | None = None,
               seed: int = 0, scale: float | None = None, lr: float = DEFAULT_LR,
               batch_size: int = 256, angles: int = 4, attempts: int = DEFAULT_ATTEMPTS,
               loss_fn: Callable | None = None, bn: str = "eval",
               ignore: str | None = "biasbn", device=None, progress: bool = True,
               cancel: threading.Event | None = None, callback: Callback | None = None,
               warn: bool = True) -> ShapedPlane:
    """Two orthogonal directions ``(u, v)`` of equal size spanning a saddle or a wine bottle.

    Both start from ``scale`` times two filter-normalised Gaussian directions drawn from
    ``seed`` (``lw.random_directions(model, 2, seed=seed)``). Sizes, angles and steps are
    measured in units of the weights, as in :func:`mine_direction` (scale-free): norms
    and inner products weight tensor ``k`` by ``1 / rms(theta_k)**2``.

    - ``"saddle"`` (PAPERS.md (d) step 5): ``u`` is the first (random: a v-basin, the
      loss rises along it), ``v`` is mined from the second as a w-peak direction
      (:func:`mine_direction`, default 500 steps), then made orthogonal to ``u``
      (Gram-Schmidt) and rescaled to ``u``'s size: the loss falls along ``v``. Checked:
      the curve along ``u`` is a v-basin and the one along ``v`` a w-peak
      (:func:`classify_curve` on :data:`~landscape_widget.SHAPE_X`).
    - ``"wine-bottle"``: ``u`` and ``v`` are mined jointly to minimise the mean of
      ``L(theta + cos(phi) u + sin(phi) v)`` over ``angles`` angles per step,
      re-orthonormalised after each step (default 800 steps): a ring of low loss around
      ``theta``, the punt at the bottom of a wine bottle. The angles are equally spaced
      with a random offset (PAPERS draws 4 independent ones; stratified ones sample the
      whole ring every step). Checked (PAPERS (d7)): all 12 equally spaced points on the
      rings ``r = 0.5`` and ``r = 1`` lie below ``L(theta)``.

    A plane that fails its check is mined again (``attempts`` tries: seed ``seed + i``,
    ``scale`` and ``lr`` divided by ``2**i``); if none passes, the best is returned with
    ``success=False`` and a :class:`ShapeWarning`.

    Args:
        model: The model (never modified).
        data: Training ``(inputs, targets)``, a ``Dataset`` or a ``DataLoader``.
        shape: ``"saddle"`` or ``"wine-bottle"``.
        steps: Adam steps per try (defaults above).
        seed: Seeds the start directions, minibatches and angles of the first try.
        scale: Size as a multiple of a filter-normalised direction's (default 0.5).
        lr: Adam learning rate relative to each tensor's RMS weight.
        batch_size: Samples per step.
        angles: Angles per step (wine bottle), equally spaced with a random offset.
        attempts: Tries before giving up (default 3).
        loss_fn: Mean loss of a batch; cross-entropy by default.
        bn: ``"eval"`` or ``"batch"``.
        ignore: ``"biasbn"`` (weights of dim > 1 only) or ``None``.
        device: Where to compute.
        progress: Show a tqdm bar.
        cancel: A ``threading.Event``; once set, mining stops and the directions reached so
            far (orthogonal, equal size) are returned unchecked (``cancelled=True``).
        callback: Called as ``callback(step, total, objective)`` after every step.
        warn: Issue the :class:`ShapeWarning` on failure.

    Returns:
        A :class:`~landscape_widget.experiments.curves.ShapedPlane` ``(u, v)`` of direction
        dicts for ``lw.compute_surface(model, data, directions=(u, v))``, carrying
        ``requested``, ``achieved``, ``success``, ``reason`` and ``attempts`` (and ``ring``,
        the highest ring loss and ``L(theta)``, for the wine bottle).

    Raises:
        ValueError: On an unknown shape, missing data or bad settings.
    """
    if shape not in PLANE_SHAPES:
        raise ValueError(f"shape={shape!r} is not a mined surface; choose one of "
                         f"{list(PLANE_SHAPES)}.")
    steps, scale = _settings(shape, steps, scale, lr, seed, attempts)
    if isinstance(angles, bool) or not isinstance(angles, int) or angles < 1:
        raise ValueError(f"angles must be an int >= 1, got {angles!r}.")
    obj = _Objective(model, data, loss_fn=loss_fn, bn=bn, ignore=ignore, device=device)
    scales = obj.scales()
    mine = dict(steps=steps, batch_size=batch_size, angles=angles, progress=progress,
                cancel=cancel, callback=callback)

    def run(settings: dict) -> tuple[Params, Params]:
        return _mine_plane_once(obj, shape, scales, scale=settings["scale"],
                                seed=settings["seed"], lr=settings["lr"], **mine)

    def check(plane: tuple[Params, Params]) -> dict:
        with obj.session():
            return _plane_check(obj, shape, *plane)

    (u, v), tries, chosen, cancelled = _retry(run, check, _plan(seed, scale, lr, attempts), cancel)
    out = ShapedPlane((obj.direction(u), obj.direction(v)))
    out._set_outcome(shape, tries, chosen, cancelled=cancelled)
    if chosen is not None:
        out.ring = chosen.get("ring")
    if warn and out.success is False:
        warn_shortfall(out, "mine_plane", _HINT)
    return out


def _plane_check(obj: _Objective, shape: str, u: Params, v: Params) -> dict:
    if shape == "saddle":
        fu, fv = obj.curve(u, _ALPHAS), obj.curve(v, _ALPHAS)
        su, sv = classify_curve(_ALPHAS, fu), classify_curve(_ALPHAS, fv)
        ok = su.shape == "v-basin" and sv.shape == "w-peak"
        score = float(_curve_check(fv, "w-peak")["score"]) - float(fu[0] + fu[-1]) / 2
        return {"achieved": "saddle" if ok else f"u {su.shape} / v {sv.shape}",
                "reason": f"along u: {su.shape} ({su.reason}); along v: {sv.shape} "
                          f"({sv.reason}); a saddle needs a v-basin along u, a w-peak along v",
                "curve": sv, "ok": ok, "score": score if math.isfinite(score) else math.inf}
    with torch.no_grad():
        l0 = float(obj.full_loss({}))
        ring = [float(obj.full_loss({k: r * (math.cos(p) * u[k] + math.sin(p) * v[k])
                                     for k in u}))
                for r in (0.5, 1.0) for p in np.arange(12) * math.pi / 6]
    top = max(ring)
    ok = top < l0
    return {"achieved": "wine-bottle" if ok else "other", "ok": ok,
            "reason": f"highest loss on the rings r=0.5 and r=1 (12 angles each) {top:.4g} "
                      f"{'<' if ok else '>='} L(theta) {l0:.4g}",
            "ring": (top, l0), "score": top - l0 if math.isfinite(top) else math.inf}


def _mine_plane_once(obj: _Objective, shape: str, scales: dict[str, float], *, scale: float,
                     seed: int, lr: float, steps: int, batch_size: int, angles: int,
                     progress: bool, cancel, callback) -> tuple[Params, Params]:
    u, v = obj.start(2, seed, scale)
    radius = _norm(u, scales)

    def orthonormalise() -> None:
        c = (_dot(v, u, scales) / _dot(u, u, scales)).item()
        for k in v:
            v[k].sub_(c * u[k])
        for d in (u, v):
            factor = (radius / _norm(d, scales)).item()
            for t in d.values():
                t.mul_(factor)

    if shape == "saddle":
        _mine_1d(obj, v, "w-peak", scales, steps=steps, seed=seed, lr=lr,
                 batch_size=batch_size, progress=progress, cancel=cancel, callback=callback)
        with torch.no_grad():
            orthonormalise()
        return u, v

    with torch.no_grad():
        orthonormalise()
    batches = obj.batches(batch_size, seed)
    gen = torch.Generator().manual_seed(seed)

    def objective(_step: int) -> Tensor:
        x, y = next(batches)
        offset = float(torch.rand((), generator=gen, dtype=torch.float64)) * 2 * math.pi
        total = 0.0
        for i in range(angles):
            phi = offset + 2 * math.pi * i / angles
            shift = {k: math.cos(phi) * u[k] + math.sin(phi) * v[k] for k in u}
            total = total + obj.loss(shift, x, y)
        return total / angles

    with obj.session():
        _adam([u, v], objective, orthonormalise, steps=steps, lr=lr, desc=f"mining {shape}",
              progress=progress, cancel=cancel, callback=callback, scales=scales)
    return u, v
