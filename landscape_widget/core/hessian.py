"""Curvature of the loss: Hessian-vector products, eigenpairs, trace and spectral density.

The Hessian is that of the mean loss over *all* data (batches weighted by their size), with
respect to the parameters of dimension > 1 by default (``ignore="biasbn"``, as loss-landscape's
``hess_vec_prod``), or of all parameters (``ignore=None``). Products run through
``functional_call`` on an evaluation copy of the model with its own copies of the buffers:
the model is never edited, BatchNorm uses its running statistics (``bn="eval"``) unless
``bn="batch"``, and quantisation observers are frozen.

How a product is taken (:class:`HessianOperator`, ``method``): with all data in one batch the
gradient's graph is built once and every product is one double backward through it (the
cost of a plain ``autograd.grad`` Hessian-vector product); over several batches,
forward-over-reverse ``torch.func.jvp`` of ``torch.func.grad``, batch by batch. Layers that
``torch.func`` cannot transform (``nn.LSTM`` on CPU, fused fake-quantisation of QAT modules)
fall back to double backward batch by batch; ``op.method`` and ``op.fallback`` say what ran.

- :func:`hessian_eigenpairs`: Lanczos with full reorthogonalisation (:mod:`.lanczos`),
  restarted by ARPACK if its basis would outgrow memory.
- :func:`hessian_trace`: Hutchinson's estimator, one product per Rademacher vector.
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
from .lanczos import extreme_pairs, lanczos, max_steps
from .params import Params, buffers_of, check_module, evaluation_copy, model_device, parameters_of

_WARMED = False
METHODS = ("auto", "graph", "jvp", "backward")


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
        batch_size: Samples per pass (default: all, at most 2048).
        point: Parameter values to take the Hessian at, instead of the model's own
            (a dict with some or all parameter names).
        device: Where to compute (default: the model's device).
        cancel: A ``threading.Event`` checked before every product.
        on_product: Called with the number of products so far after each one (progress).
        method: ``"graph"``: all data in one batch; the gradient's graph is built once
            and every product is one double backward through it. ``"jvp"``:
            forward-over-reverse, batch by batch, keeping nothing between products.
            ``"backward"``: double backward batch by batch, keeping nothing (works where
            ``torch.func`` cannot transform a layer). ``"auto"`` (default): ``"graph"`` for
            one batch, else ``"jvp"``; either falls back to the other kind (``"jvp"``,
            resp. ``"backward"``) if its first product fails, and ``fallback`` says why.

    Attributes:
        method: The method products use (after a fallback, the one that worked).
        fallback: Why the first choice was dropped, or ``None``.
        products: Products taken so far.

    Raises:
        ValueError: For bad options (each message names the fix).
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
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
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
        self._all_shapes = {k: tuple(v.shape) for k, v in params.items()}
        self.keys = [k for k, v in params.items() if ignore is None or v.dim() > 1]
        if not self.keys:
            raise ValueError("the model has no parameters of dimension > 1; pass ignore=None.")
        self._base = params
        self.shapes = [tuple(params[k].shape) for k in self.keys]
        self.numels = [params[k].numel() for k in self.keys]
        self.size = int(sum(self.numels))
        self.dtype = params[self.keys[0]].dtype
        # Own copies of the buffers: a layer that writes into its buffers in a forward pass
        # (a quantisation observer) cannot reach the model's; observers are frozen so the
        # function, and with it the Hessian, stays fixed.
        self._buffers = {}
        for k, b in buffers_of(model).items():
            b = b.to(self.device).clone()
            if k.endswith("observer_enabled"):
                b.zero_()
            self._buffers[k] = b
        self.set_point(point)
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
        if method == "graph" and self.batch < self.n:
            raise ValueError("method='graph' needs all data in one batch; raise batch_size "
                             "or use method='jvp' or 'backward'.")
        if method == "auto":
            self._plan = ["graph", "jvp"] if self.batch >= self.n else ["jvp", "backward"]
        else:
            self._plan = [method]
        self.method = self._plan[0]
        self.fallback: str | None = None
        self.loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
        self.cancel = cancel
        self.on_product = on_product
        self.products = 0

    def set_point(self, point: Params | None) -> None:
        """Take the Hessian at ``point`` (parameter values by name; ``None``: the model's).

        The operator's set-up (copies, data, method) is kept; only the gradient's graph is
        rebuilt at the next product.

        Raises:
            ValueError: If ``point`` names unknown parameters.
        """
        params = self._base
        if point is not None:
            unknown = sorted(set(point) - set(params))
            if unknown:
                raise ValueError(f"point has unknown parameter names {unknown[:3]}.")
            params = {**params, **{k: v.detach() for k, v in point.items()}}
        params = {k: v.to(self.device) for k, v in params.items()}
        self.params = {k: params[k] for k in self.keys}
        self.fixed = {k: v for k, v in params.items() if k not in self.params}
        self.fixed.update(self._buffers)
        self._graph: tuple | None = None

    def unflatten(self, flat: Tensor) -> Params:
        """Direction dict over the Hessian's parameters from a flat vector (views)."""
        parts = torch.split(flat, self.numels)
        return {k: p.view(s) for k, p, s in zip(self.keys, parts, self.shapes, strict=True)}

    def flatten(self, d: Params) -> Tensor:
        """Flat vector of a dict over (at least) the Hessian's parameters."""
        return torch.cat([d[k].reshape(-1).to(self.device, self.dtype) for k in self.keys])

    def _loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(self.module, {**self.fixed, **params}, (x,))
        return self.loss_fn(out, y)

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` (any float dtype; the result has ``v``'s dtype).

        Raises:
            Cancelled: If the cancel event is set.
            RuntimeError: If no method can differentiate the model twice (says what to do).
        """
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("cancelled")
        tangent = [p.contiguous() for p in self.unflatten(v.to(self.device, self.dtype))
                   .values()]
        while True:
            try:
                out = getattr(self, f"_{self.method}_product")(tangent)
                break
            except Cancelled:
                raise
            except (RuntimeError, NotImplementedError) as err:
                self._failed(err)
        self.products += 1
        if self.on_product is not None:
            self.on_product(self.products)
        return out.to(v.dtype)

    def _failed(self, err: Exception) -> None:
        """Switch to the next method after a first product failed, or explain and raise."""
        msg = f"{self.method}: {type(err).__name__}: {str(err).splitlines()[0]}"
        tried = [self.fallback, msg] if self.fallback else [msg]
        if self.products == 0 and self.method != self._plan[-1]:
            self.method = self._plan[self._plan.index(self.method) + 1]
            self.fallback = msg
            self._graph = None
            return
        hint = ("on CUDA a cuDNN RNN has no double backward: run the call inside "
                "`with torch.backends.cudnn.flags(enabled=False):`" if self.device.type == "cuda"
                else "replace that layer by a twice-differentiable one")
        raise RuntimeError(
            "Hessian-vector products need the loss differentiated twice, and torch could not ("
            + "; ".join(tried) + f"). Fix: {hint}, or pass method='backward' (double backward "
            "batch by batch) or method='jvp' (forward-over-reverse) to try the other "
            "way.") from err

    def _graph_product(self, tangent: list[Tensor]) -> Tensor:
        if self._graph is None:
            # Leaves that require grad, separate from the model's tensors: functional_call
            # uses them, so nothing of the model is touched or recorded.
            leaves = {k: v.detach().clone().requires_grad_(True) for k, v in
                      self.params.items()}
            with torch.enable_grad():
                loss = self._loss(leaves, self.x, self.y)
                grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True,
                                            allow_unused=True)
            self._graph = (list(leaves.values()), grads)
        leaves, grads = self._graph
        with torch.enable_grad():
            return self._double_backward(grads, leaves, tangent, retain=True)

    def _double_backward(self, grads, leaves, tangent, retain: bool) -> Tensor:
        # A gradient with no graph (unused, or linear in the parameters) has a zero Hessian
        # row: it is left out of the second backward.
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        hv = torch.autograd.grad([grads[i] for i in live], leaves,
                                 grad_outputs=[tangent[i] for i in live],
                                 retain_graph=retain, allow_unused=True)
        return torch.cat([h.reshape(-1) if h is not None else leaf.new_zeros(leaf.numel())
                          for h, leaf in zip(hv, leaves, strict=True)])

    def _batches(self):
        for start in range(0, self.n, self.batch):
            xb, yb = self.x[start:start + self.batch], self.y[start:start + self.batch]
            yield xb, yb, xb.shape[0] / self.n

    def _backward_product(self, tangent: list[Tensor]) -> Tensor:
        out = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        for xb, yb, weight in self._batches():
            leaves = [self.params[k].detach().clone().requires_grad_(True) for k in self.keys]
            with torch.enable_grad():
                loss = self._loss(dict(zip(self.keys, leaves, strict=True)), xb, yb)
                grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
                out.add_(self._double_backward(grads, leaves, tangent, retain=False),
                         alpha=weight)
        return out

    def _jvp_product(self, tangent: list[Tensor]) -> Tensor:
        out = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        g = grad(self._loss)
        tan = dict(zip(self.keys, tangent, strict=True))
        for xb, yb, weight in self._batches():
            _, hv = jvp(lambda p, xb=xb, yb=yb: g(p, xb, yb), (self.params,), (tan,))
            out.add_(torch.cat([hv[k].reshape(-1) for k in self.keys]), alpha=weight)
        return out

    def as_linear_operator(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy vectors)."""
        return scipy_operator(self.matvec, self.size)

    def start_vector(self, seed: int) -> Tensor:
        """A seeded standard normal vector of the operator's size, dtype and device."""
        g = torch.Generator().manual_seed(int(seed))
        return torch.randn(self.size, generator=g, dtype=self.dtype).to(self.device)

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


class Eigenpairs(tuple):
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

    def __new__(cls, values, vectors, **info):  # noqa: D102 - the class docstring says it
        self = super().__new__(cls, (values, vectors))
        self.__dict__.update(info)
        return self

    values = property(lambda self: self[0])
    vectors = property(lambda self: self[1])


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
        left = None if max_products is None else max_products - op.products
        if not found["converged"] and (left is None or left > 0):
            # The basis is full: ARPACK (implicitly restarted Lanczos) goes on from the
            # best Ritz vectors so far.
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
        warnings.warn(f"hessian_eigenpairs: not converged after {op.products} products; "
                      f"relative residuals {residuals / scale} above tol={tol:g}. "
                      "Raise max_products or tol.", RuntimeWarning, stacklevel=2)
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
            est.append(float((v * op.matvec(v)).sum(dtype=torch.float64)))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    arr = np.array(est)
    return TraceEstimate(float(arr.mean()), float(arr.std(ddof=1) / np.sqrt(samples)), samples,
                         op.products, op.method)


def _rademacher(op: HessianOperator, g: torch.Generator) -> Tensor:
    v = torch.randint(0, 2, (op.size,), generator=g, dtype=torch.int8)
    return (v.to(op.device, op.dtype) * 2 - 1)


class Density(tuple):
    """``(grid, density)`` of :func:`hessian_density`, with ``products`` and ``method``."""

    def __new__(cls, grid, density, **info):  # noqa: D102 - the class docstring says it
        self = super().__new__(cls, (grid, density))
        self.__dict__.update(info)
        return self


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
