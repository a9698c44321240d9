"""What the engine sums for each point: the loss, accuracy, user metrics and ``loss_se``.

:class:`LossStats` is a mixin of :class:`~landscape_widget.core.evaluate.Evaluator`: it runs
the first samples once to check the user's loss and metrics and decide what accuracy means
(:class:`~landscape_widget.core.metrics.Task`), then gives the float64 sums of one point on
one batch (``_stats``, or ``_batched_stats`` for K points of the default loss at once) and
turns the sums over all data into values (``_values``): the loss weighted by counted targets,
accuracy over counted predictions, each user metric's total over its count, and with
``samples=`` the standard error of the mean loss (core/subset.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from . import subset
from .errors import AccuracyUndefined, NoCountedTargets
from .losses import IGNORE_INDEX, batched_cross_entropy, check_reduction, loss_error
from .metrics import Task, describe, find_logits, resolve_task, user_metric_stats


class LossStats:
    """Checks and sums of the loss and metrics (a mixin of the Evaluator).

    Uses the evaluator's ``x``, ``y``, ``n``, ``loss_fn``, ``output_fn``, ``metrics``,
    ``user_metrics``, ``module``, ``base`` and its buffer state (``_enter``/``_exit``).
    """

    def _default_loss(self, out, y: Tensor) -> Tensor:
        """Cross-entropy on the logits of ``out`` (see ``output_fn``)."""
        return F.cross_entropy(find_logits(out, self.output_fn), y)

    def _check_outputs(self) -> None:
        """Run the first samples once: check loss and metrics, decide what accuracy means.

        Messages show the data's shapes (``n`` samples), not those of the probe.

        Raises:
            ValueError: If ``loss_fn`` fails on the outputs or does not return a scalar
                tensor, if a user loss is not a batch mean (``check_reduction``), or if a
                user metric fails on the first samples or returns neither per-sample values
                nor a ``(total, count)`` pair.
            NoCountedTargets: (a ``ValueError``) If every target equals ``ignore_index``.
            AccuracyUndefined: (a ``ValueError``) If ``"accuracy"`` was asked for explicitly
                (``metrics=`` given without a user accuracy) but the outputs hold no logits
                of a classification task; with the default metrics it is dropped instead
                (recorded in ``dropped``).
        """
        m = min(self.n, 8)
        y = self.y[:m]
        out = self._probe(m)
        with torch.no_grad():
            try:
                loss = self.loss_fn(out, y)
            except (RuntimeError, TypeError, ValueError, IndexError) as err:
                raise ValueError(loss_error(err, describe(out, self.n), self.y,
                                            default=not self._user_loss,
                                            tensor_out=isinstance(out, Tensor))) from err
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError(
                "loss_fn must return a scalar tensor (the mean loss of the batch); got "
                f"{getattr(loss, 'shape', type(loss).__name__)}. Use reduction='mean'."
            )
        try:
            logits, no_logits = find_logits(out, self.output_fn), ""
        except TypeError as err:
            logits, no_logits = None, str(err)
        self.task: Task = resolve_task(logits, self.y, self.loss_fn if self._user_loss else None,
                                       self.n)
        if self.task.ignore is not None and float(self.task.loss_weight(self.y)) == 0:
            raise NoCountedTargets(f"every target equals ignore_index={self.task.ignore}; the "
                                   "loss is a mean over no targets. Pass data with counted "
                                   "targets.", self.task.ignore)
        if "accuracy" in self.metrics and "accuracy" not in self.user_metrics and (
                logits is None or self.task.kind is None):
            why = no_logits or self.task.why
            if not self._default_metrics:
                raise AccuracyUndefined(f"{why}. Pass metrics=('loss',), or your own metric as "
                                 "metrics={'loss': None, 'accuracy': fn(outputs, targets)}.")
            self.dropped["accuracy"] = why
            self.metrics = tuple(k for k in self.metrics if k != "accuracy")
        self._accuracy = "accuracy" in self.metrics and "accuracy" not in self.user_metrics
        self._denoms: dict[int, tuple[list[float], float, float]] = {}
        self._tensor_out = isinstance(out, Tensor)
        self._batched_ce = (not self._user_loss and not self.user_metrics
                            and self._tensor_out and self.output_fn is None)
        if self._user_loss and (self.forced_batch or 0) < self.n:
            check_reduction(self.loss_fn, out, y, self.task)
        for name, fn in self.user_metrics.items():
            with torch.no_grad():
                try:
                    value = fn(out, y)
                except Exception as err:
                    raise ValueError(f"metrics[{name!r}](outputs, targets) failed on the first "
                                     f"samples ({describe(out, self.n)}, targets "
                                     f"{self._targets()}): {err}") from err
            user_metric_stats(name, value, m)

    def _probe(self, m: int):
        """The model's outputs on the first ``m`` samples at theta (no grad; buffers restored).

        Returns:
            The outputs, as the model returns them.
        """
        self._enter()
        try:
            with torch.no_grad():
                return functional_call(self.module, dict(self.base), (self.x[:m],))
        finally:
            self._exit()

    def _subset_se(self, population: int | None) -> int | None:
        """Set up the per-sample losses of ``loss_se`` (see core/subset.py); the population."""
        if population is None or "loss" not in self.metrics:
            return None
        if self._user_loss:
            self._loss_none = subset.unreduced_loss(self.loss_fn)
        else:
            self._loss_none = self._default_loss_none
        m = min(self.n, 8)
        out = self._probe(m)
        subset.check_unreduced(self.loss_fn, self._loss_none, out, self.y[:m], self.task,
                               default=not self._user_loss)
        self.metrics = (*self.metrics, "loss_se")
        return int(population)

    def _default_loss_none(self, out, y: Tensor) -> Tensor:
        return F.cross_entropy(find_logits(out, self.output_fn), y, reduction="none")

    def _targets(self) -> str:
        return f"{tuple(self.y.shape)} {str(self.y.dtype).replace('torch.', '')}"

    def _stats(self, out, y: Tensor, w: float) -> Tensor:
        """Sums of one point on one batch, float64 ``(S,)``; runs under vmap too.

        The loss times the batch's weight ``w`` (0 for a batch of only ignored targets),
        correct predictions, then the ``(total, count)`` of each user metric.

        Returns:
            The float64 ``(S,)`` column sums of this batch: weighted loss, number of correct
            predictions (0 when accuracy is not computed), each user metric's total and
            count, then the three ``loss_se`` sums when a population is set.
        """
        loss = self.loss_fn(out, y).to(torch.float64)
        cols = [loss * w if w > 0 else torch.zeros_like(loss)]
        if self._accuracy:
            cols.append(self.task.correct(find_logits(out, self.output_fn), y))
        else:
            cols.append(torch.zeros_like(cols[0]))
        for name, fn in self.user_metrics.items():
            cols.extend(user_metric_stats(name, fn(out, y), y.shape[0]).unbind())
        if self.population:  # sum a^2, sum ab, sum b^2 of loss_se (core/subset.py)
            cols.extend(subset.se_sums(self._loss_none(out, y), y, self.task).unbind())
        return torch.stack(cols)

    def _batched_stats(self, out: Tensor, y: Tensor) -> Tensor:
        """:meth:`_stats` of K points at once for the default loss (``out`` is (K, B, ...))."""
        k = out.shape[0]
        fast = None
        if out.dim() == 3 and y.dim() == 1 and out.is_floating_point() and not (
                y.is_floating_point() or y.dtype == torch.bool):
            fast = batched_cross_entropy(out, y, self.task.ignore
                                         if self.task.ignore is not None else IGNORE_INDEX)
        if fast is not None:
            per_sample, hit = fast
            correct = hit.sum(-1).double() if self._accuracy else None
        else:
            targets = y.unsqueeze(0).expand(k, *y.shape).flatten(0, 1)
            # reduction="none" gives 0 for ignored targets: the sum is over counted ones.
            per_sample = F.cross_entropy(out.flatten(0, 1), targets, reduction="none")
            correct = self.task.correct(out, y, lead=1) if self._accuracy else None
        loss = per_sample.reshape(k, -1).sum(1).double()  # float32 sum: as fast as the mean
        if correct is None:
            correct = torch.zeros_like(loss)
        if self.population:  # sum a^2, sum ab, sum b^2 of loss_se (core/subset.py)
            se = subset.se_sums(per_sample.reshape(k, y.shape[0], -1), y, self.task, lead=1)
            return torch.cat([torch.stack([loss, correct], 1), se], 1)
        return torch.stack([loss, correct], 1)

    def _values(self, sums: Tensor, batch: int) -> Tensor:
        """``(K, S)`` sums over all data -> loss, accuracy and user metrics ``(K, 2 + U)``."""
        _, weight, count = self._denominators(batch)
        cols = [sums[:, 0] / weight, sums[:, 1] / count]
        cols += [sums[:, 2 + 2 * j] / sums[:, 3 + 2 * j] for j in range(len(self.user_metrics))]
        if self.population:
            cols.append(subset.ratio_se(sums[:, 0], sums[:, -3], sums[:, -2], weight,
                                        sums[:, -1], self.n, self.population))
        return torch.stack(cols, 1)

    def _denominators(self, batch: int) -> tuple[list[float], float, float]:
        """Per-batch loss weights, their total and the counted predictions over all data.

        They depend on the targets only: computed once per batch size (one device sync per
        batch, here rather than in every pass).

        Returns:
            ``(weights, total, count)``: the loss weight of each batch of size ``batch``
            (``Task.loss_weight``: its counted targets, their class weights, or its
            samples), their sum, and the number of predictions that count for accuracy
            over all data; cached per batch size.
        """
        if batch not in self._denoms:
            weights, count = [], 0.0
            for s in range(0, self.n, batch):
                y = self.y[s : s + batch]
                weights.append(float(self.task.loss_weight(y)))
                count += float(self.task.acc_count(y))
            self._denoms[batch] = (weights, float(sum(weights)), count)
        return self._denoms[batch]
