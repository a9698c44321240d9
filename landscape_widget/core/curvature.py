"""Hessian eigenvalue-ratio maps (Li et al. 2018, PAPERS.md (a) step 6).

At every point ``theta + a d1 + b d2`` of a grid, the extreme eigenvalues of the Hessian
(parameters of dimension > 1, as loss-landscape) are found with Lanczos, and the map shows
``|lambda_min / lambda_max|``: near 0 the region is (almost) convex in every direction,
large values mean significant negative curvature that a 2D plot may hide.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from .errors import Cancelled
from .grid import parse_axis, progressive_order
from .heap import holding_heap
from .hessian import ARPACK_PRODUCTS, HessianOperator, _arpack, _bar
from .lanczos import extreme_pairs, max_steps
from .params import Params, check_direction, parameters_of
from .subset import resolve_seed, take_subset


@dataclass
class CurvatureMap:
    """Extreme Hessian eigenvalues on a grid; arrays are ``(ny, nx)``, rows = y.

    Attributes:
        x, y: Grid coordinates along ``d1`` and ``d2``.
        lambda_max, lambda_min: The largest and smallest eigenvalue at each point (NaN
            where not computed, e.g. after a cancel).
        spec: How it was computed.
    """

    x: np.ndarray
    y: np.ndarray
    lambda_max: np.ndarray
    lambda_min: np.ndarray
    spec: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict, repr=False)  # file content we keep (h5io.py)

    def save(self, path, *, overwrite: bool = False) -> None:
        """Write ``min_eig``/``max_eig`` as loss-landscape's ``plot_2D.py`` ratio plot reads.

        Raises:
            FileExistsError: If ``path`` exists and ``overwrite`` is false.
        """
        from .h5io import write_grid

        write_grid(path, self.x, self.y, {"lambda_min": self.lambda_min, "lambda_max":
                   self.lambda_max}, spec=self.spec, directions=None, extra=self.extra,
                   overwrite=overwrite)

    @classmethod
    def load(cls, path) -> CurvatureMap:
        """Read :meth:`save`'s file or loss-landscape's (its +1/-1 pre-fill: NaN)."""
        from .h5io import read_grid

        got = read_grid(path, ("lambda_min", "lambda_max"))
        if got["y"] is None or got["lambda_min"] is None or got["lambda_max"] is None:
            raise ValueError(f"{path} holds no 2D min_eig/max_eig maps.")
        return cls(got["x"], got["y"], got["lambda_max"], got["lambda_min"], got["spec"],
                   got["extra"])

    @property
    def ratio(self) -> np.ndarray:
        """``|lambda_min / lambda_max|`` (the paper's map)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.abs(self.lambda_min / self.lambda_max)

    @property
    def signed_ratio(self) -> np.ndarray:
        """``lambda_min / lambda_max``: negative where the curvature is of mixed sign."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.lambda_min / self.lambda_max

    def to_plotly(self, *, signed: bool = False, title: str | None = None):
        """A heatmap of the ratio (viridis on [0, 0.5] as the paper; RdBu when ``signed``)."""
        import plotly.graph_objects as go

        z = self.signed_ratio if signed else self.ratio
        label = "λmin/λmax" if signed else "|λmin/λmax|"
        trace = go.Heatmap(
            x=self.x, y=self.y, z=z, colorscale="RdBu" if signed else "Viridis",
            zmin=-0.5 if signed else 0.0, zmax=0.5, colorbar={"title": label},
            customdata=np.stack([self.lambda_min, self.lambda_max], -1),
            hovertemplate="α=%{x:.3g}<br>β=%{y:.3g}<br>" + label + "=%{z:.3g}<br>"
                          "λmin=%{customdata[0]:.3g}, λmax=%{customdata[1]:.3g}<extra></extra>")
        fig = go.Figure(trace)
        fig.update_layout(title=title or f"Hessian eigenvalue ratio {label}", xaxis_title="α",
                          yaxis_title="β", width=600, height=520)
        return fig


@dataclass
class CurvaturePoint:
    """The extreme eigenvalues at one grid point, as :func:`curvature_points` yields them.

    Attributes:
        iy, ix: Row (``y``) and column (``x``) of the point; ``flat = iy * nx + ix``.
        flat: Flat (row-major) index.
        level: Coarseness level of the point in the coarse-to-fine order.
        lambda_max, lambda_min: The largest and smallest eigenvalue.
        products: Hessian-vector products this point took.
        residual: The larger measured ``||H v - lambda v||`` of the two pairs, relative to
            ``max(|lambda_max|, |lambda_min|)``.
        converged: Whether ``residual <= tol``.
        method: How Hessian-vector products were taken (``HessianOperator.method``).
    """

    iy: int
    ix: int
    flat: int
    level: int
    lambda_max: float
    lambda_min: float
    products: int
    residual: float
    converged: bool
    method: str

    @property
    def ratio(self) -> float:
        """``|lambda_min / lambda_max|`` at this point (NaN where ``lambda_max`` is 0).

        Example:
            >>> CurvaturePoint(0, 0, 0, 0, 4.0, -1.0, 10, 0.0, True, "exact").ratio
            0.25
        """
        return abs(self.lambda_min / self.lambda_max) if self.lambda_max != 0 else float("nan")


def extreme_eigenvalues(op: HessianOperator, tol: float = 1e-2, seed: int = 0,
                        v0: Tensor | None = None) -> tuple[float, float, dict]:
    """``(lambda_max, lambda_min, info)`` of ``op`` by one Lanczos run for both ends.

    ARPACK (restarted Lanczos, warm from the best Ritz vectors) takes over only if the
    basis would outgrow memory before convergence.

    Args:
        op: The Hessian operator.
        tol: Relative residual tolerance (see :func:`~.hessian.hessian_eigenpairs`).
        seed: Seed of the start vector when ``v0`` is not given.
        v0: Start vector (a warm start), on ``op``'s device and dtype.

    Returns:
        The two eigenvalues and ``info`` with ``"vectors"`` (``(size, 2)``: the top and
        bottom Ritz vectors, float64), ``"residual"`` (relative, the larger of the two) and
        ``"converged"``.
    """
    start = op.start_vector(seed) if v0 is None else v0
    found = extreme_pairs(op.matvec, start, ends=("largest", "smallest"), tol=tol)
    (hi,), c_hi, (r_hi,) = found["largest"]
    (lo,), c_lo, (r_lo,) = found["smallest"]
    vecs = found["state"].vectors(np.concatenate([c_hi, c_lo], 1))
    res = [r_hi, r_lo]
    if not found["converged"] and not found["stalled"]:
        # The basis is full (a stall, the products' rounding floor, stops ARPACK too);
        # bounded as in hessian_eigenpairs (ARPACK's default ran for hours).
        cap = max_steps(op.size, op.dtype)
        parts = []
        for i, which in enumerate(("largest", "smallest")):
            val, vec = _arpack(op.matvec, op.size, 1, which, tol, vecs[:, i], cap,
                               max(cap, ARPACK_PRODUCTS))
            vec = vec.to(op.device)[:, 0]
            res[i] = float((op.matvec(vec) - float(val[0]) * vec).norm())
            parts.append((float(val[0]), vec))
        (hi, v_hi), (lo, v_lo) = parts
        vecs = torch.stack([v_hi, v_lo], 1)
    scale = max(abs(hi), abs(lo), 1e-300)
    residual = max(res) / scale
    return float(hi), float(lo), {"vectors": vecs, "residual": residual,
                                  "converged": residual <= tol}


def curvature_points(model: nn.Module, data, directions, xs: np.ndarray, ys: np.ndarray, *,
                     tol: float = 1e-2, seed: int = 0, cancel: threading.Event | None = None,
                     **options) -> Iterator[CurvaturePoint]:
    """The extreme Hessian eigenvalues at every point of a plane, coarse to fine.

    Points come in :func:`~.grid.progressive_order` (a coarse lattice first, then its
    refinements). One :class:`~.hessian.HessianOperator` serves every point (set-up once;
    its gradient graph is rebuilt per point), and every point after the first starts
    Lanczos warm: from the sum of the previous point's top and bottom Ritz vectors plus a
    seeded random part, which shortens both ends' convergence on smooth landscapes.

    Args:
        model: The model (never modified).
        data: The data the loss is averaged over.
        directions: ``(d1, d2)`` direction dicts.
        xs: Grid coordinates along ``d1``.
        ys: Grid coordinates along ``d2``.
        tol: Relative residual tolerance of each point's eigenpairs.
        seed: Seed of the start vectors.
        cancel: A ``threading.Event`` checked before every product.
        **options: :class:`~.hessian.HessianOperator` options.

    Yields:
        A :class:`CurvaturePoint` per grid point.

    Raises:
        Cancelled: Once ``cancel`` is set.
    """
    base = parameters_of(model)
    nx = len(xs)
    op = HessianOperator(model, data, cancel=cancel, **options)
    noise = op.start_vector(seed)
    noise = noise / noise.norm()
    warm = None
    for level, flat in progressive_order((len(ys), nx)):
        for k in flat:
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled")
            iy, ix = divmod(int(k), nx)
            op.set_point(_point(base, directions, float(xs[ix]), float(ys[iy])))
            v0 = None if warm is None else (
                warm.sum(1).to(op.dtype) + _WARM_NOISE * noise)
            before = op.products
            hi, lo, info = extreme_eigenvalues(op, tol, seed, v0)
            warm = info["vectors"]
            yield CurvaturePoint(iy, ix, int(k), int(level), hi, lo, op.products - before,
                                 info["residual"], info["converged"], op.method)


_WARM_NOISE = 0.5  # random share of a warm start: keeps it from lying in an invariant subspace


@holding_heap
def curvature_map(model: nn.Module, data, directions, *, x=(-1, 1, 11), y=(-1, 1, 11),
                  tol: float = 1e-2, seed: int = 0, progress: bool = True,
                  cancel: threading.Event | None = None, samples: int | None = None,
                  sample_seed: int | None = None, **options) -> CurvatureMap:
    """``|lambda_min / lambda_max|`` of the Hessian at every point of a plane.

    Computed by :func:`curvature_points` (coarse to fine, warm-started Lanczos).

    Args:
        model: The model (never modified).
        data: The data the loss is averaged over.
        directions: ``(d1, d2)`` direction dicts (e.g. random, filter-normalised).
        x: ``(start, stop, num)`` along ``d1``.
        y: ``(start, stop, num)`` along ``d2``.
        tol: Relative residual tolerance of the eigenpairs (1e-2 as loss-landscape).
        seed: Seed of the Lanczos start vectors.
        progress: Show a tqdm bar over grid points.
        cancel: A ``threading.Event``; once set, the remaining points stay NaN.
        samples: The Hessian of the mean loss over a random subset of this many samples
            (the subset of ``compute_surface(samples=N)``, the same for every point)
            instead of all data: each point's Lanczos runs get that much cheaper; the
            eigenvalues are those of the subset's loss, an estimate of the full data's.
            ``spec["samples"] = {"n", "of", "seed"}`` (``None`` for all data).
        sample_seed: Seed of the subset (default 0); only with ``samples``.
        **options: :class:`~landscape_widget.core.hessian.HessianOperator` options
            (``loss_fn``, ``ignore``, ``bn``, ``batch_size``, ``device``, ``method``).

    Returns:
        A :class:`CurvatureMap`; ``spec`` holds ``products``, ``method``, the largest
        relative ``residual`` and the number of points not ``converged`` (also warned).

    Raises:
        ValueError: If ``directions`` are not two directions of this model, or
            ``samples`` is not in ``[2, samples of the data]``.
        TypeError: If ``sample_seed`` is given without ``samples``.
        SubsetError: (a ``ValueError``) If ``samples`` is given for data that cannot be
            subset (see :func:`~landscape_widget.core.subset.take_subset`).
    """
    if len(directions) != 2:
        raise ValueError("curvature_map needs two directions (d1, d2).")
    sample_seed = resolve_seed(samples, sample_seed)
    drawn = None
    if samples is not None:
        data, population = take_subset(data, samples, sample_seed)
        drawn = {"n": int(samples), "of": population, "seed": sample_seed}
    for i, d in enumerate(directions):
        check_direction(model, d, name=f"directions[{i}]")
    xs, ys = parse_axis(x, "x"), parse_axis(y, "y")
    hi = np.full((ys.size, xs.size), np.nan)
    lo = np.full((ys.size, xs.size), np.nan)
    bar = _bar(progress, xs.size * ys.size, "curvature")
    t0 = time.perf_counter()
    products, worst, short, method = 0, 0.0, 0, None
    try:
        for pt in curvature_points(model, data, directions, xs, ys, tol=tol, seed=seed,
                                   cancel=cancel, **options):
            hi[pt.iy, pt.ix], lo[pt.iy, pt.ix] = pt.lambda_max, pt.lambda_min
            products += pt.products
            worst, short = max(worst, pt.residual), short + (not pt.converged)
            method = pt.method
            if bar is not None:
                bar.update(1)
    except Cancelled:
        pass
    finally:
        if bar is not None:
            bar.close()
    if short:
        warnings.warn(f"curvature_map: {short} points did not reach tol={tol:g} (largest "
                      f"relative residual {worst:.2g}).", RuntimeWarning, stacklevel=2)
    spec = {"x": list(x), "y": list(y), "tol": tol, "seed": seed, "products": products,
            "method": method, "seconds": time.perf_counter() - t0, "residual": worst,
            "not_converged": short, "samples": drawn,
            "ignore": options.get("ignore", "biasbn"), "bn": options.get("bn", "eval")}
    return CurvatureMap(xs, ys, hi, lo, spec)


def _point(base: Params, directions, a: float, b: float) -> Params:
    d1, d2 = directions
    out = {}
    for k, v in base.items():
        step = torch.zeros_like(v)
        if k in d1:
            step = step + a * d1[k].to(v.device, v.dtype)
        if k in d2:
            step = step + b * d2[k].to(v.device, v.dtype)
        out[k] = v + step
    return out
