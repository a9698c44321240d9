"""Benchmark the Hessian tools against PyHessian, side by side in one run.

Usage:
    python benchmarks/hessian.py [--repeats R] [--only NAME ...] [--device cpu|cuda]
                                 [--samples N] [--trace-samples S] [--dense] [--json PATH]

Every comparison is on the same matrix: the Hessian of the mean cross-entropy over the same
data given as ONE batch, with respect to ALL parameters (ours with ``ignore=None``), models in
eval mode. PyHessian 0.1 (the ``bench`` extra) takes double-backward products through a graph
built once and runs power iteration, stopping when the Rayleigh quotient changes by less than
``tol`` (relative) between two iterations; ours runs Lanczos (full reorthogonalisation)
stopping when the top pair's residual ``||Hv - lambda v||`` is below ``tol * lambda``.

Per workload:
- per-product cost: one plain ``torch.autograd.grad`` Hessian-vector product through a kept
  graph (what PyHessian does) against one ``HessianOperator.matvec`` (median of R x 3);
- top eigenvalue: PyHessian at its default ``tol=1e-3``; ours at its default ``tol=1e-4``;
  then both at matched accuracy, ``|lambda - ref| <= 1e-4 * ref``, each at the loosest
  tolerance of its ladder that reaches it (found by one untimed run per rung). ``ref`` is ours
  at ``tol=1e-9`` on a float64 copy (float32 and ``tol=1e-5`` above 1M parameters);
  ``--dense`` adds the dense float64 Hessian's for models under 5,000 parameters;
- trace: ``--trace-samples`` (100) Rademacher samples each (PyHessian with ``tol=-1`` so it
  takes exactly that many).

Times are one call each, set-up included, median of R (default 3) with ours and PyHessian
interleaved (the tolerance search's calls count as the first round),
``torch.set_num_threads(2)`` on CPU (CUDA calls are synchronised before reading the clock).
``speed-up`` = PyHessian's seconds / ours. ``overhead`` = seconds per product of the whole
call / one plain product. Workloads: the digits MLP (2,410 parameters) and
``lw.demo.trained_cnn`` on 512 digits samples; torchvision resnet18 (10 classes) on
``--samples`` seeded random 3x32x32 images (32 on CPU, 1024 with ``--device cuda``); a
2-layer Transformer encoder classifier on 64 random token sequences.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import landscape_widget as lw
from landscape_widget.core.hessian import HessianOperator

THREADS = 2
MATCH = 1e-4  # matched accuracy: |lambda - ref| <= MATCH * ref
OUR_TOLS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 1e-6)
PEER_TOLS = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 1e-7)
warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph")
warnings.filterwarnings("ignore", message=".*not converged", category=RuntimeWarning)

try:
    from pyhessian import hessian as PyHessian

    PEER_MODULE = sys.modules["pyhessian.hessian"]  # the name `pyhessian.hessian` is the class
    PEER_ERROR = None
except Exception as exc:  # any failure to import the peer is reported
    PyHessian = PEER_MODULE = None
    PEER_ERROR = f"{type(exc).__name__}: {exc}"


def mlp_workload(args):
    model, (x, y) = lw.demo.trained_mlp(seed=0)
    return model, (x[:512], y[:512])


def cnn_workload(args):
    model, (x, y) = lw.demo.trained_cnn(seed=0)
    return model, (x[:512], y[:512])


def resnet_workload(args):
    import torchvision

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = args.samples
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    return torchvision.models.resnet18(num_classes=10), (x, y)


class Encoder(nn.Module):
    """Token embedding + 2-layer Transformer encoder + mean pooling + linear head."""

    def __init__(self, vocab=100, width=64, heads=4, layers=2, classes=10, length=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.02 * torch.randn(length, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens) + self.pos).mean(1))


def transformer_workload(args):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 100, (64, 16), generator=g), torch.randint(0, 10, (64,), generator=g)
    return Encoder(), (x, y)


WORKLOADS = {  # short name: (description, builder)
    "MLP": ("digits MLP 64-32-10, trained, 512 samples", mlp_workload),
    "CNN": ("digits CNN (BN, residual), trained, 512 8x8 images", cnn_workload),
    "resnet18": ("resnet18 (10 classes), untrained, {n} random 3x32x32", resnet_workload),
    "transformer": ("Transformer encoder 2x64, untrained, 64 random 16-token sequences",
                    transformer_workload),
}


class Clock:
    """Wall-clock seconds; synchronises CUDA before reading (kernels run asynchronously)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


@contextlib.contextmanager
def counting(owner, name: str):
    """Count calls of ``owner.name`` (a function or method) inside the block."""
    orig, box = getattr(owner, name), [0]

    def wrapped(*args, **kwargs):
        box[0] += 1
        return orig(*args, **kwargs)

    setattr(owner, name, wrapped)
    try:
        yield box
    finally:
        setattr(owner, name, orig)


class Bench:
    """One workload: the model on its device, the data, and the two tools' calls."""

    def __init__(self, key: str, args):
        name, build = WORKLOADS[key]
        model, (x, y) = build(args)
        self.device = args.device
        self.model = model.to(self.device).eval()
        self.data = (x.to(self.device), y.to(self.device))
        self.name, self.key = name.format(n=x.shape[0]), key
        self.size = sum(p.numel() for p in model.parameters())
        self.clock = Clock(self.device)
        # CPU's fused attention has no double backward, so PyHessian fails on it; both tools
        # run the encoder with the math kernel (ours would switch to it by itself).
        self.kernel = math_attention if key == "transformer" else contextlib.nullcontext

    def ours(self, tol: float) -> float:
        vals, _ = lw.hessian_eigenpairs(self.model, self.data, k=1, tol=tol, seed=0,
                                        ignore=None)
        return float(vals[0])

    def theirs(self, tol: float, max_iter: int = 1000) -> float:
        torch.manual_seed(0)  # PyHessian's start vector is torch.randn
        h = PyHessian(self.model, nn.CrossEntropyLoss(), data=self.data,
                      cuda=self.device.startswith("cuda"))
        vals, _ = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=1)
        self.model.zero_grad(set_to_none=True)  # its constructor's backward(create_graph)
        return float(vals[0])

    def our_trace(self, samples: int) -> float:
        return lw.hessian_trace(self.model, self.data, samples=samples, ignore=None).value

    def their_trace(self, samples: int) -> float:
        torch.manual_seed(0)
        h = PyHessian(self.model, nn.CrossEntropyLoss(), data=self.data,
                      cuda=self.device.startswith("cuda"))
        vals = h.trace(maxIter=samples, tol=-1.0)  # tol < 0: exactly maxIter samples
        self.model.zero_grad(set_to_none=True)
        return float(sum(vals) / len(vals))

    def call(self, fn, side: str) -> dict:
        """One timed call of ``fn()``: its value, seconds and Hessian-vector products."""
        owner, name = ((HessianOperator, "matvec") if side == "ours"
                       else (PEER_MODULE, "hessian_vector_product"))
        with counting(owner, name) as box, self.kernel():
            t = self.clock()
            value = fn()
            seconds = self.clock() - t
        return {"value": value, "seconds": seconds, "hvps": box[0]}

    def product_costs(self, repeats: int) -> dict:
        """Median seconds of one plain autograd HVP and of one ``HessianOperator.matvec``."""
        net = copy.deepcopy(self.model)
        params = list(net.parameters())
        with self.kernel():
            loss = nn.functional.cross_entropy(net(self.data[0]), self.data[1])
            grads = torch.autograd.grad(loss, params, create_graph=True)
            op = HessianOperator(self.model, self.data, ignore=None)
            v = op.start_vector(0)
            op.matvec(v)  # builds the graph
        vs = [torch.randn_like(p) for p in params]
        plain, ours = [], []
        for _ in range(3 * repeats):
            t = self.clock()
            torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
            plain.append(self.clock() - t)
            t = self.clock()
            op.matvec(v)
            ours.append(self.clock() - t)
        return {"plain": statistics.median(plain), "ours": statistics.median(ours)}


def math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def loosest(b: Bench, side: str, tols, ref: float, runs: dict):
    """The first tolerance whose run is within MATCH of ``ref`` (runs are kept in ``runs``)."""
    fn = b.ours if side == "ours" else b.theirs
    for tol in tols:
        r = b.call(lambda tol=tol: fn(tol), side)
        runs.setdefault((side, tol), []).append(r)
        log(f"    {side} tol={tol:g}: {r['value']:.8g} ({r['hvps']} HVPs, {r['seconds']:.2f} s)")
        if abs(r["value"] - ref) <= MATCH * abs(ref):
            return tol, True
    return tols[-1], False


def timed(b: Bench, calls: dict, repeats: int, runs: dict) -> dict:
    """Median over ``repeats`` timed calls of each entry, interleaved round by round.

    ``calls`` maps ``(side, tol)`` or a name to ``(fn, side)``; calls already in ``runs``
    (the tolerance search's, timed the same way) count as rounds.
    """
    for _ in range(repeats):
        for k, (fn, side) in calls.items():
            if len(runs.setdefault(k, [])) < repeats:
                runs[k].append(b.call(fn, side))
                r = runs[k][-1]
                log(f"    {k}: {r['value']:.8g} ({r['hvps']} HVPs, {r['seconds']:.2f} s)")
    out = {}
    for k in calls:
        rs = runs[k][:repeats]
        med = statistics.median(r["seconds"] for r in rs)
        out[k] = {**rs[0], "seconds": med, "all_seconds": [r["seconds"] for r in rs]}
    return out


def bench(key: str, args) -> dict:
    b = Bench(key, args)
    log(f"{b.name}: {b.size:,} parameters; reference ...")
    if b.size <= 1_000_000 and not args.device.startswith("cuda"):
        ref_model = copy.deepcopy(b.model).double()
        ref = float(lw.hessian_eigenpairs(ref_model, b.data, k=1, tol=1e-9, ignore=None)[0][0])
    else:
        ref = b.ours(1e-5)  # float32 products: residuals much below 1e-5 are noise
    out = {"workload": b.name, "short": key, "parameters": b.size,
           "samples": int(b.data[0].shape[0]), "reference": ref, "rows": []}
    if args.dense and b.size <= 5000:
        out["dense"] = dense_lmax(b.model, b.data)
    log("  per-product cost ...")
    out["product"] = b.product_costs(args.repeats)
    if PyHessian is None:
        return out
    log("  tolerance search ...")
    runs: dict = {}
    our_tol, our_ok = loosest(b, "ours", OUR_TOLS, ref, runs)
    peer_tol, peer_ok = loosest(b, "theirs", PEER_TOLS, ref, runs)
    log(f"  timing (ours tol={our_tol:g}, PyHessian tol={peer_tol:g}) ...")
    calls = {("theirs", 1e-3): (lambda: b.theirs(1e-3), "theirs"),
             ("ours", 1e-4): (lambda: b.ours(1e-4), "ours"),
             ("theirs", peer_tol): (lambda: b.theirs(peer_tol), "theirs"),
             ("ours", our_tol): (lambda: b.ours(our_tol), "ours")}
    notes = ["default", "default", "matched" if peer_ok else "NOT reached",
             "matched" if our_ok else "NOT reached"]
    for ((side, tol), r), note in zip(timed(b, calls, args.repeats, runs).items(), notes,
                                      strict=True):
        method = "ours" if side == "ours" else "pyhessian"
        r = dict(r, method=method, tol=tol, note=note, rel_err=abs(r["value"] - ref) / abs(ref))
        out["rows"].append(r)
    out["eig_ratio"] = out["rows"][2]["seconds"] / out["rows"][3]["seconds"]
    out["matched"] = peer_ok and our_ok
    log(f"  trace, {args.trace_samples} samples ...")
    tr = timed(b, {"pyhessian": (lambda: b.their_trace(args.trace_samples), "theirs"),
                   "ours": (lambda: b.our_trace(args.trace_samples), "ours")}, args.repeats, {})
    out["trace"] = tr
    out["trace_ratio"] = tr["pyhessian"]["seconds"] / tr["ours"]["seconds"]
    return out


def dense_lmax(model, data) -> float:
    """Largest eigenvalue of the dense float64 Hessian (torch.func.hessian)."""
    from torch.func import functional_call, hessian

    m = copy.deepcopy(model).double().eval()
    names = [k for k, _ in m.named_parameters()]
    shapes = [p.shape for _, p in m.named_parameters()]
    numels = [p.numel() for _, p in m.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in m.named_parameters()])
    x, y = data[0].double(), data[1]

    def loss(v):
        parts = {k: p.reshape(s) for k, p, s in zip(names, v.split(numels), shapes, strict=True)}
        return nn.functional.cross_entropy(functional_call(m, parts, (x,)), y)

    return float(torch.linalg.eigvalsh(hessian(loss)(flat))[-1])


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def report(results: list[dict]) -> None:
    for res in results:
        pc = res["product"]
        extra = f", dense float64 {res['dense']:.9g}" if "dense" in res else ""
        print(f"\n-- {res['workload']}: {res['parameters']:,} params; reference lambda_max "
              f"{res['reference']:.9g}{extra}")
        print(f"   one product: plain autograd {1e3 * pc['plain']:.1f} ms, ours "
              f"{1e3 * pc['ours']:.1f} ms ({pc['ours'] / pc['plain']:.2f}x)")
        if not res["rows"]:
            continue
        print(f"   {'top eigenvalue':<10} {'tol':>6} {'lambda_max':>12} {'rel.err':>9} "
              f"{'HVPs':>5} {'s (median)':>10} {'overhead':>8}  accuracy")
        for r in res["rows"]:
            over = r["seconds"] / max(r["hvps"], 1) / pc["plain"]
            print(f"   {r['method']:<10} {r['tol']:>6.0e} {r['value']:>12.7g} "
                  f"{r['rel_err']:>9.1e} {r['hvps']:>5} {r['seconds']:>10.3f} {over:>7.2f}x  "
                  f"{r['note']}")
        print(f"   matched accuracy (|dlambda| <= {MATCH:g} lambda): ours "
              f"{res['eig_ratio']:.2f}x faster than PyHessian")
        for side in ("pyhessian", "ours"):
            t = res["trace"][side]
            over = t["seconds"] / max(t["hvps"], 1) / pc["plain"]
            print(f"   trace {side:<10} {t['value']:>12.6g}  {t['hvps']:>4} HVPs "
                  f"{t['seconds']:>8.3f} s  overhead {over:.2f}x")
        print(f"   trace: ours {res['trace_ratio']:.2f}x faster than PyHessian")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="+", choices=list(WORKLOADS), help="these workloads only")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (resnet18 on 1024 samples)")
    p.add_argument("--samples", type=int, help="resnet18 samples (32 on CPU, 1024 on CUDA)")
    p.add_argument("--trace-samples", type=int, default=100)
    p.add_argument("--threads", type=int, default=THREADS,
                   help="CPU threads (2; 1 on a machine oversubscribed by other work)")
    p.add_argument("--dense", action="store_true", help="dense float64 check of small models")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here.")
    args.samples = args.samples or (1024 if cuda else 32)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    peer = "pyhessian unavailable: " + PEER_ERROR if PEER_ERROR else "pyhessian 0.1"
    where = torch.cuda.get_device_name() if cuda else f"{args.threads} threads"
    print(f"torch {torch.__version__}, {args.device} ({where}), {os.cpu_count()} CPUs, {peer}, "
          f"load average {load0[0]:.2f} at start, median of {args.repeats}", flush=True)
    keys = args.only or (["resnet18"] if cuda else list(WORKLOADS))
    results = []
    for k in keys:  # each workload's table as soon as it is measured
        results.append(bench(k, args))
        report(results[-1:])
        sys.stdout.flush()
    load1 = os.getloadavg()
    print(f"\nload average {load1[0]:.2f} at end (1-min; {os.cpu_count()} CPUs)")
    for r in results:
        if "eig_ratio" in r:
            pc = r["product"]
            print(f"summary {r['short']}: top eigenvalue {r['eig_ratio']:.2f}x "
                  f"({'matched' if r['matched'] else 'accuracy NOT matched'}), trace "
                  f"{r['trace_ratio']:.2f}x, product {pc['ours'] / pc['plain']:.2f}x plain")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"torch": torch.__version__, "device": args.device,
                                         "threads": args.threads, "peer": peer, "load_start": load0,
                                         "load_end": load1, "results": results}, indent=1,
                                        default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
