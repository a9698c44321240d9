"""Hessian eigenvalue-ratio maps (Li et al. 2018, PAPERS.md (a) step 6).

At every point ``theta + a d1 + b d2`` of a grid, the extreme eigenvalues of the Hessian
(parameters of dimension > 1, as loss-landscape) are found with Lanczos, and the map shows
``|lambda_min / lambda_max|``: near 0 the region is (almost) convex in every direction,
large values mean significant negative curvature that a 2D plot may hide.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .grid import parse_axis
from .hessian import Cancelled, HessianOperator, _bar, _start_vector, lanczos_extremes
from .params import Params, check_direction, parameters_of


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


def extreme_eigenvalues(op: HessianOperator, tol: float = 1e-2, seed: int = 0
                        ) -> tuple[float, float]:
    """``(lambda_max, lambda_min)`` of ``op`` by Lanczos (relative residual ``tol``)."""
    from scipy.sparse.linalg import eigsh

    v0 = _start_vector(op.size, seed)
    # One Lanczos run serves both ends; ARPACK only if it does not converge in the cap.
    found = lanczos_extremes(op.matvec, torch.from_numpy(v0), ends=("largest", "smallest"),
                             tol=tol, vectors=False)
    if found is not None:
        return float(found["largest"][0][0]), float(found["smallest"][0][0])
    lin = op.as_linear_operator()
    ncv = min(op.size, 20)
    hi = float(eigsh(lin, k=1, which="LA", tol=tol, v0=v0, ncv=ncv,
                     return_eigenvectors=False)[0])
    lo = float(eigsh(lin, k=1, which="SA", tol=tol, v0=v0, ncv=ncv,
                     return_eigenvectors=False)[0])
    return hi, lo


def curvature_map(model: nn.Module, data, directions, *, x=(-1, 1, 11), y=(-1, 1, 11),
                  tol: float = 1e-2, seed: int = 0, progress: bool = True,
                  cancel: threading.Event | None = None, **options) -> CurvatureMap:
    """``|lambda_min / lambda_max|`` of the Hessian at every point of a plane.

    Args:
        model: The model (never modified).
        data: The data the loss is averaged over.
        directions: ``(d1, d2)`` direction dicts (e.g. random, filter-normalised).
        x: ``(start, stop, num)`` along ``d1``.
        y: ``(start, stop, num)`` along ``d2``.
        tol: Relative tolerance of the eigenvalues (1e-2 as loss-landscape).
        seed: Seed of the Lanczos start vectors.
        progress: Show a tqdm bar over grid points.
        cancel: A ``threading.Event``; once set, the remaining points stay NaN.
        **options: :class:`~landscape_widget.core.hessian.HessianOperator` options
            (``loss_fn``, ``ignore``, ``bn``, ``batch_size``, ``device``).

    Returns:
        A :class:`CurvatureMap`.
    """
    if len(directions) != 2:
        raise ValueError("curvature_map needs two directions (d1, d2).")
    for i, d in enumerate(directions):
        check_direction(model, d, name=f"directions[{i}]")
    xs, ys = parse_axis(x, "x"), parse_axis(y, "y")
    base = parameters_of(model)
    hi = np.full((ys.size, xs.size), np.nan)
    lo = np.full((ys.size, xs.size), np.nan)
    bar = _bar(progress, xs.size * ys.size, "curvature")
    t0 = time.perf_counter()
    products = 0
    try:
        for iy, b in enumerate(ys):
            for ix, a in enumerate(xs):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled")
                point = _point(base, directions, float(a), float(b))
                op = HessianOperator(model, data, point=point, cancel=cancel, **options)
                hi[iy, ix], lo[iy, ix] = extreme_eigenvalues(op, tol, seed)
                products += op.products
                if bar is not None:
                    bar.update(1)
    except Cancelled:
        pass
    finally:
        if bar is not None:
            bar.close()
    spec = {"x": list(x), "y": list(y), "tol": tol, "seed": seed, "products": products,
            "seconds": time.perf_counter() - t0,
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
