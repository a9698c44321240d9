"""Benchmark one MPO step: all sampled cells in one vmap-ed pass against a per-cell loop.

Usage:
    python benchmarks/mpo.py [--steps N] [--repeats R] [--device DEVICE] [--json PATH]

Both paths run the same maths on the same fit state (``PatternFit.step_once`` with
``batched=True`` / ``False``): the loop is what the paper's code does, one forward and one
backward per cell with gradient accumulation. Printed: milliseconds per step (best of R
runs of N steps each, after warm-up) and the speed-up, for the digits MLP 64-32-10 with
16 and 100 cells per step, and a small digits CNN. Issue 4's goal: >= 3x on CPU for the
MLP.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import landscape_widget as lw

THREADS = 2


def digits_cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(64, 10))


WORKLOADS = {
    "digits MLP 64-32-10, 4x4 checkerboard (16 cells/step)":
        (lambda: lw.demo.mlp(seed=None), "flat", lambda: lw.checkerboard(4)),
    "digits MLP 64-32-10, 16x16 checkerboard (50+50 cells/step)":
        (lambda: lw.demo.mlp(seed=None), "flat", lambda: lw.checkerboard(16)),
    "digits CNN 8-16 conv, 8x8 checkerboard (32+32 cells/step)":
        (digits_cnn, "images", lambda: lw.checkerboard(8)),
}


def time_steps(fit, x, y, batched: bool, steps: int, device) -> float:
    for _ in range(2):  # warm-up
        fit.step_once(x, y, batched=batched)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fit.step_once(x, y, batched=batched)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    device = torch.device(args.device)
    rows = []
    for name, (build, kind, mask) in WORKLOADS.items():
        data = lw.datasets.digits("train") if kind == "flat" else lw.datasets.digits_images("train")
        x, y = data[0][:256].to(device), data[1][:256].to(device)
        fits = {b: lw.fit_pattern(build, data, mask(), steps=0, seed=0, progress=False,
                                  device=device) for b in (True, False)}
        best = {True: float("inf"), False: float("inf")}
        for _ in range(args.repeats):
            for batched in (True, False):
                best[batched] = min(best[batched],
                                    time_steps(fits[batched], x, y, batched, args.steps, device))
        cells = len(fits[True]._sample(fits[True]._good)) + len(fits[True]._sample(fits[True]._bad))
        speedup = best[False] / best[True]
        rows.append({"workload": name, "cells": cells, "batched_ms": 1e3 * best[True],
                     "loop_ms": 1e3 * best[False], "speedup": speedup})
        print(f"{name}: batched {1e3 * best[True]:.1f} ms/step, per-cell loop "
              f"{1e3 * best[False]:.1f} ms/step -> {speedup:.1f}x", flush=True)
    mlp = [r for r in rows if "MLP" in r["workload"]]
    ok = all(r["speedup"] >= 3 for r in mlp)
    ratios = ", ".join(f"{r['speedup']:.1f}x" for r in mlp)
    print(f"goal >= 3x for the digits MLP on {device.type}: {'met' if ok else 'NOT met'} "
          f"({ratios}); torch {torch.__version__}, {THREADS} threads")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": str(device), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
