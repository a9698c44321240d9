"""What MPO's cross-entropy takes: checks of a fit's targets and logits; the per-cell loss.

Both paths of a step (batched and cell by cell) compute :func:`cells_cross_entropy`.

MPO (PAPERS.md (c)) carves patterns into a classifier's cross-entropy and takes no other
loss. ``F.cross_entropy`` accepts more than it means: 0/1 multi-label targets pass as
unnormalised "class probabilities", one logit gives a loss of 0 whatever the weights, and
float class indices or ``(N, T, C)`` logits fail deep in a ``vmap``-ed step with torch's
words. Each is refused here, before any step, naming the problem and the fix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.losses import check_cross_entropy_targets

IGNORE_INDEX = -100  # F.cross_entropy's default: such targets count in no mean
_ONLY_CE = ("MPO carves loss patterns into a classifier's cross-entropy (it takes no other "
            "loss, BCEWithLogits neither): pass class indices as integers (y.long()) or class "
            "probabilities.")


def check_pattern_targets(y: Tensor) -> None:
    """Refuse targets that MPO's cross-entropy would read as something else.

    Raises:
        ValueError: For real-valued targets outside [0, 1] (regression) or 0/1
            multi-label rows (both from
            :func:`~landscape_widget.core.losses.check_cross_entropy_targets`), bool or
            float targets of one value per sample (class indices must be integers), and
            float rows along dim 1 that do not sum to 1, each with the fix.

    Example:
        >>> check_pattern_targets(torch.tensor([[0.25, 0.75]]))
        >>> check_pattern_targets(torch.tensor([[1.0, 1.0, 0.0]]))
        Traceback (most recent call last):
        ...
        ValueError: The default loss is cross-entropy, ... 0/1 multi-label rows ...
    """
    check_cross_entropy_targets(y, fix=_ONLY_CE)
    if y.dtype == torch.bool or (y.is_floating_point() and y.dim() < 2):
        raise ValueError(
            f"The targets are {y.dtype} of shape {tuple(y.shape)}: MPO's cross-entropy takes "
            "class indices as integers, or class probabilities shaped like the logits. Pass "
            "y.long() for class indices.")
    if not y.is_floating_point() or not y.numel():
        return
    sums = y.sum(1)
    if torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
        return
    lo, hi = float(sums.min()), float(sums.max())
    raise ValueError(
        f"Float targets are class probabilities for MPO's cross-entropy, but their sums along "
        f"dim 1 range over [{lo:.4g}, {hi:.4g}], not 1. Normalise them "
        "(y / y.sum(1, keepdim=True)) or pass class indices as integers (y.long()); a "
        "regression's targets in [0, 1] have no pattern fit (MPO takes no other loss).")


def check_pattern_logits(logits: Tensor, y: Tensor) -> None:
    """Refuse logits that MPO's cross-entropy cannot pair with the targets ``y`` (all data).

    ``logits`` are a network's outputs on the first samples, ``(n, C, ...)``.

    Raises:
        ValueError: If there is no class dimension or only one class, the class
            dimension is last (``(N, T, C)``, torch's cross-entropy takes it at dim 1), the
            shapes do not match otherwise, or class indices fall outside ``[0, C)``
            (``-100`` ignores a target), each with the fix.
    """
    shape = tuple(logits.shape)
    got = _shape(shape[1:])
    if logits.dim() < 2 or shape[1] < 2:
        raise ValueError(
            f"The networks give logits of shape {got}: MPO's cross-entropy needs at least "
            "2 class scores along dim 1 (over one class it is 0 whatever the weights). For "
            "binary labels return 2 logits and pass class indices (y.long()).")
    classes = shape[1]
    if y.is_floating_point():
        if tuple(y.shape[1:]) != shape[1:]:
            raise ValueError(f"Class-probability targets {tuple(y.shape)} must be shaped like "
                             f"the logits (N, {', '.join(map(str, shape[1:]))}).")
        return
    if tuple(y.shape[1:]) != shape[2:]:
        last = logits.dim() == y.dim() + 1 and shape[1:-1] == tuple(y.shape[1:])
        raise ValueError(
            f"The networks give logits {got} for class-index targets {tuple(y.shape)}: "
            + ("the classes are the last dimension, but torch's cross-entropy (MPO's loss) "
               "takes them at dim 1; return logits.transpose(1, 2) (or movedim(-1, 1)) from "
               "the network." if last else
               f"cross-entropy needs targets {_shape(shape[2:])} "
               "with the logits' class dimension at dim 1"
               + (" (y.squeeze(1)?)." if y.dim() == logits.dim() and y.shape[1] == 1
                  else ".")))
    counted = y[y != IGNORE_INDEX]
    if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= classes):
        raise ValueError(
            f"Class indices range over [{int(counted.min())}, {int(counted.max())}] but the "
            f"networks give {classes} class scores: indices must lie in [0, {classes}) "
            f"({IGNORE_INDEX} ignores a target).")


def _shape(rest: tuple) -> str:
    """``(N, *rest)`` as text: ``(N,)``, ``(N, 3)``."""
    return f"(N, {', '.join(map(str, rest))})" if rest else "(N,)"


def cells_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Each network's ``F.cross_entropy(logits[k], y)``: logits ``(K, N, C, ...)`` -> ``(K,)``.

    Ignored targets (``-100``) count in no cell's mean, as in ``F.cross_entropy``: a mean
    over all targets made the batched path's loss smaller than the loop's (by the share of
    ignored tokens), and ``tau`` clamped another number than the one evaluated.

    Returns:
        The mean cross-entropy of every network over the counted targets.
    """
    k, n = logits.shape[:2]
    # Class probabilities (N, C) repeat along dim 0 only (y.repeat(k) refused them).
    ce = F.cross_entropy(logits.reshape(k * n, *logits.shape[2:]),
                         y.repeat(k, *[1] * (y.dim() - 1)), reduction="none").reshape(k, -1)
    if y.is_floating_point():
        return ce.mean(1)
    return ce.sum(1) / (y != IGNORE_INDEX).sum()
