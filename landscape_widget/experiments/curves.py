"""The 1D curve taxonomy of Li, Li & Zhan 2024 (arXiv 2405.12493), PAPERS.md (d) step 1.

A curve is ``f(alpha) = L(theta + alpha * d)``; ``alpha = 0`` is the model itself. The
paper names five shapes (abstract only; the definitions below are our PROPOSAL):

- ``"v-basin"``: one minimum, and theta sits at it.
- ``"v-side"``: one minimum, and theta sits on its slope (also: a monotonic curve, whose
  minimum is at or beyond the edge of the window).
- ``"w-basin"``: two minima, theta at one of them.
- ``"w-peak"``: two minima on either side of theta, which sits at the peak between them.
- ``"vvv-basin"``: three minima, theta at the middle one.
- ``"other"``: anything else (flat, four or more minima, too few finite points, ...).

Example:
    >>> import numpy as np
    >>> a = np.linspace(-1.5, 1.5, 61)
    >>> classify_curve(a, a**2).shape, str(classify_curve(a, (a - 0.8) ** 2))
    ('v-basin', 'v-side')
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

SHAPES = ("v-basin", "v-side", "w-basin", "w-peak", "vvv-basin", "other")
"""Labels :func:`classify_curve` can return."""

SHAPE_X = (-1.5, 1.5, 61)
"""The window of PAPERS.md (d) step 1, as ``compute_curve``'s ``x=(start, stop, num)``."""

_EPS = 1e-9  # grid coordinates from linspace are off by ~1e-16; thresholds get this slack
FLOOR = 1e-4
"""Level (fraction of the span) within which theta counts as on an extremum's flat floor."""


class Extremum(NamedTuple):
    """A local minimum or maximum of a curve.

    Attributes:
        alpha: Its coordinate (a grid point; the middle one of a flat stretch).
        loss: The loss there.
        prominence: How far it stands out from its surroundings (scipy's topographic
            prominence), in loss units.
        edge: It lies at an end of the window (the curve still descends into the edge,
            so the true minimum may be at or beyond it). Only minima can be at an edge.
    """

    alpha: float
    loss: float
    prominence: float
    edge: bool = False


@dataclass(frozen=True)
class CurveShape:
    """The result of :func:`classify_curve`; ``str(result)`` is the label.

    Attributes:
        shape: One of :data:`SHAPES`.
        minima: The significant local minima, by increasing ``alpha``.
        maxima: The significant interior local maxima, by increasing ``alpha``.
        theta_loss: ``f(0)``, the loss of the model itself (interpolated if 0 is not a
            grid point; NaN if it cannot be).
        span: ``max(f) - min(f)`` over the finite points.
        dropped: Number of non-finite points left out.
        reason: A short explanation of the label.
    """

    shape: str
    minima: tuple[Extremum, ...]
    maxima: tuple[Extremum, ...]
    theta_loss: float
    span: float
    dropped: int
    reason: str

    def __str__(self) -> str:
        """The label, e.g. ``"w-peak"``."""
        return self.shape


def _prominences(g: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Topographic prominences of the peaks ``idx`` of ``g``, with exact ties broken.

    scipy walks from a peak to the first *strictly* higher one, so two peaks of exactly
    equal height each reach the window's ends and both look as prominent as the highest
    peak; a difference of 1e-12 would leave one of them at the depth of the col between.
    Tied peaks are ordered by position by a relative 1e-12 nudge, so ties count as that.

    Returns:
        One prominence per index in ``idx`` (the peak's height above the higher of its two bases,
        scipy's definition), an empty array when ``idx`` is empty.
    """
    from scipy.signal import peak_prominences

    if not idx.size:
        return np.zeros(0)
    values = g[idx]
    nudge = 1e-12 * max(1.0, float(np.abs(g).max()))
    g = g.copy()
    for v in np.unique(values):
        tied = idx[values == v]
        g[tied] += nudge * np.arange(tied.size)
    return peak_prominences(g, idx)[0]


def _extrema(f: np.ndarray, threshold: float) -> tuple[list[tuple[int, float, bool]], list]:
    """Indices, prominences and edge flags of minima (edges allowed) and interior maxima."""
    from scipy.signal import find_peaks

    span = float(f.max() - f.min())
    # Minima are peaks of -f. A wall below everything at both ends (= loss assumed to rise
    # outside the window) lets an end point count when the curve descends into it, which
    # find_peaks alone never reports; its prominence is then the rise on the inner side.
    wall = -(float(f.max()) + span + 1.0)
    g = np.concatenate([[wall], -f, [wall]])
    idx, _ = find_peaks(g)
    prom = _prominences(g, idx)
    minima = [(int(i) - 1, float(p), i in (1, g.size - 2)) for i, p in zip(idx, prom, strict=True)
              if p > threshold]
    idx, _ = find_peaks(f)
    prom = _prominences(f, idx)
    maxima = [(int(i), float(p), False) for i, p in zip(idx, prom, strict=True) if p > threshold]
    return minima, maxima


def _as_arrays(alphas, losses) -> tuple[np.ndarray, np.ndarray]:
    if losses is None:
        if hasattr(alphas, "x") and hasattr(alphas, "loss"):  # an lw.Curve
            if alphas.loss is None:
                raise ValueError("this Curve has no loss values; compute it with 'loss' among "
                                 "its metrics.")
            alphas, losses = alphas.x, alphas.loss
        else:
            raise TypeError("classify_curve needs (alphas, losses) arrays or an lw.Curve; got "
                            f"one {type(alphas).__name__} and no losses.")
    try:
        a = np.asarray(alphas, dtype=np.float64)
        f = np.asarray(losses, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"alphas and losses must be numeric 1-D arrays: {err}") from err
    if a.ndim != 1 or f.ndim != 1 or a.shape != f.shape:
        raise ValueError(f"alphas and losses must be 1-D arrays of equal length; got shapes "
                         f"{a.shape} and {f.shape}.")
    if a.size < 3 or not np.isfinite(a).all():
        raise ValueError(f"alphas must hold at least 3 finite coordinates; got {a.size} with "
                         f"{int((~np.isfinite(a)).sum())} non-finite.")
    if not a.min() <= 0 <= a.max():
        raise ValueError(f"the curve must contain alpha = 0 (the model itself): alphas span "
                         f"[{a.min():g}, {a.max():g}]; use a window such as (-1.5, 1.5, 61).")
    order = np.argsort(a, kind="stable")
    a, f = a[order], f[order]
    if (np.diff(a) == 0).any():
        raise ValueError("alphas contain duplicates; pass each coordinate once.")
    return a, f


def classify_curve(alphas, losses=None, *, prominence: float = 0.05,
                   center: float = 0.25) -> CurveShape:
    """Label a 1D loss curve with the shape taxonomy of Li, Li & Zhan 2024.

    PROPOSAL (PAPERS.md (d) step 1, adjusted; the paper's own rule is not public):

    1. Non-finite losses are left out (``dropped`` counts them; NaN carries no shape
       information, and the evaluation engine reports diverged points as NaN). Fewer than
       3 finite points, or none on one side of ``alpha = 0``, give ``"other"``.
    2. A curve whose span ``max - min`` is below ``1e-9 * max(1, max|f|)`` is flat:
       ``"other"``.
    3. Local minima and maxima count when their topographic prominence exceeds
       ``prominence * span`` (exact ties in height are broken by position, so of two
       equal dips only one stands out by the whole depth of the curve). Minima may sit
       at an end of the window when the curve descends into it (so a monotonic curve has
       one minimum, at its low end); maxima are interior only.
    4. An extremum is *at theta* when ``|alpha| < center`` and ``|f(0) - f(extremum)|``
       is at most ``prominence * span``, or wherever it lies when ``|f(0) - f(extremum)|``
       is at most ``FLOOR * span`` (1e-4): theta on a flat floor whose grid argmin
       wandered off. PAPERS.md asks for ``|argmin| <= 0.05`` for a
       v-basin; with 1 % noise the grid argmin of ``alpha**2`` wanders to ``|alpha|`` of
       0.15 and more, so we test the level as well and keep PAPERS' 0.25 (its v-side
       bound) as the position bound, which leaves no gap between v-basin and v-side.
    5. One minimum: ``"v-basin"`` if it is at theta, else ``"v-side"`` (monotonic curves
       included: theta is on the slope of a basin whose bottom lies at or past the edge).
       Two minima: ``"w-basin"`` if one is at theta; ``"w-peak"`` if they lie on either
       side of ``alpha = 0`` with a maximum at theta between them (a cap falling to both
       edges counts, as a monotonic curve counts as a v-side). Three minima:
       ``"vvv-basin"`` if the middle one is at theta and the others lie on either side.
       Anything else: ``"other"``.

    Args:
        alphas: Coordinates (any order; must include a range around 0), or an
            :class:`~landscape_widget.Curve` (then leave ``losses`` out).
        losses: Loss at each coordinate (NaN and inf are left out).
        prominence: Significance threshold as a fraction of the curve's span; also the
            level tolerance of "at theta".
        center: Largest ``|alpha|`` (exclusive) of an extremum at theta.

    Returns:
        A :class:`CurveShape`; ``.shape`` (or ``str()``) is the label.

    Raises:
        TypeError: If the inputs are not numeric arrays (or a Curve).
        ValueError: On mismatched lengths, fewer than 3 coordinates, duplicates, a window
            without 0, or thresholds out of range.

    Example:
        >>> a = np.linspace(-1.5, 1.5, 61)
        >>> r = classify_curve(a, (a**2 - 1) ** 2)
        >>> r.shape, [round(m.alpha, 2) for m in r.minima], [m.alpha for m in r.maxima]
        ('w-peak', [-1.0, 1.0], [0.0])
    """
    if not 0 < prominence < 1:
        raise ValueError(f"prominence must be a fraction of the span in (0, 1), got "
                         f"{prominence!r}.")
    if not center > 0:
        raise ValueError(f"center must be > 0, got {center!r}.")
    a, f = _as_arrays(alphas, losses)
    finite = np.isfinite(f)
    dropped = int((~finite).sum())
    a, f = a[finite], f[finite]

    def result(shape: str, reason: str, minima=(), maxima=(), f0=np.nan, span=np.nan):
        return CurveShape(shape, tuple(minima), tuple(maxima), float(f0), float(span), dropped,
                          reason)

    if a.size < 3:
        return result("other", f"only {a.size} finite points")
    if not a[0] <= 0 <= a[-1]:
        return result("other", "no finite point on one side of alpha = 0")
    f0 = float(np.interp(0.0, a, f))
    span = float(f.max() - f.min())
    if span <= 1e-9 * max(1.0, float(np.abs(f).max())):
        return result("other", "flat curve", f0=f0, span=span)
    tol = prominence * span
    raw_min, raw_max = _extrema(f, tol)
    minima = [Extremum(float(a[i]), float(f[i]), p, e) for i, p, e in raw_min]
    maxima = [Extremum(float(a[i]), float(f[i]), p, e) for i, p, e in raw_max]

    def at_theta(e: Extremum) -> bool:
        # On a flat floor (or top) the grid argmin wanders anywhere along it: theta is at
        # the extremum when it lies on that floor, whatever the argmin's position.
        on_floor = abs(f0 - e.loss) <= FLOOR * span
        return on_floor or (abs(e.alpha) < center - _EPS and abs(f0 - e.loss) <= tol)

    def done(shape: str, reason: str) -> CurveShape:
        return result(shape, reason, minima, maxima, f0, span)

    n = len(minima)
    if n == 1:
        if at_theta(minima[0]):
            return done("v-basin", "one minimum, at theta")
        where = "at the window's edge" if minima[0].edge else f"at alpha={minima[0].alpha:.3g}"
        return done("v-side", f"one minimum, {where}; theta on its slope")
    if n == 2:
        if any(at_theta(m) for m in minima):
            return done("w-basin", "two minima, theta at one of them")
        lo, hi = minima
        peak = [m for m in maxima if lo.alpha < m.alpha < hi.alpha and at_theta(m)]
        if lo.alpha < 0 < hi.alpha and peak and f0 > max(lo.loss, hi.loss):
            return done("w-peak", "two minima on either side of theta, theta at the peak")
        return done("other", "two minima, theta at neither and not at a peak between them")
    if n == 3:
        if at_theta(minima[1]) and minima[0].alpha < 0 < minima[2].alpha:
            return done("vvv-basin", "three minima, theta at the middle one")
        return done("other", "three minima, theta not at the middle one")
    return done("other", f"{n} minima")


# --- what a shape method achieved ----------------------------------------------------------
class ShapeWarning(UserWarning):
    """A curve-shape method (mining, side, permutation) fell short of the requested shape."""


@dataclass(frozen=True)
class Attempt:
    """One try of a curve-shape method.

    Attributes:
        settings: What this try used (``seed``, ``lr``, ``at``, ...).
        achieved: The shape it reached (see :class:`ShapeOutcome`).
        reason: Why that label (the classifier's reason, or the plane criterion).
    """

    settings: dict
    achieved: str
    reason: str


class ShapeOutcome:
    """What a curve-shape method was asked for and what it achieved (mixed into its result).

    Attributes:
        requested: The shape asked for (``"w-peak"``, ``"saddle"``, ...).
        achieved: The shape reached, checked on the loss over all data: a label of
            :func:`classify_curve` on the taxonomy window :data:`SHAPE_X` for a direction,
            the plane's name or a description of what it is instead for a plane;
            ``None`` when nothing was checked (cancelled, or no data to check on).
        success: ``achieved == requested`` (``None`` when unchecked).
        reason: Why (the classifier's reason, or the plane criterion's numbers).
        curve: The :class:`CurveShape` of the returned direction (planes: of ``v``),
            or ``None``.
        attempts: Every try, in order (:class:`Attempt`).
        cancelled: The call was cancelled (the result is what it had reached).
    """

    requested: str
    achieved: str | None = None
    success: bool | None = None
    reason: str = "not checked"
    curve: CurveShape | None = None
    attempts: tuple[Attempt, ...] = ()
    cancelled: bool = False

    def _set_outcome(self, requested: str, attempts, chosen: dict | None, *,
                     cancelled: bool = False) -> None:
        self.requested, self.attempts, self.cancelled = requested, tuple(attempts), cancelled
        if chosen is not None:
            self.achieved, self.reason = chosen["achieved"], chosen["reason"]
            self.curve = chosen.get("curve")
            self.success = self.achieved == requested

    def summary(self) -> str:
        """One line: requested, achieved, attempts (for status lines and warnings)."""
        if self.cancelled:
            return f"{self.requested}: cancelled"
        if self.success is None:
            return f"{self.requested}: not checked"
        tries = f"{len(self.attempts)} attempt{'s' if len(self.attempts) != 1 else ''}"
        if self.success:
            return f"{self.requested}: achieved ({tries})"
        return (f"{self.requested}: fell short, achieved {self.achieved!r} ({self.reason}) "
                f"after {tries}")


class ShapedDirection(ShapeOutcome, dict):
    """A direction dict (keyed like ``model.named_parameters()``) with its :class:`ShapeOutcome`.

    It is a plain ``dict`` of tensors for every function that takes a direction.
    """

    def __repr__(self) -> str:
        return f"ShapedDirection({len(self)} tensors; {self.summary()})"


class ShapedPlane(ShapeOutcome, tuple):
    """A pair of directions ``(u, v)`` with its :class:`ShapeOutcome`.

    Attributes:
        ring: Wine bottle only: ``(max loss on the rings r = 0.5 and 1, L(theta))``.
    """

    ring: tuple[float, float] | None = None

    def __repr__(self) -> str:
        return f"ShapedPlane(u, v; {self.summary()})"


def warn_shortfall(result: ShapeOutcome, method: str, hint: str, stacklevel: int = 3) -> None:
    """Warn (:class:`ShapeWarning`) that ``result`` fell short of the requested shape."""
    tried = "; ".join(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in a.settings.items()) + f" -> {a.achieved}"
                      for a in result.attempts)
    warnings.warn(f"{method}(shape={result.requested!r}) fell short: it achieved "
                  f"{result.achieved!r} ({result.reason}); tried {tried}. The best attempt is "
                  f"returned; its .success is False and .achieved says what it is. {hint}",
                  ShapeWarning, stacklevel=stacklevel)
