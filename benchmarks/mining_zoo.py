"""Success rate of the curve-shape methods on models they were not calibrated on (issue 14.7).

Usage:
    python benchmarks/mining_zoo.py [--seeds 2] [--json PATH] [--only NAME ...]

The methods (``mine_direction`` w-peak / vvv-basin, ``mine_plane`` saddle / wine-bottle,
``side_direction``, ``permutation_direction``) run on a zoo of small models that differ
from the digits MLP the defaults were tuned on: other widths, depths and activations, a
near-converged and an early-stopped model, MNIST-1D (generated locally by the ``mnist1d``
package, no download), a synthetic spiral task, a CNN, and the digits MLP with its
weights scaled (x10, x0.1: another landscape) or rescaled layer by layer without changing
its function (ReLU: ``W1 * 10``, ``W2 / 10``; a scale-free method gives the same shape).

The shape each call *achieved* is measured here, independently of the library: the loss
along the returned direction on the taxonomy window (``lw.SHAPE_X``) by a plain per-point
loop in float64 over all data, labelled with ``lw.classify_curve`` (for the permutation on
``(-0.5, 1.5, 41)``, theta at 0 and its twin at 1); for planes, the saddle
is "theta is a minimum along u (v-basin) and a peak along v (w-peak)" and the wine bottle
"every one of 12 points on the rings r = 0.5 and r = 1 is below L(theta)" (PAPERS (d6),
(d7)). Where a result carries ``success`` / ``achieved`` (after issue 14.7) the script also
counts how often they agree with the independent check and whether a warning came with
every failure. Works against older code too (then only the success rate is printed), so
the same command on the old and new tree gives the before/after ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import landscape_widget as lw

ALPHAS = np.linspace(*lw.SHAPE_X)


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (torch.tensor(d.data[:1000] / 16.0, dtype=torch.float32),
            torch.tensor(d.target[:1000], dtype=torch.long))


def _mnist1d():
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = 1250
    d = make_dataset(args)
    return torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"], dtype=torch.long)


def _spirals(n: int = 900, classes: int = 3):
    g = torch.Generator().manual_seed(5)
    y = torch.arange(n) % classes
    r = torch.rand(n, generator=g) * 3 + 0.2
    t = r * 1.7 + y * (2 * math.pi / classes) + 0.25 * torch.randn(n, generator=g)
    x = torch.stack([r * torch.cos(t), r * torch.sin(t)], 1)
    return x, y


def _train(model: nn.Module, data, steps: int, lr: float = 1e-2, batch: int = 128,
           seed: int = 0) -> nn.Module:
    x, y = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model


def _mlp(sizes, act, bias=True, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(12 * 16, 10))


def _scaled(model: nn.Module, factors: list[float]) -> nn.Module:
    """A copy with each Linear's weight (and bias) multiplied by its factor."""
    out = copy.deepcopy(model)
    linears = [m for m in out.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for m, f in zip(linears, factors, strict=True):
            m.weight.mul_(f)
            if m.bias is not None:
                m.bias.mul_(f)
    return out


def zoo() -> dict:
    """``name -> (model, data)``; every model small enough for a CPU run of seconds."""
    digits, m1d, spir = _digits(), _mnist1d(), _spirals()
    relu_nb = _train(_mlp([64, 48, 10], nn.ReLU, bias=False, seed=3), digits, 250)
    models = {
        "tanh-64-64-64 near-converged": (_train(_mlp([64, 64, 64, 10], nn.Tanh, seed=1), digits,
                                                1500, lr=3e-3, batch=256), digits),
        "relu-16 early-stopped": (_train(_mlp([64, 16, 10], nn.ReLU, seed=2), digits, 25), digits),
        "gelu mnist1d 100-100": (_train(_mlp([40, 100, 100, 10], nn.GELU, seed=4), m1d, 600), m1d),
        "relu spirals 50-50": (_train(_mlp([2, 50, 50, 3], nn.ReLU, seed=5), spir, 800), spir),
        "cnn digits": (_train(_cnn(seed=6), digits, 300), digits),
        "relu no-bias": (relu_nb, digits),
        "relu no-bias, W1*10 W2/10 (same function)": (_scaled(relu_nb, [10.0, 0.1]), digits),
        "relu no-bias, weights x10": (_scaled(relu_nb, [10.0, 10.0]), digits),
        "relu no-bias, weights x0.1": (_scaled(relu_nb, [0.1, 0.1]), digits),
    }
    return models


@torch.no_grad()
def _loss64(model: nn.Module, data, d: dict | None, a: float = 0.0,
            d2: dict | None = None, b: float = 0.0) -> float:
    """Mean cross-entropy at ``theta + a d + b d2``: a plain float64 loop, eval mode."""
    m = copy.deepcopy(model).double().eval()
    params = {k: p.detach().double() for k, p in model.named_parameters()}
    buffers = {k: v.double() if v.is_floating_point() else v for k, v in model.named_buffers()}
    for k in params:
        if d is not None and k in d:
            params[k] = params[k] + a * d[k].double()
        if d2 is not None and k in d2:
            params[k] = params[k] + b * d2[k].double()
    for k in buffers:  # permutation directions also move float buffers
        if d is not None and k in d:
            buffers[k] = buffers[k] + a * d[k].double()
    x, y = data
    return float(F.cross_entropy(functional_call(m, {**params, **buffers}, (x.double(),)), y))


def independent_shape(model, data, d, alphas=ALPHAS) -> str:
    return lw.classify_curve(alphas, [_loss64(model, data, d, a) for a in alphas]).shape


def check_plane(model, data, shape, u, v) -> bool:
    if shape == "saddle":
        return (independent_shape(model, data, u) == "v-basin"
                and independent_shape(model, data, v) == "w-peak")
    l0 = _loss64(model, data, None)
    ring = [_loss64(model, data, u, r * math.cos(p), v, r * math.sin(p))
            for r in (0.5, 1.0) for p in np.linspace(0, 2 * math.pi, 12, endpoint=False)]
    return max(ring) < l0


METHODS = ("w-peak", "vvv-basin", "saddle", "wine-bottle", "side", "permutation")


def run_one(method: str, model, data, seed: int) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        if method in ("w-peak", "vvv-basin"):
            out = lw.mine_direction(model, data, method, seed=seed, progress=False)
            ok = independent_shape(model, data, out) == method
        elif method in ("saddle", "wine-bottle"):
            out = lw.mine_plane(model, data, method, seed=seed, progress=False)
            ok = check_plane(model, data, method, *out)
        elif method == "side":
            out = lw.side_direction(model, data)
            ok = independent_shape(model, data, out) == "v-side"
        else:
            try:
                out = lw.permutation_direction(model, seed=seed, data=data)
            except TypeError:  # the old signature takes no data
                out = lw.permutation_direction(model, seed=seed)
            # theta at 0, its permuted twin at 1 (the window the widget shows).
            ok = independent_shape(model, data, out, np.linspace(-0.5, 1.5, 41)) == "w-basin"
        seconds = time.perf_counter() - t0
    said = getattr(out, "success", None)
    warned = any("fell short" in str(w.message) or "achieved" in str(w.message)
                 for w in caught)
    return {"ok": bool(ok), "said": said, "warned": warned, "seconds": seconds,
            "achieved": str(getattr(out, "achieved", ""))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", nargs="*", default=None, help="methods to run")
    parser.add_argument("--models", nargs="*", default=None,
                        help="models to run (names start with these)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods = args.only or METHODS
    rows = []
    for name, (model, data) in zoo().items():
        if args.models and not any(name.startswith(m) for m in args.models):
            continue
        for method in methods:
            seeds = [0] if method == "side" else range(args.seeds)
            for seed in seeds:
                r = run_one(method, model, data, seed)
                r.update(model=name, method=method, seed=seed)
                rows.append(r)
                print(f"{name:44s} {method:12s} seed {seed}: independent "
                      f"{'OK  ' if r['ok'] else 'FAIL'} said={r['said']} warned={r['warned']} "
                      f"achieved={r['achieved']} {r['seconds']:.1f}s", flush=True)
    print("\nsuccess rate (independent check) per method:")
    for method in methods:
        sel = [r for r in rows if r["method"] == method]
        print(f"  {method:12s} {sum(r['ok'] for r in sel)}/{len(sel)}")
    total = sum(r["ok"] for r in rows)
    print(f"  all          {total}/{len(rows)} = {total / len(rows):.3f}")
    said = [r for r in rows if r["said"] is not None]
    if said:
        agree = sum(r["said"] == r["ok"] for r in said)
        false_ok = sum(r["said"] and not r["ok"] for r in said)
        unwarned = sum((not r["said"]) and not r["warned"] for r in said)
        print(f"result.success agrees with the independent check: {agree}/{len(said)}; "
              f"claimed success but wrong: {false_ok}; failures without a warning: {unwarned}")
    print(f"total seconds {sum(r['seconds'] for r in rows):.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
