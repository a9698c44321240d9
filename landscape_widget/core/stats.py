"""Numbers that tell a "convex" landscape from a "chaotic" one (Li et al. 2018's figures).

Li et al. show that without skip connections the loss surface of a deep network turns
from a single wide bowl into a chaotic field of ridges and pits; these statistics put that
into numbers, each computed from a :class:`~landscape_widget.Surface` (a loss grid) or a
:class:`~landscape_widget.CurvatureMap`:

- :func:`nonconvex_fraction`: the fraction of the plane with significant negative
  curvature, ``lambda_min < 0`` and ``|lambda_min / lambda_max| > threshold`` (the paper's
  eigenvalue-ratio map, from a curvature map; or the same test on the surface's own 2x2
  Hessian, by finite differences, which needs no Hessian-vector products);
- :func:`count_minima`: the number of strict local minima of the grid;
- :func:`roughness`: the mean total variation of the grid lines over their range (1 for a
  monotone surface, 2 for a bowl, more the more the surface goes up and down);
- :func:`basin_radius`: how far from ``theta`` the loss first rises by ``rise`` along each
  of the four axis directions.

:func:`landscape_stats` (and :meth:`Surface.stats`) gathers them in a :class:`LandscapeStats`.
Arrays are ``(ny, nx)`` with rows = y, as in :class:`~landscape_widget.Surface`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_THRESHOLD = 0.1
"""|lambda_min / lambda_max| above which a point counts as non-convex (the paper's colour
scale runs from 0, "convex", to 0.5)."""
DEFAULT_RISE = 0.5
"""Loss increase that ends the basin in :func:`basin_radius` (one contour step, 0.5, of
loss-landscape's plots)."""


def _grid(z, name: str = "z") -> np.ndarray:
    arr = np.asarray(z, dtype=np.float64)
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ValueError(f"{name} must be a 2D (ny, nx) array, got shape {arr.shape}.")
    return arr


def _coords(c, n: int, name: str) -> np.ndarray:
    arr = np.asarray(c, dtype=np.float64).reshape(-1)
    if arr.size != n:
        raise ValueError(f"{name} has {arr.size} coordinates for {n} grid columns/rows.")
    d = np.diff(arr)
    if n > 1 and not ((d > 0).all() or (d < 0).all()):
        raise ValueError(f"{name} must be strictly increasing (or strictly decreasing).")
    return arr


def _increasing(x, y, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The grid with each strictly decreasing axis reversed (``z`` with it).

    ``compute_surface(..., x=(1, -1, n))`` is a valid range whose coordinates run down; no
    statistic depends on the order the points are stored in, and ``"+x"`` of
    :func:`basin_radius` stays the direction of increasing ``x``.

    Returns:
        ``(x, y, z)`` as float arrays, coordinates increasing where they were decreasing.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.size > 1 and (np.diff(x) < 0).all():
        x, z = x[::-1], z[:, ::-1]
    if y.size > 1 and (np.diff(y) < 0).all():
        y, z = y[::-1], z[::-1]
    return x, y, z


def surface_curvature(x, y, z) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues of the 2x2 Hessian of the surface, by central differences.

    At each interior point, ``h_xx``, ``h_yy`` and ``h_xy`` are the second central
    differences of ``z`` (exact for quadratics, on uneven spacing too for ``h_xx`` and
    ``h_yy``; ``h_xy`` uses the four diagonal neighbours). Border points are NaN.

    Args:
        x: ``(nx,)`` increasing coordinates.
        y: ``(ny,)`` increasing coordinates.
        z: ``(ny, nx)`` values, rows = y.

    Returns:
        ``(lambda_max, lambda_min)``, two ``(ny, nx)`` arrays.

    Example:
        >>> x = np.linspace(-1, 1, 5)
        >>> hi, lo = surface_curvature(x, x, x[None, :] ** 2 - 3 * x[:, None] ** 2)
        >>> float(hi[2, 2]), float(lo[2, 2])
        (2.0, -6.0)
    """
    z = _grid(z)
    ny, nx = z.shape
    x, y = _coords(x, nx, "x"), _coords(y, ny, "y")
    if (x.size > 1 and x[0] > x[-1]) or (y.size > 1 and y[0] > y[-1]):
        # A descending axis: the eigenvalues of the grid sorted upwards, put back in the
        # caller's order.
        (hi, lo), fx, fy = surface_curvature(*_increasing(x, y, z)), x[0] > x[-1], y[0] > y[-1]
        return tuple(a[::-1 if fy else 1, ::-1 if fx else 1] for a in (hi, lo))
    hi = np.full(z.shape, np.nan)
    lo = np.full(z.shape, np.nan)
    if nx < 3 or ny < 3:
        return hi, lo
    hl, hr = np.diff(x)[:-1], np.diff(x)[1:]  # spacing to the left / right of x[1:-1]
    hd, hu = np.diff(y)[:-1], np.diff(y)[1:]
    c = z[1:-1, 1:-1]
    hxx = 2 * ((z[1:-1, 2:] - c) / hr - (c - z[1:-1, :-2]) / hl) / (hl + hr)
    hyy = 2 * (((z[2:, 1:-1] - c) / hu[:, None] - (c - z[:-2, 1:-1]) / hd[:, None])
               / (hd + hu)[:, None])
    hxy = ((z[2:, 2:] - z[2:, :-2] - z[:-2, 2:] + z[:-2, :-2])
           / ((hl + hr)[None, :] * (hd + hu)[:, None]))
    mean = (hxx + hyy) / 2
    rad = np.sqrt(((hxx - hyy) / 2) ** 2 + hxy**2)
    hi[1:-1, 1:-1] = mean + rad
    lo[1:-1, 1:-1] = mean - rad
    return hi, lo


def nonconvex_fraction(result, threshold: float = DEFAULT_THRESHOLD) -> float:
    """Fraction of the plane with significant negative curvature (Li et al.'s measure).

    This is the share of the paper's ``|lambda_min / lambda_max|`` map that is not dark
    (above ``threshold``), counting only negative ``lambda_min``: a point where the Hessian
    is positive definite is convex whatever the ratio.

    A point is non-convex when ``lambda_min < 0`` and either ``lambda_max <= 0`` (concave
    in every direction) or ``|lambda_min| > threshold * lambda_max``. The fraction
    is over the points where both eigenvalues are finite.

    - From a :class:`~landscape_widget.CurvatureMap`: the extreme eigenvalues of the full
      Hessian at each point, the paper's ``|lambda_min / lambda_max|`` map.
    - From a :class:`~landscape_widget.Surface` (or a ``(x, y, z)`` triple): the eigenvalues
      of the plotted surface's own 2x2 Hessian (:func:`surface_curvature`, interior points).
      This sees only the curvature within the plane; as the paper argues, negative
      curvature there implies negative curvature of the full Hessian, not the reverse.

    Args:
        result: A ``CurvatureMap``, a ``Surface`` or an ``(x, y, z)`` triple.
        threshold: The ratio above which negative curvature counts (``>= 0``).

    Returns:
        A number in [0, 1] (NaN when no point has finite eigenvalues).

    Raises:
        ValueError: If ``threshold`` is negative or the input has no loss grid.

    Example:
        >>> x = np.linspace(-1, 1, 11)
        >>> bowl = x[None, :] ** 2 + x[:, None] ** 2
        >>> saddle = x[None, :] ** 2 - 0.5 * x[:, None] ** 2
        >>> nonconvex_fraction((x, x, bowl)), nonconvex_fraction((x, x, saddle))
        (0.0, 1.0)
        >>> nonconvex_fraction((x, x, saddle), threshold=0.6)  # |-1 / 2| = 0.5 < 0.6
        0.0
    """
    if isinstance(threshold, bool) or not np.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}.")
    if hasattr(result, "lambda_min") and hasattr(result, "lambda_max"):
        hi = np.asarray(result.lambda_max, dtype=np.float64)
        lo = np.asarray(result.lambda_min, dtype=np.float64)
    else:
        x, y, z = _xyz(result)
        hi, lo = surface_curvature(x, y, z)
    ok = np.isfinite(hi) & np.isfinite(lo)
    if not ok.any():
        return float("nan")
    hi, lo = hi[ok], lo[ok]
    bad = (lo < 0) & ((hi <= 0) | (np.abs(lo) > threshold * hi))
    return float(bad.mean())


def count_minima(z, *, border: bool = True, tol: float = 0.0) -> int:
    """Number of strict local minima of a grid.

    A point is a local minimum when its value is below every one of its (up to 8)
    neighbours on the grid by more than ``tol``; points next to a NaN never count.

    Args:
        z: ``(ny, nx)`` values (a ``Surface``'s loss), or a ``Surface``.
        border: Count points on the grid's edge too (compared with the neighbours that
            exist). ``False`` counts interior points only, whose minima are not artefacts
            of where the window was cut.
        tol: Margin by which a minimum must be lower than all its neighbours (``>= 0``);
            a small positive value ignores float rounding on flat floors.

    Returns:
        The count.

    Raises:
        ValueError: If ``tol`` is negative or not finite, or ``z`` is not a 2-D grid.

    Example:
        >>> t = np.linspace(0, 4 * np.pi, 41)  # cos(x) + cos(y): minima at (pi|3pi, pi|3pi)
        >>> count_minima(np.cos(t)[None, :] + np.cos(t)[:, None])
        4
    """
    if hasattr(z, "loss") and hasattr(z, "x"):
        z = z.values("loss")
    z = _grid(z)
    if tol < 0 or not np.isfinite(tol):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}.")
    ny, nx = z.shape
    pad = np.pad(z, 1, constant_values=np.inf)
    is_min = np.isfinite(z)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == dx == 0:
                continue
            nb = pad[1 + dy:1 + dy + ny, 1 + dx:1 + dx + nx]
            # NaN neighbours fail the comparison, so a point next to one never counts.
            is_min &= z < nb - tol
    if not border:
        is_min[0, :] = is_min[-1, :] = is_min[:, 0] = is_min[:, -1] = False
    if nx == 1 and ny == 1:
        return 0
    return int(is_min.sum())


def roughness(z) -> float:
    """Mean total variation of the grid lines, each over its own range.

    For every row and every column of the grid, ``sum |z[k+1] - z[k]| / (max - min)``: 1
    for a line that only rises or only falls, 2 for one that falls to a single minimum
    and rises again to its starting height, ``m`` for a line that sweeps its range ``m``
    times; lines that are constant count as 1. The mean over all rows and columns is
    scale-free (the same for ``a * z + b``). Lines holding a NaN are left out.

    Args:
        z: ``(ny, nx)`` values or a ``Surface``.

    Returns:
        ``>= 1`` (NaN when no line is finite).

    Example:
        >>> x = np.linspace(-1, 1, 21)
        >>> roughness(x[None, :] ** 2 + x[:, None] ** 2), roughness(x[None, :] + x[:, None])
        (2.0, 1.0)
        >>> t = np.linspace(0, 4 * np.pi, 41)
        >>> round(roughness(np.cos(t)[None, :] + np.cos(t)[:, None]), 12)
        4.0
    """
    if hasattr(z, "loss") and hasattr(z, "x"):
        z = z.values("loss")
    z = _grid(z)
    ratios = []
    for lines in (z, z.T):
        for line in lines:
            if line.size < 2 or not np.isfinite(line).all():
                continue
            span = line.max() - line.min()
            ratios.append(1.0 if span == 0 else float(np.abs(np.diff(line)).sum() / span))
    return float(np.mean(ratios)) if ratios else float("nan")


def basin_radius(x, y, z, rise: float = DEFAULT_RISE) -> dict[str, float]:
    """Distance from ``theta`` at which the loss first rises by ``rise``, along each axis.

    Starting at the grid point ``(0, 0)`` (``theta``), walk along ``+x``, ``-x``, ``+y`` and
    ``-y``; the radius is where ``z`` first reaches ``z(0, 0) + rise``, linearly
    interpolated between the two grid points that bracket the crossing. ``inf`` when the
    loss stays below it to the edge of the grid (the basin is wider than the window); a
    NaN on the way also ends the walk with ``inf``'s meaning unknown, reported as NaN.

    Args:
        x: ``(nx,)`` coordinates; must contain 0 (an odd number of points on a symmetric
            range does).
        y: ``(ny,)`` coordinates; must contain 0.
        z: ``(ny, nx)`` values, rows = y.
        rise: The loss increase that ends the basin (``> 0``).

    Returns:
        ``{"+x": r, "-x": r, "+y": r, "-y": r, "min": ..., "mean": ...}`` in the units of
        the coordinates (``mean`` is ``inf`` if any radius is).

    Raises:
        ValueError: If 0 is not a grid coordinate, ``z(0, 0)`` is not finite, or ``rise``
            is not positive.

    Example:
        >>> t = np.linspace(-1, 1, 201)  # x^2 + 4 y^2 reaches 0.25 at x = 0.5, y = 0.25
        >>> r = basin_radius(t, t, t[None, :] ** 2 + 4 * t[:, None] ** 2, rise=0.25)
        >>> [round(r[k], 4) for k in ("+x", "-x", "+y", "-y")]
        [0.5, 0.5, 0.25, 0.25]
    """
    x, y, z = _increasing(x, y, _grid(z))
    ny, nx = z.shape
    x, y = _coords(x, nx, "x"), _coords(y, ny, "y")
    if isinstance(rise, bool) or not np.isfinite(rise) or rise <= 0:
        raise ValueError(f"rise must be a positive number, got {rise!r}.")
    ix, iy = _origin(x, "x"), _origin(y, "y")
    z0 = z[iy, ix]
    if not np.isfinite(z0):
        raise ValueError(f"the loss at theta (0, 0) is {z0}; the basin is undefined there.")
    level = z0 + rise
    out = {
        "+x": _walk(x[ix:], z[iy, ix:], level),
        "-x": _walk(-x[ix::-1], z[iy, ix::-1], level),
        "+y": _walk(y[iy:], z[iy:, ix], level),
        "-y": _walk(-y[iy::-1], z[iy::-1, ix], level),
    }
    radii = np.array(list(out.values()))
    out["min"] = float("nan") if np.isnan(radii).all() else float(np.nanmin(radii))
    out["mean"] = float(radii.mean())
    return out


def _origin(c: np.ndarray, name: str) -> int:
    i = int(np.argmin(np.abs(c)))
    span = float(c[-1] - c[0]) if c.size > 1 else 1.0
    if abs(c[i]) > 1e-9 * max(span, 1e-300):
        raise ValueError(f"{name} has no grid point at 0 (theta); use a range with an odd "
                         "number of points around 0, e.g. (-1, 1, 21).")
    return i


def _walk(r: np.ndarray, line: np.ndarray, level: float) -> float:
    for k in range(1, r.size):
        v = line[k]
        if not np.isfinite(v):
            return float("nan")
        if v >= level:
            a, b = line[k - 1], v
            return float(r[k - 1] + (level - a) / (b - a) * (r[k] - r[k - 1]))
    return float("inf")


def _xyz(result) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if hasattr(result, "values") and hasattr(result, "x") and hasattr(result, "y"):
        return np.asarray(result.x), np.asarray(result.y), result.values("loss")
    if isinstance(result, tuple | list) and len(result) == 3:
        return result[0], result[1], result[2]
    raise ValueError("expected a Surface, a CurvatureMap or an (x, y, z) triple, got "
                     f"{type(result).__name__}.")


@dataclass(frozen=True)
class LandscapeStats:
    """The statistics of one surface (see the module docstring for each definition).

    Attributes:
        nonconvex_fraction: From the surface's 2x2 Hessian (or the curvature map if one was
            given), with ``threshold``.
        minima: Strict local minima of the grid (border included).
        interior_minima: Strict local minima away from the grid's edge.
        roughness: Mean total variation over range of the grid lines.
        basin_radius: Mean of the four axis radii (``inf`` if any leaves the window; NaN
            if theta, ``(0, 0)``, is not a grid point or its loss is not finite).
        basin_radius_min: The smallest of the four (NaN likewise).
        threshold: The ratio threshold used.
        rise: The loss rise used for the basin.
    """

    nonconvex_fraction: float
    minima: int
    interior_minima: int
    roughness: float
    basin_radius: float
    basin_radius_min: float
    threshold: float
    rise: float

    def as_dict(self) -> dict:
        """The fields as a plain dict."""
        return asdict(self)

    def summary(self) -> str:
        """One line for a status bar or a table cell."""
        return (f"non-convex {self.nonconvex_fraction:.0%} · minima {self.minima} · "
                f"roughness {self.roughness:.2f} · basin r {self.basin_radius:.3g}")


def landscape_stats(surface, curvature=None, *, threshold: float = DEFAULT_THRESHOLD,
                    rise: float = DEFAULT_RISE, tol: float = 0.0) -> LandscapeStats:
    """All statistics of a loss surface (see :class:`LandscapeStats`).

    Args:
        surface: A :class:`~landscape_widget.Surface` with a loss grid.
        curvature: Optional :class:`~landscape_widget.CurvatureMap` of the same plane; if
            given, ``nonconvex_fraction`` uses its full-Hessian eigenvalues.
        threshold: See :func:`nonconvex_fraction`.
        rise: See :func:`basin_radius`.
        tol: See :func:`count_minima`.

    Returns:
        A :class:`LandscapeStats`.
    """
    x, y, z = _xyz(surface)
    try:
        radii = basin_radius(x, y, z, rise)
    except ValueError:
        # theta is not a grid point (an off-centre range) or its loss is not finite: the
        # basin is not measured, and says so with NaN; the other statistics still hold.
        radii = {"mean": float("nan"), "min": float("nan")}
    return LandscapeStats(
        nonconvex_fraction=nonconvex_fraction(curvature if curvature is not None
                                              else (x, y, z), threshold),
        minima=count_minima(z, tol=tol),
        interior_minima=count_minima(z, border=False, tol=tol),
        roughness=roughness(z),
        basin_radius=radii["mean"],
        basin_radius_min=radii["min"],
        threshold=float(threshold),
        rise=float(rise),
    )
