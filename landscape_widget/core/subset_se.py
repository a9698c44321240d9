"""The standard error of a subset's mean loss (``loss_se``), from per-sample losses.

The loss of a point is a ratio ``R = sum_i a_i / sum_i b_i`` over samples ``i``:

- ``a_i`` is sample ``i``'s loss from ``loss_fn`` with ``reduction='none'`` (the sum over its
  counted targets for class-index targets, whose loss torch weighs by counted targets and
  class weights; the mean over its entries otherwise),
- ``b_i`` its weight: the number (or class weight) of its counted targets, else 1.

For a plain classification or regression loss ``b_i = 1`` and ``R`` is the mean of the
``a_i``. The standard error reported (``loss_se``) is the usual one of a ratio estimator
under simple random sampling without replacement (Cochran, *Sampling Techniques*, 1977,
eq. 6.9 with the sample variance)::

    se(R) = sqrt( sum_i (a_i - R b_i)^2 / (n - 1) / n ) / mean_i(b_i) * sqrt((N - n) / (N - 1))

which for ``b_i = 1`` is exactly ``std(a, ddof=1) / sqrt(n) * sqrt((N - n) / (N - 1))``: the
sample standard deviation of the per-sample losses over ``sqrt(n)``, times the
finite-population correction, so it is 0 when ``n = N``. The engine accumulates
``sum a``, ``sum a^2``, ``sum a b`` and ``sum b^2`` per point in float64 (see
``core/evaluate.py``); :func:`ratio_se` turns them into ``se``.

Per-sample losses come from the user's loss with ``reduction='none'``: the default
cross-entropy, a torch loss module (``nn.CrossEntropyLoss()``, ``nn.MSELoss()``, ...), a
``torch.nn.functional`` loss or a ``functools.partial`` of one. A loss that cannot give them
(a lambda, a loss reducing in its own way) is refused with the fix (:class:`~.subset.SubsetError`),
rather than given a standard error from a few per-batch means, which would itself be too
noisy to be honest. With ``bn="batch"`` the per-sample losses also depend on the other
samples of their BatchNorm batch; the standard error ignores that dependence.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math

import torch
from torch import Tensor, nn

from .subset import SubsetError


def _takes_reduction(fn) -> bool:
    try:
        return "reduction" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class RowSums:
    """A ``reduction='none'`` loss summed over each sample's entries.

    The per-sample form of ``reduction='batchmean'`` (``KLDivLoss``'s, the sum over all
    entries divided by the batch size: the mean over samples of these row sums).
    """

    def __init__(self, unreduced):
        self.unreduced = unreduced

    def __call__(self, out, y: Tensor) -> Tensor:
        """Each sample's sum over its entries, ``(B,)``."""
        values = self.unreduced(out, y)
        return values.reshape(values.shape[0], -1).sum(-1)


MEANS = ("mean", "batchmean")
"""The reductions that are means over samples (of entries, of per-sample sums)."""


def unreduced_loss(loss_fn):
    """``loss_fn`` with ``reduction='none'`` (a new object), or ``None`` if it has no such form.

    A loss module is copied (the user's module keeps its reduction); a function or
    ``functools.partial`` gets the keyword. ``reduction='batchmean'`` (``KLDivLoss``,
    ``F.kl_div``) gives each sample's sum over its entries (:class:`RowSums`).

    Returns:
        The per-sample loss, or ``None``.

    Example:
        >>> out, y = torch.randn(4, 3).log_softmax(-1), torch.rand(4, 3).softmax(-1)
        >>> loss = nn.KLDivLoss(reduction="batchmean")
        >>> torch.allclose(unreduced_loss(loss)(out, y).mean(), loss(out, y))
        True
    """
    if isinstance(loss_fn, nn.Module):
        reduction = getattr(loss_fn, "reduction", None)
        if reduction not in MEANS:
            return None
        twin = copy.copy(loss_fn)  # a shallow copy: its own __dict__, the user's untouched
        twin.reduction = "none"
        return RowSums(twin) if reduction == "batchmean" else twin
    if isinstance(loss_fn, functools.partial):
        reduction = loss_fn.keywords.get("reduction", "mean")
        if reduction not in MEANS:
            return None
        inner = loss_fn.func
        while isinstance(inner, functools.partial):
            inner = inner.func
        if not _takes_reduction(inner):
            return None
        twin = functools.partial(loss_fn, reduction="none")
        return RowSums(twin) if reduction == "batchmean" else twin
    # Any function with a reduction= keyword (torch.nn.functional's, or the user's own, as
    # a partial of it already was): check_unreduced verifies its per-sample values.
    if callable(loss_fn) and not isinstance(loss_fn, type) and _takes_reduction(loss_fn):
        return functools.partial(loss_fn, reduction="none")
    return None


def per_sample_terms(values: Tensor, y: Tensor, task, lead: int = 0) -> tuple[Tensor, Tensor]:
    """``(a, b)`` of the module docstring from a ``reduction='none'`` loss.

    Args:
        values: The unreduced loss, ``(*lead, B, ...)``.
        y: The batch's targets ``(B, ...)``.
        task: The :class:`~landscape_widget.core.metrics.Task` (ignored targets, weights).
        lead: Leading point dimensions of ``values`` (K points at once).

    Returns:
        ``a`` of shape ``(*lead, B)`` and ``b`` of shape ``(B,)``, float64.
    """
    b_count = y.shape[0]
    v = values.reshape(*values.shape[:lead], b_count, -1).to(torch.float64)
    if task.ignore is None or task.per_sample:
        return v.mean(-1), torch.ones(b_count, dtype=torch.float64, device=y.device)
    mask = task.counted(y).reshape(b_count, -1)
    if task.class_weight is not None:
        w = task.class_weight.to(y.device, torch.float64)[y.clamp_min(0)].reshape(b_count, -1)
        weight = (w * mask).sum(-1)
    else:
        weight = mask.sum(-1).to(torch.float64)
    return v.sum(-1), weight


def se_sums(values: Tensor, y: Tensor, task, lead: int = 0) -> Tensor:
    """``(sum a^2, sum a b, sum b^2)`` of one batch, ``(*lead, 3)`` float64."""
    a, b = per_sample_terms(values, y, task, lead)
    return torch.stack([(a * a).sum(-1), (a * b).sum(-1), (b * b).sum().expand(a.shape[:-1])],
                       -1)


def ratio_se(sum_a: Tensor, sum_a2: Tensor, sum_ab: Tensor, sum_b: float | Tensor,
             sum_b2: Tensor, n: int, population: int) -> Tensor:
    """The standard error of ``R = sum a / sum b`` (module docstring), from the sums.

    Returns:
        The standard error (a 0-d tensor, or one per point).

    Example:
        >>> a = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
        >>> se = ratio_se(a.sum(), (a * a).sum(), a.sum(), 3.0, torch.tensor(3.0), 3, 100)
        >>> round(float(se), 12) == round(float(a.std() / 3 ** 0.5 * (97 / 99) ** 0.5), 12)
        True
    """
    r = sum_a / sum_b
    ss = (sum_a2 - 2 * r * sum_ab + r * r * sum_b2).clamp_min(0)
    fpc = (population - n) / (population - 1) if population > 1 else 0.0
    return torch.sqrt(ss / ((n - 1) * n) * fpc) / (sum_b / n)


def check_unreduced(loss_fn, unreduced, out, y: Tensor, task, default: bool) -> None:
    """Check on the first samples that the per-sample losses average to the loss's value.

    Raises:
        SubsetError: If ``unreduced`` is ``None`` or does not agree, with the fix.
    """
    fix = ("pass a loss whose reduction='none' gives each sample's loss (an nn.*Loss "
           "module, a torch.nn.functional loss, a function of yours with a reduction= "
           "keyword, or a functools.partial of one, with reduction='mean', or 'batchmean' "
           "for KL divergence), or compute the exact values (samples=None)")
    if not isinstance(out, Tensor):
        fix += ("; for outputs other than a Tensor, the default loss with output_fn= "
                "(cross-entropy on the logits it picks) gives them too")
    if unreduced is None:
        raise SubsetError(f"samples= needs each sample's loss for the standard error, and "
                          f"this loss_fn cannot give them; {fix}.")
    with torch.no_grad():
        want = float(loss_fn(out, y))
        try:
            values = unreduced(out, y)
        except Exception as err:  # noqa: BLE001 - the user's function, any error
            raise SubsetError(f"samples=: loss_fn(outputs, targets, reduction='none') "
                              f"failed ({type(err).__name__}: {err}); {fix}.") from err
        if not isinstance(values, Tensor) or values.dim() == 0 or values.shape[0] != y.shape[0]:
            raise SubsetError(f"samples=: loss_fn with reduction='none' returned "
                              f"{getattr(values, 'shape', type(values).__name__)}, not one "
                              f"value per sample; {fix}.")
        a, b = per_sample_terms(values, y, task)
        got = float(a.sum() / b.sum())
    if math.isfinite(want) and abs(got - want) > 1e-4 * max(abs(want), 1e-6):
        what = "the default loss" if default else "loss_fn"
        raise SubsetError(f"samples=: the per-sample losses of {what} average to {got:.6g} "
                          f"on the first samples, but its mean is {want:.6g}; {fix}.")
