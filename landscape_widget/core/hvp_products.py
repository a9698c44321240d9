"""The three ways :class:`~.hvp.HessianOperator` takes a Hessian-vector product.

A mixin of the operator (it uses its ``params``, ``keys``, ``x``, ``y``, ``n``, ``batch``,
``_weights``, ``size``, ``dtype``, ``device`` and ``_loss``):

- ``graph``: all data in one batch; the gradient's graph is built once, and every product
  is one double backward through it;
- ``backward``: double backward batch by batch (layers ``torch.func`` cannot transform);
- ``jvp``: forward-over-reverse ``torch.func.jvp`` of ``torch.func.grad``, batch by batch.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, jvp


class ProductMethods:
    """Hessian-vector products of the mean loss, by method (a mixin of the operator)."""

    def _build_graph(self) -> tuple[list[Tensor], tuple]:
        """The gradient's graph over all data, built once: ``(leaves, grads)``."""
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
        return self._graph

    def _graph_product(self, tangent: list[Tensor]) -> Tensor:
        leaves, grads = self._build_graph()
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
        for start, weight in zip(range(0, self.n, self.batch), self._weights, strict=True):
            if weight:
                yield (self.x[start:start + self.batch], self.y[start:start + self.batch],
                       weight, start)

    def _backward_product(self, tangent: list[Tensor]) -> Tensor:
        out = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        for xb, yb, weight, start in self._batches():
            leaves = [self.params[k].detach().clone().requires_grad_(True) for k in self.keys]
            with torch.enable_grad():
                loss = self._loss(dict(zip(self.keys, leaves, strict=True)), xb, yb, start)
                grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
                out.add_(self._double_backward(grads, leaves, tangent, retain=False),
                         alpha=weight)
        return out

    def _jvp_product(self, tangent: list[Tensor]) -> Tensor:
        out = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        g = grad(self._loss)
        tan = dict(zip(self.keys, tangent, strict=True))
        for xb, yb, weight, start in self._batches():
            _, hv = jvp(lambda p, xb=xb, yb=yb, start=start: g(p, xb, yb, start),
                        (self.params,), (tan,))
            out.add_(torch.cat([hv[k].reshape(-1) for k in self.keys]), alpha=weight)
        return out
