"""The optimizer-comparison table: planes below the diagonal, functional difference above."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .triangle import triangle_traces


def table(runs, names: Sequence[str] | None = None, *, resolution: int = 10,
          margin: float = 0.2, data=None, log: bool = True, progress: bool = True,
          size: int = 230):
    """An ``n x n`` grid of panels for the runs ``names``.

    Below the diagonal, cell ``(i, j)`` is the plane through run ``j``, run ``i`` and the
    shared start ``theta_0`` (a :func:`~landscape_widget.triangle_surface`), all on one
    colour scale. Above it, cell ``(i, j)`` lists the functional difference of the pair
    (:meth:`OptimizerRuns.functional_difference`). The diagonal names the run and its final
    losses.

    Args:
        runs: An :class:`~landscape_widget.experiments.runs.OptimizerRuns`.
        names: Runs to show (all by default).
        resolution: Grid steps per unit of each plane (10: a 0.1 grid).
        margin: How far beyond each triangle to look.
        data: Data of the planes (the training data by default).
        log: Colour by log10 loss.
        progress: Show one progress bar per plane.
        size: Pixels per panel.

    Returns:
        A ``plotly.graph_objects.Figure``.

    Raises:
        ValueError: If fewer than two runs are named.
    """
    from plotly.subplots import make_subplots

    names = list(names) if names is not None else runs.names
    n = len(names)
    if n < 2:
        raise ValueError("The table needs at least two runs.")
    planes = {}
    for i in range(n):
        for j in range(i):
            planes[(i, j)] = runs.triangle(names[j], names[i], data=data, resolution=resolution,
                                           margin=margin, progress=progress)
    values = np.concatenate([p.loss[np.isfinite(p.loss)] for p in planes.values()])
    values = np.log10(values[values > 0]) if log else values
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    diff = runs.functional_difference(names=names)
    fig = make_subplots(rows=n, cols=n, horizontal_spacing=0.02, vertical_spacing=0.02)
    for (i, j), tri in planes.items():
        for t in triangle_traces(tri, log=log, showscale=(i, j) == (1, 0),
                                 carpet=f"c{i}_{j}", zrange=(lo, hi)):
            fig.add_trace(t, row=i + 1, col=j + 1)
    for i in range(n):
        run = runs.runs[names[i]]
        text = f"<b>{names[i]}</b><br>train loss {run.history['train_loss'][-1]:.3g}"
        if run.history.get("test_accuracy"):
            text += f"<br>test acc {100 * run.history['test_accuracy'][-1]:.1f}%"
        _note(fig, n, i, i, text)
        for j in range(i + 1, n):
            d = diff[(names[i], names[j])]
            _note(fig, n, i, j, f"disagree {100 * d['disagreement']:.1f}%<br>"
                                f"sym KL {d['symmetric_kl']:.3g}<br>"
                                f"ensemble {100 * d['ensemble_accuracy']:.1f}%")
    fig.update_xaxes(visible=False, range=[-1.5 * margin - 0.2, 1 + 1.5 * margin + 0.2])
    fig.update_yaxes(visible=False, range=[-0.87 * margin - 0.12, 0.87 * (1 + 2 * margin) + 0.1])
    fig.update_layout(width=size * n + 120, height=size * n + 60, plot_bgcolor="white",
                      title="Optimizers from one start: planes through (row, column, θ0) "
                            "below, functional difference above")
    return fig


def _note(fig, n: int, i: int, j: int, text: str) -> None:
    # Paper coordinates from the cell's domain: cells without traces have no usable axes.
    k = i * n + j + 1
    suffix = "" if k == 1 else str(k)
    xd, yd = fig.layout[f"xaxis{suffix}"].domain, fig.layout[f"yaxis{suffix}"].domain
    fig.add_annotation(text=text, x=sum(xd) / 2, y=sum(yd) / 2, xref="paper", yref="paper",
                       showarrow=False, font={"size": 11})
