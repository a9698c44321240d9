"""Time to the first picture: a widget surface on a data subset first, vs the exact pass.

Usage:
    python benchmarks/progressive.py [--samples 10000] [--grid 11] [--threads 2] [--json PATH]

The workload of issue 15 (4): torchvision's ResNet-18 (10 classes, seeded init, eval mode)
on ``--samples`` seeded random CIFAR-shaped images (3x32x32; no data set is downloaded), an
``--grid`` x ``--grid`` plane of random filter-normalised directions, on the CPU. Two widget
workers run the same job one after the other in this process (a fresh evaluator each, the
plan cache cleared in between, so both pay their own planning):

- ``progressive``: the widget as it is: for data of at least
  ``PROGRESSIVE_MIN_SAMPLES`` samples the whole grid is drawn first on a random subset
  (``PROGRESSIVE_STAGES``: 256 samples first, untuned, in tiles of ``FIRST_TILE_POINTS``),
  then refined.
- ``exact``: the subset stages switched off (the widget before issue 15): every point on
  all samples from the start, in tiles of one point (its earliest possible first picture;
  the widget's default first tile holds 16 points).

Printed per run: seconds from ``submit`` to the first tile message (the first picture on
screen, less the browser's drawing), to the end of the first stage (the whole grid drawn
once), and the points of the first tile. The progressive run is cancelled once its first
stage is done, the exact run after its first tile (its full grid takes far longer; the
full-grid time printed is its first tile's seconds per point times the points, planning
included: an estimate). Ratios: exact / progressive (above 1: the subset pass is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torchvision

from landscape_widget.core import plans, progressive
from landscape_widget.core.directions import random_directions
from landscape_widget.core.evaluate import Evaluator
from landscape_widget.widget.protocol import Spec
from landscape_widget.widget.worker import Worker


def workload(samples: int, seed: int = 0):
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(samples, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (samples,), generator=g)
    return model, (x, y)


class Clock:
    """A ``send`` that stamps the tile messages and cancels the job when told to.

    ``stop_after``: cancel after this many tiles; ``stop_at_stage``: cancel at the first
    tile of the second stage (the first stage's grid is then complete).
    """

    def __init__(self, stop_after: int | None = None, stop_at_stage: bool = False):
        self.t0 = time.perf_counter()
        self.tiles: list[tuple[float, int]] = []
        self.stage_end: float | None = None
        self.stage: str | None = None
        self.stop_after, self.stop_at_stage = stop_after, stop_at_stage
        self.worker: Worker | None = None

    def __call__(self, msg, buffers):
        now = time.perf_counter() - self.t0
        if msg["kind"] == "tile":
            self.tiles.append((now, int(msg["n"])))
            if self.stop_after and len(self.tiles) >= self.stop_after:
                self.worker.cancel()
        elif msg["kind"] == "progress":
            stage = msg.get("stage", "").split(" (")[0]  # the ± changes tile by tile
            if self.stage is not None and stage != self.stage and self.stage_end is None:
                self.stage_end = self.tiles[-2][0]  # the last tile of the first stage
                if self.stop_at_stage:
                    self.worker.cancel()
            self.stage = stage


def run(model, data, grid: int, *, staged: bool, **stop):
    plans.forget_plans()  # each run plans for itself, as a first call does
    saved = progressive.PROGRESSIVE_MIN_SAMPLES
    if not staged:
        progressive.PROGRESSIVE_MIN_SAMPLES = 1 << 62
    clock = Clock(**stop)
    # The exact run gets tiles of one point: its first picture as early as it can be.
    worker = Worker(model, data, send=clock, tile_points=None if staged else 1)
    clock.worker = worker
    try:
        clock.t0 = time.perf_counter()
        worker.submit("j", Spec(resolution=grid, seed=0))
        worker.wait(3600)
    finally:
        worker.close()
        progressive.PROGRESSIVE_MIN_SAMPLES = saved
    return clock


def one_exact_point(model, data) -> float:
    """Seconds for the evaluator's setup and one point on all data with the plain plan."""
    plans.forget_plans()
    t0 = time.perf_counter()
    ev = Evaluator(model, data, random_directions(model, 2, seed=0))
    ev.expected_points = 1  # the plain plan, untimed: less than the exact widget pays
    ev.evaluate([[0.1, 0.2]])
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--grid", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--exact", choices=("widget", "point"), default="widget",
                    help="widget: the exact widget's first tile (planning included); point: "
                         "a lower bound, the evaluator's setup and one point with the plain "
                         "plan, no planning (for a loaded machine, where planning on all "
                         "data takes many minutes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, data = workload(args.samples)
    load0 = os.getloadavg()
    points = args.grid ** 2

    first_stage = progressive.progressive_sizes(args.samples)[0]
    print(f"ResNet-18 (torchvision, 10 classes), {args.samples} samples 3x32x32, "
          f"{args.grid}x{args.grid} grid, CPU, {args.threads} threads; "
          f"load average {load0[0]:.1f} at start", flush=True)
    prog = run(model, data, args.grid, staged=True, stop_at_stage=True)
    t_prog, n_prog = prog.tiles[0]
    print(f"  progressive (first subset {first_stage}): first picture {t_prog:6.2f} s "
          f"({n_prog} points); whole grid on the subset after {prog.stage_end:6.2f} s",
          flush=True)
    if args.exact == "widget":
        exact = run(model, data, args.grid, staged=False, stop_after=1)
        t_exact, n_exact = exact.tiles[0]
    else:
        t_exact, n_exact = one_exact_point(model, data), 1
    load1 = os.getloadavg()
    per_point_exact = t_exact / max(n_exact, 1)
    print(f"  exact (all {args.samples}): first picture {t_exact:6.2f} s ({n_exact} points);"
          f" the whole grid ~{per_point_exact * points:7.0f} s (from its first tile); "
          f"load average {load1[0]:.1f} at end")
    print(f"  time to first picture, exact / progressive: {t_exact / t_prog:5.1f}x; "
          f"whole grid drawn, exact / progressive: "
          f"{per_point_exact * points / prog.stage_end:5.1f}x (goal: first picture <= 2 s)")
    result = {"samples": args.samples, "grid": args.grid, "threads": args.threads,
              "load": [load0[0], load1[0]], "first_subset": first_stage,
              "progressive_first_tile_s": t_prog, "progressive_first_tile_points": n_prog,
              "progressive_first_stage_s": prog.stage_end,
              "exact_first_tile_s": t_exact, "exact_first_tile_points": n_exact,
              "exact_grid_predicted_s": per_point_exact * points}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
