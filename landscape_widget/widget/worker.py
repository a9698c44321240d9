"""The widget's worker thread: one per widget, one job at a time, cancellable.

The kernel's main thread only validates messages and hands a :class:`Job` to the
:class:`Worker`; the grid is computed in the worker thread through
:func:`~landscape_widget.iter_tiles`, and every finished tile goes to the injected ``send``
function (the widget's ``send``, or a list in tests). A new job cancels the running one: its
cancel event is set, and ``iter_tiles`` checks it before every tile, so the old job stops
within one tile. Errors, including those raised by user code such as ``loss_fn``, end the
job with an ``error`` message; the thread lives on.

Directions are cached per :meth:`Spec.direction_key` (and model fingerprint), and the last
*complete* result is passed as ``reuse=`` to the next job with the same directions and BN
mode, so raising the resolution from ``n`` to ``2n - 1`` recomputes no old point. (A
cancelled result is never reused: its NaN would be copied as if computed.)
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.compute import fingerprint
from ..core.data import is_data_fn
from ..core.directions import interpolation_direction, random_directions
from ..core.hessian import Cancelled
from ..core.landscape import TileStream, iter_tiles
from ..core.metrics import METRICS
from ..core.state import bn_batch_size_for
from ..core.surface import Curve, Surface
from . import extra_jobs, protocol, shapes
from . import models as vertex_models
from .encode import snapshot_messages as snapshot_messages  # re-exported
from .encode import tile_message
from .protocol import SHAPE_TYPES, VERTEX_COUNTS, Spec, f32


def stats_line(result) -> str:
    """The landscape statistics of a finished 2D loss surface for the status line, else ``""``.

    See :func:`~landscape_widget.core.stats.landscape_stats` (non-convex fraction, minima,
    roughness, basin radius); 1D curves, accuracy-only grids and other views get none.
    """
    if not isinstance(result, Surface) or result.loss is None:
        return ""
    return result.stats().summary()


Send = Callable[[dict, list], None]
"""``send(message, buffers)``: delivers one message to the front end."""

STATUS_INTERVAL_S = 0.5
DIRECTION_CACHE = 8
_ids = itertools.count(1)


def plan_text(plan) -> str | None:
    """The engine's plan for the status line: ``"vmap K=64"``, ``"loop K=1 (no vmap)"``."""
    if plan is None:
        return None
    text = f"{plan.strategy} K={plan.points}"
    return text + " (no vmap)" if getattr(plan, "vmap_error", "") else text


def new_id(prefix: str = "py") -> str:
    """A fresh job id (unique within the process)."""
    return f"{prefix}-{next(_ids)}"


@dataclass
class Job:
    """One request of the front end: a grid to compute, or a pattern fit.

    ``spec`` is a :class:`.protocol.Spec` or a :class:`.patterns.FitSpec`.
    """

    id: str
    spec: Spec | Any
    cancel: threading.Event = field(default_factory=threading.Event)
    state: str = "pending"
    view: dict = field(default_factory=dict)  # the start message's extras, for a joining view


class Worker:
    """Computes jobs in one daemon thread and streams their tiles through ``send``.

    Args:
        model: The user's model (never modified).
        data: ``(inputs, targets)``, a ``Dataset`` or a ``DataLoader``.
        send: ``send(message, buffers)``, called from the worker thread.
        model_b: Second model, the end point of ``"interpolation"`` directions.
        models: ``{name: model}`` for the ``"interpolate"`` and ``"plane"`` types
            (see :mod:`.models`).
        trajectory: A :class:`~landscape_widget.Trajectory` for ``"pca"`` directions.
        loss_fn: ``loss_fn(outputs, targets)``; cross-entropy by default.
        device: Where to compute (the model's device by default).
        on_status: Called with a status dict (state, device, done, total, points_per_s,
            eta_s, message, id) at the start and end of a job and every
            ``STATUS_INTERVAL_S`` seconds in between.
        on_result: Called with ``(job, result, complete)`` when a job ends with data.
        tile_points: Fixed tile size (default: adaptive, about 0.3 s per tile).
        evaluator_options: Passed to ``iter_tiles`` (``strategy``, ``memory_budget``...).
        executor: A Dask client or ``concurrent.futures`` executor computing the grid
            tiles (``iter_tiles(executor=...)``); a cancelled job cancels its futures.
            With one, ``data`` may be a ``data_fn`` that the executor's workers call; the
            Hessian and pattern features call it here, once, when first needed.
        mining_steps: Adam steps of the mined curve-shape directions (``None``: the
            library's defaults; see :mod:`.shapes`).
        bn_batch_size: Samples per BatchNorm batch for jobs with ``bn="batch"`` (``None``:
            the library's default).

    The engine evaluates a private copy of ``model`` (see
    :func:`~landscape_widget.core.params.evaluation_copy`): the user's model, its flags
    included, is only read, so a training step in the main thread meanwhile is unaffected.
    """

    def __init__(self, model, data, *, send: Send, model_b=None, trajectory=None, loss_fn=None,
                 device=None, models: dict | None = None,
                 on_status: Callable[[dict], None] | None = None,
                 on_result: Callable[[Job, Surface | Curve, bool], None] | None = None,
                 tile_points: int | None = None, evaluator_options: dict | None = None,
                 executor=None, mining_steps: int | None = None,
                 bn_batch_size: int | None = None):
        self.model, self.model_b = model, model_b
        self.shapes = shapes.ShapeDirections(mining_steps)
        self.models = dict(models or {})
        # A data_fn is loaded here at most once (lazily); an executor's workers get the
        # function itself, so they load the data where they run.
        self.executor, self.grid_data = executor, data
        self.data = functools.cache(data) if is_data_fn(data) else data
        if executor is None:
            self.grid_data = self.data
        self.trajectory = trajectory
        self.loss_fn, self.device = loss_fn, device
        self.send, self.on_status, self.on_result = send, on_status, on_result
        self.tile_points, self.evaluator_options = tile_points, evaluator_options
        bn_batch_size_for("batch", bn_batch_size)  # a bad value fails here, not in a job
        self.bn_batch_size = bn_batch_size
        # The loss, and accuracy only where it means something (see core/metrics.py).
        self.metrics: tuple[str, ...] = METRICS
        self.latest: Surface | Curve | None = None
        self.stream: TileStream | None = None
        self._cond = threading.Condition()
        self._pending: Job | None = None
        self._current: Job | None = None
        self._closed = False
        self._directions: OrderedDict[tuple, list] = OrderedDict()
        self._complete: tuple[tuple, Surface | Curve] | None = None
        self._thread = threading.Thread(target=self._loop, name="landscape-worker", daemon=True)
        self._thread.start()

    # --- control (any thread) ----------------------------------------------------------
    def submit(self, job_id: str, spec: Spec) -> Job:
        """Queue a job; the running and any queued job are cancelled."""
        job = Job(job_id, spec)
        with self._cond:
            if self._closed:
                raise RuntimeError("the worker is closed; create a new widget.")
            for old in (self._current, self._pending):
                if old is not None:
                    old.cancel.set()
            if self._pending is not None:
                self._emit({"kind": "cancelled", "id": self._pending.id, "done": 0, "total": 0})
            self._pending = job
            self._cond.notify_all()
        return job

    def cancel(self, job_id: str | None = None) -> bool:
        """Cancel the running and queued job (only the one with ``job_id`` if given).

        Returns:
            Whether a job was cancelled.
        """
        hit = False
        with self._cond:
            if self._pending is not None and job_id in (None, self._pending.id):
                self._pending.cancel.set()
                self._emit({"kind": "cancelled", "id": self._pending.id, "done": 0, "total": 0})
                self._pending = None
                hit = True
            if self._current is not None and job_id in (None, self._current.id):
                self._current.cancel.set()
                hit = True
            self._cond.notify_all()
        return hit

    @property
    def busy(self) -> bool:
        """Whether a job is running or queued."""
        with self._cond:
            return self._pending is not None or self._current is not None

    @property
    def current(self) -> Job | None:
        """The running job, if any."""
        return self._current

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no job is running or queued; returns ``False`` on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._pending is None and self._current is None, timeout
            )

    def close(self, timeout: float = 5.0) -> None:
        """Cancel everything and stop the thread."""
        with self._cond:
            self._closed = True
            for job in (self._current, self._pending):
                if job is not None:
                    job.cancel.set()
            self._pending = None
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def snapshot(self) -> tuple[Job, TileStream] | None:
        """The running job and its stream (for a view that joins mid-computation)."""
        with self._cond:
            job, stream = self._current, self.stream
        if job is None or stream is None or job.cancel.is_set():
            return None
        return job, stream

    # --- worker thread -------------------------------------------------------------------
    def _emit(self, message: dict, buffers: list | None = None) -> None:
        try:
            self.send(message, buffers or [])
        except Exception:  # noqa: BLE001 - a closed comm must not kill the worker
            pass

    def _status(self, **status) -> None:
        if self.on_status is None:
            return
        try:
            self.on_status(status)
        except Exception:  # noqa: BLE001 - same as _emit
            pass

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._pending is not None)
                if self._closed:
                    return
                job, self._pending = self._pending, None
                self._current = job
                job.state = "running"
            try:
                self._run(job)
            except Exception as err:  # noqa: BLE001 - user code (loss_fn, model) may raise
                job.state = "error"
                message = f"{type(err).__name__}: {err}"
                self._emit(protocol.error_message(job.id, message))
                self._status(state="error", id=job.id, message=message, done=0, total=0,
                             device=str(self.device or ""), points_per_s=0.0, eta_s=None)
            finally:
                with self._cond:
                    self._current = None
                    self.stream = None
                    self._cond.notify_all()

    def random_for(self, spec: Spec, count: int, model=None) -> list:
        """``count`` random directions as ``spec`` says (norm, bias+BN, seed).

        Args:
            spec: The view's spec.
            count: How many directions (drawn one after another from ``spec.seed``).
            model: Where to draw them (default: the widget's model).
        """
        return random_directions(
            self.model if model is None else model, count,
            norm=None if spec.norm == "none" else spec.norm,
            ignore="biasbn" if spec.ignore_biasbn else None, seed=spec.seed,
        )

    def directions_for(self, spec: Spec, job: Job | None = None) -> list:
        """The directions of ``spec`` (cached per direction key and model fingerprint).

        ``"random"`` draws ``1`` or ``2`` directions from ``spec.seed``. ``"interpolation"``
        goes from the model to ``model_b`` along the first axis; in 2D the second axis is a
        random direction normalised as ``spec.norm`` says. ``"pca"``: the trajectory's
        principal directions; ``"hessian"``: the top Hessian eigenvectors (unit norm;
        computed in this thread, cancellable with ``job``). ``"interpolate"`` and
        ``"plane"`` go through the named models (:func:`.models.directions`); the curve
        shapes are mined or built by :class:`.shapes.ShapeDirections` (cancellable).
        """
        if spec.direction in VERTEX_COUNTS:
            return vertex_models.directions(self, spec)
        if spec.direction in SHAPE_TYPES:  # mined or built: cached apart (see .shapes)
            return self.shapes.directions(self, spec, job or Job("-", spec))
        key = (spec.direction_key(), fingerprint(dict(self.model.state_dict())),
               spec.bn if spec.direction == "hessian" else None)
        if key in self._directions:
            self._directions.move_to_end(key)
            return self._directions[key]
        count = 2 if spec.mode == "2d" else 1
        if spec.direction == "interpolation":
            if self.model_b is None:
                raise ValueError("interpolation directions need model_b=... in the widget.")
            dirs = [interpolation_direction(self.model, self.model_b)]
            if count == 2:
                dirs.append(self.random_for(spec, 1)[0])
        elif spec.direction == "random":
            dirs = self.random_for(spec, count)
        elif spec.direction == "pca":
            dirs = extra_jobs.pca_directions(self.trajectory, count)
        elif spec.direction == "hessian":
            dirs = extra_jobs.hessian_directions(self, job or Job("-", spec), count)
        else:
            raise ValueError(f"direction type {spec.direction!r} is not implemented.")
        self._directions[key] = dirs
        while len(self._directions) > DIRECTION_CACHE:
            self._directions.popitem(last=False)
        return dirs

    def _stream(self, job: Job, dirs: list) -> TileStream:
        spec = job.spec
        if spec.direction == "plane":
            return vertex_models.plane_stream(self, job)
        x, y = spec.axes()
        reuse_key = (spec.direction_key(), spec.bn, spec.quantity, spec.precision)
        reuse = None
        if self._complete is not None and self._complete[0] == reuse_key:
            reuse = self._complete[1]
        kwargs = dict(directions=dirs if spec.mode == "2d" else dirs[0], x=x, y=y,
                      loss_fn=self.loss_fn, bn=spec.bn, device=self.device, seed=None,
                      bn_batch_size=self.bn_batch_size if spec.bn == "batch" else None,
                      tile_points=self.tile_points, cancel=job.cancel,
                      evaluator_options=self.evaluator_options, precision=spec.precision)
        for _ in range(3):
            try:
                return iter_tiles(vertex_models.centre(self, spec), self.grid_data,
                                  metrics=self.metrics,
                                  reuse=reuse, executor=self.executor, **kwargs)
            except ValueError as err:
                text = str(err)
                if reuse is not None and text.startswith("reuse="):
                    # The model or data changed since: compute everything again.
                    self._complete = reuse = None
                elif "accuracy" in self.metrics and text.startswith("accuracy needs"):
                    # Not a classification task: the loss is still well defined.
                    self.metrics = ("loss",)
                    reuse = None
                else:
                    raise
        raise RuntimeError("could not set up the computation.")  # pragma: no cover

    def _run(self, job: Job) -> None:
        spec = job.spec
        t0 = time.perf_counter()
        dev = str(self.device or "")
        self._status(state="running", id=job.id, device=dev, done=0,
                     total=int(np.prod(spec.shape)), points_per_s=0.0, eta_s=None,
                     message="preparing")
        try:
            dirs = self.directions_for(spec, job)
        except Cancelled:
            job.state = "cancelled"
            self._emit({"kind": "cancelled", "id": job.id, "done": 0, "total": 0})
            self._status(state="cancelled", id=job.id, device=dev, done=0, total=0,
                         points_per_s=0.0, eta_s=None, message="cancelled")
            return
        if spec.quantity == "curvature":
            extra_jobs.run_curvature(self, job, dirs)
            return
        stream = self._stream(job, dirs)
        info = vertex_models.view_info(dirs, stream)
        job.view = dict(info)  # before the stream is visible to a joining view's snapshot
        with self._cond:
            self.stream = stream
        dev = str(stream.evaluator.device)
        axes = stream.axes
        x_axis, y_axis = axes[-1], (axes[0] if len(axes) == 2 else None)
        dropped = dict(getattr(stream.evaluator, "dropped", {}))
        self._emit({"kind": "start", "id": job.id, "spec": spec.to_dict(),
                    "shape": list(stream.shape), "metrics": list(stream.evaluator.metrics),
                    "metrics_dropped": dropped, "device": dev, **info},
                   [f32(x_axis), f32(y_axis)])
        last_status = 0.0
        done = 0
        for tile in stream:
            if job.cancel.is_set():
                break
            done = tile.done
            self._emit(*tile_message(job.id, tile))
            elapsed = time.perf_counter() - t0
            rate = done / elapsed if elapsed > 0 else 0.0
            eta = (tile.total - done) / rate if rate > 0 else None
            progress = {"kind": "progress", "id": job.id, "done": done, "total": tile.total,
                        "points_per_s": rate, "eta_s": eta, "device": dev,
                        "plan": plan_text(stream.evaluator.plan)}
            self._emit(progress)
            now = time.perf_counter()
            if now - last_status > STATUS_INTERVAL_S:
                last_status = now
                self._status(state="running", id=job.id, device=dev, done=done,
                             total=tile.total, points_per_s=rate, eta_s=eta, message="")
        total = stream.total
        complete = done == total
        result = stream.result()
        result.spec.update(info)
        self.latest = result
        seconds = time.perf_counter() - t0
        if complete:
            job.state = "done"
            self._complete = ((spec.direction_key(), spec.bn, spec.quantity, spec.precision),
                              result)
            self._emit({"kind": "done", "id": job.id, "seconds": seconds,
                        "evaluated": stream.evaluated,
                        "reused": stream.reused - vertex_models.outside(info),
                        "nonfinite": stream.evaluator.nonfinite_points,
                        "stats": stats_line(result)})
            # A curve-shape direction that fell short says so (see .shapes).
            notes = [getattr(dirs, "note", "")]
            notes += [f"no {k}: {why}" for k, why in dropped.items()]
            if stream.evaluator.nonfinite_points:
                notes.insert(0, f"{stream.evaluator.nonfinite_points} point(s) gave a "
                                "non-finite loss")
            if getattr(stream.evaluator.plan, "vmap_error", ""):
                notes.append("computed point by point: the model cannot run under vmap")
            note = "; ".join(n for n in notes if n)
            self._status(state="done", id=job.id, device=dev, done=total, total=total,
                         points_per_s=total / seconds if seconds > 0 else 0.0, eta_s=0.0,
                         message=note)
        else:
            job.state = "cancelled"
            self._emit({"kind": "cancelled", "id": job.id, "done": done, "total": total})
            self._status(state="cancelled", id=job.id, device=dev, done=done, total=total,
                         points_per_s=0.0, eta_s=None, message="cancelled")
        if self.on_result is not None:
            self.on_result(job, result, complete)
