"""MPO's random-squares experiment (PAPERS.md (c)): acc_diff against p for plain, BN and skip nets.

Skorokhodov & Burtsev fit random square masks (an n x n grid, a ring of drawn cells and a
Bernoulli(p) interior) into the plane of three initialisations of one convnet, in plain,
BatchNorm and skip-connection form (``lw.models.squares_net``), and plot acc_diff (mean
test accuracy of good cells minus bad cells) against p. This script runs that grid on the
digits images (an offline stand-in for FashionMNIST), prints mean +- std over seeds and
writes ``results.json`` and ``acc_diff.png`` to ``--out``. The networks are too slow for a
CPU at useful sizes (a step of 100 cells is seconds there); ``--tiny`` is a smoke run.

    python benchmarks/mpo_squares_gpu.py --out /tmp/mpo         # a GPU
    python benchmarks/mpo_squares_gpu.py --out /tmp/mpo --tiny  # CPU smoke run
    # notebook 09's CPU configuration (one seed is ~3 min on an idle core):
    python benchmarks/mpo_squares_gpu.py --out /tmp/mpo --width 0.25 --steps 150 --lr 3e-3 \
        --cells 10 --batch 64 --p 0.1,0.5,0.9 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import landscape_widget as lw  # noqa: E402
from landscape_widget.models import squares_net  # noqa: E402

KINDS = ("plain", "bn", "skip")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--n", type=int, default=10, help="mask side (the paper: 30)")
    parser.add_argument("--p", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tau", type=float, default=5.0)
    parser.add_argument("--width", type=float, default=1.0,
                        help="channel factor of squares_net (notebook 09's CPU run: 0.25)")
    parser.add_argument("--cells", type=int, default=50, help="good (and bad) cells per step")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train = lw.datasets.digits_images("train")
    test = lw.datasets.digits_images("test")
    ps = [float(p) for p in args.p.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    opts = {"steps": args.steps, "lr": args.lr, "tau": args.tau, "cells_per_step": args.cells,
            "batch_size": args.batch}
    n = args.n
    if args.tiny:
        ps, seeds, n = [0.5], [0], 6
        opts.update(steps=2, cells_per_step=4, batch_size=32)
        train, test = (train[0][:64], train[1][:64]), (test[0][:64], test[1][:64])
    train = tuple(t.to(args.device) for t in train)
    test = tuple(t.to(args.device) for t in test)
    t0 = time.perf_counter()
    results: dict[str, dict[str, list[dict]]] = {k: {} for k in KINDS}
    for kind in KINDS:
        for p in ps:
            for seed in seeds:
                def build(kind=kind):
                    return squares_net(kind, width=args.width, seed=None).to(args.device)

                fit = lw.fit_pattern(build, train, lw.random_squares(n, p, seed=seed),
                                     seed=seed, progress=False, **opts)
                scores = fit.scores(test)
                results[kind].setdefault(str(p), []).append(scores)
                print(f"{kind:5s} p={p:.1f} seed {seed}: acc_diff {scores['acc_diff']:.3f} "
                      f"(good {scores['good_acc']:.3f}, bad {scores['bad_acc']:.3f})", flush=True)
    total = time.perf_counter() - t0
    print(f"\nacc_diff on the test set, mean +- std over {len(seeds)} seeds ({n}x{n} masks, "
          f"{opts['steps']} steps)")
    print("p     " + "".join(f"{k:>16s}" for k in KINDS))
    summary = {}
    for p in ps:
        cells = []
        for kind in KINDS:
            vals = np.array([r["acc_diff"] for r in results[kind][str(p)]])
            summary.setdefault(kind, []).append((float(vals.mean()), float(vals.std())))
            cells.append(f"{vals.mean():9.3f} +- {vals.std():.3f}")
        print(f"{p:.1f}  " + "".join(f"{c:>16s}" for c in cells))
    (args.out / "results.json").write_text(json.dumps(
        {"options": {**opts, "n": n, "p": ps, "seeds": seeds, "width": args.width},
         "seconds": total, "results": results, "summary": summary}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind in KINDS:
        mean, std = np.array(summary[kind]).T
        ax.errorbar(ps, mean, yerr=std, label=kind, capsize=3)
    ax.set_xlabel("mask density p")
    ax.set_ylabel("test acc_diff")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "acc_diff.png", dpi=110)
    print(f"total {total:.0f} s; wrote {args.out}/results.json, acc_diff.png")


if __name__ == "__main__":
    main()
