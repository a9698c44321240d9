"""The contenders: our engine, a loss-landscape style per-point loop and two PyPI packages.

Every runner takes a :class:`~workloads.Workload`, the two direction dicts and a grid size
``m`` (an ``m`` x ``m`` grid on [-1, 1]^2, or for the loop any list of grid points) and
returns the wall time and the losses it computed. The caller decides whether ``m`` is the
full grid or a subset whose per-point cost is extrapolated.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from workloads import Workload

os.environ.setdefault("MPLBACKEND", "Agg")  # losscape plots with matplotlib: never on screen

LOOP_BATCH = 128


@dataclass
class Timed:
    """One timed run of a contender."""

    seconds: float  # wall time of the timed part
    points: int  # grid points it evaluated
    cpu: float = 0.0  # CPU time of this process (all threads) in the timed part
    loss: np.ndarray | None = None  # (m, m) rows = y, or (points,) for a list of points
    extra: dict = field(default_factory=dict)


def grid_axis(n: int) -> np.ndarray:
    return np.linspace(-1.0, 1.0, n)


# --- (a) ours ------------------------------------------------------------------------------
def run_ours(wl: Workload, d1, d2, m: int, **options) -> Timed:
    import landscape_widget as lw

    c0, t0 = time.process_time(), time.perf_counter()
    surf = lw.compute_surface(
        wl.model, (wl.inputs, wl.targets), directions=(d1, d2),
        x=(-1, 1, m), y=(-1, 1, m), progress=False, **options,
    )
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return Timed(seconds, m * m, cpu, np.asarray(surf.loss), {"plan": surf.spec.get("plan")})


# --- (b) per-point loop in the style of tomgoldstein/loss-landscape --------------------------
def run_loop(wl: Workload, d1, d2, coords: np.ndarray, time_limit: float | None = None) -> Timed:
    """``plot_surface.py``'s ``crunch``: set ``p.data = w + x*d1 + y*d2``, then ``eval_loss``.

    ``coords`` is a ``(P, 2)`` array of ``(x, y)``. As in ``net_plotter.set_weights`` the
    change is formed per point from the direction lists, and ``evaluation.eval_loss`` runs
    ``model.eval()`` and sums ``CrossEntropyLoss * batch_size`` (and correct predictions)
    over a DataLoader with batch size 128. With ``time_limit`` it stops after the first
    point that ends past the limit; ``Timed.points`` says how many of ``coords`` were done.
    """
    net = copy.deepcopy(wl.model)
    names = [name for name, _ in net.named_parameters()]
    dx = [d1[name] for name in names]
    dy = [d2[name] for name in names]
    weights = [p.data.clone() for p in net.parameters()]
    loader = DataLoader(TensorDataset(wl.inputs, wl.targets), batch_size=LOOP_BATCH,
                        shuffle=False)
    criterion = nn.CrossEntropyLoss()
    losses = np.empty(len(coords))
    accs = np.empty(len(coords))
    c0, t0 = time.process_time(), time.perf_counter()
    for i, (a, b) in enumerate(coords):
        changes = [u * float(a) + v * float(b) for u, v in zip(dx, dy, strict=True)]
        for p, w, d in zip(net.parameters(), weights, changes, strict=True):
            p.data = w + d
        correct = 0
        total_loss = 0.0
        total = 0
        net.eval()
        with torch.no_grad():
            for inputs, targets in loader:
                batch_size = inputs.size(0)
                total += batch_size
                outputs = net(inputs)
                loss = criterion(outputs, targets)
                total_loss += loss.item() * batch_size
                _, predicted = torch.max(outputs.data, 1)
                correct += predicted.eq(targets).sum().item()
        losses[i] = total_loss / total
        accs[i] = 100.0 * correct / total
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            break
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return Timed(seconds, i + 1, cpu, losses[: i + 1])


def grid_coords(n: int) -> np.ndarray:
    """All ``(x, y)`` of the ``n`` x ``n`` grid in row-major order (rows = y)."""
    ax = grid_axis(n)
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


# --- (c) PyPI loss-landscapes 3.0.6 ----------------------------------------------------------
# random_plane scales each direction to ||theta|| / (distance * steps) per step and starts
# steps/2 steps below the model, so the plane spans theta +- ||theta|| / (2 * distance) along
# each direction: distance=0.5 matches our [-1, 1] in units of a filter-normalised direction
# (whose norm is ||theta|| over the weight tensors).
LL_DISTANCE = 0.5


def run_loss_landscapes(wl: Workload, m: int, seed: int = 0) -> Timed:
    import loss_landscapes
    import loss_landscapes.metrics

    model = copy.deepcopy(wl.model)
    # Its filter normalisation divides by the norm of every entry of a 1-D parameter, so a
    # zero entry (an untrained BatchNorm's bias) raises ZeroDivisionError (3.0.6): time it
    # on a copy whose zero 1-D entries are 1e-3, as a trained model's would not be zero.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.masked_fill_(p == 0, 1e-3)
    metric = loss_landscapes.metrics.Loss(nn.CrossEntropyLoss(), wl.inputs, wl.targets)
    torch.manual_seed(seed)  # its directions come from the global RNG (torch.rand)
    c0, t0 = time.process_time(), time.perf_counter()
    with torch.no_grad():
        data = loss_landscapes.random_plane(model, metric, distance=LL_DISTANCE, steps=m,
                                            normalization="filter", deepcopy_model=True)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    # data[i][j]: i steps along dir_one, j along dir_two: transpose to rows = y.
    return Timed(seconds, m * m, cpu, np.asarray(data, dtype=np.float64).T)


# --- (d) PyPI losscape 1.5.10 ----------------------------------------------------------------
def run_losscape(wl: Workload, d1, d2, m: int) -> Timed:
    """``losscape.create_landscape.create_3D_losscape`` with our directions and data.

    It walks the grid with ``p.data = w + x*d1 + y*d2`` and ``compute_loss`` over the first
    ``num_batches`` batches of the loader (all of them here). At the end it draws a contour
    plot and saves a PNG: that runs in a temporary directory with the Agg backend, and the
    time reported is from the call to the end of the last loss evaluation (plotting and
    saving excluded). Its per-point progress prints go to a buffer.
    """
    import losscape.create_landscape as cl

    model = copy.deepcopy(wl.model)
    names = [name for name, _ in model.named_parameters()]
    directions = [[d1[k].clone() for k in names], [d2[k].clone() for k in names]]
    loader = DataLoader(TensorDataset(wl.inputs, wl.targets), batch_size=LOOP_BATCH,
                        shuffle=False)
    num_batches = math.ceil(wl.samples / LOOP_BATCH)

    original = cl.compute_loss
    last_end = [0.0, 0.0]

    def timed_compute_loss(*args, **kwargs):
        out = original(*args, **kwargs)
        last_end[:] = [time.perf_counter(), time.process_time()]
        return out

    cl.compute_loss = timed_compute_loss
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            c0, t0 = time.process_time(), time.perf_counter()
            _, _, losses = cl.create_3D_losscape(
                model, train_loader_unshuffled=loader, directions=directions,
                criterion=nn.functional.cross_entropy, num_batches=num_batches,
                save_only=True, output_path=tmp, output_vtp=False, output_h5=False,
                x_min=-1.0, x_max=1.0, y_min=-1.0, y_max=1.0, num_points=m,
            )
            total = time.perf_counter() - t0
    finally:
        cl.compute_loss = original
        import matplotlib.pyplot as plt

        plt.close("all")
    seconds, cpu = last_end[0] - t0, last_end[1] - c0
    return Timed(seconds, m * m, cpu, np.asarray(losses, dtype=np.float64),
                 {"with_plotting_s": total})
