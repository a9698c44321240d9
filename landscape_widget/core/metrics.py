"""What the engine measures besides the forward pass: logits, accuracy, user metrics, weights.

The engine evaluates a grid point in batches and must report numbers that do not depend on
its batch size. Everything here is expressed as *sums over samples* and *counts*, added
over all batches and divided once at the end:

- the loss: ``loss_fn`` returns the mean over the counted targets of a batch; it is
  multiplied by that batch's weight (:meth:`Task.loss_weight`: the number of counted
  targets, or the sum of their class weights) and the total is divided by the total
  weight, which is the mean over all counted targets of all data. A batch whose targets
  are all ignored weighs 0 (its NaN mean is never added).
- accuracy: correct predictions and counted targets (:meth:`Task.correct`).
- a user metric ``fn(outputs, targets)``: per-sample values ``(B,)`` (their sum and ``B``),
  or a pair ``(total, count)`` of scalars, summed separately.

The loss side (ignored targets, reductions) is in core/losses.py.
:func:`resolve_task` decides, from the outputs of the first samples and all targets,
whether accuracy means something and how to compute it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .losses import class_weight, ignore_index, multilabel_threshold

BUILTIN = ("loss", "accuracy")
MetricFn = Callable[..., Tensor | tuple[Tensor, Tensor]]


class DefaultMetrics(tuple):
    """The default ``metrics``: the loss, and accuracy wherever it means something.

    A tuple equal to ``("loss", "accuracy")``; being of this type (it survives pickling,
    unlike identity) tells the engine to drop accuracy quietly (recording why in
    ``Evaluator.dropped``) where an explicit ``metrics=("loss", "accuracy")`` is refused.
    """


METRICS = DefaultMetrics(BUILTIN)


def split_metrics(metrics) -> tuple[tuple[str, ...], dict[str, MetricFn]]:
    """Names and user functions of ``metrics``.

    Args:
        metrics: A name, a sequence of ``"loss"``/``"accuracy"``, or a mapping
            ``{name: fn}`` where ``fn`` is a user metric or ``None`` for a built-in name.

    Returns:
        ``(names, {name: fn})``: all names in order, and the user functions.

    Raises:
        ValueError: Unknown names, an empty set, or a function given for ``"loss"``.
        TypeError: A mapping value that is neither callable nor ``None``.
    """
    if isinstance(metrics, str):
        metrics = (metrics,)
    if isinstance(metrics, Mapping):
        user = {}
        for name, fn in metrics.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"metric names must be non-empty strings, got {name!r}.")
            if fn is None:
                if name not in BUILTIN:
                    raise ValueError(f"metrics[{name!r}] is None, but {name!r} is not a "
                                     f"built-in metric ({list(BUILTIN)}); give a function.")
            elif name == "loss":
                raise ValueError("metrics['loss'] must be None: the loss is loss_fn's; pass "
                                 "your function as loss_fn= or under another name.")
            elif not callable(fn):
                raise TypeError(f"metrics[{name!r}] must be a function fn(outputs, targets) "
                                f"or None, got {type(fn).__name__}.")
            else:
                user[name] = fn
        names = tuple(metrics)
    else:
        names = tuple(metrics)
        user = {}
        bad = [m for m in names if m not in BUILTIN]
        if bad:
            raise ValueError(f"metrics={names!r}: unknown {bad}; choose from {list(BUILTIN)}, "
                             "or pass {name: fn(outputs, targets)} for your own.")
    if not names:
        raise ValueError(f"metrics is empty: choose a non-empty subset of {list(BUILTIN)} "
                         "(or a {name: fn} mapping).")
    return names, user


def find_logits(out, output_fn: Callable | None = None) -> Tensor:
    """The class scores in a model's outputs.

    ``output_fn(out)`` when given; else the outputs themselves (a Tensor), the ``"logits"``
    entry of a dict (HuggingFace's ``ModelOutput`` included) or a ``.logits`` attribute.
    Tuples are not guessed at (which entry holds the logits varies).

    Returns:
        The logits Tensor itself (not a copy): ``output_fn(out)``, ``out``, ``out["logits"]``
        or ``out.logits``, the first of these that applies.

    Raises:
        TypeError: If ``output_fn`` returns something other than a Tensor, or, without
            ``output_fn``, no logits can be found in ``out`` (a tuple, say).

    Example:
        >>> t = torch.zeros(2, 3)
        >>> find_logits({"logits": t, "aux": 1}) is t, find_logits((t, 1), lambda o: o[0]) is t
        (True, True)
    """
    if output_fn is not None:
        logits = output_fn(out)
        if not isinstance(logits, Tensor):
            raise TypeError(f"output_fn returned {type(logits).__name__}; it must return the "
                            "logits Tensor of the model's outputs.")
        return logits
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    if isinstance(getattr(out, "logits", None), Tensor):
        return out.logits
    raise TypeError(
        f"accuracy needs the logits, but the model returns {describe(out)}; say where they "
        "are with output_fn=, e.g. output_fn=lambda out: out[0] (a tuple) or "
        "output_fn=lambda out: out['scores'] (a dict)."
    )


def describe(out, n: int | None = None) -> str:
    """A short description of a model's outputs; dim 0 shown as ``n`` (the data's size)."""
    if isinstance(out, Tensor):
        shape = list(out.shape)
        if n is not None and shape:
            shape[0] = n
        return f"a Tensor of shape {tuple(shape)}"
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys {list(out)[:6]}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}"
    return f"a {type(out).__name__}"


@dataclass
class Task:
    """How accuracy and batch weights are computed for one data set and loss.

    Attributes:
        kind: ``"class"`` (class-index targets), ``"soft"`` (one-hot or probability
            targets, argmax matched), ``"multilabel"`` (0/1 targets, per-label accuracy),
            or ``None`` (accuracy undefined; ``why`` says why).
        class_dim: The class dimension of the logits for ``"class"`` (1 or -1).
        ignore: Target value not counted (class-index targets only).
        threshold: Decision threshold of ``"multilabel"`` (0 for logits, 0.5 for probabilities).
        class_weight: The loss's per-class weights, if any (they weigh each target's loss).
        why: Why accuracy is undefined.
        masked: Whether any target equals ``ignore`` (else no mask is applied: cheaper).
        per_sample: The loss is a mean of per-sample values (each sample weighs the same,
            whatever its counted targets); set by :func:`~.losses.check_reduction`.
    """

    kind: str | None
    class_dim: int = -1
    ignore: int | None = None
    threshold: float = 0.0
    class_weight: Tensor | None = None
    why: str = ""
    masked: bool = True
    per_sample: bool = False

    def counted(self, y: Tensor) -> Tensor:
        """Mask of the targets that count (class-index targets other than ``ignore``)."""
        # Widened: a uint8 y would compare with -100 cast to uint8, 156 (R4 of review 3).
        return y.long() != self.ignore

    def loss_weight(self, y: Tensor) -> Tensor:
        """The weight of a batch's mean loss in the mean over all data (float64 scalar).

        The number of counted targets (or the sum of their class weights) for class-index
        targets, the number of samples otherwise.

        Returns:
            A float64 scalar on ``y``'s device: ``y.shape[0]`` when nothing is ignored or
            the loss is per-sample; else the number of targets other than ``ignore``, or the
            sum of ``class_weight`` over those targets if the loss has class weights.

        Example:
            >>> task = Task("class", ignore=-100)
            >>> task.loss_weight(torch.tensor([0, -100, 2, 2])).item()
            3.0
            >>> Task("class", ignore=-100, class_weight=torch.tensor([1.0, 5.0, 0.5])
            ...      ).loss_weight(torch.tensor([0, -100, 2, 2])).item()
            2.0
        """
        if self.ignore is None or self.per_sample:
            return torch.tensor(float(y.shape[0]), dtype=torch.float64, device=y.device)
        mask = self.counted(y)
        if self.class_weight is not None:
            w = self.class_weight.to(y.device, torch.float64)
            return w[y[mask]].sum()
        return mask.sum().to(torch.float64)

    def acc_count(self, y: Tensor) -> Tensor:
        """How many predictions a batch's accuracy counts (float64 scalar)."""
        if self.kind == "class":
            return self.counted(y).sum().to(torch.float64)
        return torch.tensor(float(y.shape[0]), dtype=torch.float64, device=y.device)

    def correct(self, logits: Tensor, y: Tensor, lead: int = 0) -> Tensor:
        """Correct predictions in a batch; ``lead`` leading point dims (K) before the batch.

        Per-label accuracy adds, for each sample, the fraction of its labels predicted right.

        Returns:
            A float64 tensor of shape ``logits.shape[:lead]`` (a scalar for ``lead=0``): per
            leading point, the number of correct predictions in the batch, counting only
            targets other than ``ignore`` for ``"class"`` and, for ``"multilabel"``, each
            sample's fraction of labels right.

        Example:
            >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
            >>> Task("class", ignore=-100).correct(logits, torch.tensor([0, 0, -100])).item()
            1.0
        """
        if self.kind == "class":
            dim = self.class_dim if self.class_dim < 0 else self.class_dim + lead
            hit = logits.argmax(dim) == y
            if self.masked:
                hit = hit & self.counted(y)
        elif self.kind == "soft":
            hit = logits.argmax(-1) == y.argmax(-1)
        else:
            hit = (logits > self.threshold) == (y > 0.5)
            hit = hit.reshape(*hit.shape[:lead + 1], -1).to(torch.float64).mean(-1)
        # Counting bools in int64, then one conversion: cheaper than converting each.
        return hit.flatten(lead).sum(-1).to(torch.float64)


def resolve_task(logits: Tensor | None, y: Tensor, loss_fn, n: int) -> Task:
    """Decide whether accuracy means something for these outputs, targets and loss.

    Args:
        logits: The logits of the first samples (``None`` if they could not be found).
        y: All targets (their values decide the kind).
        loss_fn: The user's loss (or ``None`` for cross-entropy).
        n: Number of samples (for messages: the data's shape, not the probe's).

    Returns:
        A :class:`Task`; ``kind=None`` with ``why`` when accuracy is undefined.
    """
    ignore = ignore_index(loss_fn) if not y.is_floating_point() else None
    weight = class_weight(loss_fn) if ignore is not None else None
    if logits is None:
        return Task(None, ignore=ignore, class_weight=weight)
    shape = (n, *logits.shape[1:])
    got = f"outputs {shape} and {y.dtype} targets {tuple(y.shape)}"
    if not y.is_floating_point() and y.dtype != torch.bool:
        # The class dimension: last (HuggingFace's (N, T, C)) or 1 (torch's (N, C, d1, ...)).
        rest = tuple(y.shape[1:])
        dims = [d for d, other in ((-1, logits.shape[1:-1]), (1, logits.shape[2:]))
                if logits.dim() == y.dim() + 1 and tuple(other) == rest]
        if not dims:
            if y.shape[1:] == logits.shape[1:]:
                return _multilabel(logits, y, loss_fn, got, ignore, weight)
            return Task(None, ignore=ignore, class_weight=weight, why=(
                f"accuracy needs logits with one more (class) dimension than the class-index "
                f"targets; got {got}"))
        dim = dims[0]
        classes = logits.shape[dim]
        if classes < 2:
            return Task(None, ignore=ignore, class_weight=weight, why=(
                f"accuracy needs at least 2 classes, but the model gives {classes} score per "
                f"target ({got}); for one-logit binary classification pass "
                "metrics={'loss': None, 'accuracy': lw.multilabel_accuracy(threshold=0.0)} "
                "with float 0/1 targets shaped like the outputs"))
        counted = y[y != ignore]
        if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= classes):
            return Task(None, ignore=ignore, class_weight=weight, why=(
                f"accuracy needs class indices in [0, {classes}) (or {ignore} to ignore a "
                f"target); the targets range over [{int(counted.min())}, "
                f"{int(counted.max())}] ({got})"))
        return Task("class", class_dim=dim, ignore=ignore, class_weight=weight,
                    masked=bool((y == ignore).any()))
    y = y.to(logits.dtype) if y.dtype == torch.bool else y
    if y.shape[1:] != logits.shape[1:]:
        return Task(None, why=f"accuracy is undefined for real-valued (regression) targets; "
                              f"got {got}")
    binary = bool(((y == 0) | (y == 1)).all())
    soft = (logits.dim() >= 2 and multilabel_threshold(loss_fn) is None
            and bool((y >= 0).all())
            and bool(torch.allclose(y.sum(-1), torch.ones((), dtype=y.dtype, device=y.device))))
    if soft:
        return Task("soft")  # one-hot or class probabilities: argmax against argmax
    if binary:
        return _multilabel(logits, y, loss_fn, got, None, None)
    return Task(None, why=f"accuracy is undefined for real-valued (regression) targets; "
                          f"got {got}")


def _multilabel(logits, y, loss_fn, got, ignore, weight) -> Task:
    threshold = multilabel_threshold(loss_fn)
    if not bool(((y == 0) | (y == 1)).all()):
        return Task(None, ignore=ignore, class_weight=weight, why=(
            f"accuracy needs class-index targets or 0/1 labels shaped like the outputs; "
            f"got {got}"))
    if threshold is None:
        return Task(None, why=(
            f"these are 0/1 multi-label targets ({got}), and per-label accuracy depends on "
            "whether the outputs are logits or probabilities, which this loss_fn does not "
            "tell; pass metrics={'loss': None, 'accuracy': lw.multilabel_accuracy("
            "threshold=0.0)} (0.5 for probabilities), or loss_fn=nn.BCEWithLogitsLoss()"))
    return Task("multilabel", threshold=threshold)


def multilabel_accuracy(threshold: float = 0.0, output_fn: Callable | None = None) -> MetricFn:
    """A user metric: per-label accuracy of 0/1 targets, ``outputs > threshold`` as 1.

    Use ``threshold=0.0`` for logits, ``0.5`` for probabilities. Each sample contributes
    the fraction of its labels predicted right.

    Returns:
        A metric ``fn(outputs, targets)`` returning, per sample, the fraction of its labels
        with ``(logits > threshold) == (target > 0.5)`` as a float64 ``(B,)`` tensor (the
        logits found by :func:`find_logits` with ``output_fn``). Its ``threshold``
        attribute is part of its fingerprint for reusing results.

    Example:
        >>> fn = multilabel_accuracy(0.0)
        >>> fn(torch.tensor([[2.0, -1.0], [0.5, 0.5]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        tensor([1.0000, 0.5000], dtype=torch.float64)
    """

    def per_label_accuracy(outputs, targets):
        logits = find_logits(outputs, output_fn)
        hit = (logits > threshold) == (targets > 0.5)
        return hit.reshape(hit.shape[0], -1).to(torch.float64).mean(-1)

    per_label_accuracy.threshold = threshold  # part of its fingerprint (see compute._reuse)
    return per_label_accuracy


def user_metric_stats(name: str, value, batch: int) -> Tensor:
    """``(total, count)`` of one batch from a user metric's return value (float64 ``(2,)``).

    Returns:
        ``tensor([total, count])`` in float64: the metric's own pair of scalars, or for
        per-sample values the sum of the values and the batch size.

    Raises:
        ValueError: If the value is neither per-sample ``(B,)`` nor a ``(total, count)`` pair.

    Example:
        >>> user_metric_stats("m", torch.tensor([1.0, 2.0, 4.0]), 3).tolist()
        [7.0, 3.0]
        >>> user_metric_stats("m", (torch.tensor(5.0), torch.tensor(8)), 3).tolist()
        [5.0, 8.0]
    """
    if isinstance(value, (tuple, list)) and len(value) == 2:
        total, count = (torch.as_tensor(v) for v in value)
        if total.dim() == 0 and count.dim() == 0:
            return torch.stack([total.to(torch.float64), count.to(torch.float64)])
    elif isinstance(value, Tensor) and value.shape == (batch,):
        ones = torch.full((), float(batch), dtype=torch.float64, device=value.device)
        return torch.stack([value.to(torch.float64).sum(), ones])
    shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
    raise ValueError(
        f"metrics[{name!r}] returned {shape} for a batch of {batch}; return per-sample "
        f"values of shape ({batch},) (e.g. reduction='none'), or a pair (total, count) of "
        "scalars for a ratio over other units (tokens, labels): the engine sums over all "
        "data and divides once, so the value does not depend on its batch size."
    )
