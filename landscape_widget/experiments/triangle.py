"""The plane through three models (Im, Tao & Branson 2016, PAPERS (b) B3).

A point of the plane is ``theta(alpha, beta) = alpha * theta_1 + beta * theta_2 +
(1 - alpha - beta) * theta_3``. The paper's exact slice was not available; this is the
standard barycentric plane, sampled (PROPOSAL) on a ``1/resolution`` lattice with
``alpha, beta >= -margin`` and ``alpha + beta <= 1 + margin``, and drawn on an equilateral
triangle with the three models at its corners.

The grid goes through the same engine and progressive tiles as every surface: the evaluator's
``barycentric`` mode sums the three weight vectors from zero, so each vertex is its model bit
for bit (``theta_3 + 1 * (theta_1 - theta_3)`` would not be). BatchNorm running statistics
are combined like the weights, so in ``bn="eval"`` mode each vertex also has its own model's
statistics; outside the triangle a running variance could turn negative, and such points
come out NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..core.compute import grid_job
from ..core.evaluate import METRICS, LossFn
from ..core.fingerprints import fingerprint
from ..core.grid import ExactAxis
from ..core.heap import holding_heap
from ..core.params import (
    Params,
    check_module,
    check_same_placement,
    check_same_structure,
    float_buffers_of,
    outside_inference_mode,
    parameters_of,
)
from ..core.tile_stream import TileStream, run_stream

# Corners of the drawing: model 1 right, model 2 top, model 3 at the origin.
CORNERS = np.array([[1.0, 0.0], [0.5, math.sqrt(3) / 2], [0.0, 0.0]])


def model_point(model: nn.Module) -> Params:
    """A model's weights and floating-point buffers, as one point of a barycentric plane."""
    check_module(model)
    point = parameters_of(model)
    point.update(float_buffers_of(model))
    return point


def _check_same(models: Sequence[nn.Module], names: Sequence[str]) -> list[Params]:
    points = [model_point(m) for m in models]
    ref = {k: tuple(v.shape) for k, v in points[0].items()}
    for name, p in zip(names[1:], points[1:], strict=True):
        shapes = {k: tuple(v.shape) for k, v in p.items()}
        if shapes != ref:
            diff = sorted(set(shapes.items()) ^ set(ref.items()))[:3]
            raise ValueError(
                f"{name} does not have the architecture of {names[0]} (differences: {diff}); "
                "a plane through models needs three models of the same architecture."
            )
    for name, m in zip(names[1:], models[1:], strict=True):
        check_same_structure(models[0], m, names[0], name)
    check_same_placement(list(models), list(names))
    return points


def lattice(resolution: int, margin: float) -> np.ndarray:
    """Axis values ``i / resolution`` from ``-margin`` to ``1 + 2 * margin``.

    Written as exact quotients (not ``numpy.linspace``) so that 0 and 1 are on the axis
    exactly and the vertices are grid points.

    Returns:
        The axis values.

    Raises:
        TypeError: If ``resolution`` is not an int.
        ValueError: If ``resolution`` is outside [2, 200] or ``margin`` outside [0, 1].
    """
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        raise TypeError(f"resolution must be an int (grid steps per unit), got {resolution!r}.")
    if not 2 <= resolution <= 200:
        raise ValueError(f"resolution={resolution} is outside [2, 200]; 20 is a 0.05 grid.")
    if not (isinstance(margin, (int, float)) and 0 <= margin <= 1):
        raise ValueError(f"margin must be a number in [0, 1], got {margin!r}.")
    lo = -math.floor(margin * resolution + 1e-9)
    hi = resolution - 2 * lo
    return np.arange(lo, hi + 1) / resolution


STREAM_OPTIONS = frozenset({"tile_points", "cancel", "evaluator_options", "executor"})
"""The engine options :func:`triangle_stream` (and so :func:`triangle_surface`) takes."""


def triangle_stream(models: Sequence[nn.Module], data, *, resolution: int = 20,
                    margin: float = 0.2, loss_fn: LossFn | None = None,
                    metrics: Sequence[str] = METRICS, bn: str = "eval", device=None,
                    names: Sequence[str] | None = None, precision: str | None = None,
                    **options) -> TileStream:
    """The barycentric plane as a :class:`~landscape_widget.TileStream` (coarse to fine).

    Points outside the region (``alpha + beta > 1 + margin``) are never evaluated; they stay
    NaN. Args are those of :func:`triangle_surface`; ``options`` go to the engine
    (``tile_points``, ``cancel``, ``evaluator_options``, ``executor``).

    Returns:
        The :class:`~landscape_widget.TileStream`.

    Raises:
        ValueError: If there are not three models of one architecture (see
            :func:`triangle_surface` for the other checks).
        TypeError: If ``precision`` is also in ``evaluator_options``, or an option is not
            one of :data:`STREAM_OPTIONS`.
    """
    unknown = sorted(set(options) - STREAM_OPTIONS)
    if unknown:
        # Left unread they were ignored: samples=1000 computed on all data, compile=True
        # eagerly, and a misspelt option did nothing, all without a word.
        hint = {"samples": "samples=: the plane is always computed on all data",
                "sample_seed": "sample_seed=: the plane is always computed on all data",
                "compile": "pass compile= in evaluator_options={'compile': ...}"}
        why = "; ".join(hint[k] for k in unknown if k in hint)
        raise TypeError(f"triangle_surface got unexpected option(s) {unknown}; it takes "
                        f"{sorted(STREAM_OPTIONS)}" + (f" ({why})." if why else "."))
    evaluator_options = options.pop("evaluator_options", None)
    if precision is not None:  # also accepted among evaluator_options, as by iter_tiles
        if "precision" in (evaluator_options or {}):
            raise TypeError("precision was given twice (also in evaluator_options).")
        evaluator_options = {**(evaluator_options or {}), "precision": precision}
    if len(models) != 3:
        raise ValueError(f"A plane through models needs exactly three models, got {len(models)}.")
    names = list(names) if names is not None else ["model 1", "model 2", "model 3"]
    points = _check_same(models, names)
    axis = lattice(resolution, margin)
    # The lattice reaches the largest multiple of 1/resolution within the margin asked for;
    # that is the margin of the region (and of the drawing).
    margin = abs(float(axis[0]))
    alpha, beta = np.meshgrid(axis, axis)
    # axes: the exact quotients, so that the vertices are grid points.
    job = grid_job(models[2], data, axes=[ExactAxis(axis)] * 2, points=points,
                   region=alpha + beta <= 1 + margin + 1e-9, loss_fn=loss_fn, metrics=metrics,
                   bn=bn, device=device, seed=None, keep_directions=False,
                   evaluator_options=evaluator_options, executor=options.pop("executor", None))
    job.spec.update(kind="triangle", names=names, resolution=resolution, margin=margin,
                    models=[fingerprint(p) for p in points])
    return TileStream(job, options.pop("tile_points", None), options.pop("cancel", None))


@dataclass
class TriangleSurface:
    """Loss (and accuracy) on the plane through three models.

    Attributes:
        alpha: ``(n, n)`` weight of model 1 at each grid point (columns vary alpha).
        beta: ``(n, n)`` weight of model 2 (rows vary beta); model 3 has ``1 - alpha - beta``.
        loss: ``(n, n)`` mean loss; NaN outside the region.
        accuracy: ``(n, n)`` accuracy in [0, 1], or ``None``.
        names: The three models' names.
        spec: How it was computed.
        extra_metrics: ``{name: (n, n) array}`` of the user's metrics (``metrics={name: fn}``).
    """

    alpha: np.ndarray
    beta: np.ndarray
    loss: np.ndarray | None
    accuracy: np.ndarray | None
    names: list[str]
    spec: dict = field(default_factory=dict)
    extra_metrics: dict = field(default_factory=dict)

    @property
    def xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Cartesian ``(x, y)`` of every grid point on the equilateral drawing."""
        gamma = 1.0 - self.alpha - self.beta
        x = self.alpha * CORNERS[0, 0] + self.beta * CORNERS[1, 0] + gamma * CORNERS[2, 0]
        y = self.alpha * CORNERS[0, 1] + self.beta * CORNERS[1, 1] + gamma * CORNERS[2, 1]
        return x, y

    def values(self, metric: str = "loss") -> np.ndarray:
        """The ``(n, n)`` array of ``metric`` ("loss", "accuracy" or a user metric's name)."""
        arr = {"loss": self.loss, "accuracy": self.accuracy, **self.extra_metrics}.get(metric)
        if arr is None:
            raise ValueError(f"metric {metric!r} was not computed; pass metrics=(..., {metric!r}).")
        return arr

    def vertex_index(self, i: int) -> tuple[int, int]:
        """``(row, column)`` of model ``i``'s grid point (0, 1 or 2)."""
        if i not in (0, 1, 2):
            raise IndexError(f"model index must be 0, 1 or 2, got {i!r}.")
        a, b = [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0)][i]
        axis = self.alpha[0]
        return int(np.flatnonzero(axis == b)[0]), int(np.flatnonzero(axis == a)[0])

    def loss_at_model(self, i: int, metric: str = "loss") -> float:
        """The grid's value at vertex ``i`` (0, 1, 2): model ``i`` itself."""
        return float(self.values(metric)[self.vertex_index(i)])

    def to_plotly(self, *, metric: str = "loss", log: bool | None = None,
                  title: str | None = None):
        """The plane on an equilateral triangle (a plotly contour on a carpet).

        Args:
            metric: ``"loss"`` or ``"accuracy"``.
            log: Colour by log10 (default: for the loss, as the paper's figures).
            title: Figure title.

        Returns:
            A ``plotly.graph_objects.Figure``.
        """
        import plotly.graph_objects as go

        fig = go.Figure(triangle_traces(self, metric=metric, log=log))
        m = float(self.spec.get("margin", 0.0))
        fig.update_layout(
            title=title or f"{metric} on the plane through {', '.join(self.names)}",
            width=620, height=560, plot_bgcolor="white",
            # The region's bounding box with room for the names (the mask would widen it).
            xaxis={"visible": False, "range": [-1.5 * m - 0.25, 1 + 1.5 * m + 0.25]},
            yaxis={"visible": False, "scaleanchor": "x",
                   "range": [-m * CORNERS[1, 1] - 0.1, (1 + 2 * m) * CORNERS[1, 1] + 0.1]})
        return fig


def _cartesian(ab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drawing coordinates of ``(alpha, beta)`` rows (model 3 at the origin)."""
    return ab[:, 0] + ab[:, 1] / 2, ab[:, 1] * CORNERS[1, 1]


def triangle_traces(tri: TriangleSurface, *, metric: str = "loss", log: bool | None = None,
                    showscale: bool = True, carpet: str = "tri", xaxis: str = "x",
                    yaxis: str = "y", zrange: tuple[float, float] | None = None) -> list:
    """Plotly traces of a :class:`TriangleSurface`: carpet, contours, outline, the models.

    Args:
        tri: The plane.
        metric: ``"loss"`` or ``"accuracy"``.
        log: Colour by log10 (default: for the loss).
        showscale: Draw the colour bar.
        carpet: Id of the carpet (unique per figure).
        xaxis: Plotly x axis to draw on.
        yaxis: Plotly y axis to draw on.
        zrange: ``(low, high)`` of the colour scale (after log10), to share it across panels.

    Returns:
        Plotly trace objects.
    """
    import plotly.graph_objects as go

    z = tri.values(metric)
    log = (metric == "loss") if log is None else log
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.log10(np.where(z > 0, z, np.nan))
    x, y = tri.xy
    axis = tri.alpha[0]
    levels = {}
    if zrange is not None and zrange[1] > zrange[0]:
        levels = {"autocontour": False, "zmin": zrange[0], "zmax": zrange[1]}
        contours = {"start": zrange[0], "end": zrange[1], "size": (zrange[1] - zrange[0]) / 15}
    else:
        contours = {}
    hidden = {"showgrid": False, "showticklabels": "none", "showline": False,
              "linecolor": "rgba(0,0,0,0)", "linewidth": 0,
              "startline": False, "endline": False}
    traces = [
        go.Carpet(a=axis, b=axis, x=x, y=y, carpet=carpet, aaxis=hidden, baxis=hidden,
                  xaxis=xaxis, yaxis=yaxis),
        go.Contourcarpet(a=axis, b=axis, z=z, carpet=carpet, colorscale="Viridis",
                         showscale=showscale, contours={"coloring": "fill", **contours},
                         **levels,
                         line={"width": 0.5}, xaxis=xaxis, yaxis=yaxis,
                         colorbar={"title": ("log10 " if log else "") + metric}),
    ]
    # Contours on a carpet extend over the NaN corner beyond alpha + beta = 1 + margin;
    # paint that corner over in the background colour, reaching a little past the carpet
    # (else its anti-aliased edge shows the colours below).
    m = float(tri.spec.get("margin", 0.0))
    e, top = 0.05, float(axis[-1])
    lo, hi = -m - e, top + e
    corner = np.array([[1 + 2 * m + e, lo], [hi, lo], [hi, hi], [lo, hi], [lo, 1 + 2 * m + e]])
    cx, cy = _cartesian(corner)
    traces.append(go.Scatter(x=np.r_[cx, cx[:1]], y=np.r_[cy, cy[:1]], fill="toself",
                             fillcolor="white", mode="lines", line={"width": 0, "color": "white"},
                             hoverinfo="skip", showlegend=False, xaxis=xaxis, yaxis=yaxis))
    ring = np.vstack([CORNERS, CORNERS[:1]])
    traces.append(go.Scatter(x=ring[:, 0], y=ring[:, 1], mode="lines", showlegend=False,
                             line={"color": "white", "width": 1.5}, hoverinfo="skip",
                             xaxis=xaxis, yaxis=yaxis))
    labels = [f"{n}<br>{metric} {tri.loss_at_model(i, metric):.4g}"
              for i, n in enumerate(tri.names)]
    traces.append(go.Scatter(x=CORNERS[:, 0], y=CORNERS[:, 1], mode="markers",
                             hovertext=labels, hoverinfo="text", showlegend=False,
                             marker={"symbol": "x", "size": 10, "color": "red"},
                             xaxis=xaxis, yaxis=yaxis))
    # The names go at the region's outer corners, on white, where contours cannot hide them.
    ox, oy = _cartesian(np.array([[1 + 2 * m, -m], [-m, 1 + 2 * m], [-m, -m]]))
    traces.append(go.Scatter(x=ox, y=oy, mode="text", text=tri.names, showlegend=False,
                             textposition=["bottom center", "top center", "bottom center"],
                             hoverinfo="skip", cliponaxis=False, xaxis=xaxis, yaxis=yaxis))
    return traces


@outside_inference_mode
@holding_heap
def triangle_surface(m1: nn.Module, m2: nn.Module, m3: nn.Module, data, *,
                     resolution: int = 20, margin: float = 0.2,
                     loss_fn: LossFn | None = None, metrics: Sequence[str] = METRICS,
                     bn: str = "eval", device=None, names: Sequence[str] | None = None,
                     precision: str | None = None, progress: bool = True,
                     **options) -> TriangleSurface:
    """Loss on the plane ``alpha * theta_1 + beta * theta_2 + (1 - alpha - beta) * theta_3``.

    Args:
        m1: Model at ``(alpha, beta) = (1, 0)``; never modified (nor are the others).
        m2: Model at ``(0, 1)``.
        m3: Model at ``(0, 0)``; the three must share one architecture.
        data: ``(inputs, targets)`` tensors, a ``Dataset`` or a ``DataLoader``.
        resolution: Grid steps per unit of alpha and beta (20: the PROPOSAL's 0.05 grid).
        margin: How far beyond the triangle to look: ``alpha, beta >= -margin`` and
            ``alpha + beta <= 1 + margin`` (PROPOSAL 0.2), rounded down to a multiple of
            ``1 / resolution`` (``spec["margin"]`` holds the margin used).
        loss_fn: Mean loss of a batch; cross-entropy by default.
        metrics: ``"loss"``, ``"accuracy"`` or ``{name: fn}`` (see :func:`~.iter_tiles`).
        bn: ``"eval"`` (combined running statistics) or ``"batch"``.
        device: Where to compute (the models' device by default).
        names: Labels of the three models.
        precision: ``"fp32"`` (exact, the default), ``"tf32"``, ``"bf16"`` or ``"fp16"``
            (CUDA), as in :func:`~landscape_widget.compute_surface`; ``spec["precision"]``
            and ``spec["precision_error"]`` record it.
        progress: Show a tqdm progress bar.
        **options: ``tile_points``, ``cancel``, ``evaluator_options`` for the engine, and
            ``executor`` (a Dask ``Client`` or ``concurrent.futures`` executor whose workers
            compute the tiles, as in :func:`~landscape_widget.compute_surface`).

    Returns:
        A :class:`TriangleSurface`; ``tri.loss_at_model(i)`` is the value at vertex ``i``.

    Raises:
        TypeError: For an option not listed above (``samples=``: the plane is computed on
            all data; ``compile=`` goes in ``evaluator_options``), or ``precision`` given
            twice.

    Example:
        >>> import torch
        >>> torch.manual_seed(0) and None
        >>> ms = [torch.nn.Linear(4, 3) for _ in range(3)]
        >>> data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
        >>> tri = triangle_surface(*ms, data, resolution=5, progress=False)
        >>> tri.loss.shape  # alpha, beta in -0.2, 0, 0.2, ..., 1.4
        (9, 9)
    """
    stream = triangle_stream([m1, m2, m3], data, resolution=resolution, margin=margin,
                             loss_fn=loss_fn, metrics=metrics, bn=bn, device=device,
                             names=names, precision=precision, **options)
    surface = run_stream(stream, progress, "plane")
    alpha, beta = np.meshgrid(surface.x, surface.y)
    return TriangleSurface(alpha, beta, surface.loss, surface.accuracy,
                           list(stream.spec["names"]), surface.spec, surface.extra_metrics)


def barycentric_point(points: Sequence[Params], alpha: float, beta: float) -> Params:
    """``alpha * p1 + beta * p2 + (1 - alpha - beta) * p3``, summed from zero as the engine does.

    Useful to materialise a point of the plane; at the vertices it returns the models'
    tensors bit for bit.

    Returns:
        The point, a parameter dict.
    """
    gamma = 1.0 - alpha - beta
    out = {}
    for k in points[0]:
        acc = torch.zeros_like(points[0][k])
        for c, p in zip((alpha, beta, gamma), points, strict=True):
            acc = acc + torch.tensor(c, dtype=torch.float64).to(p[k].dtype) * p[k]
        out[k] = acc
    return out
