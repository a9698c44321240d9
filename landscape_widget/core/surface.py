"""Result objects: :class:`Surface` (2D) and :class:`Curve` (1D), with HDF5 files and plotly.

Files use tomgoldstein/loss-landscape's key names (``xcoordinates``, ``ycoordinates``,
``train_loss``, ``train_acc``) so its ``plot_2D.py``/``plot_1D.py`` read them: the loss
array is stored with rows = y (``Z[iy, ix]``), which is what those scripts' ``contour(X, Y,
Z)`` with ``X, Y = meshgrid(x, y)`` expects, and accuracy is stored in percent as there.
Our own metadata goes into attributes under ``landscape_widget/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

KINDS = ("contour", "heatmap", "surface")
FORMAT_VERSION = 1


def _metric_label(metric: str) -> str:
    return {"loss": "loss", "accuracy": "accuracy"}.get(metric, metric)


def _write_common(f, spec: dict, directions) -> None:
    f.attrs["landscape_widget/format"] = FORMAT_VERSION
    f.attrs["landscape_widget/spec"] = json.dumps(spec, default=str)
    f.attrs["landscape_widget/acc_units"] = "percent"
    if directions:
        g = f.create_group("landscape_widget_directions")
        for i, d in enumerate(directions):
            gi = g.create_group(str(i))
            for k, v in d.items():
                gi.create_dataset(k, data=v.detach().cpu().numpy())


def _read_common(f):
    spec = json.loads(f.attrs.get("landscape_widget/spec", "{}"))
    directions = None
    if "landscape_widget_directions" in f:
        g = f["landscape_widget_directions"]
        directions = [
            {k: torch.from_numpy(np.asarray(g[str(i)][k])) for k in g[str(i)]}
            for i in range(len(g))
        ]
    return spec, directions


def _write_extra(f, extra: dict) -> None:
    """User metrics (``metrics={name: fn}``) go to their own group, one dataset each."""
    if extra:
        g = f.create_group("landscape_widget_metrics")
        for name, arr in extra.items():
            g.create_dataset(name, data=np.asarray(arr, dtype=np.float64))


def _read_extra(f, shape=None) -> dict:
    if "landscape_widget_metrics" not in f:
        return {}
    g = f["landscape_widget_metrics"]
    out = {k: np.asarray(g[k], dtype=np.float64) for k in g}
    return {k: v.reshape(shape) for k, v in out.items()} if shape else out


def _acc_from_file(f) -> np.ndarray | None:
    if "train_acc" not in f:
        return None
    acc = np.asarray(f["train_acc"], dtype=np.float64)
    # loss-landscape writes percent; so do we (attribute says so).
    return acc / 100.0


@dataclass
class Curve:
    """Loss (and accuracy) along one direction: ``theta + alpha * d`` for ``alpha`` in ``x``.

    Attributes:
        x: ``(n,)`` coordinates.
        loss: ``(n,)`` loss values (NaN where not computed or non-finite).
        accuracy: ``(n,)`` accuracy in [0, 1], or ``None`` if not requested.
        spec: How it was computed (ranges, loss, bn mode, seed, device, timings).
        directions: The direction as a one-element list of dicts (CPU tensors), if kept.
        extra_metrics: ``{name: (n,) array}`` of the user's metrics (``metrics={name: fn}``).
    """

    x: np.ndarray
    loss: np.ndarray | None
    accuracy: np.ndarray | None = None
    spec: dict = field(default_factory=dict)
    directions: list | None = None
    extra_metrics: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        """Write an HDF5 file that loss-landscape's ``plot_1D.py`` can read."""
        import h5py

        with h5py.File(path, "w") as f:
            f["xcoordinates"] = self.x
            if self.loss is not None:
                f["train_loss"] = self.loss
            if self.accuracy is not None:
                f["train_acc"] = self.accuracy * 100.0
            _write_common(f, self.spec, self.directions)
            _write_extra(f, self.extra_metrics)

    @classmethod
    def load(cls, path: str | Path) -> Curve:
        """Read a file written by :meth:`save` (or a loss-landscape 1D file)."""
        import h5py

        with h5py.File(path, "r") as f:
            if "ycoordinates" in f:
                raise ValueError(f"{path} holds a 2D surface; use lw.Surface.load.")
            spec, directions = _read_common(f)
            loss = np.asarray(f["train_loss"], dtype=np.float64) if "train_loss" in f else None
            return cls(np.asarray(f["xcoordinates"]), loss, _acc_from_file(f), spec, directions,
                       _read_extra(f))

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
        fig.update_layout(
            title=title or "Loss along a direction",
            xaxis_title="α",
            yaxis={"title": "loss", "type": "log" if log else "linear"},
            yaxis2={"title": "accuracy", "overlaying": "y", "side": "right", "range": [0, 1]},
            legend={"x": 0.01, "y": 0.99},
        )
        return fig


@dataclass
class Surface:
    """Loss (and accuracy) on a plane ``theta + alpha * d1 + beta * d2``.

    Attributes:
        x: ``(nx,)`` alpha coordinates.
        y: ``(ny,)`` beta coordinates.
        loss: ``(ny, nx)`` values, rows = y: ``loss[iy, ix]`` is at ``(x[ix], y[iy])``.
        accuracy: ``(ny, nx)`` accuracy in [0, 1], or ``None``.
        spec: How it was computed.
        directions: ``[d1, d2]`` (CPU tensors), if kept.
        extra_metrics: ``{name: (ny, nx) array}`` of the user's metrics.
    """

    x: np.ndarray
    y: np.ndarray
    loss: np.ndarray | None
    accuracy: np.ndarray | None = None
    spec: dict = field(default_factory=dict)
    directions: list | None = None
    extra_metrics: dict = field(default_factory=dict)

    def values(self, metric: str = "loss") -> np.ndarray:
        """The ``(ny, nx)`` array of ``metric`` ("loss", "accuracy" or a user metric's name).

        Raises:
            ValueError: If it was not computed (with the reason accuracy was left out).
        """
        arr = {"loss": self.loss, "accuracy": self.accuracy, **self.extra_metrics}.get(metric)
        if arr is None:
            why = (self.spec.get("metrics_dropped") or {}).get(metric)
            if why:
                raise ValueError(f"metric {metric!r} was not computed: {why}.")
            raise ValueError(f"metric {metric!r} was not computed; pass metrics=(..., {metric!r}).")
        return arr

    def save(self, path: str | Path) -> None:
        """Write an HDF5 file that loss-landscape's ``plot_2D.py`` can read."""
        import h5py

        with h5py.File(path, "w") as f:
            f["xcoordinates"] = self.x
            f["ycoordinates"] = self.y
            if self.loss is not None:
                f["train_loss"] = self.loss
            if self.accuracy is not None:
                f["train_acc"] = self.accuracy * 100.0
            _write_common(f, self.spec, self.directions)
            _write_extra(f, self.extra_metrics)

    @classmethod
    def load(cls, path: str | Path) -> Surface:
        """Read a file written by :meth:`save` (or a loss-landscape 2D file)."""
        import h5py

        with h5py.File(path, "r") as f:
            if "ycoordinates" not in f:
                raise ValueError(f"{path} holds a 1D curve; use lw.Curve.load.")
            spec, directions = _read_common(f)
            x = np.asarray(f["xcoordinates"])
            y = np.asarray(f["ycoordinates"])
            loss = np.asarray(f["train_loss"], dtype=np.float64) if "train_loss" in f else None
            acc = _acc_from_file(f)
            extra = _read_extra(f, (y.size, x.size))
        shape = (y.size, x.size)
        loss = None if loss is None else loss.reshape(shape)
        acc = None if acc is None else acc.reshape(shape)
        return cls(x, y, loss, acc, spec, directions, extra)

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
