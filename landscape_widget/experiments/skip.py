"""Skip connections, depth and width (Li et al. 2018, PAPERS.md (a)): a train-and-map study.

For every ``(depth, width, shortcut)`` configuration, :func:`skip_study` builds a CIFAR-style
ResNet (:func:`~landscape_widget.models.resnet`), trains it (SGD with Nesterov momentum and
a cosine learning-rate decay, or Adam), computes its filter-normalised random surface
around the trained weights and the statistics of :mod:`~landscape_widget.core.stats`.
Notebook 08 runs it on the CPU at small size and ``benchmarks/zoo_gpu.py`` at full size.
:func:`study_figure` puts the surfaces side by side on one colour scale.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.landscape import compute_surface
from ..core.stats import LandscapeStats, landscape_stats
from ..core.surface import Surface
from ..models import resnet


@dataclass
class StudyRun:
    """One configuration of :func:`skip_study`: its model, surface and statistics."""

    depth: int
    width: int
    shortcut: bool
    seed: int
    model: nn.Module
    surface: Surface
    stats: LandscapeStats
    train_loss: float
    train_acc: float
    seconds: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """E.g. ``"ResNet-20-noshort k=2"``."""
        return (f"ResNet-{self.depth}{'' if self.shortcut else '-noshort'}"
                + (f" k={self.width}" if self.width != 1 else ""))

    def row(self) -> dict:
        """The configuration, training result and statistics as a flat dict (for JSON)."""
        return {"name": self.name, "depth": self.depth, "width": self.width,
                "shortcut": self.shortcut, "seed": self.seed, "train_loss": self.train_loss,
                "train_acc": self.train_acc, **self.stats.as_dict(), "seconds": self.seconds}


def fit(model: nn.Module, data: tuple[Tensor, Tensor], *, epochs: int, lr: float,
        batch_size: int = 128, optimizer: str = "sgd", weight_decay: float = 5e-4,
        seed: int = 0) -> None:
    """Train ``model`` in place: SGD (Nesterov, momentum 0.9) or Adam, cosine-decayed ``lr``.

    Li et al. train with SGD, lr 0.1, momentum 0.9, weight decay 5e-4, batch 128 and step
    decays; a cosine decay over the (much shorter) run plays that role here. The batch order
    comes from a private generator seeded with ``seed``.

    Raises:
        ValueError: If ``optimizer`` is neither ``"sgd"`` nor ``"adam"``.
    """
    x, y = data
    params = list(model.parameters())
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True,
                                                     weight_decay=weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer={optimizer!r}: choose 'sgd' or 'adam'.")
    n = x.shape[0]
    per_epoch = math.ceil(n / batch_size)
    total = max(1, epochs * per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    gen = torch.Generator().manual_seed(int(seed))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(x.device)
        for i in range(per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def _loss_acc(model: nn.Module, data, batch: int = 2048) -> tuple[float, float]:
    x, y = data
    loss, correct = 0.0, 0
    for i in range(0, x.shape[0], batch):
        out = model(x[i:i + batch])
        loss += float(F.cross_entropy(out, y[i:i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i:i + batch]).sum())
    return loss / x.shape[0], correct / x.shape[0]


def skip_study(train_data, *, depths: Sequence[int] = (20, 56), widths: Sequence[int] = (1,),
               shortcuts: Sequence[bool] = (True, False), seed: int = 0, eval_data=None,
               epochs: int = 20, lr: float = 0.1, optimizer: str = "sgd",
               batch_size: int = 128, weight_decay: float = 5e-4, base: int = 16,
               span: float = 1.0, points: int = 21, rise: float = 0.5,
               threshold: float = 0.1, device=None, num_threads: int | None = 1,
               progress: bool = False) -> list[StudyRun]:
    """Train ResNets with and without shortcuts and map their loss surfaces.

    Every configuration starts from initial weights drawn from ``seed`` and uses the same
    batch order; its surface is ``compute_surface`` on ``eval_data`` (default: the training
    data) over ``[-span, span]^2`` with ``points`` per axis, along two filter-normalised
    random directions drawn from ``seed`` (biases and BatchNorm excluded, BN in eval mode:
    loss-landscape's recipe).

    Args:
        train_data: ``(inputs, targets)`` tensors, images ``(N, C, H, W)``.
        depths: ResNet depths ``6n + 2``.
        widths: Width factors ``k``.
        shortcuts: Which variants to train.
        seed: Seed of the weights, the batch order and the directions.
        eval_data: Data the surfaces are computed on.
        epochs: Training epochs.
        lr: Peak learning rate.
        optimizer: ``"sgd"`` (Nesterov, momentum 0.9) or ``"adam"``.
        batch_size: Training batch size.
        weight_decay: L2 penalty.
        base: First-stage channels at ``k = 1`` (16 as He et al.).
        span: Half-width of the plotted square.
        points: Grid points per axis (odd, so that theta is a grid point).
        rise: Loss rise that ends the basin (:func:`~landscape_widget.basin_radius`).
        threshold: Ratio of :func:`~landscape_widget.nonconvex_fraction`.
        device: Where to train and evaluate (default: where ``train_data`` lives).
        num_threads: CPU threads for the study (``torch.set_num_threads``, restored after):
            1 by default, since these small networks gain nothing from intra-op threads and
            on a busy machine several threads can make each step many times slower.
            ``None`` leaves the setting alone; ignored off the CPU.
        progress: Print one line per configuration.

    Returns:
        One :class:`StudyRun` per configuration, in the order depth, width, shortcut.

    Raises:
        ValueError: If ``points`` is even (theta would not be a grid point), or ``optimizer`` is
            neither ``"sgd"`` nor ``"adam"``.
    """
    x, y = train_data
    device = torch.device(device) if device is not None else x.device
    train_data = (x.to(device), y.to(device))
    eval_data = train_data if eval_data is None else tuple(t.to(device) for t in eval_data)
    if points % 2 == 0:
        raise ValueError(f"points must be odd so that theta is a grid point, got {points}.")
    old_threads = torch.get_num_threads()
    if num_threads is not None and device.type == "cpu":
        torch.set_num_threads(int(num_threads))
    try:
        return _study(train_data, eval_data, depths, widths, shortcuts, seed, epochs, lr,
                      optimizer, batch_size, weight_decay, base, span, points, rise, threshold,
                      device, progress)
    finally:
        torch.set_num_threads(old_threads)


def _study(train_data, eval_data, depths, widths, shortcuts, seed, epochs, lr, optimizer,
           batch_size, weight_decay, base, span, points, rise, threshold, device,
           progress) -> list[StudyRun]:
    x, y = train_data
    runs = []
    for depth in depths:
        for width in widths:
            for shortcut in shortcuts:
                t0 = time.perf_counter()
                net = resnet(depth, shortcut=shortcut, width=width, in_channels=x.shape[1],
                             num_classes=int(y.max()) + 1, base=base, seed=seed).to(device)
                fit(net, train_data, epochs=epochs, lr=lr, batch_size=batch_size,
                    optimizer=optimizer, weight_decay=weight_decay, seed=seed)
                t1 = time.perf_counter()
                loss, acc = _loss_acc(net, train_data)
                surface = compute_surface(net, eval_data, x=(-span, span, points),
                                          y=(-span, span, points), metrics=("loss",),
                                          seed=seed, progress=False)
                stats = landscape_stats(surface, threshold=threshold, rise=rise)
                t2 = time.perf_counter()
                run = StudyRun(depth, width, bool(shortcut), seed, net, surface, stats, loss,
                               acc, {"train": round(t1 - t0, 2), "surface": round(t2 - t1, 2)})
                runs.append(run)
                if progress:
                    print(f"{run.name:24s} loss {loss:.3f} acc {acc:.3f}  "
                          f"{stats.summary()}  ({t1 - t0:.0f} s + {t2 - t1:.0f} s)", flush=True)
    return runs


def study_figure(runs: Sequence[StudyRun], *, cols: int | None = None, zmax: float = 10.0):
    """The runs' loss surfaces side by side, as contour plots on one log10 colour scale.

    Args:
        runs: From :func:`skip_study`.
        cols: Plots per row (default: the number of shortcut variants times widths).
        zmax: Loss values are clipped at ``zmax`` (loss-landscape's plots stop at 10).

    Returns:
        A plotly figure.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    cols = cols or min(len(runs), 4)
    rows = math.ceil(len(runs) / cols)
    titles = [f"{r.name}<br><sup>{r.stats.summary()}</sup>" for r in runs]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles,
                        horizontal_spacing=0.04, vertical_spacing=0.12)
    lo = min(float(np.nanmin(r.surface.loss)) for r in runs)
    zmin = math.log10(max(lo, 1e-4))
    for i, r in enumerate(runs):
        z = np.log10(np.clip(r.surface.loss, 10**zmin, zmax))
        fig.add_trace(go.Contour(x=r.surface.x, y=r.surface.y, z=z, zmin=zmin,
                                 zmax=math.log10(zmax), colorscale="Viridis", ncontours=20,
                                 showscale=i == 0, colorbar={"title": "log10 loss"}),
                      row=i // cols + 1, col=i % cols + 1)
    fig.update_layout(width=260 * cols + 80, height=280 * rows + 60,
                      title="Loss surfaces: shortcuts, depth and width (one colour scale)")
    fig.update_annotations(font_size=10)
    return fig
