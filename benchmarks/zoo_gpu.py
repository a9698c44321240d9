"""Li et al. 2018's skip-connection figure at full size: ResNet-20/56 with and without shortcuts.

The models are the CIFAR ResNets of ``landscape_widget.models`` (16-32-64 channels,
parameter-free shortcuts), trained on the scikit-learn digits upscaled to 32x32 (an
offline stand-in for CIFAR-10: 1400 training images; nothing is downloaded), with SGD
(Nesterov, momentum 0.9, lr 0.1 cosine-decayed, weight decay 5e-4, batch 128) as in the
paper. Each trained network gets a filter-normalised random surface on [-1, 1]^2 over the
whole training set and the statistics of ``lw.landscape_stats``. The script prints one
line per network and writes ``results.json``, ``surfaces.npz`` and ``surfaces.png`` to
``--out``.

    python benchmarks/zoo_gpu.py --out /tmp/zoo            # a GPU: < 3 min on an H200
    python benchmarks/zoo_gpu.py --out /tmp/zoo --tiny     # CPU smoke run (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import landscape_widget as lw  # noqa: E402
from landscape_widget.experiments.skip import skip_study  # noqa: E402


def digits32(device) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits training split, upscaled to 32x32 (bilinear) and standardised."""
    x, y = lw.datasets.digits_images("train")
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    return x.to(device), y.to(device)


def save_png(runs, path: Path, zmax: float = 10.0) -> None:
    """Contour plots side by side, one log10 colour scale (loss clipped at ``zmax``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(runs), 4)
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.5 * rows), squeeze=False)
    lo = max(min(float(np.nanmin(r.surface.loss)) for r in runs), 1e-4)
    levels = np.linspace(math.log10(lo), math.log10(zmax), 25)
    for ax, r in zip(axes.flat, runs, strict=False):
        z = np.log10(np.clip(r.surface.loss, lo, zmax))
        cs = ax.contourf(r.surface.x, r.surface.y, z, levels=levels, cmap="viridis")
        ax.contour(r.surface.x, r.surface.y, z, levels=levels[::3], colors="k", linewidths=0.3)
        s = r.stats
        ax.set_title(f"{r.name} (seed {r.seed})\nnon-convex {s.nonconvex_fraction:.0%}, "
                     f"minima {s.minima}, rough {s.roughness:.2f}", fontsize=8)
        ax.set_aspect("equal")
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    fig.colorbar(cs, ax=axes, shrink=0.8, label="log10 loss")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for PNG/JSON/NPZ")
    parser.add_argument("--depths", default="20,56")
    parser.add_argument("--widths", default="1")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--points", type=int, default=31, help="grid points per axis (odd)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke run: ResNet-8, 4 base channels, 2 epochs, 7x7 grid")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    t0 = time.perf_counter()
    x, y = digits32(args.device)
    opts = {"depths": [int(d) for d in args.depths.split(",")],
            "widths": [int(w) for w in args.widths.split(",")],
            "epochs": args.epochs, "points": args.points, "base": 16}
    if args.tiny:
        x, y = x[:256], y[:256]
        opts.update(depths=[8], widths=[1], epochs=2, points=7, base=4)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device {args.device} ({name}), "
          f"{x.shape[0]} images {tuple(x.shape[1:])}, {opts}", flush=True)
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        runs += skip_study((x, y), seed=seed, progress=True, **opts)
    total = time.perf_counter() - t0
    rows = [r.row() for r in runs]
    (args.out / "results.json").write_text(json.dumps(
        {"options": opts, "device": args.device, "seconds": total, "runs": rows}, indent=1,
        default=float))
    np.savez_compressed(args.out / "surfaces.npz", x=runs[0].surface.x, y=runs[0].surface.y,
                        **{f"{r.name}|seed{r.seed}": r.surface.loss for r in runs})
    save_png(runs, args.out / "surfaces.png")
    print(f"{'network':26s} {'seed':>4s} {'loss':>7s} {'acc':>6s} {'nonconvex':>9s} "
          f"{'minima':>6s} {'rough':>6s} {'basin r':>7s}")
    for r in runs:
        s = r.stats
        print(f"{r.name:26s} {r.seed:4d} {r.train_loss:7.4f} {r.train_acc:6.3f} "
              f"{s.nonconvex_fraction:9.3f} {s.minima:6d} {s.roughness:6.2f} "
              f"{s.basin_radius:7.3f}")
    print(f"total {total:.0f} s; wrote {args.out}/results.json, surfaces.npz, surfaces.png")


if __name__ == "__main__":
    main()
