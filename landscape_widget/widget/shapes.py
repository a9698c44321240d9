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

import threading
import time
from collections import OrderedDict

import numpy as np

from ..core.compute import fingerprint
from ..core.data import sample_inputs
from ..core.hessian import Cancelled
from ..core.surface import Curve
from ..experiments.curves import SHAPE_X, classify_curve
from ..experiments.mining import DEFAULT_STEPS, mine_direction, mine_plane
from ..experiments.permute import PERMUTATION_X, permutation_direction
from ..experiments.side import side_direction
from .protocol import SHAPE_PLANES, SHAPE_TYPES, Spec

CACHE = 4
"""Mined or built directions kept per worker (each is one or two copies of the weights)."""
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


def entries() -> list[dict]:
    """Entries of the ``direction_types`` trait, one per curve-shape direction type.

    Besides ``label``, ``direction`` and ``norm`` (that of the random y axis of a curve
    type in 2D), each carries ``shape`` (``"curve"`` or ``"surface"``) and ``window``:
    ``[start, stop, num]``, which the front end sets when the user enters this kind of
    type: the taxonomy window :data:`~landscape_widget.SHAPE_X` for curves (1D; the
    permutation's ``(-0.5, 1.5, 41)``, theta and its twin, where its shape is checked), the same
    range on both axes for planes (2D only; ``num`` applies when coming from 1D).
    """
    out = []
    for name in SHAPE_TYPES:
        plane = name in SHAPE_PLANES
        # The permutation's shape is checked on PERMUTATION_X (theta at 0, its twin at 1).
        start, stop, num = PERMUTATION_X if name == "permutation" else SHAPE_X
        out.append({"label": _LABELS[name], "direction": name,
                    "norm": "none" if plane else "filter",
                    "shape": "surface" if plane else "curve",
                    "window": [float(start), float(stop), 31 if plane else int(num)]})
    return out


class _Labelled(list):
    """Directions with axis labels (read by :func:`.extra_jobs.path_info`) and a ``note``.

    ``note`` says what a curve-shape method fell short of ("" when it got its shape); the
    worker shows it in the status line of the finished job.
    """

    axis_labels: list[str]
    note: str = ""


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


class ShapeDirections:
    """The mined and built directions of one worker, cached.

    Args:
        steps: Adam steps of every mining (``None``: the defaults of
            :data:`~landscape_widget.experiments.mining.DEFAULT_STEPS`, 500 to 800).

    Raises:
        TypeError: If ``steps`` is not an int or ``None``.
        ValueError: If ``steps`` is negative.
    """

    def __init__(self, steps: int | None = None):
        self.steps = check_steps(steps)
        self._cache: OrderedDict[tuple, list] = OrderedDict()
        self._lock = threading.Lock()

    def steps_for(self, direction: str) -> int | None:
        """Adam steps of ``direction`` (``None`` for the built ones)."""
        shape = _MINED.get(direction)
        if shape is None:
            return None
        return DEFAULT_STEPS[shape] if self.steps is None else self.steps

    def directions(self, worker, spec: Spec, job) -> list:
        """The directions of ``spec`` (one in 1D, two in 2D), computing them if needed.

        Args:
            worker: The :class:`.worker.Worker` (model, data, loss, device, status).
            spec: A spec whose ``direction`` is one of :data:`.protocol.SHAPE_TYPES`.
            job: The running job: its cancel event stops mining, its id tags the status.

        Returns:
            A list of direction dicts with ``axis_labels``.

        Raises:
            Cancelled: If the job was cancelled while mining.
            ValueError: If the type is unknown or the experiment refuses the model.
        """
        if spec.direction not in SHAPE_TYPES:
            raise ValueError(f"{spec.direction!r} is not a curve-shape direction type.")
        base = self._base(worker, spec, job)
        dirs = _Labelled(base)
        dirs.axis_labels = list(_AXES[spec.direction])
        dirs.note = getattr(base, "note", "")
        if dirs.note:  # the shortfall stays visible on the plot, not only in the status
            dirs.axis_labels[0] += f" — fell short: {base[0].achieved}" if len(base) == 1 \
                else " — fell short"
        if spec.direction not in SHAPE_PLANES and spec.mode == "2d":
            second = worker.random_for(spec, 2)[1]
            dirs.append(second)
            dirs.axis_labels.append("β (random direction)")
        return dirs

    def _key(self, worker, spec: Spec) -> tuple:
        name = spec.direction
        # Only what the direction depends on: side has no seed, permutation no BN mode
        # or ignore (it moves everything).
        seed = None if name == "side" else spec.seed
        bn = None if name == "permutation" else spec.bn
        ignore = None if name == "permutation" else spec.ignore_biasbn
        return (name, seed, bn, ignore, self.steps_for(name),
                fingerprint(dict(worker.model.state_dict())))

    def _base(self, worker, spec: Spec, job) -> list:
        key = self._key(worker, spec)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        if job.cancel.is_set():
            raise Cancelled("cancelled")
        base = self._compute(worker, spec, job)
        if job.cancel.is_set():
            # Mining returns what it reached when cancelled: half mined, never cached.
            raise Cancelled("cancelled")
        with self._lock:
            self._cache[key] = base
            while len(self._cache) > CACHE:
                self._cache.popitem(last=False)
        return base

    def _compute(self, worker, spec: Spec, job) -> list:
        name, label = spec.direction, _LABELS[spec.direction]
        ignore = "biasbn" if spec.ignore_biasbn else None
        common = dict(loss_fn=worker.loss_fn, bn=spec.bn, device=worker.device)
        _status(worker, job, f"{label}: computing the direction")
        # warn=False: the shortfall goes to the status line and the axis label (a warning
        # from the worker thread would land in whichever cell runs next).
        if name == "permutation":
            # Checked on a few real inputs: a w-basin whose ends differ would mislead.
            inputs = sample_inputs(worker.data, 64)
            found = permutation_direction(worker.model, seed=spec.seed, check_inputs=inputs,
                                          data=worker.data, warn=False, **common)
            return _reported([found], found, worker, job, label)
        if name == "side":
            found = side_direction(worker.model, worker.data, ignore=ignore, cancel=job.cancel,
                                   warn=False, **common)
            return _reported([found], found, worker, job, label)
        mining = dict(steps=self.steps_for(name), seed=spec.seed, ignore=ignore,
                      progress=False, cancel=job.cancel, warn=False,
                      callback=_progress(worker, job, label), **common)
        if name in SHAPE_PLANES:
            found = mine_plane(worker.model, worker.data, shape=_MINED[name], **mining)
            return _reported(list(found), found, worker, job, label)
        found = mine_direction(worker.model, worker.data, shape=_MINED[name], **mining)
        return _reported([found], found, worker, job, label)


def shape_note(found) -> str:
    """What a curve-shape method achieved, for the status line (``""`` when it succeeded).

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


class _Base(list):
    """The computed directions and what they achieved (``note``: the shortfall, or "")."""

    note: str = ""


def _reported(dirs: list, found, worker, job, label: str) -> list:
    out = _Base(dirs)
    out.note = shape_note(found)
    if not job.cancel.is_set():
        _status(worker, job, f"{label}: {out.note or found.summary()}")
    return out


def _status(worker, job, message: str, done: int = 0, total: int = 0,
            eta: float | None = None) -> None:
    worker._status(state="running", id=job.id, device=str(worker.device or ""), done=done,
                   total=total, points_per_s=0.0, eta_s=eta, message=message)


def _progress(worker, job, label: str):
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
        _status(worker, job, f"{label}: mining step {step}/{total}, objective {objective:.4g}",
                done=step, total=total, eta=eta)

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


__all__ = ["entries", "check_steps", "ShapeDirections", "curve_info"]
