"""The evaluation engine: loss and metrics at many points ``theta + sum_k c_k d_k``.

Every surface, curve and later feature evaluates parameter points through
:class:`Evaluator`. The user's module is never written to: points are evaluated with
``torch.func.functional_call`` on a private copy of the module (its own tensors, attributes,
hooks and flags; see :func:`~landscape_widget.core.params.evaluation_copy`), and buffers a
``forward`` changes in place are put back after every pass, so every point starts from the
user's state.

Two strategies, chosen by timing real grid points on the first call:

- ``"vmap"``: K points per forward pass, ``torch.vmap`` over stacked parameter sets, the
  data in batches of B samples so that K x B x (activations per sample) fits a memory budget.
- ``"loop"``: one point at a time over the whole data set in large batches.

Any failure of the vmap path (an operation without a batching rule such as ``aten::lstm``,
an in-place update of a buffer, a data-dependent branch) falls back to the loop, and the
plan records why (``plan.vmap_error``).

Small, overhead-bound models gain a lot from vmap; convolutional ones are bound by
activation memory traffic and can be faster point by point. Measuring beats guessing.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .batch_stats import PROBE_KEEP_BYTES, PROBE_SAMPLES, LossStats
from .compiled import CompiledForward, check_compile
from .coupling import BatchCoupling
from .data import as_tensors, check_finite
from .directions import barycentric_keys
from .evaluator_report import EvaluatorReport
from .heap import hold_heap
from .input_dtype import InputDtype
from .lane_pool import check_lanes
from .metrics import (
    METRICS,
    DefaultMetrics,
    MetricFn,
    split_metrics,
)
from .model_kinds import check_runnable
from .params import (
    Params,
    buffers_of,
    check_direction,
    evaluation_copy,
    model_device,
    parameters_of,
    weights_dtype,
)
from .passes import PointPasses
from .plan_choice import PlanChoice
from .plans import (
    UNKNOWN_POINTS,
    Plan,
    _default_budget,
    _stem_budget,
    check_positive,
)
from .precision import (
    PrecisionCheck,
    check_precision,
    effective_precision,
    precision_flags,
)
from .reuse import model_code_fingerprint
from .state import BufferState, bn_batch_size_for, check_running_stats, set_flags
from .stem import split_stem
from .stem_terms import StemTerms
from .tuning import PlanTuner

BN_MODES = ("eval", "batch")
LossFn = Callable[[Tensor, Tensor], Tensor]


class Evaluator(PointPasses, PlanChoice, InputDtype, LossStats, BatchCoupling, PrecisionCheck,
                PlanTuner, CompiledForward, StemTerms, BufferState, EvaluatorReport):
    """Evaluate loss and metrics of ``model`` at points of a low-dimensional subspace.

    Args:
        model: The model; never modified (parameters, buffers and flags stay bit-identical).
        data: ``(inputs, targets)`` tensors, a ``Dataset`` or a ``DataLoader``; moved to the
            device once.
        directions: The subspace: a sequence of direction dicts (see
            :func:`~landscape_widget.random_direction`).
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss of a batch; the default
            is cross-entropy on the logits. ``outputs`` are what the model returns, as they
            are (a Tensor, a tuple, a dict such as HuggingFace's ``{"logits": ...}``). The
            reported loss is the mean over all counted targets of all data: batches are
            weighted by their number of targets not equal to ``ignore_index`` (-100, or the
            loss module's own) and by the loss's class ``weight`` if it has one. A loss that
            sums over the batch, or otherwise is no such mean, is refused (checked on the
            first samples), since its value would depend on the engine's batch size.
        metrics: Names from ``"loss"``, ``"accuracy"``, or a mapping ``{name: fn}`` with
            ``None`` for those built-ins and ``fn(outputs, targets)`` for your own metrics,
            returning per-sample values ``(B,)`` (reported: their mean over all samples) or a
            pair ``(total, count)`` of scalars (reported: sum of totals / sum of counts over
            all data, e.g. correct tokens / counted tokens). Accuracy is the argmax match
            for class-index targets with at least 2 classes (targets equal to
            ``ignore_index`` not counted) or one-hot / probability targets, and per-label
            accuracy for 0/1 multi-label targets with a BCE loss; for other tasks it is
            refused with the reason. The default asks for the loss and accuracy where it
            means something (``dropped`` records why it was left out).
        output_fn: ``output_fn(outputs)`` returning the logits, for accuracy and the default
            loss, when the model returns neither a Tensor, nor a dict with ``"logits"``,
            nor an object with ``.logits`` (e.g. ``lambda out: out[0]`` for a tuple).
        bn: ``"eval"`` uses BatchNorm running statistics; ``"batch"`` uses the statistics of
            consecutive batches of ``bn_batch_size`` samples (in data order) and leaves
            running statistics untouched. Dropout is off.
        bn_batch_size: Samples per BatchNorm batch with ``bn="batch"`` (default
            :data:`~landscape_widget.core.state.BN_BATCH_SIZE`; see
            :func:`~landscape_widget.core.state.bn_batch_size_for`). The engine's passes then
            hold exactly these batches, so the values do not depend on its plan.
        device: Where to compute; defaults to the model's device. The model must already
            live there (it is not moved, since moving it would modify it).
        strategy: ``"auto"`` (time both), ``"vmap"`` or ``"loop"``.
        memory_budget: Bytes of activations per forward pass (default: 25 % of the available
            RAM on CPU, 40 % of free memory on CUDA; activations per sample are measured on
            the model). The plain loop takes the largest batch within it (all data if it
            fits); on a CPU the tuner also tries cache-sized batches.
        batch_size: Force the number of samples per forward pass (not with ``bn="batch"``,
            where ``bn_batch_size`` decides).
        stem: The linear-stem shortcut: the first layer's output is linear in its weights,
            so it is computed once per direction for all data (core/stem.py). ``"auto"``
            lets the timing decide, ``True`` uses it whenever the model allows, ``False``
            never.
        stem_budget: Bytes the precomputed first-layer outputs may take (default 1 GiB on
            CPU, 25 % of free memory on CUDA).
        barycentric: ``directions`` are ``m + 1`` points (full parameter dicts, e.g. trained
            models' weights) instead of offsets, and a point with coordinates ``c`` (``m`` of
            them) is ``sum_j c_j p_j + (1 - sum_j c_j) p_m``. The model only supplies the
            architecture (and entries no point gives). Written as a weighted sum from zero
            rather than as ``p_m + sum_j c_j (p_j - p_m)`` so that each vertex is its point
            bit for bit (``1 * p + 0 * q = p`` exactly; ``p_m + (p_j - p_m)`` is not).
        population: ``data`` is a random subset of a data set of this many samples
            (``samples=`` of :func:`~landscape_widget.compute_surface`): the evaluator also
            reports ``"loss_se"``, the standard error of each point's mean loss (defined in
            ``core/subset_se.py``), from per-sample losses (``reduction='none'``).
        precision: ``"fp32"`` (true float32, the default: TF32 is switched off while
            computing), ``"tf32"``, ``"bf16"`` or ``"fp16"`` (CUDA only); see
            core/precision.py. Losses and accuracies are summed in float64 whatever the
            precision; below fp32, the largest |loss - fp32 loss| over the first
            :data:`~landscape_widget.core.precision.ERROR_POINTS` points evaluated (and
            points whose loss is not finite at that precision: inf if finite in fp32) is
            measured (``describe()["plan"]["precision_error"]``).
        compile: ``True``, ``False`` or ``"auto"`` (default): evaluate through
            ``torch.compile`` with the weights as inputs (see core/compiled.py); ``"auto"``
            compiles only on CUDA, large grids whose predicted time dwarfs the compile time.
        lanes: Points computed at once on a CPU, each in its own thread with
            ``torch.get_num_threads() // lanes`` intra-op threads (see core/lanes.py).
            ``"auto"`` (default) times 2, 4, ... lanes against one point at a time on real
            grid points, for models whose forward draws no random numbers; an int forces
            that many for loop plans (1: never).
    """

    # Under the caller's torch.inference_mode() the set-up's tensors would be inference
    # tensors, which the computation cannot update in place or save for backward.
    @torch.inference_mode(False)
    def __init__(
        self,
        model: nn.Module,
        data,
        directions: Sequence[Params],
        *,
        loss_fn: LossFn | None = None,
        metrics: Sequence[str] | dict[str, MetricFn | None] = METRICS,
        output_fn: Callable | None = None,
        bn: str = "eval",
        bn_batch_size: int | None = None,
        device: str | torch.device | None = None,
        strategy: str = "auto",
        memory_budget: int | None = None,
        batch_size: int | None = None,
        stem: bool | str = "auto",
        stem_budget: int | None = None,
        barycentric: bool = False,
        population: int | None = None,
        precision: str = "fp32",
        compile: bool | str = "auto",
        lanes: int | str = "auto",
    ):
        check_runnable(model, hooks=True)  # the set-up probe hooks every layer
        if bn not in BN_MODES:
            raise ValueError(f"bn={bn!r} is not supported; choose 'eval' or 'batch'.")
        check_running_stats(model, bn)  # batch-statistics BN under bn="eval": plan-dependent
        self._default_metrics = isinstance(metrics, DefaultMetrics)
        metrics, self.user_metrics = split_metrics(metrics)
        if output_fn is not None and not callable(output_fn):
            raise TypeError("output_fn must be callable as output_fn(outputs) -> logits.")
        self.output_fn = output_fn
        # Metrics asked for by default but undefined for this task: {name: why}.
        self.dropped: dict[str, str] = {}
        if strategy not in ("auto", "vmap", "loop"):
            raise ValueError("strategy must be 'auto', 'vmap' or 'loop'.")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(outputs, targets).")
        memory_budget = check_positive("memory_budget", memory_budget,
                                       "a share of the free memory")
        batch_size = check_positive("batch_size", batch_size, "the tuner chooses")

        home = model_device(model)
        self.device = torch.device(device) if device is not None else home
        if self.device.type != home.type or (
            self.device.index is not None and home.index is not None and self.device != home
        ):
            raise ValueError(
                f"The model is on {home} but device={self.device} was given; move the model "
                f"first (model.to({str(self.device)!r})) or pass device={str(home)!r}."
            )
        self.metrics = metrics
        # The user's loss only: a bound method of self stored on self would be a reference
        # cycle, keeping the evaluator (its copy of the model, the data on the device) alive
        # after the call until Python's cyclic collector runs (see the ``loss_fn`` property).
        self._loss_given: LossFn | None = loss_fn
        self._user_loss = loss_fn is not None
        # The default loss on plain Tensor outputs is computed for all K points at once,
        # outside vmap (decided in _check_outputs).
        self._batched_ce = False
        self.bn = bn
        self.bn_batch_size = bn_batch_size_for(bn, bn_batch_size)
        if self.bn_batch_size is not None and batch_size is not None:
            raise ValueError(
                "batch_size cannot be forced with bn='batch': the samples per pass are the "
                "BatchNorm batches; pass bn_batch_size= to choose them."
            )

        self.lanes_choice = check_lanes(lanes, self.device)
        # The precision asked for (the plan's note names it); self.precision becomes the
        # one computed once the weights' dtype is known (effective_precision).
        self.asked_precision = self.precision = check_precision(precision, self.device)
        self.compile = check_compile(compile)
        # compile=True compiles a loop plan: the tuner then times loops only.
        self.compile_only_loops = self.compile is True
        self._active = "fp32"  # the precision of the passes running now
        self._precision_fallback = ""  # why precision fell back to fp32 (autocast failed)
        self._trial_values: dict[str, dict[int, Tensor]] = {}
        # Per batch (start, size, classes): target_checks of the default loss, made once.
        self._target_checks: dict[tuple[int, int, int], tuple[bool, bool]] = {}
        self._kept: dict[int, Tensor] = {}  # trial rows of the first evaluate() call
        self._trial_row = 0  # the next grid row a full-data plan trial computes
        self._lane_setup()  # the calling thread's lane state (core/lanes.py)
        self._error_pairs: list[tuple[float, float]] = []  # (loss, fp32 loss) checked
        self._spread_checked = 0  # of the first ERROR_POINTS points (not the non-finite ones)
        self.module = self._prepare_module(model, bn)
        # Part of the plan-cache key: two models of one repr may run other code (a flag,
        # a hook), so one's plan (its vmap_error, lanes dropped) is not the other's. Of
        # the user's model: an attribute hashed by identity is the same object call after call.
        self._model_code = model_code_fingerprint(model)
        # The copy's own tensors: nothing a forward writes to them reaches the user's model.
        base = parameters_of(self.module)
        # The weights' dtype, not the first tensor's (see weights_dtype): inputs are cast to it.
        self.dtype = weights_dtype(base)
        base.update(buffers_of(self.module))
        self.base: Params = {k: v.to(self.device) for k, v in base.items()}
        self.dtype = self.dtype or next(iter(base.values())).dtype
        # spec["precision"] said "tf32" for fp32 computed on a CPU, "bf16" for a float64
        # model's float64 forward: it now says what is computed (reuse= compares it).
        self.precision = effective_precision(self.precision, self.device, self.dtype)

        for i, d in enumerate(directions):
            check_direction(model, d, name=f"directions[{i}]")
        self.barycentric = bool(barycentric)
        if self.barycentric:
            keys = barycentric_keys(self.base, directions)
        else:
            # Keys along which every direction is zero (biases under "biasbn") stay unbatched.
            keys = [k for k in base if any(k in d and bool(d[k].any()) for d in directions)]
        self.keys = keys
        # After barycentric_keys: the zeros it puts in ``base`` are the buffers a pass must
        # find again. Gathered before, they were not put back, so the set-up's probe left
        # a QAT observer's statistics in them and every point of a plane through three
        # models summed them in (its corners were not the models).
        self._state_versions()
        self.dirs = [
            {k: d.get(k, torch.zeros_like(base[k])).to(self.device, base[k].dtype) for k in keys}
            for d in directions
        ]

        x, y = as_tensors(data)
        check_finite(x, y)
        self.y = y.to(self.device)
        self.n = int(x.shape[0])
        self.user_budget = memory_budget
        self.budget = memory_budget or _default_budget(self.device)
        self.forced_batch = batch_size
        self.stem_budget = stem_budget if stem_budget is not None else _stem_budget(self.device)
        self._check_outputs_cast(x)  # sets self.x; also measures act_bytes (see _probe)
        # A forward mixing the samples of a batch (h - h.mean(0)) holds all data per pass
        # (core/coupling.py): the engine's batching would otherwise change its loss.
        self._check_coupling(min(self.n, PROBE_SAMPLES))
        self.population = self._subset_se(population)
        self.strategy = strategy
        self.plan: Plan | None = None
        # Set by a tile runner while a tile computes, once the plan is chosen: passes stop
        # at the next batch (core/passes.py, Cancelled), not after a point over all data.
        self._cancel: threading.Event | None = None
        self._results: list[Plan] = []
        self.rejected: list[str] = []
        self._x_cl: Tensor | None = None
        self._cl_terms: tuple[Params, list[Params]] | None = None
        # The point build's kept row sum ((layout, coefficients), tensors), see _point; and
        # whether one fits the memory (decided at the first row).
        self._row = None  # (a property: the calling lane's, see core/lanes.py)
        self._row_fits: bool | None = None
        self._stem_row_fits: bool | None = None  # the same for the stem's inputs (stem.py)
        # The linear-stem shortcut (see core/stem.py) needs a copy of the module to trace.
        if stem not in ("auto", True, False):
            raise ValueError("stem must be 'auto', True or False.")
        # (Outputs other than one Tensor go without: its safety net compares tensors.)
        # (Nor a forward writing to its input: the stem's first-layer inputs are computed
        # once from the data, the writes would be lost. Nor one mixing the samples of a
        # batch: its head would see the stem's batches, not the passes'.)
        self.stem = (split_stem(self.module, class_major_head=self._batched_ce,
                                fold_pays=self._fold_pays)
                     if stem and self._tensor_out and not self.input_writes
                     and self.batch_coupling is None else None)
        if self.stem is not None:
            # Its graph modules are reference cycles: freed with the evaluator, not whenever
            # Python's cyclic collector runs (see core/fx_trace.py, release).
            weakref.finalize(self, self.stem.release)
        if self.stem is not None and self.stem.constants and (
                buffers_of(self.module).keys() & set(self.keys)):
            # Directions that move a buffer: a value the trace computed from it at theta
            # would stay fixed in the suffix at every point.
            self.stem = None
        self._stem_choice = stem
        self._stem_terms: list | None = None
        self._stem_packs: dict[str, tuple] = {}
        self._stem_buf = None  # the passes' stem inputs (StemTerms; the lane's)
        self.points_evaluated = 0
        # Callers that know how many points are coming (a grid) set this before the first
        # evaluate(); the tuner then skips plans wider than the whole job.
        self.expected_points = UNKNOWN_POINTS
        self.nonfinite_points = 0
        # The set-up's probe outputs are kept for the stem's check only, and only if small (a
        # segmentation net's 8 output maps may take hundreds of MB: the check then runs the
        # model again).
        if self.stem is None or self._probed.numel() * self._probed.element_size() > (
                PROBE_KEEP_BYTES):
            self._probed = None

    # --- setup -------------------------------------------------------------------------
    def _prepare_module(self, model: nn.Module, bn: str) -> nn.Module:
        module = evaluation_copy(model)  # the user's flags are never switched
        set_flags(module, bn)
        return module

    # --- public --------------------------------------------------------------------------
    def evaluate(self, coeffs) -> dict[str, np.ndarray]:
        """Loss and metrics at ``theta + sum_j coeffs[:, j] * d_j`` for each row of ``coeffs``.

        The first call times the candidate plans on one pass each and keeps the fastest;
        the real points its trials computed are kept (see :meth:`_pin_trial_points`).

        Args:
            coeffs: ``(P, len(directions))`` array of coordinates.

        Returns:
            ``{metric: (P,) float64 array}``; non-finite losses are NaN.
        """
        width = len(self.dirs) - self.barycentric
        # A copy: torch takes no numpy view with negative strides (coords[::-1]).
        c = torch.as_tensor(np.array(coeffs, dtype=np.float64)).reshape(-1, width)
        if self.barycentric:
            c = torch.cat([c, 1.0 - c.sum(1, keepdim=True)], 1)
        c = c.to(self.device)
        self._enter()
        try:
            with precision_flags(self.precision, self.device), hold_heap():
                self._active = self.precision
                values = self._evaluate(c)
                if self.precision != "fp32" and c.shape[0]:
                    self._check_precision(c, values)
        finally:
            self._active = "fp32"
            self._exit()
        values = values.cpu().numpy()
        loss = values[:, 0].copy()
        bad = ~np.isfinite(loss)
        if bad.any():
            loss[bad] = np.nan
            self.nonfinite_points += int(bad.sum())
        self.points_evaluated += int(c.shape[0])
        column = {"loss": loss, "accuracy": values[:, 1]}
        column.update({name: values[:, 2 + j] for j, name in enumerate(self.user_metrics)})
        if self.population:
            column["loss_se"] = np.where(bad, np.nan, values[:, -1])
        return {m: column[m] for m in self.metrics}
