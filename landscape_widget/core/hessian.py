"""Curvature of the loss: Hessian-vector products, eigenpairs, trace and spectral density.

The Hessian is that of the mean loss over *all* data (batches weighted by their size), with
respect to the parameters of dimension > 1 by default (``ignore="biasbn"``, as loss-landscape's
``hess_vec_prod``), or of all parameters (``ignore=None``). Products are forward-over-reverse
(``torch.func.jvp`` of ``torch.func.grad``) through ``functional_call`` on an evaluation copy
of the model: the model is never edited, and BatchNorm uses its running statistics
(``bn="eval"``) unless ``bn="batch"``.

- :func:`hessian_eigenpairs`: Lanczos (ARPACK via ``scipy.sparse.linalg.eigsh``).
- :func:`hessian_trace`: Hutchinson's estimator with Rademacher vectors and its standard error.
- :func:`hessian_density`: stochastic Lanczos quadrature (Ghorbani et al. 2019, as PyHessian).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

from .data import as_tensors
from .params import Params, buffers_of, check_module, evaluation_copy, model_device, parameters_of

_WARMED = False


def _warm_forward_ad() -> None:
    """Load torch's forward-AD decompositions once, hiding torch's own FutureWarning.

    The first ``jvp`` of a process imports ``torch._decomp.decompositions_for_jvp``, which
    calls the deprecated ``torch.jit.script``; the warning is about torch, not user code.
    """
    global _WARMED
    if not _WARMED:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated",
                                    category=FutureWarning)
            jvp(lambda t: t * t, (torch.ones(1),), (torch.ones(1),))
        _WARMED = True


class Cancelled(RuntimeError):
    """A curvature computation stopped by its cancel event."""


class HessianOperator:
    """``v -> H v`` for the Hessian of the mean loss over ``data``.

    Args:
        model: The model (never modified).
        data: ``(inputs, targets)``, a ``Dataset`` or a ``DataLoader``.
        loss_fn: ``loss_fn(outputs, targets)``, a batch mean; cross-entropy by default.
        ignore: ``"biasbn"`` (default): only parameters of dimension > 1; ``None``: all.
        bn: ``"eval"`` (running statistics) or ``"batch"``.
        batch_size: Samples per HVP pass (default: all, at most 2048).
        point: Parameter values to take the Hessian at, instead of the model's own
            (a dict with some or all parameter names).
        device: Where to compute (default: the model's device).
        cancel: A ``threading.Event`` checked before every product.
        on_product: Called with the number of products so far after each one (progress).
        method: How products are taken. ``"graph"``: when all data fits in one batch, the
            gradient's graph is built once and every product is one double backward
            through it (fastest on CPU: 2-4x fewer milliseconds per product than ``jvp``
            in benchmarks/hessian.py); ``"jvp"``: forward-over-reverse
            (``torch.func.jvp`` of ``torch.func.grad``), batch by batch, keeping no graph
            between products; ``"auto"`` (default): ``"graph"`` for one batch, else
            ``"jvp"``.
    """

    def __init__(self, model: nn.Module, data, *, loss_fn: Callable | None = None,
                 ignore: str | None = "biasbn", bn: str = "eval", batch_size: int | None = None,
                 point: Params | None = None, device=None,
                 cancel: threading.Event | None = None,
                 on_product: Callable[[int], None] | None = None, method: str = "auto"):
        check_module(model)
        _warm_forward_ad()
        if ignore not in ("biasbn", None):
            raise ValueError("ignore must be 'biasbn' (parameters of dim > 1) or None (all).")
        if bn not in ("eval", "batch"):
            raise ValueError("bn must be 'eval' or 'batch'.")
        self.device = torch.device(device) if device is not None else model_device(model)
        self.module = evaluation_copy(model)
        if self.module is model:
            raise ValueError("this model cannot be copied (deepcopy failed), so its flags "
                             "cannot be set without modifying it; make it deep-copyable.")
        self.module.eval()
        if bn == "batch":
            for m in self.module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
                    m.track_running_stats = False
        params = parameters_of(model)
        if point is not None:
            unknown = sorted(set(point) - set(params))
            if unknown:
                raise ValueError(f"point has unknown parameter names {unknown[:3]}.")
            params = {**params, **{k: v.detach() for k, v in point.items()}}
        params = {k: v.to(self.device) for k, v in params.items()}
        self._all_shapes = {k: tuple(v.shape) for k, v in params.items()}
        self.keys = [k for k, v in params.items() if ignore is None or v.dim() > 1]
        if not self.keys:
            raise ValueError("the model has no parameters of dimension > 1; pass ignore=None.")
        self.params = {k: params[k] for k in self.keys}
        self.fixed = {k: v for k, v in params.items() if k not in self.params}
        self.fixed.update({k: v.to(self.device) for k, v in buffers_of(model).items()})
        self.shapes = [tuple(self.params[k].shape) for k in self.keys]
        self.numels = [self.params[k].numel() for k in self.keys]
        self.size = int(sum(self.numels))
        self.dtype = next(iter(self.params.values())).dtype
        x, y = as_tensors(data)
        if x.shape[0] == 0:
            raise ValueError("data is empty.")
        if torch.is_floating_point(x):
            x = x.to(self.dtype)
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.n = int(x.shape[0])
        if batch_size is not None and (isinstance(batch_size, bool)
                                       or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be an int >= 1 or None (all data, at most "
                             f"2048), got {batch_size!r}.")
        self.batch = int(batch_size or min(self.n, 2048))
        if method not in ("auto", "graph", "jvp"):
            raise ValueError("method must be 'auto', 'graph' or 'jvp'.")
        if method == "graph" and self.batch < self.n:
            raise ValueError("method='graph' needs all data in one batch; raise batch_size "
                             "or use method='jvp'.")
        self.method = ("graph" if self.batch >= self.n else "jvp") if method == "auto" else method
        self._graph: tuple | None = None
        self.loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
        self.cancel = cancel
        self.on_product = on_product
        self.products = 0

    def unflatten(self, flat: Tensor) -> Params:
        """Direction dict over the Hessian's parameters from a flat vector."""
        parts = torch.split(flat, self.numels)
        return {k: p.reshape(s) for k, p, s in zip(self.keys, parts, self.shapes, strict=True)}

    def flatten(self, d: Params) -> Tensor:
        """Flat vector of a dict over (at least) the Hessian's parameters."""
        return torch.cat([d[k].reshape(-1).to(self.device, self.dtype) for k in self.keys])

    def _loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(self.module, {**self.fixed, **params}, (x,))
        return self.loss_fn(out, y)

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` (any float dtype; the result has ``v``'s dtype)."""
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("cancelled")
        tangent = self.unflatten(v.to(self.device, self.dtype))
        if self.method == "graph":
            out = self._graph_product(tangent)
        else:
            out = self._jvp_product(tangent)
        self.products += 1
        if self.on_product is not None:
            self.on_product(self.products)
        return out.to(v.dtype)

    def _graph_product(self, tangent: Params) -> Tensor:
        if self._graph is None:
            # Leaves that require grad, separate from the model's tensors: functional_call
            # uses them, so nothing of the model is touched or recorded.
            leaves = {k: v.detach().clone().requires_grad_(True) for k, v in
                      self.params.items()}
            with torch.enable_grad():
                loss = self._loss(leaves, self.x, self.y)
                grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
            self._graph = (list(leaves.values()), grads)
        leaves, grads = self._graph
        with torch.enable_grad():
            hv = torch.autograd.grad(grads, leaves, grad_outputs=[tangent[k] for k in self.keys],
                                     retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).double()

    def _jvp_product(self, tangent: Params) -> Tensor:
        out = torch.zeros(self.size, dtype=torch.float64, device=self.device)
        g = grad(self._loss)
        for start in range(0, self.n, self.batch):
            xb, yb = self.x[start:start + self.batch], self.y[start:start + self.batch]
            _, hv = jvp(lambda p, xb=xb, yb=yb: g(p, xb, yb), (self.params,), (tangent,))
            out += self.flatten(hv).double() * (xb.shape[0] / self.n)
        return out

    def as_linear_operator(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy vectors)."""
        return scipy_operator(self.matvec, self.size)

    def full_direction(self, flat: Tensor) -> Params:
        """A direction dict over *all* parameters (zero outside the Hessian's), on the CPU."""
        d = {k: v.detach().cpu().float() for k, v in self.unflatten(flat).items()}
        return {k: d[k] if k in d else torch.zeros(s) for k, s in self._all_shapes.items()}


def scipy_operator(matvec: Callable[[Tensor], Tensor], size: int):
    """``matvec`` on torch tensors as a scipy ``LinearOperator`` on float64 numpy vectors."""
    from scipy.sparse.linalg import LinearOperator

    def mv(v):
        flat = np.ascontiguousarray(v, dtype=np.float64).reshape(-1)
        return matvec(torch.from_numpy(flat)).cpu().numpy()

    return LinearOperator((size, size), matvec=mv, dtype=np.float64)


def _start_vector(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(size)


BASIS_BYTES = 2 << 30
"""Memory the Lanczos basis may take (float64 vectors); it caps the number of steps."""


def lanczos_steps(matvec: Callable[[Tensor], Tensor], v0: Tensor, steps: int):
    """The Lanczos iteration with full reorthogonalisation (twice, float64).

    Yields ``(alphas, betas, beta, basis)`` after every step: the tridiagonal's diagonal and
    off-diagonal so far, the norm of the next residual, and the orthonormal basis (rows).
    A consumer that stops early (converged, or ``beta`` about 0) simply breaks; the basis
    grows by doubling up to ``steps`` rows.
    """
    size = v0.numel()
    basis = torch.zeros(min(steps, 32), size, dtype=torch.float64)
    q = v0.double().cpu()
    basis[0] = q / q.norm()
    alphas: list[float] = []
    betas: list[float] = []
    for m in range(steps):
        w = matvec(basis[m]).double().cpu()
        if m:
            w = w - betas[-1] * basis[m - 1]
        alphas.append(float(w @ basis[m]))
        for _ in range(2):
            w = w - basis[:m + 1].T @ (basis[:m + 1] @ w)
        beta = float(w.norm())
        yield alphas, betas, beta, basis[:m + 1]
        if m + 1 == steps:
            return
        betas.append(beta)
        if m + 1 == basis.shape[0]:
            grown = torch.zeros(min(steps, 2 * basis.shape[0]), size, dtype=torch.float64)
            grown[:m + 1] = basis
            basis = grown
        basis[m + 1] = w / beta


def lanczos_extremes(matvec: Callable[[Tensor], Tensor], v0: Tensor, *, k: int = 1,
                     ends: tuple[str, ...] = ("largest",), tol: float = 1e-4,
                     max_steps: int | None = None, vectors: bool = True) -> dict | None:
    """Extreme eigenpairs of a symmetric operator by Lanczos, stopping once converged.

    Full reorthogonalisation (twice, float64) keeps the Ritz values clean. After every
    step the Ritz pairs of the tridiagonal matrix are checked: a pair is converged when its
    residual ``||H y - theta y|| = beta_m |s_m|`` is at most ``tol * max|theta|``. One run
    serves both ends of the spectrum (``ends=("largest", "smallest")``).

    Args:
        matvec: ``v -> H v`` on flat float64 vectors.
        v0: Start vector.
        k: Eigenpairs wanted at each end.
        ends: ``"largest"`` and/or ``"smallest"`` (algebraic).
        tol: Relative residual tolerance.
        max_steps: Cap on steps (products); default from :data:`BASIS_BYTES`.
        vectors: Also return the Ritz vectors.

    Returns:
        ``{end: (values, vectors or None)}`` with values ordered outward from the middle
        reversed (largest first for ``"largest"``, smallest first for ``"smallest"``), or
        ``None`` if not converged within ``max_steps``.
    """
    size = v0.numel()
    cap = max(2 * k + 2, min(size, BASIS_BYTES // (8 * max(size, 1))))
    steps = min(cap, max_steps or cap, size)
    for alphas, betas, beta, basis in lanczos_steps(matvec, v0, steps):
        t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        theta, svec = np.linalg.eigh(t)
        scale = max(abs(theta[0]), abs(theta[-1]), 1e-30)
        picks = {"largest": np.arange(len(theta) - 1, max(len(theta) - 1 - k, -1), -1),
                 "smallest": np.arange(0, min(k, len(theta)))}
        done = len(theta) >= k and all(
            np.all(beta * np.abs(svec[-1, picks[e]]) <= tol * scale) for e in ends)
        if done or beta < 1e-12 * scale or len(alphas) == size:
            out = {}
            for e in ends:
                idx = picks[e]
                vecs = (basis.T @ torch.from_numpy(svec[:, idx])).numpy() if vectors else None
                out[e] = (theta[idx], vecs)
            return out
    return None


def hessian_eigenpairs(model: nn.Module, data, *, k: int = 2, which: str = "largest",
                       tol: float = 1e-4, max_products: int | None = None, seed: int = 0,
                       progress: bool = False, **options) -> tuple[np.ndarray, list[Params]]:
    """The ``k`` largest (or smallest) eigenvalues of the Hessian and their eigenvectors.

    Args:
        model: The model (never modified).
        data: The data the loss is averaged over.
        k: Number of eigenpairs.
        which: ``"largest"`` or ``"smallest"`` (algebraic).
        tol: Relative residual ``||H v - lambda v|| / max|lambda|`` at which a pair is
            converged (the eigenvalue's error is of order ``tol**2``).
        max_products: Cap on Hessian-vector products of the first Lanczos run.
        seed: Seed of the Lanczos start vector (results are deterministic).
        progress: Show a tqdm counter of Hessian-vector products.
        **options: :class:`HessianOperator` options (``loss_fn``, ``ignore``, ``bn``,
            ``batch_size``, ``point``, ``device``, ``cancel``).

    Returns:
        ``(values, vectors)``: eigenvalues sorted from largest to smallest (``"largest"``)
        or smallest to largest (``"smallest"``), and unit-norm eigenvectors as direction
        dicts over all parameters (zero where excluded), usable as surface directions.
    """
    from scipy.sparse.linalg import eigsh

    if which not in ("largest", "smallest"):
        raise ValueError("which must be 'largest' or 'smallest'.")
    op = HessianOperator(model, data, **options)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < op.size:
        raise ValueError(f"k must be an int in [1, {op.size - 1}], got {k!r}.")
    v0 = _start_vector(op.size, seed)
    bar = _bar(progress, None, "Hessian-vector products")

    def matvec(v: Tensor) -> Tensor:
        out = op.matvec(v)
        if bar is not None:
            bar.update(1)
        return out

    try:
        # Lanczos with a convergence test first: it stops as soon as the wanted Ritz pairs
        # are accurate (a handful of products for the top eigenvalue); ARPACK (restarted
        # Lanczos, at least ncv products) takes over if the basis cap is reached first.
        found = lanczos_extremes(matvec, torch.from_numpy(v0), k=k, ends=(which,), tol=tol,
                                 max_steps=max_products)
        if found is not None:
            vals, vecs = found[which]
        else:
            ncv = min(op.size, max(2 * k + 1, 20))
            maxiter = None if max_products is None else max(1, max_products // ncv)
            vals, vecs = eigsh(scipy_operator(matvec, op.size), k=k,
                               which="LA" if which == "largest" else "SA", tol=tol, v0=v0,
                               ncv=ncv, maxiter=maxiter)
            order = np.argsort(-vals if which == "largest" else vals)
            vals, vecs = vals[order], vecs[:, order]
    finally:
        if bar is not None:
            bar.close()
    dirs = []
    for i in range(k):
        v = vecs[:, i]
        v = v * (1.0 if v[np.argmax(np.abs(v))] >= 0 else -1.0)  # a fixed sign
        dirs.append(op.full_direction(torch.from_numpy(v / np.linalg.norm(v))))
    return vals, dirs


class TraceEstimate(NamedTuple):
    """Hutchinson's estimate of the Hessian trace."""

    value: float
    stderr: float
    samples: int


def hessian_trace(model: nn.Module, data, *, samples: int = 100, seed: int = 0,
                  progress: bool = False, **options) -> TraceEstimate:
    """Hutchinson's trace estimate ``mean(v^T H v)`` over Rademacher ``v``, with its error.

    Args:
        model: The model (never modified).
        data: The data the loss is averaged over.
        samples: Number of random vectors.
        seed: Seed of the vectors.
        progress: Show a tqdm bar.
        **options: :class:`HessianOperator` options.

    Returns:
        ``TraceEstimate(value, stderr, samples)``; ``stderr`` is the sample standard
        deviation over ``sqrt(samples)``.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ValueError(f"samples must be an int >= 2, got {samples!r}.")
    op = HessianOperator(model, data, **options)
    g = torch.Generator().manual_seed(seed)
    bar = _bar(progress, samples, "Hutchinson")
    est = []
    try:
        for _ in range(samples):
            v = (torch.randint(0, 2, (op.size,), generator=g) * 2 - 1).double()
            est.append(float(v @ op.matvec(v).cpu()))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    arr = np.array(est)
    return TraceEstimate(float(arr.mean()), float(arr.std(ddof=1) / np.sqrt(samples)), samples)


def hessian_density(model: nn.Module, data, *, steps: int = 60, runs: int = 3,
                    grid_points: int = 1000, sigma: float | None = None, seed: int = 0,
                    progress: bool = False, **options) -> tuple[np.ndarray, np.ndarray]:
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature.

    Each run starts Lanczos from a Rademacher vector; the Ritz values are the quadrature
    nodes and the squared first components of the Ritz vectors their weights; the density
    is the run average of Gaussians of width ``sigma`` at the nodes.

    Args:
        model: The model (never modified).
        data: The data the loss is averaged over.
        steps: Lanczos steps per run (at most the number of parameters).
        runs: Independent runs averaged.
        grid_points: Points of the returned grid.
        sigma: Gaussian width (default 1 % of the spectrum's span).
        seed: Seed of the start vectors.
        progress: Show a tqdm bar over runs.
        **options: :class:`HessianOperator` options.

    Returns:
        ``(grid, density)``: the density integrates to 1 over the grid.
    """
    op = HessianOperator(model, data, **options)
    steps = int(min(steps, op.size))
    g = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    bar = _bar(progress, runs, "SLQ runs")
    try:
        for _ in range(runs):
            v = (torch.randint(0, 2, (op.size,), generator=g) * 2 - 1).double()
            for step in lanczos_steps(op.matvec, v, steps):
                if step[2] < 1e-10:  # an invariant subspace: the quadrature is exact
                    break
            a, b = step[0], step[1]
            t = np.diag(a) + np.diag(b, 1) + np.diag(b, -1)
            theta, u = np.linalg.eigh(t)
            nodes.append(theta)
            weights.append(u[0] ** 2 / runs)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    nodes_, weights_ = np.concatenate(nodes), np.concatenate(weights)
    lo, hi = nodes_.min(), nodes_.max()
    span = max(hi - lo, 1e-12)
    sigma = float(sigma) if sigma is not None else 0.01 * span
    grid = np.linspace(lo - 0.05 * span - 3 * sigma, hi + 0.05 * span + 3 * sigma, grid_points)
    dens = (weights_[None, :] * np.exp(-0.5 * ((grid[:, None] - nodes_[None, :]) / sigma) ** 2)
            ).sum(1) / (sigma * np.sqrt(2 * np.pi))
    dens = dens / np.trapezoid(dens, grid)
    return grid, dens


def _bar(progress: bool, total: int | None, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc)
