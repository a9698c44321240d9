"""Plotly figures of pattern fits: the ternary mask beside the plane's heatmap."""

from __future__ import annotations

import numpy as np

# Good cells black (minimised), bad white, ignored grey: the paper's mask figure.
MASK_COLORS = [[0.0, "#ffffff"], [0.5, "#bdbdbd"], [1.0, "#111111"]]


def pattern_figure(mask: np.ndarray, values: np.ndarray, metric: str, log: bool,
                   title: str = ""):
    """Two heatmaps with the mask's orientation (row 0 at the top).

    Args:
        mask: Ternary mask (H, W).
        values: The metric per cell (H, W).
        metric: ``"loss"`` or ``"accuracy"`` (axis and colour-bar title).
        log: Colour ``log2(values)``; the hover text keeps the plain value.
        title: Figure title.

    Returns:
        A ``plotly.graph_objects.Figure`` with the mask on the left and the metric on the right.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("mask (black = good)", metric),
                        horizontal_spacing=0.08)
    fig.add_trace(go.Heatmap(z=mask.astype(float), zmin=-1, zmax=1, colorscale=MASK_COLORS,
                             showscale=False,
                             hovertemplate="row %{y}, col %{x}: %{z}<extra></extra>"),
                  row=1, col=1)
    vals = np.asarray(values, dtype=float)
    z = np.log2(np.clip(vals, 2.0 ** -12, None)) if log else vals
    fig.add_trace(go.Heatmap(
        z=z, customdata=vals, colorscale="RdBu_r" if metric == "loss" else "Viridis",
        zmin=None if metric == "loss" else 0.0, zmax=None if metric == "loss" else 1.0,
        colorbar={"title": f"log2 {metric}" if log else metric},
        hovertemplate="row %{y}, col %{x}: %{customdata:.4g}<extra></extra>"), row=1, col=2)
    for col in (1, 2):
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{'' if col == 1 else col}",
                         row=1, col=col)
        fig.update_xaxes(constrain="domain", row=1, col=col)
    fig.update_layout(title=title, width=820, height=420, margin={"t": 60})
    return fig
