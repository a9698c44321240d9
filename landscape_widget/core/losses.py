"""What the engine needs to know about the user's loss: ignored targets, labels, reduction.

The engine combines batches as ``sum_b w_b L_b / sum_b w_b`` (weights from
:meth:`~landscape_widget.core.metrics.Task.loss_weight`); :func:`check_reduction` verifies,
on the first samples, that the loss is such a mean, and refuses sums with the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100  # torch's default for cross_entropy / nll_loss (and HuggingFace's)


def base_fn(loss_fn):
    """The function under any ``functools.partial`` layers."""
    while isinstance(loss_fn, functools.partial):
        loss_fn = loss_fn.func
    return loss_fn


def ignore_index(loss_fn) -> int:
    """The target value the loss skips.

    The module's ``ignore_index``, a partial's keyword, or -100 (torch's and HuggingFace's
    default).

    Returns:
        The ``ignore_index`` keyword of a ``functools.partial`` if it has one, else the
        ``ignore_index`` attribute of the loss under the partials if it is an int, else
        :data:`IGNORE_INDEX` (-100).

    Example:
        >>> ignore_index(nn.CrossEntropyLoss(ignore_index=3))
        3
        >>> ignore_index(functools.partial(F.cross_entropy, ignore_index=7))
        7
        >>> ignore_index(F.mse_loss) == IGNORE_INDEX
        True
    """
    if isinstance(loss_fn, functools.partial) and "ignore_index" in loss_fn.keywords:
        return int(loss_fn.keywords["ignore_index"])
    value = getattr(base_fn(loss_fn), "ignore_index", IGNORE_INDEX)
    return int(value) if isinstance(value, int) else IGNORE_INDEX


def class_weight(loss_fn) -> Tensor | None:
    """The loss's per-class weights: a partial's ``weight=`` keyword or the module's ``weight``.

    Returns:
        The weight tensor, or ``None`` if the loss has none.

    Example:
        >>> w = torch.tensor([1.0, 3.0])
        >>> class_weight(functools.partial(F.cross_entropy, weight=w)) is w
        True
        >>> class_weight(nn.CrossEntropyLoss(weight=w)).tolist(), class_weight(F.mse_loss)
        ([1.0, 3.0], None)
    """
    if isinstance(loss_fn, functools.partial) and "weight" in loss_fn.keywords:
        value = loss_fn.keywords["weight"]
    else:
        value = getattr(base_fn(loss_fn), "weight", None)
    return value if isinstance(value, Tensor) else None


_LOGIT_LOSSES = (nn.BCEWithLogitsLoss, nn.MultiLabelSoftMarginLoss)
_PROB_LOSSES = (nn.BCELoss,)


def multilabel_threshold(loss_fn) -> float | None:
    """0 if ``loss_fn`` takes logits of independent labels, 0.5 if probabilities, else None."""
    fn = base_fn(loss_fn)
    if isinstance(fn, _LOGIT_LOSSES) or fn in (F.binary_cross_entropy_with_logits,
                                               F.multilabel_soft_margin_loss):
        return 0.0
    if isinstance(fn, _PROB_LOSSES) or fn is F.binary_cross_entropy:
        return 0.5
    return None


def slice_outputs(out, sl: slice, n: int):
    """``out`` restricted to samples ``sl`` (tensors whose dim 0 is ``n``), or None.

    Tensors in dicts (HuggingFace's ``ModelOutput`` too), tuples, lists, namedtuples and
    dataclasses are sliced, in an object of the same type; anything else is kept as is.

    Returns:
        The outputs of samples ``sl``.

    Example:
        >>> from collections import namedtuple
        >>> Out = namedtuple("Out", "logits aux")
        >>> slice_outputs(Out(torch.arange(4), 1.0), slice(1, 3), 4)
        Out(logits=tensor([1, 2]), aux=1.0)
    """
    if isinstance(out, Tensor):
        return out[sl] if out.dim() and out.shape[0] == n else out
    if isinstance(out, Mapping):
        items = {k: slice_outputs(v, sl, n) for k, v in out.items()}
        try:
            return type(out)(**items) if type(out) is not dict else items
        except TypeError:
            return items
    if isinstance(out, tuple) and hasattr(type(out), "_fields"):  # a namedtuple
        return type(out)(*(slice_outputs(v, sl, n) for v in out))
    if isinstance(out, (tuple, list)):
        return type(out)(slice_outputs(v, sl, n) for v in out)
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        # A copy with each field sliced (frozen, or fields outside __init__, included).
        part = copy.copy(out)
        for f in dataclasses.fields(out):
            object.__setattr__(part, f.name, slice_outputs(getattr(out, f.name), sl, n))
        return part
    return out


def check_cross_entropy_targets(y: Tensor, fix: str | None = None) -> None:
    """Refuse real-valued and multi-label targets for the default loss (cross-entropy).

    ``F.cross_entropy`` also takes float targets shaped like the logits, as class
    probabilities; regression targets (negative, or above 1) and 0/1 multi-label rows
    (several 1s per row) pass it too and give a number with no meaning. Probabilities and
    one-hot rows are accepted.

    Args:
        y: The targets.
        fix: What to do instead, for a method whose loss is cross-entropy by design (none
            given: pass the task's loss as ``loss_fn=``).

    Raises:
        ValueError: If float targets leave ``[0, 1]``, or are 0/1 rows whose sums along
            dim 1 are not all 1, with the fix.

    Example:
        >>> check_cross_entropy_targets(torch.tensor([[0.2, 0.8]]))
        >>> check_cross_entropy_targets(torch.tensor([[-1.5, 0.8]]))
        Traceback (most recent call last):
        ...
        ValueError: The default loss is cross-entropy, ...
    """
    if not y.is_floating_point() or not y.numel():
        return
    lo, hi = float(y.min()), float(y.max())
    if lo < 0 or hi > 1:
        raise ValueError(
            "The default loss is cross-entropy, which takes class indices or class "
            f"probabilities, but the targets are real-valued over [{lo:.4g}, {hi:.4g}] (a "
            "regression?): its values would mean nothing. " + (fix or (
                "Pass the task's loss, e.g. loss_fn=torch.nn.MSELoss() for regression, or "
                "class indices as integers (y.long())."))
        )
    sums = y.sum(1) if y.dim() >= 2 else None
    if (sums is not None and not torch.allclose(sums, torch.ones_like(sums), atol=1e-4)
            and bool(((y == 0) | (y == 1)).all()) and float(sums.max()) <= 1):
        # One-hot rows with some all 0 (no class): neither multi-label nor y.long()'s case.
        raise ValueError(
            "The default loss is cross-entropy, which takes class indices or class "
            f"probabilities, but {int((sums == 0).sum())} of the one-hot target rows are all 0 "
            "(no class): cross-entropy gives them loss 0 and they would still count in the "
            "mean. Leave those samples out of the data, or give each a class.")
    if (sums is not None and not torch.allclose(sums, torch.ones_like(sums), atol=1e-4)
            and bool(((y == 0) | (y == 1)).all())):
        # Several 1s per row (BCE-style labels): F.cross_entropy takes them for unnormalised
        # class probabilities and returns a number of no task's loss, without a word.
        raise ValueError(
            "The default loss is cross-entropy, which takes class indices or class "
            "probabilities, but the targets are 0/1 multi-label rows (their sums along dim 1 "
            f"range over [{float(sums.min()):.4g}, {float(sums.max()):.4g}], not 1): it would "
            "read them as unnormalised class probabilities. " + (fix or (
                "Pass the task's loss, loss_fn=torch.nn.BCEWithLogitsLoss() (with metrics="
                "{'loss': None, 'accuracy': lw.multilabel_accuracy(threshold=0.0)}), or one "
                "class index per sample (y.long())."))
        )


def check_reduction(loss_fn, out, y: Tensor, task) -> None:
    """Refuse a ``loss_fn`` whose batch value is not the weighted mean of its parts' values.

    The engine combines batches as ``sum_b w_b L_b / sum_b w_b`` (see the module
    docstring); a loss that sums (``reduction='sum'``) or otherwise does not decompose
    would give a value that changes with the engine's batch size. Checked on the outputs
    of the first samples, split in two ways (halves; first sample and the rest), on the
    same outputs, so BatchNorm does not matter. With ignored targets the weights are the
    counted targets (torch's ``ignore_index`` mean); a loss that is instead a mean of
    per-sample means is recognised and weighted by samples (``task.per_sample``).

    Raises:
        ValueError: If the loss is a sum or does not decompose, with the fix.
    """
    m = y.shape[0]
    if m < 2:
        return
    with torch.no_grad():
        whole = float(loss_fn(out, y))
        splits = []
        for h in sorted({m // 2, 1}):
            parts = [(slice(0, h), y[:h]), (slice(h, m), y[h:])]
            splits.append([(float(loss_fn(slice_outputs(out, sl, m), yy)), yy)
                           for sl, yy in parts])
    if not _finite(whole):
        return

    def agrees() -> bool:
        for parts in splits:
            pairs = [(v, float(task.loss_weight(yy))) for v, yy in parts]
            pairs = [(v, w) for v, w in pairs if w]
            if not pairs or not all(_finite(v) for v, _ in pairs):
                continue
            mean = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
            if abs(whole - mean) > 1e-4 * max(abs(whole), abs(mean), 1e-12):
                return False
        return True

    if agrees():
        return
    if task.ignore is not None:
        task.per_sample = True
        if agrees():
            return
        task.per_sample = False
    vals = [v for v, _ in splits[0]]
    if abs(whole - sum(vals)) <= 1e-4 * max(abs(whole), 1e-12):
        raise ValueError(
            f"loss_fn returns a sum over the batch (on {m} samples it gives {whole:.6g}, the "
            f"sum of its parts' values {vals[0]:.6g} + {vals[1]:.6g}); the landscape would "
            "change with the engine's batch size. Return the mean: reduction='mean' (the "
            "default of torch's losses), or divide by the batch size: "
            "loss_fn=lambda out, y: my_loss(out, y) / len(y)."
        )
    broadcast = _broadcast_shape(out, y)
    if broadcast is not None:
        # MSELoss on (N, 1) outputs and (N,) targets compares every output with every
        # target: torch only warns, and a sum/mean test cannot say why it fails.
        raise ValueError(
            f"loss_fn broadcasts the outputs {tuple(out.shape)} against the targets "
            f"{tuple(y.shape)} to {broadcast} (every sample's output against every target), "
            "so it is not a mean over samples and its value is wrong. Give the targets the "
            f"outputs' shape: pass y.reshape({', '.join(['-1', *map(str, out.shape[1:])])}), "
            "or squeeze the outputs in the loss: loss_fn=lambda out, y: "
            "F.mse_loss(out.squeeze(-1), y)."
        )
    raise ValueError(
        f"loss_fn is not a mean over samples: on {m} samples it gives {whole:.6g}, but not "
        "the weighted mean of its parts' values. The engine splits the data into batches "
        "and averages their losses (weighted by the number of counted targets, or of "
        "samples), so the value would depend on its batch size. Make loss_fn the mean of "
        "per-sample (or per-target) losses, or evaluate all data in one batch with "
        "evaluator_options={'batch_size': len(data)}."
    )


def uneven_row(y: Tensor, m: int, task) -> int | None:
    """A sample that tells :func:`check_reduction`'s two means apart where the probe cannot.

    A mean over counted targets and a mean of per-sample means agree on samples that all
    count the same targets (language-model data sorted by length: the first samples are
    all full), so the check on the first ``m`` samples could not tell them apart, and the
    engine weighted the batches of a per-sample mean by their counted targets (the surface
    then changed with the batch size: 0.026 off with 16-sample batches).

    Args:
        y: All targets.
        m: The number of probe samples (the first ``m``).
        task: The :class:`~landscape_widget.core.metrics.Task` (ignored targets, weights).

    Returns:
        When the first ``m`` samples all weigh the same (``Task.loss_weight``), the index of
        the first later sample with counted targets that weighs otherwise; else ``None``.
    """
    if task.ignore is None or task.per_sample or y.dim() < 2 or y.shape[0] <= m or (
            not task.masked and task.class_weight is None):  # every sample counts all
        return None

    def weights(rows: Tensor) -> Tensor:
        mask = task.counted(rows).reshape(rows.shape[0], -1)
        if task.class_weight is None:
            return mask.sum(-1).to(torch.float64)
        w = task.class_weight.to(rows.device, torch.float64)[rows.clamp_min(0)]
        return (w.reshape(rows.shape[0], -1) * mask).sum(-1)

    first = weights(y[:m])
    if not bool((first == first[0]).all()) or float(first[0]) == 0:
        return None
    step = max(1, 2**22 // max(1, y[0].numel()))  # chunks of ~4M targets (the masks' memory)
    for start in range(m, y.shape[0], step):
        w = weights(y[start : start + step])
        other = ((w != first[0]) & (w > 0)).nonzero()
        if other.numel():
            return start + int(other[0])
    return None


def decide_weighting(loss_fn, forward: Callable[[Tensor], object], y: Tensor, task,
                     m: int = 8) -> None:
    """Set ``task.per_sample``: :func:`check_reduction` on the first ``m`` samples.

    Where those all weigh the same, one that weighs otherwise (:func:`uneven_row`) is added.

    Args:
        loss_fn: The user's loss.
        forward: ``forward(rows)`` returns the model's outputs on the samples ``rows``.
        y: All targets.
        task: The :class:`~landscape_widget.core.metrics.Task`, updated.
        m: The number of first samples.

    Raises:
        ValueError: From :func:`check_reduction`.
    """
    rows = torch.arange(min(m, y.shape[0]), device=y.device)
    j = uneven_row(y, len(rows), task)
    if j is not None:
        rows = torch.cat([rows, rows.new_tensor([j])])
    check_reduction(loss_fn, forward(rows), y[rows], task)


def _broadcast_shape(out, y: Tensor) -> tuple[int, ...] | None:
    """The shape ``out`` and ``y`` broadcast to, if it mixes their sample dims, else None.

    Returns:
        The broadcast shape when ``out`` is a tensor whose shape differs from ``y``'s and
        broadcasting them pairs samples of one with other samples of the other (more
        elements than either), e.g. ``(N, 1)`` with ``(N,)`` gives ``(N, N)``; else None.
    """
    if not isinstance(out, Tensor) or out.shape == y.shape:
        return None
    try:
        shape = torch.broadcast_shapes(out.shape, y.shape)
    except RuntimeError:
        return None
    big = math.prod(shape)
    return tuple(shape) if big > out.numel() and big > y.numel() else None


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")
