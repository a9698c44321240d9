"""What the compare panel sends: the ``compare_result`` trait and its notes.

One surface per model (see :mod:`.compare`): the shared colour range, each model's loss as
float32 bytes, its landscape statistics, and a note where its loss is not finite (the
model and the cause), which also joins the panel's status.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from ..core.stats import landscape_stats
from ..core.surface import Surface
from .protocol import Spec, f32, short


def shared_range(surfaces: Mapping[str, Surface]) -> tuple[float, float] | None:
    """``(zmin, zmax)`` of the loss over every finite point of ``surfaces`` (``None`` if none)."""
    finite = [s.loss[np.isfinite(s.loss)] for s in surfaces.values() if s.loss is not None]
    finite = [f for f in finite if f.size]
    if not finite:
        return None
    return float(min(f.min() for f in finite)), float(max(f.max() for f in finite))


def _json_number(v):
    # JSON has no inf or NaN: an infinite basin radius (the loss never rose by `rise`
    # inside the window) is the text "inf", an unmeasured one (NaN) is None.
    if not isinstance(v, float) or np.isfinite(v):
        return v
    return None if np.isnan(v) else ("inf" if v > 0 else "-inf")


def stats_row(surface: Surface, note: str = "") -> dict:
    """The statistics of one surface, JSON-ready, plus its one-line ``summary``.

    Returns:
        ``{statistic: value}`` and ``"summary"``; ``note`` (non-finite points, see
        :func:`nonfinite_note`) joins the summary, or replaces it when no point is finite
        (the statistics are all NaN then).
    """
    stats = landscape_stats(surface)
    row = {k: _json_number(v) for k, v in stats.as_dict().items()}
    finite = surface.loss is not None and np.isfinite(surface.loss).any()
    row["summary"] = note if note and not finite else "; ".join(
        t for t in (stats.summary(), note) if t)
    return row


def nonfinite_note(name: str, model: nn.Module, surface: Surface) -> str:
    """What the panel says about ``name``'s non-finite losses (``""`` if every point is finite).

    Names the model and the cause: a parameter or buffer that already holds NaN/inf (every
    point is then NaN), else a loss that is not finite anywhere on the grid (the model's
    outputs or the loss overflow on this data), else the points where it diverges.

    Returns:
        One sentence, or ``""``.
    """
    loss = surface.loss
    if loss is None:
        return ""
    bad = int((~np.isfinite(loss)).sum())
    if not bad:
        return ""
    if bad < loss.size:
        return (f"{name}: {bad} of {loss.size} points gave a non-finite loss (kept as gaps: the "
                "model diverges there; shrink the range to look closer)")
    broken = nonfinite_tensors(model)
    if broken:
        return f"{name}: no finite loss anywhere: the model's own {broken} holds NaN/inf"
    return (f"{name}: no finite loss at any of the {loss.size} points: the model's outputs or "
            "the loss are NaN/inf on this data (check model(inputs) and loss_fn at its own "
            "weights)")


def nonfinite_tensors(model: nn.Module) -> str:
    """The first parameter or buffer of ``model`` holding NaN/inf, quoted (``""`` if none)."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    broken = [k for k, v in tensors if v.is_floating_point() and not torch.isfinite(v).all()]
    more = f" (and {len(broken) - 1} more tensors)" if len(broken) > 1 else ""
    return f"{short(broken[0], 60)}{more}" if broken else ""


def encode_compare(job_id: str, names: tuple[str, ...], surfaces: Mapping[str, Surface],
                   spec: Spec, complete: bool, notes: Mapping[str, str] | None = None) -> dict:
    """The ``compare_result`` trait: shared axes and range, per-model loss bytes and stats.

    Returns:
        The trait's dict; ``notes`` (name -> text, from :func:`nonfinite_note`) are kept as
        ``"notes"`` and join each model's ``summary``; ``"precision"`` is what each
        surface was computed in.
    """
    notes = {n: v for n, v in (notes or {}).items() if v}
    first = next(iter(surfaces.values()), None)
    zrange = shared_range(surfaces)
    return {
        "id": job_id,
        "names": list(names),
        "computed": [n for n in names if n in surfaces],
        "x": None if first is None else bytes(f32(first.x)),
        "y": None if first is None else bytes(f32(first.y)),
        "shape": [] if first is None else list(first.loss.shape),
        "loss": {n: bytes(f32(s.loss)) for n, s in surfaces.items()},
        "zmin": None if zrange is None else zrange[0],
        "zmax": None if zrange is None else zrange[1],
        "stats": {n: stats_row(s, notes.get(n, "")) for n, s in surfaces.items()},
        "notes": notes,
        "precision": {n: s.spec.get("precision", "fp32") for n, s in surfaces.items()},
        "norm": spec.norm if spec.direction == "random" else "filter",
        "seed": spec.seed,
        "complete": bool(complete),
    }


__all__ = ["shared_range", "stats_row", "nonfinite_note", "nonfinite_tensors", "encode_compare"]
