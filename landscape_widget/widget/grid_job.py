"""The widget's grid job: a loss surface or curve, streamed tile by tile, coarse to fine.

:func:`run_grid` computes ``job.spec``'s grid through :func:`~landscape_widget.iter_tiles`
(or, for the plane through three models, :func:`.models.plane_stream`) and streams its
``start``, ``tile``, ``progress`` and ``done`` / ``cancelled`` messages. The last *complete*
result is passed as ``reuse=`` to the next job with the same directions, BN mode and
quantity, so raising the resolution from ``n`` to ``2n - 1`` recomputes no old point. (A
cancelled result is never reused: its NaN would be copied as if computed.)
"""

from __future__ import annotations

import functools
import time

from ..core.errors import AccuracyUndefined, ReuseMismatch
from ..core.landscape import TileStream, iter_tiles
from ..core.progressive import progressive_stream
from ..core.surface import Curve, Surface
from . import models, protocol
from .encode import stream_start, stream_tile
from .jobs import Context, Job

STATUS_INTERVAL_S = 0.5


def plan_text(plan) -> str | None:
    """The engine's plan for the status line: ``"vmap K=64"``, ``"loop K=1 (no vmap)"``."""
    if plan is None:
        return None
    text = f"{plan.strategy} K={plan.points}"
    return text + " (no vmap)" if getattr(plan, "vmap_error", "") else text


def stats_line(result) -> str:
    """The landscape statistics of a finished 2D loss surface for the status line, else ``""``.

    See :func:`~landscape_widget.core.stats.landscape_stats` (non-convex fraction, minima,
    roughness, basin radius); 1D curves, accuracy-only grids and other views get none.

    Returns:
        The one-line summary of :meth:`Surface.stats <landscape_widget.Surface.stats>` for
        a :class:`~landscape_widget.Surface` with a loss grid, else the empty string.
    """
    if not isinstance(result, Surface) or result.loss is None:
        return ""
    return result.stats().summary()


def _reuse_key(spec) -> tuple:
    # Points of another precision are other values: never reused (the engine refuses too).
    return (spec.direction_key(), spec.bn, spec.quantity, spec.precision)


def open_stream(ctx: Context, job: Job, dirs: list) -> TileStream:
    """The tile stream of ``job.spec``, falling back where the engine refuses a request.

    A ``reuse=`` of another model or data (:class:`~landscape_widget.core.errors.ReuseMismatch`)
    computes everything again; accuracy undefined for this task
    (:class:`~landscape_widget.core.errors.AccuracyUndefined`) computes the loss alone, for
    this and every later job of the widget.

    Returns:
        The engine's tile stream for the job: the plane stream for ``direction="plane"``,
        else :func:`~landscape_widget.iter_tiles` over the job's grid, with
        progressive subset stages first for large data when no points are reused and no
        executor computes the tiles. ``ctx.complete`` (dropped reuse) and ``ctx.metrics``
        (accuracy dropped) are updated when a fallback was taken.

    Raises:
        ReuseMismatch: (a ``ValueError``) If the engine refuses a reuse although none was
            passed (not expected; without a reuse it cannot mismatch).
        AccuracyUndefined: (a ``ValueError``) If accuracy is undefined for the task
            although it was not asked for (not expected either).
        RuntimeError: If three tries all end in a fallback (cannot happen: each
            fallback is taken at most once; kept as a guard).
    """
    spec = job.spec
    x, y = spec.axes()

    def make(reuse) -> TileStream:
        if spec.direction == "plane":
            return models.plane_stream(ctx, job)
        exact = functools.partial(
            iter_tiles, models.centre(ctx, spec), ctx.grid_data, metrics=ctx.metrics,
            reuse=reuse, executor=ctx.executor,
            directions=dirs if spec.mode == "2d" else dirs[0], x=x, y=y,
            loss_fn=ctx.loss_fn, bn=spec.bn, device=ctx.device, seed=None,
            bn_batch_size=ctx.bn_batch_size if spec.bn == "batch" else None,
            tile_points=ctx.tile_points, cancel=job.cancel,
            evaluator_options=ctx.evaluator_options, precision=spec.precision)
        # Large data: subset passes first (core/progressive.py), unless points are reused
        # (those are exact already) or an executor computes the tiles.
        staged = (None if reuse is not None or ctx.executor is not None else
                  progressive_stream(exact, ctx.grid_data))
        return staged or exact()

    reuse = None
    if ctx.complete is not None and ctx.complete[0] == _reuse_key(spec):
        reuse = ctx.complete[1]
    for _ in range(3):
        try:
            return make(reuse)
        except ReuseMismatch:
            if reuse is None:
                raise
            ctx.complete = reuse = None  # the model or data changed: compute everything again
        except AccuracyUndefined:
            if "accuracy" not in ctx.metrics:
                raise
            ctx.metrics = ("loss",)  # not a classification task: the loss still is defined
            reuse = None
    raise RuntimeError("could not set up the computation.")  # pragma: no cover


def run_grid(ctx: Context, job: Job, dirs: list) -> tuple[Surface | Curve, bool]:
    """Stream ``job.spec``'s grid to the front end; ``(result, complete)`` at the end.

    Args:
        ctx: The widget's context.
        job: The running job (cancelled within one tile).
        dirs: Its directions (from :func:`.directions.directions_for`).

    Returns:
        The result (partial, NaN where not computed, if cancelled) and whether every point
        was computed.
    """
    spec, report = job.spec, job.report
    t0 = time.perf_counter()
    stream = open_stream(ctx, job, dirs)
    info = models.view_info(dirs, stream)
    job.view = dict(info)  # before the stream is visible to a joining view's snapshot
    job.stream = stream
    dev = report.device = str(stream.evaluator.device)
    dropped = dict(getattr(stream.evaluator, "dropped", {}))
    report.emit(*stream_start(job, stream))
    last_status, done = 0.0, 0
    for tile in stream:
        if job.cancel.is_set():
            break
        done = tile.done
        report.emit(*stream_tile(job.id, tile))
        elapsed = time.perf_counter() - t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (tile.total - done) / rate if rate > 0 else None
        stage = getattr(tile, "stage", "")  # a subset pass (core/progressive.py), labelled
        report.emit(protocol.progress_message(job.id, done, tile.total, rate, eta, dev,
                                              plan_text(stream.evaluator.plan), stage))
        now = time.perf_counter()
        if now - last_status > STATUS_INTERVAL_S:
            last_status = now
            report.status(message=stage, done=done, total=tile.total, points_per_s=rate,
                          eta_s=eta)
    total = stream.total
    complete = done == total
    result = stream.result()
    result.spec.update(info)
    ctx.latest = result
    seconds = time.perf_counter() - t0
    if not complete:
        job.state = "cancelled"
        report.cancelled(done, total)
        return result, False
    job.state = "done"
    ctx.complete = (_reuse_key(spec), result)
    ev = stream.evaluator
    report.emit(protocol.done_message(job.id, seconds, stream.evaluated,
                                      stream.reused - models.outside(info),
                                      ev.nonfinite_points, stats_line(result)))
    # A curve-shape direction that fell short says so (see .shapes).
    notes = [getattr(dirs, "note", "")]
    notes += [f"no {k}: {why}" for k, why in dropped.items()]
    if ev.nonfinite_points:
        notes.insert(0, f"{ev.nonfinite_points} point(s) gave a non-finite loss")
    if getattr(ev.plan, "vmap_error", ""):
        notes.append("computed point by point: the model cannot run under vmap")
    report.status("done", "; ".join(n for n in notes if n), done=total, total=total,
                  points_per_s=total / seconds if seconds > 0 else 0.0, eta_s=0.0)
    return result, True
