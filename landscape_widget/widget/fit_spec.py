"""What a pattern-fit request may ask for: :class:`FitSpec`, validated by :func:`parse_fit_spec`.

A leaf of ``widget/`` (it imports only :mod:`.spec`'s error and quoting helpers), so the
message table of :mod:`.protocol` can parse ``fit`` messages without importing the fit
runner (:mod:`.patterns`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ..experiments.masks import MAX_CELLS, MIN_CELLS
from .spec import ProtocolError, short

FIT_FIELDS = {"mask": list, "steps": int, "lr": float, "tau": float, "cells_per_step": int,
              "batch_size": int, "seed": int, "every": int, "resume": bool}
LIMITS = {"steps": (1, 100_000), "cells_per_step": (1, 4096), "batch_size": (1, 1 << 16),
          "seed": (0, 2**31 - 1), "every": (1, 10_000), "lr": (1e-7, 1.0), "tau": (1e-3, 100.0)}


@dataclass(frozen=True)
class FitSpec:
    """A validated fit request."""

    mask: tuple[tuple[int, ...], ...]
    steps: int = 300
    lr: float = 3e-3
    tau: float = 2.5
    cells_per_step: int = 50
    batch_size: int = 256
    seed: int = 0
    every: int = 10
    resume: bool = False

    @property
    def binary(self) -> np.ndarray:
        """The mask as a ``uint8`` array."""
        return np.array(self.mask, dtype=np.uint8)


def parse_fit_spec(raw) -> FitSpec:
    """Validate the ``spec`` of a fit message; raises :class:`ProtocolError`.

    Returns:
        A :class:`FitSpec` with the checked values (floats as ``float``) and the mask as a binary
        array.

    Raises:
        ProtocolError: (a ValueError) If ``raw`` is not a dict, has unknown or missing fields, a
            field of the wrong type or outside its :data:`LIMITS`, or a mask that is not a rectangle
            of 0/1 cells of allowed size.

    Example:
        >>> parse_fit_spec({"mask": [[1, 0], [0, 1]], "steps": 5, "lr": 0.003, "tau": 2.5,
        ...     "cells_per_step": 50, "batch_size": 256, "seed": 0, "every": 5,
        ...     "resume": False}).binary.tolist()
        [[1, 0], [0, 1]]
    """
    if not isinstance(raw, dict):
        raise ProtocolError(f"fit spec must be an object, got {type(raw).__name__}.")
    unknown = sorted(str(k)[:40] for k in raw if k not in FIT_FIELDS)[:10]
    if unknown:
        raise ProtocolError(f"fit spec has unknown fields {unknown}; "
                            f"allowed: {sorted(FIT_FIELDS)}.")
    missing = sorted(set(FIT_FIELDS) - set(raw))
    if missing:
        raise ProtocolError(f"fit spec is missing fields {missing}.")
    values = {}
    for key, typ in FIT_FIELDS.items():
        v = raw[key]
        if typ is float:
            ok = isinstance(v, int | float) and not isinstance(v, bool) and abs(v) < 1e300 \
                and math.isfinite(v)
        elif typ is int:
            ok = isinstance(v, int) and not isinstance(v, bool)
        else:
            ok = isinstance(v, typ)
        if not ok:
            raise ProtocolError(f"fit spec.{key} must be of type {typ.__name__}, got {short(v)}.")
        if key in LIMITS and not LIMITS[key][0] <= v <= LIMITS[key][1]:
            raise ProtocolError(f"fit spec.{key}={short(v)} is outside {list(LIMITS[key])}.")
        values[key] = float(v) if typ is float else v
    values["mask"] = check_mask(raw["mask"])
    return FitSpec(**values)


def fit_schema() -> dict:
    """What the pattern editor knows of a fit: its fields' ``limits`` and ``defaults``.

    Sent in the widget's read-only ``_spec_schema`` trait (under ``"fit"``).

    Returns:
        ``{"limits": {field: [low, high]}, "defaults": {field: default}}`` for every field of
        :class:`FitSpec` but the mask.

    Example:
        >>> fit_schema()["limits"]["cells_per_step"], fit_schema()["defaults"]["steps"]
        ([1, 4096], 300)
    """
    defaults = {f.name: f.default for f in dataclasses.fields(FitSpec) if f.name != "mask"}
    return {"limits": {k: list(v) for k, v in LIMITS.items()}, "defaults": defaults}


def check_mask(rows) -> tuple[tuple[int, ...], ...]:
    """The rows of a fit mask (0/1 cells, equal lengths), checked; raises ProtocolError."""
    if not MIN_CELLS <= len(rows) <= MAX_CELLS:
        raise ProtocolError(f"fit spec.mask needs {MIN_CELLS}..{MAX_CELLS} rows, got {len(rows)}.")
    if not all(isinstance(r, list) for r in rows):
        raise ProtocolError("fit spec.mask must be a list of rows (lists of 0/1).")
    width = len(rows[0])
    if not MIN_CELLS <= width <= MAX_CELLS or any(len(r) != width for r in rows):
        raise ProtocolError(f"fit spec.mask rows must all have the same length in "
                            f"{MIN_CELLS}..{MAX_CELLS}.")
    for r in rows:
        for v in r:
            if isinstance(v, bool) or v not in (0, 1) or not isinstance(v, int):
                raise ProtocolError(f"fit spec.mask cells must be 0 or 1, got {short(v)}.")
    return tuple(tuple(r) for r in rows)


__all__ = ["FIT_FIELDS", "LIMITS", "FitSpec", "check_mask", "fit_schema", "parse_fit_spec"]
