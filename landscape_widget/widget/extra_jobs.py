"""Worker jobs beyond plain loss surfaces: trajectory-PCA and Hessian directions, curvature maps.

Kept apart from :mod:`.worker` so each file stays small. The curvature map streams through
the same ``start`` / ``tile`` / ``progress`` / ``done`` messages as a surface (the ratio
``|lambda_min / lambda_max|`` travels in the loss buffer, and ``start`` carries its
``label``), so the front end draws it with its usual code, coarse to fine.
"""

from __future__ import annotations

import time

import numpy as np

from ..core.curvature import curvature_points
from ..core.hessian import Cancelled, hessian_eigenpairs
from ..core.surface import Surface
from .protocol import f32, i32

CURVATURE_LABEL = "|λmin/λmax|"


def pca_directions(trajectory, count: int) -> list:
    """The first ``count`` PCA directions of ``trajectory`` (a PCADirections list)."""
    if trajectory is None:
        raise ValueError("PCA directions need a trajectory: LandscapeWidget(..., "
                         "trajectory=lw.Trajectory(...)).")
    dirs, _ = trajectory.pca_directions(k=2)
    return dirs if count == 2 else type(dirs)(dirs[:1], dirs.evr[:1], dirs.path[:, :1])


def hessian_directions(worker, job, count: int) -> list:
    """The top-``count`` Hessian eigenvectors at the model (cancellable with the job)."""
    dev = str(worker.device or "")
    last = [0.0]

    def progress(products: int) -> None:
        now = time.perf_counter()
        if products == 1 or now - last[0] > 0.5:
            last[0] = now
            worker._status(state="running", id=job.id, device=dev, done=0, total=0,
                           points_per_s=0.0, eta_s=None,
                           message=f"Hessian eigenvectors: {products} Hessian-vector products")

    _, vecs = hessian_eigenpairs(worker.model, worker.data, k=count, loss_fn=worker.loss_fn,
                                 device=worker.device, bn=job.spec.bn, cancel=job.cancel,
                                 tol=1e-4, on_product=progress)
    return vecs


def path_info(dirs) -> dict:
    """``path`` (the trajectory's coordinates) and axis ``labels`` for the start message."""
    path = getattr(dirs, "path", None)
    labels = getattr(dirs, "axis_labels", None)
    out = {}
    if path is not None:
        out["path"] = np.asarray(path, dtype=float).round(8).tolist()
    if labels:
        out["labels"] = list(labels)
    return out


def run_curvature(worker, job, dirs) -> None:
    """Compute the eigenvalue-ratio map of ``job.spec``'s grid, point by point."""
    spec = job.spec
    (x0, x1, nx), (y0, y1, ny) = spec.axes()
    xs, ys = np.linspace(x0, x1, nx), np.linspace(y0, y1, ny)
    dev = str(worker.device or "cpu")
    total = nx * ny
    worker._emit({"kind": "start", "id": job.id, "spec": spec.to_dict(), "shape": [ny, nx],
                  "metrics": ["loss"], "device": dev, "label": CURVATURE_LABEL,
                  **path_info(dirs)}, [f32(xs), f32(ys)])
    hi, lo = np.full((ny, nx), np.nan), np.full((ny, nx), np.nan)
    t0, done = time.perf_counter(), 0
    try:
        # The same coarse-to-fine, warm-started iterator as lw.curvature_map: equal maps.
        for pt in curvature_points(worker.model, worker.data, dirs, xs, ys, tol=1e-2,
                                   seed=spec.seed, cancel=job.cancel, loss_fn=worker.loss_fn,
                                   bn=spec.bn, device=worker.device):
            hi[pt.iy, pt.ix], lo[pt.iy, pt.ix] = pt.lambda_max, pt.lambda_min
            ratio = abs(pt.lambda_min / pt.lambda_max) if pt.lambda_max != 0 else np.nan
            done += 1
            worker._emit({"kind": "tile", "id": job.id, "level": 0, "n": 1, "done": done,
                          "total": total}, [i32([pt.flat]), f32([ratio]), f32(None)])
            rate = done / (time.perf_counter() - t0)
            worker._emit({"kind": "progress", "id": job.id, "done": done, "total": total,
                          "points_per_s": rate, "eta_s": (total - done) / rate,
                          "device": dev, "plan": "Lanczos"})
    except Cancelled:
        pass
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.abs(lo / hi)
    result = Surface(xs, ys, ratio, None, {
        "quantity": "curvature", "label": CURVATURE_LABEL, "lambda_max": hi.tolist(),
        "lambda_min": lo.tolist(), "device": dev, "direction": spec.direction})
    worker.latest = result
    seconds = time.perf_counter() - t0
    complete = done == total
    job.state = "done" if complete else "cancelled"
    if complete:
        worker._emit({"kind": "done", "id": job.id, "seconds": seconds, "evaluated": total,
                      "reused": 0, "nonfinite": int(np.isnan(ratio).sum())})
    else:
        worker._emit({"kind": "cancelled", "id": job.id, "done": done, "total": total})
    worker._status(state=job.state, id=job.id, device=dev, done=done, total=total,
                   points_per_s=done / seconds if seconds else 0.0, eta_s=0.0,
                   message="" if complete else "cancelled")
    if worker.on_result is not None:
        worker.on_result(job, result, complete)
