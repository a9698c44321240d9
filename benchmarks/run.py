"""Benchmark landscape_widget against a per-point loop, loss-landscapes and losscape.

Usage:
    python benchmarks/run.py [--quick] [--json PATH] [--budget SECONDS] [--repeats R]

One run times every contender on both workloads of issue 2 with ``torch.set_num_threads(2)``,
prints seconds per grid, points/s and our speed-ups, checks the goals, prints a FLOP lower
bound and checks that our surface equals the per-point loop's. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
import workloads  # noqa: E402

THREADS = 2
TOLERANCE = 1e-4

CONTENDERS = {
    "ours": "(a) ours: lw.compute_surface",
    "loop": "(b) per-point loop (loss-landscape style)",
    "loss_landscapes": "(c) loss-landscapes random_plane",
    "losscape": "(d) losscape create_3D_losscape",
}
PEERS = ("loop", "loss_landscapes", "losscape")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def run_peer(name: str, wl: workloads.Workload, d1, d2, per_point: float, budget: float,
             repeats: int) -> dict:
    """Time one peer on the full grid, or on a subset when the full grid would exceed budget."""
    n, total = wl.n, wl.points
    full = per_point * total <= budget
    if name == "loop":
        # Grid points in random order until the budget is spent: a subset spread over the
        # whole grid (for the correctness check) whose size does not rely on the estimate.
        order = np.random.default_rng(0).permutation(total)
        coords = peers.grid_coords(n)[order]
        runs = [peers.run_loop(wl, d1, d2, coords, time_limit=budget) for _ in range(repeats)]
        best = min(runs, key=lambda r: r.seconds / r.points)
        idx = order[: best.points]
        label = f"{idx.size} of {total} grid points, random order"
    else:
        m = n if full else max(3, min(n, int(np.sqrt(budget / per_point))))
        idx = None
        if name == "loss_landscapes":
            runs = [peers.run_loss_landscapes(wl, m) for _ in range(repeats)]
        else:
            runs = [peers.run_losscape(wl, d1, d2, m) for _ in range(repeats)]
        label = f"a {m}x{m} grid on the same range"
    best = min(runs, key=lambda r: r.seconds / r.points)
    seconds = best.seconds / best.points * total
    return {
        "seconds": seconds,
        "cpu_seconds": best.cpu / best.points * total,
        "timed_seconds": best.seconds,
        "timed_points": best.points,
        "extrapolated": best.points < total,
        "subset": label,
        "loss": best.loss,
        "indices": idx,
        "extra": best.extra,
    }


def bench_workload(wl: workloads.Workload, args, rate: float) -> dict:
    import landscape_widget as lw

    d1, d2 = lw.random_directions(wl.model, 2, seed=0)
    opts = {}
    if args.strategy:
        opts["evaluator_options"] = {"strategy": args.strategy}
    probe = args.probe

    # Warm-up of every contender on a small grid (first-call costs), which also gives the
    # per-point cost that decides whether a peer runs the full grid.
    log(f"[{wl.key}] warm-up on {probe}x{probe} grids")
    peers.run_ours(wl, d1, d2, probe, **opts)
    per_point = {
        "loop": peers.run_loop(wl, d1, d2, peers.grid_coords(2)),
        "loss_landscapes": peers.run_loss_landscapes(wl, probe),
        "losscape": peers.run_losscape(wl, d1, d2, probe),
    }
    per_point = {k: v.seconds / v.points for k, v in per_point.items()}

    log(f"[{wl.key}] ours: {wl.n}x{wl.n}")
    ours_runs = [peers.run_ours(wl, d1, d2, wl.n, **opts) for _ in range(args.repeats)]
    ours = min(ours_runs, key=lambda r: r.seconds)
    results = {"ours": {"seconds": ours.seconds, "cpu_seconds": ours.cpu,
                        "timed_seconds": ours.seconds,
                        "timed_points": wl.points, "extrapolated": False,
                        "plan": ours.extra["plan"], "loss": ours.loss}}
    for name in PEERS:
        est = per_point[name] * wl.points
        log(f"[{wl.key}] {name}: ~{est:.0f} s for the full grid by its warm-up "
            f"(budget {args.budget:.0f} s)")
        results[name] = run_peer(name, wl, d1, d2, per_point[name], args.budget, args.repeats)

    # Correctness: ours vs the per-point loop on the points the loop computed.
    loop = results["loop"]
    ours_flat = ours.loss.ravel()
    check = {"loop_vs_ours": rel_diff(ours_flat[loop["indices"]], loop["loss"]),
             "loop_points": int(loop["indices"].size)}
    lc = results["losscape"]
    check["losscape_vs_ours"] = (rel_diff(ours.loss, lc["loss"])
                                 if lc["loss"].shape == ours.loss.shape else None)
    check["ok"] = bool(check["loop_vs_ours"] < TOLERANCE)

    fastest = min(PEERS, key=lambda k: results[k]["seconds"])
    for name in PEERS:
        results[name]["speedup"] = results[name]["seconds"] / ours.seconds
        results[name]["cpu_speedup"] = results[name]["cpu_seconds"] / ours.cpu
    flops = workloads.forward_flops_per_sample(wl.model, wl.inputs)
    work = flops[0] * wl.points * wl.samples
    bound = work / rate
    target = fastest if wl.goal == "fastest_peer" else "loop"
    speedup = results[target]["seconds"] / ours.seconds
    cpu_speedup = results[target]["cpu_seconds"] / ours.cpu
    return {
        "key": wl.key,
        "title": wl.title,
        "points": wl.points,
        "samples": wl.samples,
        "results": results,
        "fastest_peer": fastest,
        "goal": {"against": target, "factor": wl.goal_factor, "speedup": speedup,
                 "cpu_speedup": cpu_speedup, "met": bool(speedup >= wl.goal_factor)},
        "flops_per_sample": {"analytic": flops[0], "flop_counter": flops[1]},
        "bound_seconds": bound,
        "ours_over_bound": ours.seconds / bound,
        "ours_gflops": work / ours.seconds / 1e9,
        "check": check,
    }


def fmt_plan(plan: dict | None) -> str:
    if not plan:
        return "plan: none"
    flags = "".join(f" {k}={plan[k]}" for k in ("layout", "stem", "vmap_error", "precision",
                                                 "compiled") if plan.get(k))
    why = f" ({plan['reason']})" if plan.get("reason") else ""
    return (f"{plan.get('strategy')} K={plan.get('points')} B={plan.get('batch')}{flags}"
            f"{why}")


def report(res: dict, rate: float) -> None:
    r = res["results"]
    print(f"\n{res['title']}: {res['points']} points x {res['samples']} samples")
    print(f"  {'contender':<42}{'s/grid':>8}{'points/s':>9}{'speed-up':>9}"
          f"{'cpu s':>8}{'cpu x':>7}  note")
    for name, label in CONTENDERS.items():
        v = r[name]
        pts = res["points"] / v["seconds"]
        if name == "ours":
            ratio, cpu_ratio = "", ""
            note = f"auto plan: {fmt_plan(v.get('plan'))}"
        else:
            ratio, cpu_ratio = f"{v['speedup']:.2f}x", f"{v['cpu_speedup']:.2f}x"
            note = (f"extrapolated from {v['subset']} ({v['timed_seconds']:.1f} s)"
                    if v["extrapolated"] else "full grid")
            if name == "losscape":
                note += "; plotting excluded"
        print(f"  {label:<42}{v['seconds']:>8.2f}{pts:>9.1f}{ratio:>9}"
              f"{v['cpu_seconds']:>8.1f}{cpu_ratio:>7}  {note}")
    fastest = res["fastest_peer"]
    print(f"  fastest peer: {CONTENDERS[fastest]}; our speed-up over it: "
          f"{r[fastest]['speedup']:.2f}x")
    g = res["goal"]
    met = "MET" if g["met"] else "NOT MET"
    against = "the per-point loop" if g["against"] == "loop" else "the fastest peer"
    print(f"  goal: >= {g['factor']:.0f}x {against}: {g['speedup']:.2f}x wall-clock -> {met}"
          f" (CPU-time ratio {g['cpu_speedup']:.2f}x)")
    f = res["flops_per_sample"]
    print(f"  lower bound: {f['analytic']:,} FLOP/sample (FlopCounterMode: {f['flop_counter']:,})"
          f" x {res['points']} points x {res['samples']} samples / {rate / 1e9:.1f} GFLOP/s"
          f" = {res['bound_seconds']:.3f} s; ours = {res['ours_over_bound']:.1f}x the bound"
          f" ({res['ours_gflops']:.2f} GFLOP/s)")
    c = res["check"]
    status = "OK" if c["ok"] else "FAIL"
    print(f"  correctness: max rel diff ours vs per-point loop over {c['loop_points']} points"
          f" = {c['loop_vs_ours']:.2e} (< {TOLERANCE:g}: {status})")
    if c["losscape_vs_ours"] is not None:
        print(f"  losscape (same directions) vs ours: max rel diff {c['losscape_vs_ours']:.2e}")


def to_jsonable(obj):
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items() if k not in ("loss", "indices")}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small grids: a smoke run (< 1 min)")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument("--budget", type=float, default=None,
                   help="max seconds per peer measurement before it is timed on a subset and "
                        "extrapolated (default 60, quick 3)")
    p.add_argument("--repeats", type=int, default=1, help="best of R timed runs per contender")
    p.add_argument("--strategy", choices=("auto", "vmap", "loop"), default=None,
                   help="force our engine's strategy (default: the library default, auto)")
    args = p.parse_args(argv)
    args.budget = args.budget if args.budget is not None else (3.0 if args.quick else 60.0)
    args.probe = 2 if args.quick else 4

    sys.stdout.reconfigure(line_buffering=True)
    torch.set_num_threads(THREADS)
    import landscape_widget as lw

    load0 = os.getloadavg()
    print(f"landscape_widget {lw.__version__} benchmark: torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load0[0]:.2f} at start"
          f"{' (quick mode)' if args.quick else ''}")
    rate = workloads.matmul_rate(1024 if args.quick else 2048)
    print(f"float32 matmul {1024 if args.quick else 2048}^3: {rate / 1e9:.1f} GFLOP/s (best of 5)")

    specs = ([workloads.cnn_workload(5), workloads.mlp_workload(9)] if args.quick
             else [workloads.cnn_workload(21), workloads.mlp_workload(41)])
    t0 = time.perf_counter()
    out = [bench_workload(wl, args, rate) for wl in specs]
    for res in out:
        report(res, rate)
    load1 = os.getloadavg()
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; load average {load1[0]:.2f} at end "
          f"(other processes on a shared machine make timings noisy)")
    ok = all(r["check"]["ok"] for r in out)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"torch": torch.__version__, "threads": THREADS, "quick": args.quick,
               "budget_s": args.budget, "repeats": args.repeats,
               "load_average": [load0[0], load1[0]], "matmul_gflops": rate / 1e9,
               "workloads": to_jsonable(out), "correct": ok}
        args.json.write_text(json.dumps(doc, indent=2, default=str))
        print(f"results written to {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
