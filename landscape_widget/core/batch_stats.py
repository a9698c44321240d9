"""What the engine sums for each point: the loss, accuracy, user metrics and ``loss_se``.

:class:`LossStats` is a mixin of :class:`~landscape_widget.core.evaluate.Evaluator`: it runs
the first samples once to check the user's loss and metrics and decide what accuracy means
(:class:`~landscape_widget.core.metrics.Task`), then gives the float64 sums of one point on
one batch (``_stats``, or ``_batched_stats`` for K points of the default loss at once) and
turns the sums over all data into values (``_values``): the loss weighted by counted targets,
accuracy over counted predictions, each user metric's total over its count, and with
``samples=`` the standard error of the mean loss (core/subset_se.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from . import subset_se
from .batched_ce import batched_cross_entropy, target_checks
from .errors import AccuracyUndefined, NoCountedTargets
from .losses import (
    IGNORE_INDEX,
    check_cross_entropy_targets,
    check_reduction,
    loss_error,
    uneven_row,
)
from .metrics import Task, describe, find_logits, resolve_task, user_metric_stats
from .precision import precision_flags, to_float32
from .rng import batch_draws

PROBE_SAMPLES = 8
"""Samples of the set-up's one forward at theta (:meth:`LossStats._probe`)."""
PROBE_KEEP_BYTES = 16 * 2**20
"""Largest probe output kept after the set-up, for the linear stem's check."""


class LossStats:
    """Checks and sums of the loss and metrics (a mixin of the Evaluator).

    Uses the evaluator's ``x``, ``y``, ``n``, ``loss_fn``, ``output_fn``, ``metrics``,
    ``user_metrics``, ``module``, ``base`` and its buffer state (``_enter``/``_exit``).
    """

    @property
    def loss_fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        """The loss: the user's ``loss_fn``, else the engine's default (cross-entropy).

        A property, not an attribute holding ``self._default_loss``: that bound method would
        make every evaluator a reference cycle, freed (with its copy of the model and its
        data on the device) only when Python's cyclic collector runs.
        """
        return self._loss_given if self._loss_given is not None else self._default_loss

    def _default_loss(self, out, y: Tensor) -> Tensor:
        """Cross-entropy on the logits of ``out`` (see ``output_fn``).

        Half-precision logits (a bf16 or fp16 model) are taken to float32 first: torch
        returns their loss rounded to bf16 (0.4 % relative), and the engine's sums are
        float64 whatever the precision.

        Returns:
            The mean cross-entropy of the batch, a float32 (or float64) scalar.
        """
        return F.cross_entropy(to_float32(find_logits(out, self.output_fn)), y)

    def _check_outputs(self) -> None:
        """Run the first samples once: check loss and metrics, decide what accuracy means.

        Messages show the data's shapes (``n`` samples), not those of the probe.

        Raises:
            ValueError: If ``loss_fn`` fails on the outputs, changes them in place, or does
                not return a scalar tensor; if the default loss gets real-valued targets
                outside ``[0, 1]`` or 0/1 multi-label rows; if a user loss is not a batch mean
                (``check_reduction``), or if a user metric fails on the first samples or
                returns neither per-sample values nor a ``(total, count)`` pair.
            NoCountedTargets: (a ``ValueError``) If every target equals ``ignore_index``.
            AccuracyUndefined: (a ``ValueError``) If ``"accuracy"`` was asked for explicitly
                (``metrics=`` given without a user accuracy) but the outputs hold no logits
                of a classification task; with the default metrics it is dropped instead
                (recorded in ``dropped``).
        """
        m = min(self.n, PROBE_SAMPLES)
        y = self.y[:m]
        out = self._probe(m)
        before = output_versions(out)
        with torch.no_grad():
            try:
                loss = self.loss_fn(out, y)
            except (RuntimeError, TypeError, ValueError, IndexError) as err:
                raise ValueError(loss_error(err, describe(out, self.n), self.y,
                                            default=not self._user_loss,
                                            tensor_out=isinstance(out, Tensor))) from err
        check_untouched(out, before, "loss_fn")
        if not self._user_loss:
            check_cross_entropy_targets(self.y)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError(
                "loss_fn must return a scalar tensor (the mean loss of the batch); got "
                f"{getattr(loss, 'shape', type(loss).__name__)}. Use reduction='mean'."
            )
        try:
            logits, no_logits = find_logits(out, self.output_fn), ""
        except TypeError as err:
            logits, no_logits = None, str(err)
        # bf16 logits of a float32 model at fp32: its forward runs under its own autocast
        # (or casts); said in spec["plan"]["precision_note"], which claimed "true fp32".
        self.out_dtype = logits.dtype if isinstance(logits, Tensor) else None
        self.task: Task = resolve_task(logits, self.y, self.loss_fn if self._user_loss else None,
                                       self.n)
        if self.task.ignore is not None and float(self.task.loss_weight(self.y)) == 0:
            if bool(self.task.counted(self.y).any()):  # all of classes the loss weighs 0
                raise NoCountedTargets(
                    f"every target other than ignore_index={self.task.ignore} is of a class "
                    "whose weight is 0 in the loss's weight=; the loss is a mean over no "
                    "weight (0/0). Pass data with targets of classes weighted above 0.",
                    self.task.ignore, zero_weight=True)
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
            j = uneven_row(self.y, m, self.task)
            if j is not None:  # the first samples count the same targets: see uneven_row
                rows = torch.tensor([0, j], device=self.y.device)
                check_reduction(self.loss_fn, self._forward(self.x[rows]), self.y[rows],
                                self.task)
        for name, fn in self.user_metrics.items():
            with torch.no_grad():
                try:
                    value = fn(out, y)
                except Exception as err:
                    raise ValueError(f"metrics[{name!r}](outputs, targets) failed on the first "
                                     f"samples ({describe(out, self.n)}, targets "
                                     f"{self._targets()}): {err}") from err
            check_untouched(out, before, f"metrics[{name!r}]")
            user_metric_stats(name, value, m)

    def _probe(self, m: int):
        """The model's outputs on the first ``m`` samples at theta (no grad; buffers restored).

        The probe runs once: it also measures ``act_bytes``, the bytes per sample of every
        leaf module's tensor outputs (the memory budgets' unit). A second forward for that
        alone, on another batch size, cost a ResNet-50 call 0.16 s on a 2-core CPU (oneDNN
        makes kernels per batch size).

        Returns:
            The outputs, as the model returns them (the same object on later calls while
            ``_probed`` holds them).

        Also sets ``input_writes``: whether the forward changed its input in place (then
        every pass gets a copy of its batch, see :meth:`~.passes.PointPasses._pass`).

        Raises:
            RuntimeError: What the forward raised, marked with ``forward_inputs`` (the
                inputs' shape and dtype; see :func:`~.input_dtype.forward_error`).
        """
        if getattr(self, "_probed", None) is not None and self._probed_rows == m:
            return self._probed
        total = 0
        elements: dict[int, int] = {}  # per leaf module (by id): its outputs' elements

        def hook(mod, _i, out):
            nonlocal total
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, Tensor):
                    total += t.numel() * t.element_size()
                    elements[id(mod)] = elements.get(id(mod), 0) + t.numel()

        leaves = [mod for mod in self.module.modules() if not list(mod.children())]
        handles = [mod.register_forward_hook(hook) for mod in leaves]
        # The probe runs on a copy of the first samples (a few KB): a forward that changes
        # its input in place (x.mul_(2), x[:, 0] = 0) is found here before it has touched
        # the data, which on a CPU are the user's own tensor. Given the data, it changed
        # the user's tensor and every pass saw the input as the passes before had left it:
        # the loss depended on the order of the points (off by 100 % after two).
        with torch.inference_mode(False):  # a normal tensor: it has a version counter
            x, pristine = self.x[:m].clone(), self.x[:m].clone()
        version = x._version
        try:
            out = self._forward(x)
        except RuntimeError as err:
            # Marked as the forward's own failure on these inputs (see input_dtype.py).
            err.forward_inputs = (tuple(x.shape), x.dtype)
            raise
        finally:
            for h in handles:
                h.remove()
        # The values too: a write through x.data or x.numpy() bumps no version counter
        # (the surface was off by 278 and the user's data changed, with nothing said).
        self.input_writes = x._version != version or not torch.equal(x, pristine)
        self.act_bytes = max(int(total / m), 4 * int(self.x[:1].numel()), 64)
        # Per sample, for the BatchNorm fold's choice (core/fold.py, fold_pays).
        self.out_elements = {k: v // m for k, v in elements.items()}
        self._probed, self._probed_rows = out, m
        return out

    def _forward(self, x: Tensor):
        """The model's outputs on ``x`` at the base point, as the passes compute them.

        Returns:
            The outputs, as the model returns them.
        """
        self._enter()
        try:
            # Under the flags the points are computed with (true fp32 unless "tf32"), not the
            # user's: the linear stem's check compares these outputs with the split model's,
            # run while evaluating; with TF32 (torch's default for cuDNN convolutions) in
            # one and not the other they differ by 1e-3 and the stem was refused.
            with torch.no_grad(), precision_flags(self.precision, self.device), batch_draws(
                    self.device, 0):  # seeded as the passes over the first batch
                return functional_call(self.module, dict(self.base), (x,))
        finally:
            self._exit()

    def _subset_se(self, population: int | None) -> int | None:
        """Set up the per-sample losses of ``loss_se`` (see core/subset_se.py); the population."""
        if population is None or "loss" not in self.metrics:
            return None
        # The user's per-sample loss, or None for the default's (a bound method stored on
        # self would be a reference cycle: see ``loss_fn``).
        self._user_loss_none = (subset_se.unreduced_loss(self.loss_fn) if self._user_loss
                                else None)
        if (self._user_loss and self.task.ignore is not None and self.task.class_weight is None
                and bool(self.task.counted(self.y).all())):
            # No target is ignored: every sample counts the same targets, so a mean over
            # targets is a mean over samples, and a loss reduced within each sample
            # (MultiLabelMarginLoss, a per-sequence loss on (N, T) class indices) gives
            # one value per sample; weighed by its targets, its mean came out T times too
            # small and samples= was refused. (The default loss's batched sums are of
            # targets: it keeps their weights, the same numbers.)
            self.task.per_sample = True
        m = min(self.n, PROBE_SAMPLES)
        out = self._probe(m)
        subset_se.check_unreduced(self.loss_fn, self._loss_none_fn(), out, self.y[:m], self.task,
                               default=not self._user_loss)
        self.metrics = (*self.metrics, "loss_se")
        return int(population)

    def _loss_none_fn(self):
        """The per-sample loss of ``loss_se``.

        Returns:
            The user's unreduced loss (``None`` if it has no such form: check_unreduced
            refuses it), or the default's.
        """
        return self._user_loss_none if self._user_loss else self._default_loss_none

    def _default_loss_none(self, out, y: Tensor) -> Tensor:
        return F.cross_entropy(to_float32(find_logits(out, self.output_fn)), y,
                               reduction="none")

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
        if self.population:  # sum a^2, sum ab, sum b^2 of loss_se (core/subset_se.py)
            cols.extend(subset_se.se_sums(self._loss_none_fn()(out, y), y, self.task).unbind())
        return torch.stack(cols)

    def _batched_stats(self, out: Tensor, y: Tensor, start: int) -> Tensor:
        """:meth:`_stats` of K points at once for the default loss (``out`` is (K, B, ...)).

        ``y`` is ``self.y[start:start + B]``: the checks of those targets are made once.

        Returns:
            The float64 ``(K, S)`` sums of loss and hits (and ``loss_se``'s sums), as
            :meth:`_stats` gives them for one point.
        """
        k = out.shape[0]
        # A bf16/fp16 model's logits in float32: per-sample losses and their sum in half
        # precision were 0.3 % off for 2000 samples (tests/test_review5.py::test_r1).
        out = to_float32(out)
        fast = None
        if out.dim() == 3 and y.dim() == 1 and out.is_floating_point() and not (
                y.is_floating_point() or y.dtype == torch.bool):
            ignore = self.task.ignore if self.task.ignore is not None else IGNORE_INDEX
            key = (start, y.shape[0], out.shape[-1])
            if key not in self._target_checks:
                self._target_checks[key] = target_checks(y, out.shape[-1], ignore)
            fast = batched_cross_entropy(out, y, ignore, self._target_checks[key])
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
        if self.population:  # sum a^2, sum ab, sum b^2 of loss_se (core/subset_se.py)
            se = subset_se.se_sums(per_sample.reshape(k, y.shape[0], -1), y, self.task, lead=1)
            return torch.cat([torch.stack([loss, correct], 1), se], 1)
        return torch.stack([loss, correct], 1)

    def _values(self, sums: Tensor, batch: int) -> Tensor:
        """``(K, S)`` sums over all data -> loss, accuracy and user metrics ``(K, 2 + U)``."""
        _, weight, count = self._denominators(batch)
        cols = [sums[:, 0] / weight, sums[:, 1] / count]
        cols += [sums[:, 2 + 2 * j] / sums[:, 3 + 2 * j] for j in range(len(self.user_metrics))]
        if self.population:
            cols.append(subset_se.ratio_se(sums[:, 0], sums[:, -3], sums[:, -2], weight,
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


def output_versions(out, path: str = "outputs") -> dict[str, tuple[int, int]]:
    """Identity and version counter of every tensor in a model's outputs, by path.

    An in-place operation on a tensor bumps its version counter; replacing a dict entry
    or a field changes the identity found there. Nothing is copied.

    Returns:
        ``{path: (id, version)}`` over tensors in dicts, tuples, lists and dataclasses.

    Example:
        >>> out = {"logits": torch.zeros(2)}
        >>> before = output_versions(out)
        >>> _ = out["logits"].add_(1)
        >>> output_versions(out) == before
        False
    """
    if isinstance(out, Tensor):  # an inference tensor (inference_mode forward): no counter,
        return {path: (id(out), -1 if out.is_inference() else out._version)}  # no writes
    if isinstance(out, Mapping):
        items = [(f"{path}[{k!r}]", v) for k, v in out.items()]
    elif isinstance(out, (tuple, list)):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(out)]
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        items = [(f"{path}.{f.name}", getattr(out, f.name)) for f in dataclasses.fields(out)]
    else:
        return {}
    return {k: v for p, item in items for k, v in output_versions(item, p).items()}


def check_untouched(out, before: dict[str, tuple[int, int]], who: str) -> None:
    """Refuse a loss or metric that changed the model's outputs (see :func:`output_versions`).

    The engine passes each point's outputs to the loss, then to accuracy, the metrics and
    the per-sample losses of ``loss_se``, and its set-up checks call the loss several times
    on one output: an in-place change would reach all of these.

    Raises:
        ValueError: If a tensor of ``out`` was changed in place, replaced or removed since
            ``before``.
    """
    after = output_versions(out)
    # Entries added (a loss caching a value in the dict) change nothing the engine reads.
    changed = [p for p in before if before[p] != after.get(p)]
    if changed:
        raise ValueError(
            f"{who} changed the model's outputs ({sorted(changed)[0]} was modified in place "
            "or replaced); the engine passes the same outputs on to accuracy, the other "
            "metrics and the set-up checks, which would see the changed values. Leave them "
            "as they are and compute out of place into a new variable, e.g. "
            "logits = out + prior, not out += prior (or clone the outputs first)."
        )
