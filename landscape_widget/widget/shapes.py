"""The widget's curve-shape features (Li, Li & Zhan 2024, PAPERS.md (d)).

Two parts, both thin layers over :mod:`landscape_widget.experiments`:

- **Direction types** that show the shapes random directions never do, computed on
  demand in the worker thread: ``"mined-w-peak"`` and ``"mined-vvv-basin"``
  (:func:`~landscape_widget.mine_direction`), ``"permutation"`` (the w-basin,
  :func:`~landscape_widget.permutation_direction`), ``"side"`` (the v-side,
  :func:`~landscape_widget.side_direction`), and the mined planes ``"saddle"`` and
  ``"wine-bottle"`` (:func:`~landscape_widget.mine_plane`).

  Mining takes seconds to minutes: its progress goes to the status line (step, total,
  objective, ETA) and the job's cancel event stops it before the next Adam step (a new
  request or the stop button). A cancelled mining is never cached: its direction is half
  mined. Finished directions are cached per (type, seed, BN mode, ignore, steps, model
  fingerprint); the data is fixed per widget. The cache ignores ``mode``, ``norm``, the
  ranges and the resolution, so a new window, resolution or 1D/2D switch re-uses them.

  In 2D the curve types put their direction on the x axis and a random direction (drawn
  from ``spec.seed``, normalised as ``spec.norm`` says) on y, as ``"interpolation"`` does.
  That random direction is the *second* of the seed's draws: the first is the start of
  mining (``mine_direction`` starts from it), so taking it would give a y axis nearly
  parallel to x. The planes are 2D only; in 1D the protocol refuses them
  (:data:`.protocol.SHAPE_PLANES`): their ``u`` alone is a plain random direction for
  the saddle, and half of a symmetric pair for the wine bottle.

  ``"permutation"`` moves every parameter and the BatchNorm statistics (the permuted
  network must compute the same function), so it ignores ``ignore_biasbn``; its errors
  (skip connections, grouped convolutions...) reach the status line unchanged.

- **The curve's label**: every *complete* 1D loss curve is classified with
  :func:`~landscape_widget.classify_curve` (default thresholds) and its label, reason and
  extrema travel in the ``result`` trait (:func:`curve_info`), so a re-render and a static
  export show them too. A cancelled curve is not labelled: NaN gaps of a coarse-to-fine
  stream would be read as missing samples and could change the label; waiting for the last
  tile is cheap (classification takes microseconds) and never shows a label that later
  flips. A window without ``alpha = 0`` (the model) has no label either.
"""

from __future__ import annotations

import time

import numpy as np

from ..core.data import sample_inputs
from ..core.fingerprints import fingerprint
from ..core.reuse import model_code_fingerprint
from ..core.surface import Curve
from ..experiments.curves import SHAPE_X, classify_curve
from ..experiments.mining import DEFAULT_STEPS, mine_direction
from ..experiments.mining_plane import mine_plane
from ..experiments.permute import PERMUTATION_X, permutation_direction
from ..experiments.side import side_direction
from .jobs import Context, Job, Labelled
from .spec import SHAPE_PLANES, SHAPE_TYPES, Spec

STATUS_INTERVAL_S = 0.25

_MINED = {"mined-w-peak": "w-peak", "mined-vvv-basin": "vvv-basin", "saddle": "saddle",
          "wine-bottle": "wine-bottle"}
_LABELS = {
    "mined-w-peak": "mined: w-peak",
    "mined-vvv-basin": "mined: vvv-basin",
    "permutation": "permutation (w-basin)",
    "side": "side (v-side)",
    "saddle": "mined plane: saddle",
    "wine-bottle": "mined plane: wine-bottle",
}
_AXES = {
    "mined-w-peak": ["α (mined w-peak direction)"],
    "mined-vvv-basin": ["α (mined vvv-basin direction)"],
    "permutation": ["α (θ → π(θ), permuted units)"],
    "side": ["α (downhill: v-side)"],
    "saddle": ["u (random: the loss rises)", "v (mined w-peak: the loss falls)"],
    "wine-bottle": ["u (mined wine bottle)", "v (mined wine bottle)"],
}


def entry(name: str) -> dict:
    """The entry of the ``direction_types`` trait of curve-shape direction type ``name``.

    Besides ``label``, ``direction`` and ``norm`` (that of the random y axis of a curve
    type in 2D), it carries ``shape`` (``"curve"`` or ``"surface"``) and ``window``:
    ``[start, stop, num]``, which the front end sets when the user enters this kind of
    type: the taxonomy window :data:`~landscape_widget.SHAPE_X` for curves (1D; the
    permutation's ``(-0.5, 1.5, 41)``, theta and its twin, where its shape is checked), the same
    range on both axes for planes (2D only; ``num`` applies when coming from 1D).

    Returns:
        The trait entry: ``label``, ``direction``, ``norm``, ``shape`` and ``window``.

    Example:
        >>> entry("saddle")["window"]
        [-1.5, 1.5, 31]
    """
    plane = name in SHAPE_PLANES
    # The permutation's shape is checked on PERMUTATION_X (theta at 0, its twin at 1).
    start, stop, num = PERMUTATION_X if name == "permutation" else SHAPE_X
    return {"label": _LABELS[name], "direction": name, "norm": "none" if plane else "filter",
            "shape": "surface" if plane else "curve",
            "window": [float(start), float(stop), 31 if plane else int(num)]}


def entries() -> list[dict]:
    """Entries of the ``direction_types`` trait, one per curve-shape direction type."""
    return [entry(name) for name in SHAPE_TYPES]


def check_steps(steps: int | None) -> int | None:
    """``steps`` if it is a valid ``mining_steps`` (an int >= 0, or ``None``).

    Args:
        steps: The widget's ``mining_steps``.

    Returns:
        ``steps``.

    Raises:
        TypeError: If ``steps`` is not an int or ``None``.
        ValueError: If ``steps`` is negative.
    """
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)):
        raise TypeError(f"mining_steps must be an int or None, got {type(steps).__name__}.")
    if steps is not None and steps < 0:
        raise ValueError(f"mining_steps must be >= 0, got {steps}.")
    return steps


def steps_for(direction: str, steps: int | None) -> int | None:
    """Adam steps of mining ``direction`` (``None`` for the built ones).

    Args:
        direction: A curve-shape direction type.
        steps: The widget's ``mining_steps`` (``None``: the library's defaults,
            :data:`~landscape_widget.experiments.mining.DEFAULT_STEPS`, 500 to 800).

    Returns:
        The steps, or ``None`` for a built (not mined) type.
    """
    shape = _MINED.get(direction)
    if shape is None:
        return None
    return DEFAULT_STEPS[shape] if steps is None else steps


def key(ctx: Context, spec: Spec) -> tuple:
    """What a curve-shape direction depends on (its cache key in :mod:`.directions`).

    Not ``mode``, ``norm``, the ranges or the resolution: a new window, resolution or 1D/2D
    switch re-uses the direction. ``side`` has no seed; ``permutation`` moves everything, so
    it has no BN mode or ignore.

    Returns:
        ``(name, seed, bn, ignore, mining steps, fingerprints of the model's state and
        code, of tensor data)``, with ``None`` for the settings that do not apply to the type.
    """
    name = spec.direction
    seed = None if name == "side" else spec.seed
    bn = None if name == "permutation" else spec.bn
    ignore = None if name == "permutation" else spec.ignore_biasbn
    return (name, seed, bn, ignore, steps_for(name, ctx.mining_steps),
            fingerprint(dict(ctx.model.state_dict())), model_code_fingerprint(ctx.model),
            ctx.data_key())


def finish(ctx: Context, spec: Spec, base: list) -> Labelled:
    """The directions of ``spec`` from the computed ``base``: axis labels, note, 2D y axis.

    Args:
        ctx: The widget's context.
        spec: A spec whose ``direction`` is one of :data:`.spec.SHAPE_TYPES`.
        base: What :func:`compute` returned (cached).

    Returns:
        A :class:`.jobs.Labelled` list (one direction in 1D, two in 2D).
    """
    dirs = Labelled(base)
    dirs.axis_labels = list(_AXES[spec.direction])
    dirs.note = getattr(base, "note", "")
    if dirs.note:  # the shortfall stays visible on the plot, not only in the status
        dirs.axis_labels[0] += f" — fell short: {base[0].achieved}" if len(base) == 1 \
            else " — fell short"
    if spec.direction not in SHAPE_PLANES and spec.mode == "2d":
        dirs.append(ctx.random(spec, 2)[1])
        dirs.axis_labels.append("β (random direction)")
    return dirs


def compute(ctx: Context, spec: Spec, job: Job) -> list:
    """Mine or build the direction(s) of ``spec`` (in the worker thread; cancellable).

    Args:
        ctx: The widget's context (model, data, loss, device, mining steps).
        spec: A spec whose ``direction`` is one of :data:`.spec.SHAPE_TYPES`.
        job: The running job: its cancel event stops mining, its reporter shows progress.

    Returns:
        The computed directions with ``note`` (what fell short, or ``""``).

    Raises:
        ValueError: If the type is unknown or the experiment refuses the model.
    """
    name = spec.direction
    if name not in SHAPE_TYPES:
        raise ValueError(f"{name!r} is not a curve-shape direction type.")
    label = _LABELS[name]
    ignore = "biasbn" if spec.ignore_biasbn else None
    common = dict(loss_fn=ctx.loss_fn, bn=spec.bn, device=ctx.device)
    job.report.status(message=f"{label}: computing the direction")
    # warn=False: the shortfall goes to the status line and the axis label (a warning
    # from the worker thread would land in whichever cell runs next).
    if name == "permutation":
        # Checked on a few real inputs: a w-basin whose ends differ would mislead.
        inputs = sample_inputs(ctx.data, 64)
        found = permutation_direction(ctx.model, seed=spec.seed, check_inputs=inputs,
                                      data=ctx.data, warn=False, **common)
        return _reported([found], found, job, label)
    if name == "side":
        found = side_direction(ctx.model, ctx.data, ignore=ignore, cancel=job.cancel,
                               warn=False, **common)
        return _reported([found], found, job, label)
    mining = dict(steps=steps_for(name, ctx.mining_steps), seed=spec.seed, ignore=ignore,
                  progress=False, cancel=job.cancel, warn=False,
                  callback=_progress(job, label), **common)
    if name in SHAPE_PLANES:
        found = mine_plane(ctx.model, ctx.data, shape=_MINED[name], **mining)
        return _reported(list(found), found, job, label)
    found = mine_direction(ctx.model, ctx.data, shape=_MINED[name], **mining)
    return _reported([found], found, job, label)


def shape_note(found) -> str:
    """What a curve-shape method achieved, for the status line (``""`` when it succeeded).

    Returns:
        ``found.summary()`` (requested shape, what was achieved and why, after how many attempts) if
        the method fell short, else ``""``.

    Example:
        >>> from landscape_widget.experiments.curves import ShapedDirection
        >>> d = ShapedDirection()
        >>> d._set_outcome("w-peak", [], {"achieved": "v-basin", "reason": "one minimum"})
        >>> shape_note(d)
        "w-peak: fell short, achieved 'v-basin' (one minimum) after 0 attempts"
    """
    if getattr(found, "success", None) is False:
        return found.summary()
    return ""


def _reported(dirs: list, found, job: Job, label: str) -> Labelled:
    out = Labelled(dirs)
    out.note = shape_note(found)
    if not job.cancel.is_set():
        job.report.status(message=f"{label}: {out.note or found.summary()}")
    return out


def _progress(job: Job, label: str):
    """A mining callback that reports to the status line, at most every 0.25 s."""
    t0 = time.perf_counter()
    last = [0.0]

    def callback(step: int, total: int, objective: float) -> None:
        now = time.perf_counter()
        if step not in (1, total) and now - last[0] < STATUS_INTERVAL_S:
            return
        last[0] = now
        rate = step / (now - t0) if now > t0 else 0.0
        eta = (total - step) / rate if rate > 0 else None
        job.report.status(message=f"{label}: mining step {step}/{total}, objective "
                                  f"{objective:.4g}", done=step, total=total, eta_s=eta)

    return callback


def curve_info(result, complete: bool) -> dict | None:
    """The label and extrema of a complete 1D loss curve, for the ``result`` trait.

    Args:
        result: The job's result (only a :class:`~landscape_widget.Curve` with a loss is
            labelled).
        complete: Whether every point was computed (partial curves get no label).

    Returns:
        ``{"shape", "reason", "theta_loss", "extrema": [{"alpha", "loss", "kind",
        "prominence", "edge"}, ...]}`` with ``kind`` ``"min"`` or ``"max"``, extrema by
        increasing ``alpha``; ``None`` when there is nothing to label. JSON-safe (no NaN).

    Example:
        >>> a = np.linspace(-1.5, 1.5, 61)
        >>> info = curve_info(Curve(a, (a**2 - 1) ** 2), complete=True)
        >>> info["shape"], [(e["kind"], round(e["alpha"], 2)) for e in info["extrema"]]
        ('w-peak', [('min', -1.0), ('max', 0.0), ('min', 1.0)])
    """
    if not complete or not isinstance(result, Curve) or result.loss is None:
        return None
    try:
        found = classify_curve(result.x, result.loss)
    except ValueError:
        return None  # e.g. a window without alpha = 0: the taxonomy is about theta
    extrema = [{"alpha": e.alpha, "loss": e.loss, "kind": kind, "prominence": e.prominence,
                "edge": bool(e.edge)}
               for kind, group in (("min", found.minima), ("max", found.maxima)) for e in group]
    extrema.sort(key=lambda e: e["alpha"])
    theta = found.theta_loss
    return {"shape": found.shape, "reason": found.reason, "extrema": extrema,
            "theta_loss": theta if np.isfinite(theta) else None}


__all__ = ["entry", "entries", "check_steps", "steps_for", "key", "compute", "finish",
           "curve_info", "shape_note"]
