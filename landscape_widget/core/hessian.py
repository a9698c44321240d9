"""Curvature of the loss: eigenpairs, trace and spectral density of the Hessian.

The Hessian is that of the mean loss over *all* data (batches weighted by their size), with
respect to the parameters of dimension > 1 by default (``ignore="biasbn"``, as loss-landscape's
``hess_vec_prod``), or of all parameters (``ignore=None``), taken by
:class:`~.hvp.HessianOperator` (one double backward per product through a graph built once,
or forward-over-reverse batch by batch, with fallbacks; the model is never edited; BatchNorm
uses its running statistics unless ``bn="batch"``; quantisation observers are frozen).

- :func:`hessian_eigenpairs`: Lanczos with full reorthogonalisation (:mod:`.lanczos`),
  restarted by ARPACK if its basis would outgrow memory.
- :func:`hessian_trace`: Hutchinson's estimator, one product per Rademacher vector.
- :func:`hessian_density`: stochastic Lanczos quadrature (Ghorbani et al. 2019, as PyHessian).
"""

from __future__ import annotations

import sys
import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .errors import Cancelled  # re-exported: `from core.hessian import Cancelled` works
from .heap import holding_heap
from .hvp import METHODS, HessianOperator, scipy_operator
from .lanczos import STALL_STEPS, extreme_pairs, lanczos, max_steps

__all__ = ["METHODS", "Cancelled", "Density", "Eigenpairs", "HessianOperator", "TraceEstimate",
           "hessian_density", "hessian_eigenpairs", "hessian_trace", "scipy_operator"]


class _PairWithInfo(tuple):
    """A pair that unpacks as ``(a, b)`` and carries what was achieved as attributes."""

    def __new__(cls, first, second, **info):  # noqa: D102 - the class docstring says it
        self = super().__new__(cls, (first, second))
        self.__dict__.update(info)
        return self

    def __getnewargs__(self):  # pickling: the pair goes to __new__, the rest is __dict__
        return tuple(self)


class Eigenpairs(_PairWithInfo):
    """``(values, vectors)`` of :func:`hessian_eigenpairs`, with what was achieved.

    Unpacks as the pair; the attributes say how far the answer is to be trusted.

    Attributes:
        values: Eigenvalues (numpy, float64).
        vectors: Unit eigenvectors as direction dicts.
        residuals: ``||H v - lambda v||`` of each pair (absolute).
        products: Hessian-vector products taken.
        method: How products were taken (``HessianOperator.method``).
        solver: ``"lanczos"`` or ``"lanczos+arpack"`` (restarted when the basis was full).
        converged: Whether every residual is within ``tol * max|lambda|``.
    """

    values = property(lambda self: self[0])
    vectors = property(lambda self: self[1])


ARPACK_PRODUCTS = 2000
"""Products ARPACK may take, at least, after a full Lanczos basis when no ``max_products``
is given (see :func:`hessian_eigenpairs`)."""


@holding_heap
def hessian_eigenpairs(model: nn.Module, data, *, k: int = 2, which: str = "largest",
                       tol: float = 1e-4, max_products: int | None = None, seed: int = 0,
                       progress: bool = False, **options) -> Eigenpairs:
    """The ``k`` largest (or smallest) eigenvalues of the Hessian and their eigenvectors.

    Args:
        model: The model (never modified).
        data: The data the loss is averaged over.
        k: Number of eigenpairs.
        which: ``"largest"`` or ``"smallest"`` (algebraic).
        tol: Relative residual ``||H v - lambda v|| / max|lambda|`` at which a pair is
            converged (the eigenvalue's error is of order ``tol**2`` times the ratio of
            ``max|lambda|`` to the gap to the next eigenvalue).
        max_products: Cap on Hessian-vector products.
        seed: Seed of the Lanczos start vector (results are deterministic).
        progress: Show a tqdm counter of Hessian-vector products.
        **options: :class:`HessianOperator` options (``loss_fn``, ``ignore``, ``bn``,
            ``batch_size``, ``point``, ``device``, ``cancel``, ``on_product``, ``method``).

    Returns:
        :class:`Eigenpairs` ``(values, vectors)``: eigenvalues sorted from largest to
        smallest (``"largest"``) or smallest to largest (``"smallest"``), and unit-norm
        eigenvectors as direction dicts over all parameters (zero where excluded), usable as
        surface directions; ``.residuals``, ``.products``, ``.method``, ``.converged``.
        A warning is issued if a pair did not converge within ``max_products``.

    Raises:
        ValueError: For a bad ``k``, ``which`` or operator option.
    """
    if which not in ("largest", "smallest"):
        raise ValueError("which must be 'largest' or 'smallest'.")
    if max_products is not None and (isinstance(max_products, bool)
                                     or not isinstance(max_products, int) or max_products < 1):
        raise ValueError(f"max_products must be an int >= 1 or None, got {max_products!r}.")
    op = HessianOperator(model, data, **options)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < op.size:
        raise ValueError(f"k must be an int in [1, {op.size - 1}], got {k!r}.")
    bar = _bar(progress, None, "Hessian-vector products")

    def matvec(v: Tensor) -> Tensor:
        out = op.matvec(v)
        if bar is not None:
            bar.update(1)
        return out

    cap = max_steps(op.size, op.dtype, k)
    solver = "lanczos"
    try:
        found = extreme_pairs(matvec, op.start_vector(seed), k=k, ends=(which,), tol=tol,
                              steps=min(cap, max_products or cap))
        vals, coef, _ = found[which]
        vecs = found["state"].vectors(coef)
        # Without a cap, ARPACK may take as many products again as the basis held, or
        # ARPACK_PRODUCTS (its own default, 10 restarts per unknown, ran for hours).
        left = (max(cap, ARPACK_PRODUCTS) if max_products is None
                else max_products - op.products)
        if not found["converged"] and not found["stalled"] and left > 0:
            # The basis is full: ARPACK (implicitly restarted Lanczos) goes on from the
            # best Ritz vectors so far. (Not after a stall: the products' rounding floor
            # stops it as well.)
            solver = "lanczos+arpack"
            vals, vecs = _arpack(matvec, op.size, k, which, tol, vecs.sum(1), cap, left)
            vecs = vecs.to(op.device)
    finally:
        if bar is not None:
            bar.close()
    vecs = vecs / vecs.norm(dim=0)
    hv = torch.stack([op.matvec(vecs[:, i]) for i in range(k)], 1) if solver != "lanczos" \
        else None
    residuals = (np.asarray(found[which][2]) if hv is None else
                 (hv - vecs * torch.as_tensor(vals, device=vecs.device)).norm(dim=0).cpu().numpy())
    scale = max(found["scale"], float(np.abs(vals).max()), 1e-300)
    converged = bool(np.all(residuals <= tol * scale))
    if not converged:
        # float64 has no finer dtype to advise (a model already in it was told to use it).
        finer = ("" if op.dtype == torch.float64 else
                 ", or compute in float64 (model.double() and its data)")
        why = (f"the residuals stopped shrinking (not halved in {STALL_STEPS} products: the "
               f"rounding floor of {op.dtype} products is above tol). Raise tol{finer}"
               if found["stalled"] else "Raise max_products or tol")
        warnings.warn(f"hessian_eigenpairs: not converged after {op.products} products; "
                      f"relative residuals {residuals / scale} above tol={tol:g}; {why}.",
                      RuntimeWarning, stacklevel=2)
    dirs = []
    for i in range(k):
        v = vecs[:, i]
        v = v * (1.0 if v[torch.argmax(v.abs())] >= 0 else -1.0)  # a fixed sign
        dirs.append(op.full_direction(v))
    return Eigenpairs(np.asarray(vals, dtype=np.float64), dirs, residuals=residuals,
                      products=op.products, method=op.method, fallback=op.fallback,
                      solver=solver, converged=converged, tol=tol)


def _arpack(matvec, size: int, k: int, which: str, tol: float, v0: Tensor, cap: int,
            left: int | None) -> tuple[np.ndarray, Tensor]:
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    ncv = min(size, max(2 * k + 1, min(cap, 20)))
    maxiter = None if left is None else max(1, left // ncv)
    try:
        vals, vecs = eigsh(scipy_operator(matvec, size), k=k,
                           which="LA" if which == "largest" else "SA", tol=tol,
                           v0=v0.double().cpu().numpy(), ncv=ncv, maxiter=maxiter)
    except ArpackNoConvergence as err:
        vals, vecs = err.eigenvalues, err.eigenvectors
        if len(vals) < k:
            raise RuntimeError(f"no eigenpair converged within max_products; "
                               f"raise it (ARPACK: {err}).") from err
    order = np.argsort(-vals if which == "largest" else vals)
    return vals[order], torch.from_numpy(vecs[:, order])


class TraceEstimate(NamedTuple):
    """Hutchinson's estimate of the Hessian trace (``products`` equals ``samples``)."""

    value: float
    stderr: float
    samples: int
    products: int = 0
    method: str = ""


@holding_heap
def hessian_trace(model: nn.Module, data, *, samples: int = 100, seed: int = 0,
                  progress: bool = False, **options) -> TraceEstimate:
    """Hutchinson's trace estimate ``mean(v^T H v)`` over Rademacher ``v``, with its error.

    One Hessian-vector product per sample and nothing else.

    Args:
        model: The model (never modified).
        data: The data the loss is averaged over.
        samples: Number of random vectors.
        seed: Seed of the vectors.
        progress: Show a tqdm bar.
        **options: :class:`HessianOperator` options.

    Returns:
        ``TraceEstimate(value, stderr, samples, products, method)``; ``stderr`` is the
        sample standard deviation over ``sqrt(samples)``.

    Raises:
        ValueError: If ``samples`` is not an int >= 2.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ValueError(f"samples must be an int >= 2, got {samples!r}.")
    op = HessianOperator(model, data, **options)
    g = torch.Generator().manual_seed(seed)
    bar = _bar(progress, samples, "Hutchinson")
    est = []
    try:
        for _ in range(samples):
            v = _rademacher(op, g)
            est.append(float(torch.dot(v, op.matvec(v))))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    arr = np.array(est)
    return TraceEstimate(float(arr.mean()), float(arr.std(ddof=1) / np.sqrt(samples)), samples,
                         op.products, op.method)


def _rademacher(op: HessianOperator, g: torch.Generator) -> Tensor:
    """A random ±1 vector of the operator's size, dtype and device, drawn from ``g``.

    One random number per entry costs about a Hessian-vector product on an 11M-parameter
    network (``randint`` into int8: 0.39 s for 11M entries on one thread; ``bernoulli_``
    0.69 s), and on a GPU the host draw and copy took 4x the product. So 56 signs come
    from the bits of each 64-bit random word (its top byte left zero, so every bit used is
    uniform) and are unpacked with vector operations; on an accelerator the unpacking
    runs there. The signs are the same on every device.

    Returns:
        A flat tensor of ``op.size`` entries, each -1 or +1 with probability 1/2.
    """
    words = torch.randint(0, 2**56, (-(-op.size // 56),), generator=g, dtype=torch.int64)
    octets = words.view(torch.uint8).reshape(-1, 8)
    octets = (octets[:, :7] if sys.byteorder == "little" else octets[:, 1:]).to(op.device)
    shifts = torch.arange(8, dtype=torch.uint8, device=op.device)
    bits = ((octets.unsqueeze(-1) >> shifts) & 1).reshape(-1)[: op.size]
    return bits.to(op.dtype).mul_(2).sub_(1)


class Density(_PairWithInfo):
    """``(grid, density)`` of :func:`hessian_density`, with ``products`` and ``method``."""


@holding_heap
def hessian_density(model: nn.Module, data, *, steps: int = 60, runs: int = 3,
                    grid_points: int = 1000, sigma: float | None = None, seed: int = 0,
                    progress: bool = False, **options) -> Density:
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature.

    Each run starts Lanczos from a Rademacher vector (one product per step); the Ritz
    values are the quadrature nodes and the squared first components of the Ritz vectors
    their weights; the density is the run average of Gaussians of width ``sigma`` at the
    nodes.

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
        :class:`Density` ``(grid, density)``: the density integrates to 1 over the grid;
        ``.products``, ``.method``.
    """
    op = HessianOperator(model, data, **options)
    steps = int(min(steps, op.size))
    g = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    bar = _bar(progress, runs, "SLQ runs")
    try:
        for _ in range(runs):
            for state in lanczos(op.matvec, _rademacher(op, g), steps):
                last = state  # the last step's decomposition (an invariant subspace may end early)
            theta, u, _ = last.ritz()
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
    return Density(grid, dens, products=op.products, method=op.method)


def _bar(progress: bool, total: int | None, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc)
