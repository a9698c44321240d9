"""Result objects: :class:`Surface` (2D) and :class:`Curve` (1D), with HDF5 files and plotly.

Files use tomgoldstein/loss-landscape's layout (``core/h5io.py``): ``xcoordinates``,
``ycoordinates``, ``train_loss``, ``train_acc`` (percent), ``test_loss``, ``test_acc``, with
rows = y (``Z[iy, ix]``, what its ``plot_2D.py`` contours with ``meshgrid(x, y)``), so its
scripts read our files and we read theirs. Our own metadata goes into attributes under
``landscape_widget/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import h5io

KINDS = ("contour", "heatmap", "surface")
METRIC_FIELDS = ("loss", "accuracy", "test_loss", "test_accuracy", "loss_se")


def _metric_label(metric: str) -> str:
    return metric.replace("_", " ")


def _values(obj, metric: str) -> np.ndarray:
    if metric in obj.extra_metrics:
        return obj.extra_metrics[metric]
    if metric not in METRIC_FIELDS:
        raise ValueError(f"metric must be one of {list(METRIC_FIELDS) + list(obj.extra_metrics)}"
                         f", got {metric!r}.")
    arr = getattr(obj, metric)
    if arr is None:
        why = (obj.spec.get("metrics_dropped") or {}).get(metric)
        if why:
            raise ValueError(f"metric {metric!r} was not computed: {why}.")
        hint = (f"pass test_data= to compute {metric}" if metric.startswith("test")
                else "pass samples=N to evaluate on a subset with standard errors"
                if metric == "loss_se" else f"pass metrics=(..., {metric!r})")
        raise ValueError(f"metric {metric!r} was not computed; {hint}.")
    return arr


def _fields(obj) -> dict:
    return {name: getattr(obj, name) for name in METRIC_FIELDS}


class _GridFile:
    """``save`` shared by :class:`Curve` and :class:`Surface` (a curve has no ``y``)."""

    def save(self, path: str | Path, *, overwrite: bool = False,
             missing: float = float("nan")) -> None:
        """Write an HDF5 file in loss-landscape's layout (``core/h5io.py``).

        Args:
            path: The file.
            overwrite: Replace an existing file (default False: a ``FileExistsError``
                protects it). What a loaded file held that this object does not use
                (``dir_file``, ``min_eig``, ...) is written back.
            missing: Value written where there is no value (NaN: not computed or
                non-finite). ``-1`` lets loss-landscape's ``plot_surface.py`` compute those
                points; NaN leaves them out of its plots.

        Raises:
            FileExistsError: If ``path`` exists and ``overwrite`` is false.
        """
        h5io.write_grid(path, self.x, getattr(self, "y", None), _fields(self), spec=self.spec,
                        directions=self.directions, extra=self.extra, overwrite=overwrite,
                        user_metrics=self.extra_metrics, missing=missing)


@dataclass
class Curve(_GridFile):
    """Loss (and accuracy) along one direction: ``theta + alpha * d`` for ``alpha`` in ``x``.

    Attributes:
        x: ``(n,)`` coordinates.
        loss: ``(n,)`` loss values (NaN where not computed or non-finite).
        accuracy: ``(n,)`` accuracy in [0, 1], or ``None`` if not requested.
        spec: How it was computed (ranges, loss, bn mode, seed, device, timings).
        directions: The direction as a one-element list of dicts (CPU tensors), if kept.
        test_loss, test_accuracy: The same on test data (``test_data=``), or ``None``.
        extra: What a loaded file held that this class does not use (written back by save).
        extra_metrics: ``{name: array}`` of the user's metrics (``metrics={name: fn}``).
        loss_se: ``(n,)`` standard errors of ``loss`` when it was evaluated on a random
            subset of the data (``samples=N``; see :attr:`Surface.loss_se`), else ``None``.
    """

    x: np.ndarray
    loss: np.ndarray | None
    accuracy: np.ndarray | None = None
    spec: dict = field(default_factory=dict)
    directions: list | None = None
    test_loss: np.ndarray | None = None
    test_accuracy: np.ndarray | None = None
    extra: dict = field(default_factory=dict, repr=False)
    extra_metrics: dict = field(default_factory=dict)
    loss_se: np.ndarray | None = None

    def values(self, metric: str = "loss") -> np.ndarray:
        """The ``(n,)`` array of ``metric`` (``"loss"``, ``"accuracy"``, ``"test_loss"``, ...)."""
        return _values(self, metric)

    @classmethod
    def load(cls, path: str | Path) -> Curve:
        """Read a file written by :meth:`save` or by loss-landscape (-1 entries: NaN)."""
        got = h5io.read_grid(path, METRIC_FIELDS)
        if got["y"] is not None:
            raise ValueError(f"{path} holds a 2D surface; use lw.Surface.load.")
        return cls(got["x"], *(got[k] for k in ("loss", "accuracy", "spec", "directions",
                                                "test_loss", "test_accuracy", "extra")),
                   extra_metrics=got["user_metrics"], loss_se=got["loss_se"])

    def to_plotly(self, *, log: bool = False, title: str | None = None):
        """A line plot of loss (left axis) and accuracy (right axis, if computed)."""
        import plotly.graph_objects as go

        fig = go.Figure()
        if self.loss is not None:
            fig.add_trace(go.Scatter(x=self.x, y=self.loss, name="loss", mode="lines",
                                     hovertemplate="α=%{x:.4g}<br>loss=%{y:.5g}<extra></extra>"))
        if self.accuracy is not None:
            fig.add_trace(go.Scatter(x=self.x, y=self.accuracy, name="accuracy", yaxis="y2",
                                     mode="lines", line={"dash": "dash"},
                                     hovertemplate="α=%{x:.4g}<br>acc=%{y:.4f}<extra></extra>"))
        if self.test_loss is not None:
            fig.add_trace(go.Scatter(x=self.x, y=self.test_loss, name="test loss", mode="lines",
                                     line={"dash": "dot"}))
        if self.test_accuracy is not None:
            fig.add_trace(go.Scatter(x=self.x, y=self.test_accuracy, name="test accuracy",
                                     yaxis="y2", mode="lines", line={"dash": "dashdot"}))
        fig.update_layout(
            title=title or "Loss along a direction",
            xaxis_title="α",
            yaxis={"title": "loss", "type": "log" if log else "linear"},
            yaxis2={"title": "accuracy", "overlaying": "y", "side": "right", "range": [0, 1]},
            legend={"x": 0.01, "y": 0.99},
        )
        return fig


@dataclass
class Surface(_GridFile):
    """Loss (and accuracy) on a plane ``theta + alpha * d1 + beta * d2``.

    Attributes:
        x: ``(nx,)`` alpha coordinates.
        y: ``(ny,)`` beta coordinates.
        loss: ``(ny, nx)`` values, rows = y: ``loss[iy, ix]`` is at ``(x[ix], y[iy])``.
        accuracy: ``(ny, nx)`` accuracy in [0, 1], or ``None``.
        spec: How it was computed.
        directions: ``[d1, d2]`` (CPU tensors), if kept.
        test_loss, test_accuracy: The same on test data (``test_data=``), or ``None``.
        extra: What a loaded file held that this class does not use (written back by save).
        extra_metrics: ``{name: array}`` of the user's metrics (``metrics={name: fn}``).
        loss_se: ``(ny, nx)`` standard errors of ``loss`` when it was evaluated on a random
            subset of ``n`` of the ``N`` samples (``samples=n``; ``spec["samples"]`` records
            ``n``, ``N`` and the subset's seed), else ``None``: the sample standard deviation
            of the per-sample losses over ``sqrt(n)``, times ``sqrt((N - n) / (N - 1))``
            (0 when ``n = N``); for losses weighted by counted targets, the ratio-estimator
            form of ``core/subset_se.py``. Saved as ``train_loss_se`` in the HDF5 file.
    """

    x: np.ndarray
    y: np.ndarray
    loss: np.ndarray | None
    accuracy: np.ndarray | None = None
    spec: dict = field(default_factory=dict)
    directions: list | None = None
    test_loss: np.ndarray | None = None
    test_accuracy: np.ndarray | None = None
    extra: dict = field(default_factory=dict, repr=False)
    extra_metrics: dict = field(default_factory=dict)
    loss_se: np.ndarray | None = None

    def values(self, metric: str = "loss") -> np.ndarray:
        """The ``(ny, nx)`` array of ``metric``: loss, accuracy, test_loss, test_accuracy."""
        return _values(self, metric)

    def stats(self, curvature=None, **options):
        """Chaos statistics of the loss grid (non-convex fraction, minima, roughness, basin).

        Args:
            curvature: Optional :class:`~landscape_widget.CurvatureMap` of the same plane
                (its full-Hessian eigenvalues then give the non-convex fraction).
            **options: ``threshold``, ``rise``, ``tol`` of
                :func:`~landscape_widget.core.stats.landscape_stats`.

        Returns:
            A :class:`~landscape_widget.core.stats.LandscapeStats`.
        """
        from .stats import landscape_stats

        return landscape_stats(self, curvature, **options)

    @classmethod
    def load(cls, path: str | Path) -> Surface:
        """Read a file written by :meth:`save` or by loss-landscape.

        loss-landscape's ``(len(x), len(y))`` arrays are read in the order its
        ``plot_surface.py`` filled them; its -1 ("not computed") entries become NaN, and
        such a surface can be finished with ``compute_surface(..., reuse=surface)``.

        Returns:
            A :class:`Surface` with the file's coordinates, float64 ``(ny, nx)`` arrays (NaN
            where not computed, accuracy as a fraction), spec, directions, user metrics
            and ``loss_se``; what the file holds that is not interpreted is kept in
            ``extra`` and written back by :meth:`save`.

        Raises:
            FileNotFoundError: If there is no such file.
            ValueError: If the file holds a 1D curve (no ``ycoordinates``; use
                ``lw.Curve.load``), has no ``xcoordinates``, or an array's size does not
                match the grid.
        """
        got = h5io.read_grid(path, METRIC_FIELDS)
        if got["y"] is None:
            raise ValueError(f"{path} holds a 1D curve; use lw.Curve.load.")
        return cls(got["x"], got["y"], *(got[k] for k in (
            "loss", "accuracy", "spec", "directions", "test_loss", "test_accuracy", "extra")),
                   extra_metrics=got["user_metrics"], loss_se=got["loss_se"])

    def to_vtp(self, path: str | Path, *, metric: str = "loss", log: bool = False,
               overwrite: bool = False) -> None:
        """Write a ParaView ``.vtp`` file: the surface as quads with ``metric`` as height.

        Works for any grid (non-square included). See :func:`~landscape_widget.core.vtp.write_vtp`.

        Raises:
            FileExistsError: If ``path`` exists and ``overwrite`` is false.
        """
        from .vtp import write_vtp

        write_vtp(path, self.x, self.y, self.values(metric), name=metric, log=log,
                  overwrite=overwrite)

    def to_plotly(
        self,
        kind: str = "contour",
        *,
        metric: str = "loss",
        log: bool = False,
        title: str | None = None,
        path=None,
    ):
        """A plotly figure: ``"contour"``, ``"heatmap"`` or ``"surface"`` (3D).

        Axis titles are the directions' labels when known (``"1st PC: 91.2 %"`` for PCA
        directions), else α and β.

        Args:
            kind: The view.
            metric: ``"loss"`` or ``"accuracy"``.
            log: Colour (and height) on a log10 scale.
            title: Figure title.
            path: ``(n, 2)`` coordinates to draw over the plot, e.g. a training path from
                :meth:`~landscape_widget.Trajectory.project` (start marked, end at θ).

        Returns:
            A ``plotly.graph_objects.Figure`` of ``metric`` over the grid (NaN points left as
            gaps), with θ marked at (0, 0) in the 2D views and ``path`` drawn if given.

        Raises:
            ValueError: If ``kind`` is not one of :data:`KINDS`, ``metric`` is unknown or was
                not computed for this surface, or ``path`` is not an ``(n, 2)`` array.
        """
        import plotly.graph_objects as go

        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not supported; choose one of {list(KINDS)}.")
        z = self.values(metric)
        if log:
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.log10(np.where(z > 0, z, np.nan))
        label = ("log10 " if log else "") + _metric_label(metric)
        hover = "α=%{x:.4g}<br>β=%{y:.4g}<br>" + label + "=%{z:.5g}<extra></extra>"
        common = {"x": self.x, "y": self.y, "z": z, "colorscale": "Viridis",
                  "colorbar": {"title": label}, "hovertemplate": hover}
        if kind == "contour":
            trace = go.Contour(**common, contours={"coloring": "heatmap"}, connectgaps=False)
        elif kind == "heatmap":
            trace = go.Heatmap(**common, hoverongaps=False)
        else:
            trace = go.Surface(**common)
        fig = go.Figure(trace)
        fig.update_layout(title=title or f"{_metric_label(metric)} surface", width=640, height=560)
        xlabel, ylabel = (self.spec.get("axis_labels") or ["α", "β"])[:2]
        if kind == "surface":
            fig.update_layout(scene={"xaxis_title": xlabel, "yaxis_title": ylabel,
                                     "zaxis_title": label})
        else:
            fig.update_layout(xaxis_title=xlabel, yaxis_title=ylabel)
            if path is not None:
                xy = np.asarray(path, dtype=float)
                if xy.ndim != 2 or xy.shape[1] < 2:
                    raise ValueError(f"path must be an (n, 2) array, got shape {xy.shape}.")
                fig.add_trace(go.Scatter(x=xy[:, 0], y=xy[:, 1], mode="lines+markers",
                                         name="path", line={"color": "white", "width": 2},
                                         marker={"size": 5, "color": "white",
                                                 "line": {"color": "black", "width": 1}},
                                         hovertemplate="checkpoint %{pointNumber}<extra></extra>"))
                fig.add_trace(go.Scatter(x=xy[:1, 0], y=xy[:1, 1], mode="markers", name="start",
                                         marker={"symbol": "circle-open", "size": 11,
                                                 "color": "orange", "line": {"width": 3}}))
            fig.add_trace(go.Scatter(x=[0], y=[0], mode="markers", name="θ",
                                     marker={"symbol": "x", "color": "red", "size": 9},
                                     hovertemplate="θ (the model)<extra></extra>"))
        return fig
