"""Copies of a model besides the evaluator's own (see ``params.evaluation_copy``).

:func:`module_copy` is ``copy.deepcopy`` for models that hold non-leaf tensors as plain
attributes (pruning, legacy ``weight_norm``); :func:`structural_copy` gives a lane of points
(core/lanes.py) a module of its own around the evaluator's tensors; :func:`true_gradients`
makes a private copy's autograd give the loss's own gradient (embeddings'
``scale_grad_by_freq`` and ``sparse``) and its second derivative (``nn.Hardsigmoid``).
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


class ClampHardsigmoid(nn.Module):
    """``nn.Hardsigmoid`` as ``clamp(x + 3, 0, 6) / 6``, which torch differentiates twice.

    torch has no derivative of ``hardsigmoid_backward`` (and no forward-mode one), so no
    Hessian product of a model with it (MobileNetV3's squeeze-excitation gates) could be
    taken. The clamp form is the same function; on a CPU, the same values bit for bit.
    """

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        """``hardsigmoid(x)`` (written into ``x`` when ``inplace``).

        Returns:
            ``clamp(x + 3, 0, 6) / 6``.
        """
        if self.inplace:  # as nn.Hardsigmoid(inplace=True): the caller may read x after
            return x.add_(3).clamp_(0, 6).div_(6)
        return (x + 3).clamp(0, 6) / 6


def _twice_differentiable(module: nn.Module) -> None:
    """Swap every hook-free ``nn.Hardsigmoid`` of a private copy for :class:`ClampHardsigmoid`.

    One with hooks stays (a hook may read or change what the layer computes).
    """
    swapped: dict[int, nn.Module] = {}
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if (type(child) is nn.Hardsigmoid and not child._forward_hooks
                    and not child._forward_pre_hooks and not child._backward_hooks):
                # A layer used in two places stays one layer.
                new = swapped.setdefault(id(child), ClampHardsigmoid(child.inplace))
                parent._modules[name] = new.train(child.training)


def true_gradients(module: nn.Module) -> nn.Module:
    """Make a private copy's autograd give the loss's own first and second derivatives.

    Turns off ``scale_grad_by_freq`` and ``sparse`` in its embeddings:
    ``scale_grad_by_freq`` divides each embedding row's gradient by the row's count in the
    batch: a training heuristic that leaves the forward, and so the loss, unchanged but
    makes autograd's "gradient" something else than the loss's. Hessian products from it
    are not symmetric and gradient directions are bent; off, they are the loss's own.
    ``sparse`` only changes the gradient's layout, which a flat gradient or a Hessian
    product cannot reshape ("reshape is not implemented for sparse tensors").
    Swaps ``nn.Hardsigmoid`` for the same function in a form torch can differentiate
    twice (:class:`ClampHardsigmoid`).

    Returns:
        ``module`` itself (a private copy: never the user's model), changed in place.
    """
    for m in module.modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            m.scale_grad_by_freq = False
            m.sparse = False
    _twice_differentiable(module)
    return module
