"""Grids, coarse-to-fine ordering and tiles.

A grid is one or two axes, ``numpy.linspace`` ranges or exact coordinates. Points are
visited coarse to fine: first the lattice of every ``2**L``-th index, anchored at the
middle index so that the centre of a symmetric odd grid (the model itself) comes first,
then every ``2**(L-1)``-th, down to every point. Each point is visited exactly once.
Points are grouped into tiles (:func:`cut_tiles`, the one place a grid is cut); a tile is
the unit that is computed, streamed and cancelled (:class:`Tile`, once computed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

MAX_AXIS_POINTS = 1025
"""Largest number of points on one axis (documented cap; 1025 = 2 * 512 + 1)."""

MAX_GRID_POINTS = 1025 * 1025
"""Largest number of points in one grid."""


def parse_axis(spec, name: str = "x") -> np.ndarray:
    """Turn ``(start, stop, num)`` into ``numpy.linspace(start, stop, num)`` with checks.

    Returns:
        The ``num`` coordinates.

    Raises:
        TypeError: If ``spec`` is not a 3-tuple of numbers.
        ValueError: If the range is not finite, ``num`` is outside ``[1, MAX_AXIS_POINTS]``,
            or ``num`` is 1 with ``start != stop`` (``stop`` would be ignored).
    """
    if isinstance(spec, np.ndarray) or not isinstance(spec, (tuple, list)) or len(spec) != 3:
        raise TypeError(
            f"{name} must be a (start, stop, num) tuple as in numpy.linspace, e.g. (-1, 1, 51); "
            f"got {spec!r}."
        )
    start, stop, num = spec
    for v, what in ((start, "start"), (stop, "stop")):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} {what} must be a number, got {v!r}.")
        if not math.isfinite(float(v)):
            raise ValueError(
                f"{name} {what} must be finite, got {v!r}; use e.g. {name}=(-1, 1, 51)."
            )
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)):
        raise TypeError(f"{name} num must be an int, got {num!r}.")
    if not 1 <= int(num) <= MAX_AXIS_POINTS:
        raise ValueError(
            f"{name} num={num} is outside [1, {MAX_AXIS_POINTS}]; use fewer points per axis "
            "(51 to 101 is typical) or zoom into a smaller range."
        )
    if int(num) > 1 and float(start) == float(stop):
        raise ValueError(f"{name} start and stop are equal ({start}); give a non-empty range.")
    if int(num) == 1 and float(start) != float(stop):
        # linspace(start, stop, 1) is [start]: stop would be ignored. The likely cause is a
        # list of three coordinates, [-1, 0, 1], read as start=-1, stop=0, num=1.
        raise ValueError(
            f"{name}={spec!r} reads as start={start}, stop={stop}, num=1: one point, at "
            f"{start}, and stop would be ignored. For one point pass ({start}, {start}, 1); "
            f"{name} is (start, stop, num), not a list of coordinates: if {list(spec)} were "
            f"coordinates, pass ({min(spec)}, {max(spec)}, 3)."
        )
    return np.linspace(float(start), float(stop), int(num))


@dataclass(frozen=True)
class ExactAxis:
    """An axis given by its coordinates, taken as they are (not a ``linspace`` range).

    E.g. exact quotients ``i / n``, so that chosen values such as 0 and 1 are grid points,
    which ``linspace`` rounding may miss.

    Attributes:
        values: The coordinates, strictly increasing or decreasing.
    """

    values: np.ndarray


def axis_values(spec, name: str = "x") -> np.ndarray:
    """An axis from ``(start, stop, num)`` (:func:`parse_axis`) or an :class:`ExactAxis`.

    Returns:
        The coordinates as a float64 array.

    Raises:
        TypeError: If ``spec`` is neither (see :func:`parse_axis`), or the coordinates of an
            ``ExactAxis`` are not a 1-D array of numbers.
        ValueError: If coordinates are not finite, not strictly monotonic, or more than
            :data:`MAX_AXIS_POINTS`; see :func:`parse_axis` for ranges.

    Example:
        >>> axis_values((0, 1, 3), "x").tolist()
        [0.0, 0.5, 1.0]
        >>> exact = axis_values(ExactAxis(np.arange(-1, 4) / 3), "x")
        >>> exact.tolist() == [i / 3 for i in range(-1, 4)]
        True
    """
    if not isinstance(spec, ExactAxis):
        return parse_axis(spec, name)
    values = np.asarray(spec.values)
    if values.ndim != 1 or values.dtype.kind not in "iuf":
        raise TypeError(f"{name} coordinates must be a 1-D array of numbers, got shape "
                        f"{values.shape} of {values.dtype}.")
    values = values.astype(np.float64)
    if not 1 <= values.size <= MAX_AXIS_POINTS:
        raise ValueError(f"{name} has {values.size} coordinates, outside [1, {MAX_AXIS_POINTS}].")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} coordinates must be finite.")
    steps = np.diff(values)
    if values.size > 1 and not ((steps > 0).all() or (steps < 0).all()):
        raise ValueError(f"{name} coordinates must be strictly increasing or decreasing.")
    return values


def axis_range(spec, values: np.ndarray) -> list:
    """``[start, stop, num]`` of an axis as recorded in a result's spec.

    A range is recorded as given; an :class:`ExactAxis` by its first, last and count.

    Returns:
        ``[start, stop, num]``.
    """
    if isinstance(spec, ExactAxis):
        return [float(values[0]), float(values[-1]), int(values.size)]
    return list(spec)


def _axis_levels(n: int) -> np.ndarray:
    """Per index, the largest L such that ``(i - c)`` is a multiple of ``2**L``."""
    c = (n - 1) // 2
    offsets = np.abs(np.arange(n) - c)
    levels = np.full(n, 63, dtype=np.int64)
    nz = offsets > 0
    # Trailing zeros of each offset: its 2-adic valuation.
    levels[nz] = np.log2(offsets[nz] & -offsets[nz]).astype(np.int64)
    return levels


def coarsest_level(shape: tuple[int, ...]) -> int:
    """The first level visited: a lattice of roughly 4 to 8 points per axis."""
    n = max(shape)
    return max(0, int(math.floor(math.log2(max(n - 1, 1)))) - 2)


def progressive_order(shape: tuple[int, ...]) -> list[tuple[int, np.ndarray]]:
    """Flat indices of a grid of ``shape`` (rows = y, columns = x) in coarse-to-fine order.

    Args:
        shape: ``(n,)`` for a curve or ``(ny, nx)`` for a surface.

    Returns:
        A list of ``(level, flat_indices)`` from the coarsest level down to level 0. Every
        flat index of the grid appears exactly once.
    """
    levels = [_axis_levels(n) for n in shape]
    if len(shape) == 1:
        point_level = levels[0]
    else:
        point_level = np.minimum.outer(levels[0], levels[1]).ravel()
    top = coarsest_level(shape)
    point_level = np.minimum(point_level, top)
    out = []
    for level in range(top, -1, -1):
        idx = np.flatnonzero(point_level == level)
        if idx.size:
            out.append((level, idx))
    return out


def cut_tiles(shape: tuple[int, ...], size: int | Callable[[], int]
              ) -> Iterator[tuple[int, np.ndarray]]:
    """The progressive order of a grid cut into tiles: ``(level, flat indices)``.

    A tile never spans two levels. Every runner cuts its tiles here (the local one and
    the executor's); they differ only in how large the next tile should be.

    Args:
        shape: ``(n,)`` for a curve or ``(ny, nx)`` for a surface.
        size: Points per tile, or a function called before each tile is cut that returns
            it (runners size tiles by the speed measured so far).

    Yields:
        ``(level, flat)``: the tile's level and at most ``size`` flat indices (row-major,
        rows = y), in the order of :func:`progressive_order`.

    Raises:
        ValueError: If a size is below 1.

    Example:
        >>> [(level, flat.tolist()) for level, flat in cut_tiles((9,), 3)]
        [(1, [0, 2, 4]), (1, [6, 8]), (0, [1, 3, 5]), (0, [7])]
    """
    for level, idx in progressive_order(shape):
        pos = 0
        while pos < idx.size:
            n = int(size() if callable(size) else size)
            if n < 1:
                raise ValueError(f"a tile needs at least one point, got a size of {n}.")
            flat = idx[pos : pos + n]
            pos += flat.size
            yield level, flat


@dataclass
class Tile:
    """A batch of finished grid points, as streamed to a progress bar or the widget.

    Attributes:
        index: Position in the stream.
        level: Coarseness (points lie on the lattice of every ``2**level``-th index).
        flat: Flat indices into the grid (row-major; rows = y for surfaces).
        values: ``{metric: array}`` aligned with ``flat``.
        evaluated: How many of these points were computed (the others were reused).
        done: Points finished so far, this tile included.
        total: Points in the whole grid.
        seconds: Wall time spent on this tile.
    """

    index: int
    level: int
    flat: np.ndarray
    values: dict[str, np.ndarray]
    evaluated: int
    done: int
    total: int
    seconds: float


def match_axis(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """For each coordinate of ``new``, the index of the same coordinate in ``old`` or -1.

    Two coordinates are the same when they differ by less than ``1e-9`` of the axis span
    (linspace rounding differs between ``n`` and ``2n - 1`` points in the last bits).

    Returns:
        An index array of ``new``'s shape.
    """
    if old.size == 0:
        return np.full(new.shape, -1)
    span = max(float(np.ptp(new)), float(np.ptp(old)), 1.0)
    pos = np.searchsorted(old, new) if old.size < 2 or old[0] <= old[-1] else None
    out = np.full(new.shape, -1)
    if pos is None:  # descending axis: fall back to a dense comparison
        diff = np.abs(new[:, None] - old[None, :])
        j = diff.argmin(axis=1)
        ok = diff[np.arange(new.size), j] <= 1e-9 * span
        out[ok] = j[ok]
        return out
    for cand in (pos - 1, pos):
        cand = np.clip(cand, 0, old.size - 1)
        ok = (np.abs(old[cand] - new) <= 1e-9 * span) & (out < 0)
        out[ok] = cand[ok]
    return out
