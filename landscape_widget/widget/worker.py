"""The widget's worker thread: one per widget, one job at a time, cancellable.

The kernel's main thread only validates messages and hands a :class:`~.jobs.Job` to the
:class:`Worker`; the worker thread runs it: its directions (:mod:`.directions`, cached),
then the grid (:func:`.grid_job.run_grid`) or the curvature map
(:func:`.curvature_job.run_curvature`), whose messages go to the injected ``send`` function
(the widget's ``send``, or a list in tests). A new job cancels the running one: its cancel
event is set, and the grid engine checks it before every tile, so the old job stops within
one tile. Errors, including those raised by user code such as ``loss_fn``, end the job with
an ``error`` message (and its traceback in the status); the thread lives on.

This module owns only the thread, the queue (one pending job) and the run loop; what the
jobs compute with lives in the worker's :class:`~.jobs.Context`.
"""

from __future__ import annotations

import atexit
import dataclasses
import threading
import weakref
from collections.abc import Callable

import numpy as np

from ..core.errors import Cancelled
from ..core.landscape import TileStream
from ..core.state import bn_batch_size_for
from ..core.surface import Curve, Surface
from . import protocol, shapes
from .curvature_job import run_curvature
from .directions import DirectionCache, directions_for
from .encode import snapshot_messages as snapshot_messages  # re-exported
from .grid_job import plan_text as plan_text  # re-exported
from .grid_job import run_grid
from .grid_job import stats_line as stats_line  # re-exported
from .jobs import Context, Job, Reporter, Send
from .jobs import new_id as new_id  # re-exported
from .spec import Spec

_CONTEXT_FIELDS = frozenset(f.name for f in dataclasses.fields(Context))
EXIT_TIMEOUT = 3.0
"""Seconds the interpreter's exit waits for each computing worker to stop (a tile's work)."""
_LIVE: weakref.WeakSet = weakref.WeakSet()  # the workers not closed yet


@atexit.register
def _close_all() -> None:
    """Stop every worker at the interpreter's exit (a script, a kernel shutting down).

    A daemon thread still inside torch when the interpreter finalises aborts the process
    ("terminate called without an active exception") instead of exiting cleanly; the
    workers are cancelled between tiles and joined first.
    """
    for worker in list(_LIVE):
        worker.close(timeout=EXIT_TIMEOUT)


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
        shapes.check_steps(mining_steps)
        bn_batch_size_for("batch", bn_batch_size)  # a bad value fails here, not in a job
        self.ctx = Context(model, data, loss_fn=loss_fn, device=device, model_b=model_b,
                           models=models, trajectory=trajectory, executor=executor,
                           tile_points=tile_points, evaluator_options=evaluator_options,
                           mining_steps=mining_steps, bn_batch_size=bn_batch_size)
        self.directions = DirectionCache()
        self.send, self.on_status, self.on_result = send, on_status, on_result
        self._cond = threading.Condition()
        self._pending: Job | None = None
        self._current: Job | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="landscape-worker", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    # What the jobs compute with (model, data, loss_fn, device, metrics, latest...) lives
    # in the context; reading or setting it through the worker (`worker.latest`,
    # `worker.tile_points = 16`) reaches the context.
    def __getattr__(self, name: str):
        if name in _CONTEXT_FIELDS and "ctx" in self.__dict__:
            return getattr(self.ctx, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name in _CONTEXT_FIELDS:
            setattr(self.ctx, name, value)
        else:
            super().__setattr__(name, value)

    def reporter(self, job_id: str) -> Reporter:
        """A reporter of job ``job_id`` to this worker's ``send`` and ``on_status``."""
        return Reporter(job_id, self.send, self.on_status, self.ctx.device_name)

    # --- control (any thread) ----------------------------------------------------------
    def submit(self, job_id: str, spec: Spec) -> Job:
        """Queue a job; the running and any queued job are cancelled."""
        job = Job(job_id, spec, report=self.reporter(job_id))
        with self._cond:
            if self._closed:
                raise RuntimeError("the worker is closed; create a new widget.")
            for old in (self._current, self._pending):
                if old is not None:
                    old.cancel.set()
            if self._pending is not None:
                self._pending.report.emit(protocol.cancelled_message(self._pending.id))
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
                self._pending.report.emit(protocol.cancelled_message(self._pending.id))
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

    @property
    def stream(self) -> TileStream | None:
        """The running grid's stream, if any."""
        job = self._current
        return None if job is None else job.stream

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
        _LIVE.discard(self)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def snapshot(self) -> tuple[Job, TileStream] | None:
        """The running job and its stream (for a view that joins mid-computation)."""
        with self._cond:
            job = self._current
        stream = None if job is None else job.stream
        if job is None or stream is None or job.cancel.is_set():
            return None
        return job, stream

    def directions_for(self, spec: Spec, job: Job | None = None) -> list:
        """The directions of ``spec`` (see :func:`.directions.directions_for`).

        Args:
            spec: The validated spec.
            job: The job computing them (default: one that is never cancelled).

        Returns:
            The directions (one in 1D, two in 2D; none for the plane).
        """
        job = job or Job("-", spec, report=self.reporter("-"))
        return directions_for(self.ctx, self.directions, spec, job)

    def random_for(self, spec: Spec, count: int, model=None) -> list:
        """``count`` random directions as ``spec`` says (see :meth:`.jobs.Context.random`)."""
        return self.ctx.random(spec, count, model)

    # --- worker thread -------------------------------------------------------------------
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
                job.report.failed(err)
            finally:
                with self._cond:
                    self._current = None
                    job.stream = None
                    self._cond.notify_all()

    def _run(self, job: Job) -> None:
        spec = job.spec
        job.report.status(message="preparing", total=int(np.prod(spec.shape)))
        try:
            dirs = self.directions_for(spec, job)
        except Cancelled:
            job.state = "cancelled"
            job.report.cancelled()
            return
        run = run_curvature if spec.quantity == "curvature" else run_grid
        result, complete = run(self.ctx, job, dirs)
        if self.on_result is not None:
            self.on_result(job, result, complete)
