"""What the kernel sends of a grid: ``tile`` messages, a joining view's replay, the ``result``.

Kept apart from :mod:`.worker` and :mod:`.widget` so each file stays small. The live stream
goes out as custom messages with float32 / int32 buffers (see :mod:`.protocol`); the
finished grid goes into the widget's ``result`` trait, which a re-render, a second view or
a static HTML export reads without a kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..core.landscape import TileStream
from ..core.surface import Curve, Surface
from .protocol import f32, i32
from .shapes import curve_info

if TYPE_CHECKING:
    from .worker import Job


def tile_message(job_id: str, tile) -> tuple[dict, list]:
    """The ``tile`` message and its ``[flat, loss, accuracy]`` buffers."""
    msg = {"kind": "tile", "id": job_id, "level": int(tile.level), "n": int(tile.flat.size),
           "done": int(tile.done), "total": int(tile.total)}
    return msg, [i32(tile.flat), f32(tile.values.get("loss")), f32(tile.values.get("accuracy"))]


def snapshot_messages(job: Job, stream: TileStream) -> list[tuple[dict, list]]:
    """``start`` plus one ``tile`` of every point computed so far (for a joining view)."""
    axes = stream.axes
    arrays = {m: a.reshape(-1).copy() for m, a in stream.arrays.items()}
    loss = arrays.get("loss")
    known = np.flatnonzero(~np.isnan(loss if loss is not None else next(iter(arrays.values()))))
    start = {"kind": "start", "id": job.id, "spec": job.spec.to_dict(),
             "shape": list(stream.shape), "metrics": list(stream.evaluator.metrics),
             "metrics_dropped": dict(getattr(stream.evaluator, "dropped", {})),
             "device": str(stream.evaluator.device), **job.view}
    tile = {"kind": "tile", "id": job.id, "level": 0, "n": int(known.size),
            "done": int(known.size), "total": stream.total}
    acc = arrays.get("accuracy")
    return [
        (start, [f32(axes[-1]), f32(axes[0] if len(axes) == 2 else None)]),
        (tile, [i32(known), f32(None if loss is None else loss[known]),
                f32(None if acc is None else acc[known])]),
    ]


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
