"""Hessian-vector products of the mean loss over data: :class:`HessianOperator`.

How a product is taken (``method``): with all data in one batch the gradient's graph is
built once and every product is one double backward through it (the cost of a plain
``autograd.grad`` Hessian-vector product); over several batches, forward-over-reverse
``torch.func.jvp`` of ``torch.func.grad``, batch by batch. Layers that ``torch.func`` cannot
transform (``nn.LSTM`` on CPU, fused fake-quantisation of QAT modules) fall back to double
backward batch by batch; fused attention kernels without a double backward
(``scaled_dot_product_attention`` on CPU) to the math kernel; ``op.method`` and
``op.fallback`` say what ran. The model is never edited: products run through
``functional_call`` on an evaluation copy with its own copies of the buffers.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp

from .copies import true_gradients
from .data import as_tensors
from .errors import Cancelled  # re-exported: `from core.hvp import Cancelled` still works
from .hvp_fallbacks import ProductFallbacks
from .hvp_products import ProductMethods
from .lanczos import scipy_operator
from .losses import check_cross_entropy_targets, decide_weighting
from .metrics import find_logits, resolve_task
from .model_kinds import check_differentiable, check_runnable, no_graph_error, sign_entries
from .params import (
    Params,
    buffers_of,
    evaluation_copy,
    model_device,
    parameters_of,
    plain_modes,
    weights_dtype,
)
from .rng import batch_draws
from .state import (
    BN_BATCH_SIZE,
    check_no_renorm,
    check_running_stats,
    held_generators,
    plain_attributes,
    restore_attributes,
    set_flags,
)

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


class HessianOperator(ProductMethods, ProductFallbacks):
    """``v -> H v`` for the Hessian of the mean loss over ``data``.

    Args:
        model: The model (never modified).
        data: ``(inputs, targets)``, a ``Dataset`` or a ``DataLoader``.
        loss_fn: ``loss_fn(outputs, targets)``, a batch mean (over its counted targets);
            cross-entropy on the logits by default. ``outputs`` are the model's, as returned
            (a tuple or a dict too).
        output_fn: Where the default loss finds the logits in the outputs (see
            :func:`~landscape_widget.core.metrics.find_logits`).
        ignore: ``"biasbn"`` (default): only parameters of dimension > 1; ``None``: all.
        bn: ``"eval"`` (running statistics) or ``"batch"``.
        batch_size: Samples per pass (default: all, at most 2048). With ``bn="batch"``
            the BatchNorm batches, as ``bn_batch_size`` of ``compute_surface`` (default
            128, its default: the curvature of the loss the surfaces plot).
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

    # Under the caller's torch.inference_mode() the set-up's tensors would be inference
    # tensors, which the computation cannot update in place or save for backward.
    @torch.inference_mode(False)
    def __init__(self, model: nn.Module, data, *, loss_fn: Callable | None = None,
                 ignore: str | None = "biasbn", bn: str = "eval", batch_size: int | None = None,
                 point: Params | None = None, device=None,
                 cancel: threading.Event | None = None,
                 on_product: Callable[[int], None] | None = None, method: str = "auto",
                 output_fn: Callable | None = None):
        check_runnable(model)
        _warm_forward_ad()
        if ignore not in ("biasbn", None):
            raise ValueError("ignore must be 'biasbn' (parameters of dim > 1) or None (all).")
        if bn not in ("eval", "batch"):
            raise ValueError("bn must be 'eval' or 'batch'.")
        check_running_stats(model, bn)  # else the products would depend on self.batch
        check_no_renorm(model)  # max_norm writes the weight in forward
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
        self.device = torch.device(device) if device is not None else model_device(model)
        # Private: its flags are ours to set. Embeddings' scale_grad_by_freq off: products
        # of the loss's Hessian, not of the rescaled training gradient.
        self.module = true_gradients(evaluation_copy(model))
        set_flags(self.module, bn)
        # Attributes and generators a forward changes (self.calls += 1, noise drawn from
        # self.g) are put back after every forward, as the surfaces' (core/state.py): else
        # each product differentiated another function, refused as a layer torch cannot
        # differentiate twice ("not symmetric").
        self._attributes = plain_attributes(self.module)
        self._generators = held_generators(self.module)
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
        if torch.is_floating_point(x):  # the weights' dtype, not the first moved one's
            x = x.to(weights_dtype(params) or self.dtype)
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.n = int(x.shape[0])
        if loss_fn is None:
            check_cross_entropy_targets(self.y)
        if batch_size is not None and (isinstance(batch_size, bool)
                                       or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be an int >= 1 or None (all data, at most "
                             f"2048), got {batch_size!r}.")
        # With bn="batch" the batch is BatchNorm's: the surfaces' default (bn_batch_size,
        # 128), or the products would be those of another loss than the one plotted.
        default = BN_BATCH_SIZE if bn == "batch" else 2048
        self.batch = int(batch_size or min(self.n, default))
        if method == "graph" and self.batch < self.n:
            raise ValueError("method='graph' needs all data in one batch; raise batch_size "
                             "or use method='jvp' or 'backward'.")
        if method == "auto":
            self._plan = ["graph", "jvp"] if self.batch >= self.n else ["jvp", "backward"]
        else:
            self._plan = [method]
        self.method = self._plan[0]
        self.fallback: str | None = None
        self._math_attention = False
        self.output_fn = output_fn
        # The user's loss only (see the ``loss_fn`` property: no reference cycle).
        self._loss_given = loss_fn
        # Batches weigh by their counted targets (ignore_index, class weights), as the
        # engine's losses do, so the Hessian is that of the mean over all counted targets
        # whatever the batch size; a batch with none counts nothing (its loss is NaN).
        task = resolve_task(None, self.y, loss_fn, self.n)
        if loss_fn is not None and self.batch < self.n:  # a mean of per-sample means weighs
            with torch.no_grad(), plain_modes(self.device):  # batches by samples (losses.py)
                decide_weighting(loss_fn, lambda r: self._outputs(self.params, self.x[r]),
                                 self.y, task)
        weights = [float(task.loss_weight(self.y[s:s + self.batch]))
                   for s in range(0, self.n, self.batch)]
        if not sum(weights):
            raise ValueError("every target is ignored (ignore_index): the loss is a mean over "
                             "no targets. Pass data with counted targets.")
        self._weights = [w / sum(weights) for w in weights]
        self.cancel = cancel
        self.on_product = on_product
        self.products = 0
        self._symmetric = False  # checked at the first product (_check_symmetric)
        self._reached = False  # and that no parameter is used without autograd

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
        self._constant_losses = self._graph_losses = 0  # this product's batches (_loss)

    def unflatten(self, flat: Tensor) -> Params:
        """Direction dict over the Hessian's parameters from a flat vector (views)."""
        parts = torch.split(flat, self.numels)
        return {k: p.view(s) for k, p, s in zip(self.keys, parts, self.shapes, strict=True)}

    def flatten(self, d: Params) -> Tensor:
        """Flat vector of a dict over (at least) the Hessian's parameters."""
        return torch.cat([d[k].reshape(-1).to(self.device, self.dtype) for k in self.keys])

    @property
    def loss_fn(self) -> Callable:
        """The user's ``loss_fn``, else the default (cross-entropy).

        A property: ``self._default_loss`` stored on self would make the operator a
        reference cycle, which keeps its copy of the model, its data and its saved graph
        alive after the call until Python's cyclic collector runs (GPU memory included).
        """
        return self._loss_given if self._loss_given is not None else self._default_loss

    def _default_loss(self, out, y: Tensor) -> Tensor:
        return F.cross_entropy(find_logits(out, self.output_fn), y)

    def _loss(self, params: Params, x: Tensor, y: Tensor, start: int = 0) -> Tensor:
        out = self._outputs(params, x, start)
        loss = self.loss_fn(out, y)
        if (isinstance(loss, Tensor) and not loss.requires_grad and torch.is_grad_enabled()
                and _has_graph(out)):
            # A loss constant on this batch (a masked loss with nothing to count returning
            # torch.zeros(())) adds nothing to the Hessian, but a product needs a graph.
            # A loss_fn that detaches (.item()) is constant on every batch: matvec says so.
            self._constant_losses += 1
            return loss + sum(p.sum() * 0 for p in params.values())
        check_differentiable(loss, params, "Hessian-vector products")  # no_grad forward
        self._graph_losses += 1
        return loss

    def _outputs(self, params: Params, x: Tensor, start: int = 0):
        # Random draws in forward are seeded by the batch, as the surfaces' (core/rng.py):
        # every product differentiates the same function, the caller's RNG is untouched.
        with batch_draws(self.device, start):
            # A copy of the batch: a forward that writes to its input (x.mul_(2)) would
            # change the user's data (on a CPU, self.x is their tensor) and every later
            # product would see it changed. One copy per batch, small beside the products.
            # Fresh copies of the buffers too: a forward that writes to them (a counter)
            # would otherwise start each pass from the last one's state, so the products
            # of a batched method were those of changing functions (not symmetric: blamed
            # on weight_norm), and under torch.func it wrote into a captured tensor.
            # Attributes and generators the forward changes are put back after it.
            fresh = {k: b.clone() for k, b in self._buffers.items()}
            try:
                out = functional_call(self.module, {**self.fixed, **fresh, **params},
                                      (x.clone(),))
            finally:
                restore_attributes(self._attributes)
                for g, state in self._generators:
                    g.set_state(state)
        return out

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` (any float dtype; the result has ``v``'s dtype).

        Returns:
            The Hessian of the loss at the base point times ``v``, flat, in ``v``'s dtype.

        Raises:
            Cancelled: If the cancel event is set.
            RuntimeError: If no method can differentiate the model twice (says what to do).
            ValueError: If no batch's loss has a graph back to the parameters (a forward
                or loss_fn without autograd).
        """
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("cancelled")
        tangent = [p.contiguous() for p in self.unflatten(v.to(self.device, self.dtype))
                   .values()]
        while True:
            self._constant_losses = self._graph_losses = 0
            try:
                with self._attention(), plain_modes(self.device):
                    if not self._reached:
                        # Its losses count as this product's: the graph it builds is the
                        # products' (method "graph"), else its batch is their first one.
                        self._check_reached()
                    if not self._symmetric:
                        self._check_symmetric()
                    out = getattr(self, f"_{self.method}_product")(tangent)
                break
            except Cancelled:
                raise
            except (RuntimeError, NotImplementedError) as err:
                self._failed(err)
        if self._constant_losses and not self._graph_losses:  # no batch had a graph
            error: ValueError = no_graph_error("Hessian-vector products")
            raise error
        self.products += 1
        if self.on_product is not None:
            self.on_product(self.products)
        return out.to(v.dtype)

    def as_linear_operator(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy vectors)."""
        return scipy_operator(self.matvec, self.size)

    def start_vector(self, seed: int) -> Tensor:
        """A seeded standard normal start vector, zero on the sign entries.

        No product moves the sign entries (:func:`~.model_kinds.sign_entries`: their
        gradient is zero), so eigenvectors from it keep them at zero (a 1e-5 left there
        made a surface along the eigenvector jump at the model).

        Returns:
            A flat vector of the operator's size, dtype and device.
        """
        g = torch.Generator().manual_seed(int(seed))
        v = torch.randn(self.size, generator=g, dtype=self.dtype).to(self.device)
        signs = sign_entries(self.module)  # the private copy's names are the model's
        hold = {k: signs.get(k, torch.zeros(s, dtype=torch.bool)) for k, s in
                zip(self.keys, self.shapes, strict=True)}
        return v.masked_fill(self.flatten(hold).bool(), 0) if signs else v

    def full_direction(self, flat: Tensor) -> Params:
        """A direction dict over *all* parameters (zero outside the Hessian's), on the CPU."""
        d = {k: v.detach().cpu().float() for k, v in self.unflatten(flat).items()}
        return {k: d[k] if k in d else torch.zeros(s) for k, s in self._all_shapes.items()}


def _has_graph(out) -> bool:
    """Whether a model's outputs (a tensor, or a tuple, list or dict of them) have a graph."""
    if isinstance(out, Tensor):
        return out.requires_grad
    if isinstance(out, dict):
        return any(_has_graph(v) for v in out.values())
    if isinstance(out, (tuple, list)):
        return any(_has_graph(v) for v in out)
    return False
