"""Benchmark tiles on an executor: 1 vs 2 Dask workers on the CPU, and executor overhead on a GPU.

Usage:
    python benchmarks/executor.py [--quick] [--repeats R] [--json PATH]
    python benchmarks/executor.py --device cuda [--gpus G] [--n N] [--samples S]

CPU (default): workload (i) of ``benchmarks/run.py`` (the 9,098-parameter CNN on 1024
samples, a 21x21 plane, the same directions) computed by ``lw.compute_surface`` locally
(1 and 2 torch threads) and with ``executor=`` a Dask ``LocalCluster`` of 1 and of 2
worker processes, one thread each (Dask starts workers with ``OMP_NUM_THREADS=1``). The
data travels in the payload, scattered once. Each configuration is timed ``R`` times
(default 2): the first call includes the evaluator build and plan tuning on every worker
(as a local call includes its tuning), later calls find the worker's cached evaluator.
Cluster start-up is not timed. Printed: seconds per grid (first and best), points/s, the
speed-up of 2 workers over 1 (a ratio; ideal 2.0 on 2 idle cores) and the largest
difference from the local surface.

GPU (``--device cuda``): the CIFAR-shaped ResNet (torchvision resnet18, 10 classes) on
``S`` seeded random 3x32x32 images, an ``N`` x ``N`` plane, computed on one GPU locally
and through ``lw.local_gpu_executor(gpus=range(G))`` (default ``G`` = 1: the overhead of
the executor, printed as a ratio; more GPUs show the scaling). The data is made on the
worker by a ``data_fn``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import landscape_widget as lw

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workloads  # noqa: E402

THREADS = 2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def max_diff(a, b) -> float:
    return float(np.nanmax(np.abs(np.asarray(a, float) - np.asarray(b, float))))


def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def cifar_data(samples: int, seed: int = 0):
    """Runs on the worker (a data_fn): seeded random CIFAR-shaped images."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(samples, 3, 32, 32, generator=g), torch.randint(0, 10, (samples,),
                                                                       generator=g)


def cpu(args) -> dict:
    from dask.distributed import Client, LocalCluster

    wl = workloads.cnn_workload(9 if args.quick else 21)
    d = lw.random_directions(wl.model, 2, seed=0)
    grid = dict(directions=d, x=(-1, 1, wl.n), y=(-1, 1, wl.n), progress=False)
    data = (wl.inputs, wl.targets)
    rows, ref = {}, None
    for threads in (1, THREADS):
        torch.set_num_threads(threads)
        times, surf = timed(lambda: lw.compute_surface(wl.model, data, **grid), args.repeats)
        ref = surf if ref is None else ref
        rows[f"local, {threads} thread(s)"] = {"times": times, "plan": surf.spec["plan"],
                                               "diff": max_diff(surf.loss, ref.loss)}
        log(f"local {threads} thread(s): {min(times):.2f} s")
    torch.set_num_threads(THREADS)
    for workers in (1, 2):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=logging.ERROR)
        client = Client(cluster)
        try:
            client.wait_for_workers(workers, timeout=300)
            times, surf = timed(
                lambda c=client: lw.compute_surface(wl.model, data, executor=c, **grid),
                args.repeats)
        finally:
            client.close()
            cluster.close()
        rows[f"Dask, {workers} worker(s) x 1 thread"] = {
            "times": times, "plan": surf.spec["plan"], "executor": surf.spec["executor"],
            "diff": max_diff(surf.loss, ref.loss)}
        log(f"{workers} worker(s): {min(times):.2f} s")
    one = min(rows["Dask, 1 worker(s) x 1 thread"]["times"])
    two = min(rows["Dask, 2 worker(s) x 1 thread"]["times"])
    return {"workload": wl.title, "points": wl.points, "rows": rows,
            "speedup_2_over_1": one / two,
            "overhead_1_worker_over_local_1_thread":
                one / min(rows["local, 1 thread(s)"]["times"])}


def gpu(args) -> dict:
    import functools

    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    d = lw.random_directions(model, 2, seed=0)
    grid = dict(directions=d, x=(-1, 1, args.n), y=(-1, 1, args.n), progress=False)
    data_fn = functools.partial(cifar_data, args.samples)
    rows = {}
    local_model = model.to("cuda")
    local_data = tuple(t.to("cuda") for t in data_fn())
    times, ref = timed(lambda: lw.compute_surface(local_model, local_data, **grid),
                       args.repeats)
    rows["local, 1 GPU"] = {"times": times, "plan": ref.spec["plan"], "diff": 0.0}
    log(f"local GPU: {min(times):.2f} s")
    client = lw.local_gpu_executor(gpus=range(args.gpus), dashboard_address=":0",
                                   silence_logs=logging.ERROR)
    try:
        client.wait_for_workers(args.gpus, timeout=300)
        # The model travels as a CPU copy; the workers put it on their own GPU.
        times, surf = timed(
            lambda: lw.compute_surface(model, data_fn, executor=client, **grid), args.repeats)
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    rows[f"Dask, {args.gpus} GPU worker(s)"] = {
        "times": times, "plan": surf.spec["plan"], "executor": surf.spec["executor"],
        "diff": max_diff(surf.loss, ref.loss)}
    log(f"executor: {min(times):.2f} s")
    return {"workload": f"resnet18 (10 classes), {args.samples} x 3x32x32, "
                        f"{args.n}x{args.n} plane", "points": args.n ** 2, "rows": rows,
            "executor_over_local": min(times) / min(rows["local, 1 GPU"]["times"])}


def report(out: dict) -> None:
    print(f"\n{out['workload']}")
    print(f"{'configuration':<34} {'first s':>8} {'best s':>8} {'points/s':>9} "
          f"{'max |diff|':>10}  plan")
    for name, row in out["rows"].items():
        best = min(row["times"])
        plan = row["plan"] or {}
        print(f"{name:<34} {row['times'][0]:8.2f} {best:8.2f} {out['points'] / best:9.1f} "
              f"{row['diff']:10.1e}  {plan.get('strategy')} K={plan.get('points')} "
              f"B={plan.get('batch')}")
    for key in ("speedup_2_over_1", "overhead_1_worker_over_local_1_thread",
                "executor_over_local"):
        if key in out:
            print(f"{key.replace('_', ' ')}: {out[key]:.2f}x")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="CPU: a 9x9 plane")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--gpus", type=int, default=1, help="GPU workers (--device cuda)")
    p.add_argument("--n", type=int, default=21, help="plane resolution (--device cuda)")
    p.add_argument("--samples", type=int, default=2048, help="images (--device cuda)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(THREADS)
    start = load()
    log(f"{start} at start")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible here.", file=sys.stderr)
        return 2
    out = gpu(args) if args.device == "cuda" else cpu(args)
    out.update(load_start=start, load_end=load(), torch=torch.__version__)
    report(out)
    print(f"{start} at start, {out['load_end']} at end")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=str))
    worst = max(row["diff"] for row in out["rows"].values())
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
