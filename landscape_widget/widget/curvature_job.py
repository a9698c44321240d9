"""The widget's curvature-map job: the Hessian eigenvalue ratio, streamed coarse to fine.

The map streams through the same ``start`` / ``tile`` / ``progress`` / ``done`` messages
as a surface (the ratio ``|lambda_min / lambda_max|`` travels in the loss buffer, and
``start`` carries its ``label``), so the front end draws it with its usual code. The points
come from :func:`~landscape_widget.core.curvature.curvature_points`, the coarse-to-fine,
warm-started iterator behind ``lw.curvature_map`` too, so both give equal maps. A fixed
subset of the ``samples`` control ("1k", "5k", "10k") computes the map on that subset
(the one ``lw.curvature_map(samples=N)`` draws), named in the label; "auto" and "exact"
use all data (a curvature map has no subset stages).
"""

from __future__ import annotations

import time

import numpy as np

from ..core.curvature import CurvatureMap, curvature_points
from ..core.errors import Cancelled
from ..core.subset import SUBSET_SEED, take_subset
from ..core.surface import Surface
from . import protocol
from .encode import path_info
from .grid_job import planned_samples
from .jobs import Context, Job

CURVATURE_LABEL = "|λmin/λmax|"


def run_curvature(ctx: Context, job: Job, dirs) -> tuple[Surface, bool]:
    """Compute the eigenvalue-ratio map of ``job.spec``'s grid, point by point.

    Args:
        ctx: The widget's context (model, data, loss, device).
        job: The running job (its cancel event stops the map before the next product).
        dirs: The two directions of the plane.

    Returns:
        ``(result, complete)``: the ratio map as a :class:`~landscape_widget.Surface`
        (``spec`` holds ``lambda_max`` and ``lambda_min``; NaN where not computed), and
        whether every point was computed.
    """
    spec, report = job.spec, job.report
    (x0, x1, nx), (y0, y1, ny) = spec.axes()
    xs, ys = np.linspace(x0, x1, nx), np.linspace(y0, y1, ny)
    dev = report.device = str(ctx.device or "cpu")
    total = nx * ny
    data, drawn, label = ctx.data, None, CURVATURE_LABEL
    samples = planned_samples(spec, ctx.data)
    if samples is not None:  # a fixed subset of the samples control ("auto" is exact here)
        data, population = take_subset(ctx.data, samples, SUBSET_SEED)
        drawn = {"n": samples, "of": population, "seed": SUBSET_SEED}
        label = f"{CURVATURE_LABEL} on {samples:,} of {population:,} samples"
    report.emit(*protocol.start_message(job.id, spec.to_dict(), (ny, nx), ["loss"], dev, xs, ys,
                                        label=label, **path_info(dirs)))
    hi, lo = np.full((ny, nx), np.nan), np.full((ny, nx), np.nan)
    t0, done = time.perf_counter(), 0
    try:
        for pt in curvature_points(ctx.model, data, dirs, xs, ys, tol=1e-2,
                                   seed=spec.seed, cancel=job.cancel, loss_fn=ctx.loss_fn,
                                   bn=spec.bn, device=ctx.device,
                                   # The surfaces' BatchNorm batches: the same loss's Hessian.
                                   batch_size=ctx.bn_batch_size if spec.bn == "batch" else None):
            hi[pt.iy, pt.ix], lo[pt.iy, pt.ix] = pt.lambda_max, pt.lambda_min
            done += 1
            report.emit(*protocol.tile_message(job.id, [pt.flat], [pt.ratio], None, done=done,
                                               total=total))
            rate = done / (time.perf_counter() - t0)
            report.emit(protocol.progress_message(job.id, done, total, rate,
                                                  (total - done) / rate, dev, "Lanczos"))
    except Cancelled:
        pass
    ratio = CurvatureMap(xs, ys, hi, lo).ratio  # as lw.curvature_map(...).ratio
    result = Surface(xs, ys, ratio, None, {
        "quantity": "curvature", "label": label, "lambda_max": hi.tolist(),
        "lambda_min": lo.tolist(), "device": dev, "direction": spec.direction,
        "samples": drawn})
    ctx.latest = result
    seconds = time.perf_counter() - t0
    complete = done == total
    job.state = "done" if complete else "cancelled"
    if complete:
        report.emit(protocol.done_message(job.id, seconds, total, 0,
                                          int(np.isnan(ratio).sum())))
    else:
        report.emit(protocol.cancelled_message(job.id, done, total))
    report.status(job.state, "" if complete else "cancelled", done=done, total=total,
                  points_per_s=done / seconds if seconds else 0.0, eta_s=0.0)
    return result, complete
