"""Copies of a model besides the evaluator's own (see ``params.evaluation_copy``).

:func:`module_copy` is ``copy.deepcopy`` for models that hold non-leaf tensors as plain
attributes (pruning, legacy ``weight_norm``); :func:`structural_copy` gives a lane of points
(core/lanes.py) a module of its own around the evaluator's tensors; :func:`true_gradients`
makes a private copy's autograd give the loss's own gradient (embeddings'
``scale_grad_by_freq`` and ``sparse``).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .params import _module_by_module, copy_hooks


def module_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also of a model holding a non-leaf tensor as an attribute.

    Pruning (``torch.nn.utils.prune``) and legacy ``weight_norm`` keep ``weight`` as
    ``weight_orig * mask`` (a non-leaf tensor, which ``deepcopy`` refuses) and recompute it
    before every forward: it is copied detached. What a forward under ``vmap`` left there
    (a batched tensor that escaped it: nothing can copy or read it) becomes ``None`` in
    the copy, until its next forward sets it again.

    Returns:
        An independent copy of ``model`` (same classes, unlike :func:`evaluation_copy`),
        whose hooks' closures hold copies of the objects they held.
    """
    memo = _tensor_attributes(model)
    with torch.no_grad():
        out = copy.deepcopy(model, memo)
    # deepcopy keeps hook functions as they are, closures and all: a hook storing into a
    # dict its closure holds would write into the user's (a batched tensor, under MPO's
    # vmap). The copy's hooks get closures copied through the same memo.
    copy_hooks(out, memo)
    return out


def _tensor_attributes(model: nn.Module) -> dict[int, object]:
    """A ``deepcopy`` memo for the plain tensor attributes ``deepcopy`` cannot copy.

    Returns:
        ``{id: copy}``: non-leaf tensors (``weight_orig * mask``, a stored energy) detached,
        and what a forward under ``vmap`` left there (nothing can read it) as ``None``.
    """
    memo: dict[int, object] = {}
    for m in model.modules():
        for v in vars(m).values():
            if isinstance(v, Tensor) and not isinstance(v, nn.Parameter):
                if torch._C._functorch.is_functorch_wrapped_tensor(v):
                    memo[id(v)] = None
                elif v.grad_fn is not None:
                    memo[id(v)] = v.detach().clone()
    return memo


def structural_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that shares its parameters and buffers but nothing else.

    Attributes, submodules, hooks (with what their closures hold, see
    :func:`~.params.copy_hooks`) and plain tensor attributes are the copy's own, so two
    threads can each ``functional_call`` their copy. It copies what the evaluator's own
    copy does: non-leaf tensor attributes (detached), and a class that refuses
    ``deepcopy`` as a whole part by part.

    Returns:
        The copy (``copy.deepcopy`` with every parameter and buffer kept as it is).

    Raises:
        Exception: Whatever ``deepcopy`` of a part of ``module`` raised.

    Example:
        >>> m = nn.Linear(2, 1)
        >>> c = structural_copy(m)
        >>> c is m, c.weight is m.weight
        (False, True)
    """
    memo = _tensor_attributes(module)
    memo.update({id(t): t for t in module.parameters()})
    memo.update({id(t): t for t in module.buffers()})
    work = dict(memo)
    with torch.no_grad(), torch.inference_mode(False):
        try:
            out = copy.deepcopy(module, work)
        except Exception:  # noqa: BLE001 - a class may refuse deepcopy as a whole
            work = dict(memo)
            out = _module_by_module(module, work)
        # A hook closing over a dict the forward reads (stored features) must fill the
        # lane's own, not the evaluator's that every lane shares.
        copy_hooks(out, work)
    return out


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
