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
    """

    def __init__(self, model: nn.Module, data, *, loss_fn: Callable | None = None,
                 ignore: str | None = "biasbn", bn: str = "eval", batch_size: int | None = None,
                 point: Params | None = None, device=None,
                 cancel: threading.Event | None = None,
                 on_product: Callable[[int], None] | None = None):
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
        self.batch = int(batch_size or min(self.n, 2048))
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
        out = torch.zeros(self.size, dtype=torch.float64, device=self.device)
        g = grad(self._loss)
        for start in range(0, self.n, self.batch):
            xb, yb = self.x[start:start + self.batch], self.y[start:start + self.batch]
            _, hv = jvp(lambda p, xb=xb, yb=yb: g(p, xb, yb), (self.params,), (tangent,))
            out += self.flatten(hv).double() * (xb.shape[0] / self.n)
        self.products += 1
        if self.on_product is not None:
            self.on_product(self.products)
        return out.to(v.dtype)

    def as_linear_operator(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy vectors)."""
        from scipy.sparse.linalg import LinearOperator

        def mv(v):
            return self.matvec(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)
                                                .reshape(-1))).cpu().numpy()

        return LinearOperator((self.size, self.size), matvec=mv, dtype=np.float64)

    def full_direction(self, flat: Tensor) -> Params:
        """A direction dict over *all* parameters (zero outside the Hessian's), on the CPU."""
        d = {k: v.detach().cpu().float() for k, v in self.unflatten(flat).items()}
        return {k: d[k] if k in d else torch.zeros(s) for k, s in self._all_shapes.items()}


def _start_vector(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(size)


def hessian_eigenpairs(model: nn.Module, data, *, k: int = 2, which: str = "largest",
                       tol: float = 1e-6, max_products: int | None = None, seed: int = 0,
                       progress: bool = False, **options) -> tuple[np.ndarray, list[Params]]:
    """The ``k`` largest (or smallest) eigenvalues of the Hessian and their eigenvectors.

    Args:
        model: The model (never modified).
        data: The data the loss is averaged over.
        k: Number of eigenpairs.
        which: ``"largest"`` or ``"smallest"`` (algebraic).
        tol: Relative accuracy of the eigenvalues (ARPACK's ``tol``).
        max_products: Cap on Hessian-vector products (ARPACK restarts included).
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
    lin = _counted(op, progress, "Hessian-vector products")
    try:
        ncv = min(op.size, max(2 * k + 1, 20))
        maxiter = None if max_products is None else max(1, max_products // ncv)
        vals, vecs = eigsh(lin, k=k, which="LA" if which == "largest" else "SA", tol=tol,
                           v0=_start_vector(op.size, seed), ncv=ncv, maxiter=maxiter)
    finally:
        _close(lin)
    order = np.argsort(-vals if which == "largest" else vals)
    vals, vecs = vals[order], vecs[:, order]
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


def lanczos(matvec: Callable[[Tensor], Tensor], v0: Tensor, steps: int) -> tuple[np.ndarray,
                                                                               np.ndarray]:
    """Lanczos with full reorthogonalisation (float64); returns the tridiagonal's diagonals."""
    q = v0.double() / v0.double().norm()
    basis = [q]
    alphas, betas = [], []
    prev, beta = torch.zeros_like(q), 0.0
    for _ in range(steps):
        w = matvec(q).double().cpu() - beta * prev
        alpha = float(w @ q)
        w = w - alpha * q
        for b in basis:  # full reorthogonalisation: keeps the Ritz values clean
            w = w - (w @ b) * b
        alphas.append(alpha)
        beta = float(w.norm())
        if beta < 1e-10 or len(alphas) == steps:
            break
        betas.append(beta)
        prev, q = q, w / beta
        basis.append(q)
    return np.array(alphas), np.array(betas[:len(alphas) - 1])


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
            a, b = lanczos(op.matvec, v, steps)
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


def _counted(op: HessianOperator, progress: bool, desc: str):
    """The operator as a scipy LinearOperator, updating a tqdm counter per product."""
    lin = op.as_linear_operator()
    bar = _bar(progress, None, desc)
    if bar is None:
        return lin
    inner = lin.matvec

    def mv(v):
        out = inner(v)
        bar.update(1)
        return out

    from scipy.sparse.linalg import LinearOperator

    wrapped = LinearOperator(lin.shape, matvec=mv, dtype=lin.dtype)
    wrapped._bar = bar
    return wrapped


def _close(lin) -> None:
    bar = getattr(lin, "_bar", None)
    if bar is not None:
        bar.close()
