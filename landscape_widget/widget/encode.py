"""What the kernel sends of a grid: ``start``, ``tile``, a joining view's replay, ``result``.

The messages themselves are built by :mod:`.protocol`; this module maps a stream onto them,
with the view's extras (trajectory path, axis labels). The live stream goes out as custom
messages with float32 / int32 buffers; the finished grid goes into the widget's ``result``
trait, which a re-render, a second view or a static HTML export reads without a kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..core.landscape import TileStream
from ..core.surface import Curve, Surface
from .protocol import Message, f32, start_message, tile_message
from .shapes import curve_info

if TYPE_CHECKING:
    from .jobs import Job


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


def stream_start(job: Job, stream: TileStream) -> Message:
    """The ``start`` message of ``job``'s grid (its extras ``job.view``: labels, marks...)."""
    axes = stream.axes
    return start_message(job.id, job.spec.to_dict(), stream.shape, stream.evaluator.metrics,
                         str(stream.evaluator.device), axes[-1],
                         axes[0] if len(axes) == 2 else None,
                         metrics_dropped=dict(getattr(stream.evaluator, "dropped", {})),
                         **job.view)


def stream_tile(job_id: str, tile) -> Message:
    """The ``tile`` message of one tile of a stream."""
    return tile_message(job_id, tile.flat, tile.values.get("loss"), tile.values.get("accuracy"),
                        level=tile.level, done=tile.done, total=tile.total)


def snapshot_messages(job: Job, stream: TileStream) -> list[Message]:
    """``start`` plus one ``tile`` of every point computed so far (for a joining view)."""
    arrays = {m: a.reshape(-1).copy() for m, a in stream.arrays.items()}
    loss = arrays.get("loss")
    known = np.flatnonzero(~np.isnan(loss if loss is not None else next(iter(arrays.values()))))
    acc = arrays.get("accuracy")
    return [stream_start(job, stream),
            tile_message(job.id, known, None if loss is None else loss[known],
                         None if acc is None else acc[known], level=0, done=known.size,
                         total=stream.total)]


def encode_result(job: Job, result: Surface | Curve, complete: bool, device: str) -> dict:
    """The ``result`` trait: arrays as float32 bytes (binary buffers on the wire) + shapes."""
    def raw(a):
        return None if a is None else bytes(f32(a))

    is_surface = isinstance(result, Surface)
    return {
        "id": job.id,
        "spec": job.spec.to_dict(),
        "shape": list(result.loss.shape if result.loss is not None else result.accuracy.shape),
        "metrics": [m for m in ("loss", "accuracy") if getattr(result, m) is not None],
        "x": raw(result.x),
        "y": raw(result.y) if is_surface else None,
        "loss": raw(result.loss),
        "accuracy": raw(result.accuracy),
        "complete": bool(complete),
        "device": device,
        # Axis labels and the training path (PCA directions), the colour-bar label
        # (curvature maps): what a re-render needs besides the arrays.
        "labels": result.spec.get("labels"),
        "path": result.spec.get("path"),
        "label": result.spec.get("label"),
        # Named models to mark, and the plane through three models (see .models).
        "marks": result.spec.get("marks"),
        "plane": result.spec.get("plane"),
        # A complete 1D loss curve's shape label and extrema (see .shapes).
        "curve": curve_info(result, complete),
    }
