"""Copies of a model for work other than evaluating points (see ``params.evaluation_copy``).

:func:`module_copy` is ``copy.deepcopy`` for models that hold non-leaf tensors as plain
attributes (pruning, legacy ``weight_norm``); :func:`true_gradients` makes a private copy's
autograd give the loss's own gradient (embeddings' ``scale_grad_by_freq`` and ``sparse``).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def module_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also of a model holding a non-leaf tensor as an attribute.

    Pruning (``torch.nn.utils.prune``) and legacy ``weight_norm`` keep ``weight`` as
    ``weight_orig * mask`` (a non-leaf tensor, which ``deepcopy`` refuses) and recompute it
    before every forward: it is copied detached. What a forward under ``vmap`` left there
    (a batched tensor that escaped it: nothing can copy or read it) becomes ``None`` in
    the copy, until its next forward sets it again.

    Returns:
        An independent copy of ``model`` (same classes, unlike :func:`evaluation_copy`).
    """
    memo: dict[int, object] = {}
    for m in model.modules():
        for v in vars(m).values():
            if isinstance(v, Tensor) and not isinstance(v, nn.Parameter):
                if torch._C._functorch.is_functorch_wrapped_tensor(v):
                    memo[id(v)] = None
                elif v.grad_fn is not None:
                    memo[id(v)] = v.detach().clone()
    with torch.no_grad():
        return copy.deepcopy(model, memo)


def true_gradients(module: nn.Module) -> nn.Module:
    """Turn off ``scale_grad_by_freq`` and ``sparse`` in a private copy's embeddings.

    ``scale_grad_by_freq`` divides each embedding row's gradient by the row's count in the
    batch: a training heuristic that leaves the forward, and so the loss, unchanged but
    makes autograd's "gradient" something else than the loss's. Hessian products from it
    are not symmetric and gradient directions are bent; off, they are the loss's own.
    ``sparse`` only changes the gradient's layout, which a flat gradient or a Hessian
    product cannot reshape ("reshape is not implemented for sparse tensors").

    Returns:
        ``module`` itself (a private copy: never the user's model), changed in place.
    """
    for m in module.modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            m.scale_grad_by_freq = False
            m.sparse = False
    return module
