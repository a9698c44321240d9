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

from ..core.data import is_data_fn
from ..core.errors import AccuracyUndefined, ReuseMismatch
from ..core.landscape import TileStream, iter_tiles
from ..core.precision import NO_EFFECT
from ..core.progressive import SUBSET_CHOICES, progressive_stream, sample_stages, stage_label
from ..core.subset import SubsetError, data_size
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


def grid_data(ctx: Context):
    """The data the grid engine gets.

    Returns:
        ``ctx.grid_data``, with a local ``data_fn`` called (it is cached by the context,
        so it loads once) so that it can be subset like any data; an executor's
        ``data_fn`` stays a function, which its workers call.
    """
    if ctx.executor is None and is_data_fn(ctx.grid_data):
        return ctx.grid_data()
    return ctx.grid_data


def planned_samples(spec, data) -> int | None:
    """The subset size the final result of ``spec``'s grid is computed on (``None``: exact).

    ``"auto"`` ends exact, as does a fixed subset of data that holds no more samples;
    the plane through three models has no subset mode.

    Returns:
        The subset size of the job's last stage, or ``None`` for all data.
    """
    if spec.direction == "plane" or spec.samples not in SUBSET_CHOICES:
        return None
    try:
        population = data_size(data)
    except (SubsetError, TypeError, ValueError):
        population = None  # a data_fn on an executor's workers: they draw the subset
    return sample_stages(spec.samples, population)[-1]


def _reuse_key(spec, data, result=None) -> tuple:
    # Points of another precision are other values, and a subset's values are not the
    # exact ones (nor another subset's): never reused (the engine refuses them too). A
    # finished ``result`` is keyed by the samples it was computed on: a data_fn on an
    # executor is sized only by its workers, so a fixed subset of it may end exact.
    samples = (planned_samples(spec, data) if result is None else
               (result.spec.get("samples") or {}).get("n"))
    return (spec.direction_key(), spec.bn, spec.quantity, spec.precision, samples)


def subset_text(result) -> str:
    """``"subset 1,000 of 50,000 samples (±0.012)"`` for a subset result, else ``""``.

    The ± is the median standard error of the points (see
    :func:`~landscape_widget.core.progressive.stage_label`).

    Returns:
        The label, or the empty string for an exact result.
    """
    drawn = (getattr(result, "spec", None) or {}).get("samples")
    if not drawn:
        return ""
    return stage_label(drawn["n"], drawn.get("of"), getattr(result, "loss_se", None))


def open_stream(ctx: Context, job: Job, dirs: list) -> TileStream:
    """The tile stream of ``job.spec``, falling back where the engine refuses a request.

    A ``reuse=`` of another model or data (:class:`~landscape_widget.core.errors.ReuseMismatch`)
    computes everything again; accuracy undefined for this task
    (:class:`~landscape_widget.core.errors.AccuracyUndefined`) computes the loss alone, for
    this and every later job of the widget.

    Returns:
        The engine's tile stream for the job: the plane stream for ``direction="plane"``,
        else :func:`~landscape_widget.iter_tiles` over the job's grid, with the data
        subset stages of ``spec.samples`` (:func:`~landscape_widget.core.progressive.
        progressive_stream`: with ``"auto"``, subset stages first for large data when no
        points are reused). ``ctx.complete`` (dropped reuse) and ``ctx.metrics``
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
    data = grid_data(ctx)

    def make(reuse) -> TileStream:
        if spec.direction == "plane":
            return models.plane_stream(ctx, job)
        # The grid reused fell back to fp32 at this precision (the model fails under
        # autocast): computed in fp32 directly, so its points are reused. Asked at the
        # control's precision, the engine refused them as of another precision and every
        # resolution change computed the whole grid again (after a failing try).
        precision = (reuse.spec.get("precision", "fp32")
                     if reuse is not None and _fell_back(spec, reuse) else spec.precision)
        exact = functools.partial(
            iter_tiles, models.centre(ctx, spec), data, metrics=ctx.metrics,
            reuse=reuse, executor=ctx.executor,
            directions=dirs if spec.mode == "2d" else dirs[0], x=x, y=y,
            loss_fn=ctx.loss_fn, bn=spec.bn, device=ctx.device, seed=None,
            bn_batch_size=ctx.bn_batch_size if spec.bn == "batch" else None,
            tile_points=ctx.tile_points, cancel=job.cancel,
            evaluator_options=ctx.evaluator_options, precision=precision)
        # The samples control (core/progressive.py): "auto" runs subset passes first on
        # large data, unless points are reused (those are exact already); a fixed subset
        # is the answer (its reused points are of the same subset: the reuse key says so).
        if reuse is not None and spec.samples == "auto":
            return exact()
        staged = progressive_stream(exact, data, spec.samples,
                                    remote=ctx.executor is not None)
        return staged or exact()

    reuse = None
    if ctx.complete is not None and ctx.complete[0] == _reuse_key(spec, data):
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


def _samples_note(spec, result) -> str:
    """Why a fixed subset asked for was computed on all data instead (else ``""``)."""
    if spec.samples not in SUBSET_CHOICES or (result.spec.get("samples") or {}).get("n"):
        return ""
    if spec.direction == "plane":
        return "the plane through three models is computed on all data (no subset)"
    return (f"samples {spec.samples}: the data holds at most {SUBSET_CHOICES[spec.samples]:,} "
            "samples, so all of them were used (exact)")


def _fell_back(spec, result) -> bool:
    """Whether ``result`` fell back to fp32 from the control's precision (autocast failed).

    Not where the control's precision has no effect (tf32 on a CPU, bf16 on a float64
    model: ``effective_precision``): those results record fp32 as computed, and a call at
    the control's precision reuses them.

    Returns:
        True if ``result`` records another precision than the control's for another
        reason than that precision's lack of effect.
    """
    got = result.spec.get("precision", spec.precision)
    note = (result.spec.get("plan") or {}).get("precision_note") or ""
    return got != spec.precision and (note.startswith(f"{spec.precision} failed")
                                      or NO_EFFECT not in note)


def _precision_note(spec, result) -> str:
    """Why the grid was computed at another precision than the control's (else ``""``).

    A model that fails under autocast is computed in fp32 (core/precision.py): only a
    warning in the worker thread said so, while the control still read bf16. A precision
    with no effect here (tf32 on a CPU) computes fp32 too: the plan's note says why.

    Returns:
        The plan's note on the fallback (it names the error) or on the precision's lack of
        effect, or ``""``.
    """
    got = result.spec.get("precision", spec.precision)
    if got == spec.precision:
        return ""
    # The plan's note reads "bf16 failed (RuntimeError: ...): computed in fp32", or
    # "tf32 has no effect on a CPU: computed in fp32".
    note = (result.spec.get("plan") or {}).get("precision_note") or ""
    return note if note.startswith(f"{spec.precision} failed") or not _fell_back(
        spec, result) else f"{spec.precision} failed on this model: computed in {got}"


def run_grid(ctx: Context, job: Job, dirs: list) -> tuple[Surface | Curve, bool]:
    """Stream ``job.spec``'s grid to the front end; ``(result, complete)`` at the end.

    Args:
        ctx: The widget's context.
        job: The running job (cancelled at the next batch of a pass, once the first tile
            has chosen the plan; within the first tile, after it).
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
    ctx.complete = (_reuse_key(spec, grid_data(ctx), result), result)
    ev = stream.evaluator
    # A subset result says so where the statistics are shown (the status line).
    summary = " · ".join(filter(None, [subset_text(result), stats_line(result)]))
    report.emit(protocol.done_message(job.id, seconds, stream.evaluated,
                                      stream.reused - models.outside(info),
                                      ev.nonfinite_points, summary))
    # A curve-shape direction that fell short says so (see .shapes).
    notes = [getattr(dirs, "note", ""), _samples_note(spec, result), _precision_note(spec, result)]
    notes += [f"no {k}: {why}" for k, why in dropped.items()]
    if result.spec.get("batch_coupling"):  # its loss depends on the batching (core/coupling.py)
        notes.append(f"all {result.spec['n_samples']} samples in every pass: the model mixes "
                     "the samples of a batch")
    if ev.nonfinite_points:
        notes.insert(0, f"{ev.nonfinite_points} point(s) gave a non-finite loss")
    if getattr(ev.plan, "vmap_error", ""):
        notes.append("computed point by point: the model cannot run under vmap")
    report.status("done", "; ".join(n for n in notes if n), done=total, total=total,
                  points_per_s=total / seconds if seconds > 0 else 0.0, eta_s=0.0)
    return result, True
