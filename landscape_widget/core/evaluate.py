"""The evaluation engine: loss and metrics at many points ``theta + sum_k c_k d_k``.

Every surface, curve and later feature evaluates parameter points through
:class:`Evaluator`. The user's module is never written to: points are evaluated with
``torch.func.functional_call`` on a structural copy of the module that shares its
tensors (see :func:`~landscape_widget.core.params.evaluation_copy`).

Two strategies, chosen by timing real grid points on the first call:

- ``"vmap"``: K points per forward pass, ``torch.vmap`` over stacked parameter sets, the
  data in batches of B samples so that K x B x (activations per sample) fits a memory budget.
- ``"loop"``: one point at a time over the whole data set in large batches.

Small, overhead-bound models gain a lot from vmap; convolutional ones are bound by
activation memory traffic and can be faster point by point. Measuring beats guessing.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .data import as_tensors
from .params import (
    Params,
    buffers_of,
    check_direction,
    evaluation_copy,
    model_device,
    parameters_of,
)

METRICS = ("loss", "accuracy")
BN_MODES = ("eval", "batch")
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Plan:
    """How points are evaluated: strategy, points per pass K, samples per pass B."""

    strategy: str
    points: int
    batch: int
    seconds_per_point: float = math.nan


def _is_oom(err: BaseException) -> bool:
    msg = str(err).lower()
    return "out of memory" in msg or "can't allocate memory" in msg


def _default_budget(device: torch.device) -> int:
    """Bytes of activations one forward pass may use."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.4)
    # On a CPU, working sets that stay near the caches run fastest.
    return 64 * 2**20


class Evaluator:
    """Evaluate loss and metrics of ``model`` at points of a low-dimensional subspace.

    Args:
        model: The model; never modified (parameters, buffers and flags stay bit-identical).
        data: ``(inputs, targets)`` tensors, a ``Dataset`` or a ``DataLoader``; moved to the
            device once.
        directions: The subspace: a sequence of direction dicts (see
            :func:`~landscape_widget.random_direction`).
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss of a batch; the default
            is cross-entropy. The reported loss is the exact per-sample mean over all data.
        metrics: Any of ``"loss"``, ``"accuracy"`` (argmax match, in [0, 1]).
        bn: ``"eval"`` uses BatchNorm running statistics; ``"batch"`` uses the statistics of
            each evaluation batch and leaves running statistics untouched. Dropout is off.
        device: Where to compute; defaults to the model's device. The model must already
            live there (it is not moved, since moving it would modify it).
        strategy: ``"auto"`` (time both), ``"vmap"`` or ``"loop"``.
        memory_budget: Bytes of activations per forward pass (default: 64 MiB on CPU, 40 %
            of free memory on CUDA).
        batch_size: Force the number of samples per forward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        data,
        directions: Sequence[Params],
        *,
        loss_fn: LossFn | None = None,
        metrics: Sequence[str] = METRICS,
        bn: str = "eval",
        device: str | torch.device | None = None,
        strategy: str = "auto",
        memory_budget: int | None = None,
        batch_size: int | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if bn not in BN_MODES:
            raise ValueError(f"bn={bn!r} is not supported; choose 'eval' or 'batch'.")
        if isinstance(metrics, str):
            metrics = (metrics,)
        metrics = tuple(metrics)
        bad = [m for m in metrics if m not in METRICS]
        if bad or not metrics:
            raise ValueError(f"metrics={metrics!r}: choose a non-empty subset of {list(METRICS)}.")
        if strategy not in ("auto", "vmap", "loop"):
            raise ValueError("strategy must be 'auto', 'vmap' or 'loop'.")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(outputs, targets).")

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
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else F.cross_entropy
        self.bn = bn

        self.module = self._prepare_module(model, bn)
        base = parameters_of(model)
        base.update(buffers_of(model))
        self.base: Params = {k: v.to(self.device) for k, v in base.items()}
        self.dtype = next(iter(parameters_of(model).values())).dtype

        for i, d in enumerate(directions):
            check_direction(model, d, name=f"directions[{i}]")
        # Keys along which every direction is zero (biases under "biasbn") stay unbatched.
        keys = [k for k in base if any(k in d and bool(d[k].any()) for d in directions)]
        self.keys = keys
        self.dirs = [
            {k: (d[k] if k in d else torch.zeros_like(base[k])).to(self.device, base[k].dtype) for k in keys}
            for d in directions
        ]

        x, y = as_tensors(data)
        if torch.is_floating_point(x) and self.dtype.is_floating_point:
            x = x.to(self.dtype)
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.n = int(self.x.shape[0])
        self.budget = memory_budget or _default_budget(self.device)
        self.forced_batch = batch_size
        self.act_bytes = self._activation_bytes()
        self._check_outputs()
        self.strategy = strategy
        self.plan: Plan | None = None
        self._trials: list[Plan] = []
        self._results: list[Plan] = []
        self.points_evaluated = 0
        self.nonfinite_points = 0

    # --- setup -------------------------------------------------------------------------
    @staticmethod
    def _set_flags(module: nn.Module, bn: str) -> None:
        """Eval mode everywhere; with ``bn="batch"`` BatchNorm uses batch statistics."""
        module.eval()
        if bn == "batch":
            for m in module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
                    # Without tracking, F.batch_norm gets no running buffers: batch statistics
                    # and no in-place update (which vmap could not batch anyway).
                    m.track_running_stats = False

    def _prepare_module(self, model: nn.Module, bn: str) -> nn.Module:
        module = evaluation_copy(model)
        self._shared = module is model
        if not self._shared:
            self._set_flags(module, bn)
        return module

    def _enter(self) -> None:
        # Only when the module could not be copied: switch the user's flags for the call
        # and put them back in _exit, always (a finally block calls it).
        if self._shared:
            self._saved = [
                (m, m.training, getattr(m, "track_running_stats", None))
                for m in self.module.modules()
            ]
            self._set_flags(self.module, self.bn)

    def _exit(self) -> None:
        if self._shared:
            for m, training, trs in self._saved:
                m.training = training
                if trs is not None:
                    m.track_running_stats = trs

    def _activation_bytes(self) -> int:
        """Approximate bytes of activations per sample, from one forward pass of 2 samples."""
        total = 0

        def hook(_m, _i, out):
            nonlocal total
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, Tensor):
                    total += t.numel() * t.element_size()

        leaves = [m for m in self.module.modules() if not list(m.children())]
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            self._enter()
            with torch.no_grad():
                functional_call(self.module, self.base, (self.x[:2],))
        finally:
            self._exit()
            for h in handles:
                h.remove()
        per_sample = total / min(2, self.n)
        return max(int(per_sample), 4 * int(self.x[:1].numel()), 64)

    def _check_outputs(self) -> None:
        self._enter()
        try:
            with torch.no_grad():
                out = functional_call(self.module, self.base, (self.x[:2],))
                if not isinstance(out, Tensor):
                    raise TypeError(
                        f"The model returned {type(out).__name__}; landscape_widget needs a model "
                        "whose forward returns one Tensor of outputs (wrap it to select it)."
                    )
                loss = self.loss_fn(out, self.y[:2])
        finally:
            self._exit()
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError(
                "loss_fn must return a scalar tensor (the mean loss of the batch); got "
                f"{getattr(loss, 'shape', type(loss).__name__)}. Use reduction='mean'."
            )
        if "accuracy" in self.metrics:
            y = self.y
            if not (
                (y.dim() == 1 and not torch.is_floating_point(y) and out.dim() == 2)
                or (y.shape[1:] == out.shape[1:] and out.dim() >= 2)
            ):
                raise ValueError(
                    f"accuracy needs class-index targets of shape (N,) with outputs (N, C), or "
                    f"targets shaped like the outputs; got targets {tuple(y.shape)} and outputs "
                    f"{tuple(out.shape)}. Pass metrics=('loss',) for other tasks."
                )

    # --- one point, one chunk ------------------------------------------------------------
    def _point_stats(self, params: Params, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        out = functional_call(self.module, params, (x,))
        loss = self.loss_fn(out, y)
        if "accuracy" in self.metrics:
            target = y if y.dim() == out.dim() - 1 else y.argmax(-1)
            correct = (out.argmax(-1) == target).sum()
        else:
            correct = torch.zeros((), device=out.device)
        return loss, correct

    def _stacked(self, coeffs: Tensor) -> Params:
        """Parameters of K points: base + sum_j c[:, j] * d_j, stacked along a new dim 0."""
        params = dict(self.base)
        for k in self.keys:
            base = self.base[k]
            shape = (coeffs.shape[0],) + (1,) * base.dim()
            acc = base.unsqueeze(0).expand((coeffs.shape[0],) + base.shape)
            for j, d in enumerate(self.dirs):
                acc = acc + coeffs[:, j].to(base.dtype).reshape(shape) * d[k].unsqueeze(0)
            params[k] = acc
        return params

    def _run_vmap(self, coeffs: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        k = coeffs.shape[0]
        stacked = self._stacked(coeffs)
        in_dims = ({name: (0 if name in self.keys else None) for name in stacked}, None, None)
        fn = torch.vmap(self._point_stats, in_dims=in_dims, randomness="same")
        loss_sum = torch.zeros(k, dtype=torch.float64, device=self.device)
        correct = torch.zeros(k, dtype=torch.float64, device=self.device)
        for s in range(0, self.n, batch):
            x, y = self.x[s : s + batch], self.y[s : s + batch]
            loss, corr = fn(stacked, x, y)
            loss_sum += loss.double() * x.shape[0]
            correct += corr.double()
        return loss_sum / self.n, correct / self.n

    def _run_loop(self, coeffs: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        losses, accs = [], []
        for c in coeffs:
            params = dict(self.base)
            for k in self.keys:
                acc = self.base[k]
                for j, d in enumerate(self.dirs):
                    acc = acc + c[j].to(acc.dtype) * d[k]
                params[k] = acc
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            correct = torch.zeros((), dtype=torch.float64, device=self.device)
            for s in range(0, self.n, batch):
                x, y = self.x[s : s + batch], self.y[s : s + batch]
                loss, corr = self._point_stats(params, x, y)
                loss_sum += loss.double() * x.shape[0]
                correct += corr.double()
            losses.append(loss_sum / self.n)
            accs.append(correct / self.n)
        return torch.stack(losses), torch.stack(accs)

    def _batch_for(self, points: int) -> int:
        if self.forced_batch:
            return int(self.forced_batch)
        return int(max(1, min(self.n, self.budget // max(1, points * self.act_bytes))))

    def _run(self, plan: Plan, coeffs: Tensor) -> tuple[Tensor, Tensor]:
        """Evaluate with ``plan``, halving K (then B) on out-of-memory."""
        while True:
            try:
                with torch.no_grad():
                    if plan.strategy == "vmap":
                        out = []
                        for s in range(0, coeffs.shape[0], plan.points):
                            out.append(self._run_vmap(coeffs[s : s + plan.points], plan.batch))
                        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
                    return self._run_loop(coeffs, plan.batch)
            except (RuntimeError, MemoryError) as err:
                if not _is_oom(err) or (plan.points == 1 and plan.batch == 1):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if plan.points > 1:
                    plan.points //= 2
                else:
                    plan.batch = max(1, plan.batch // 2)

    # --- tuning --------------------------------------------------------------------------
    def _candidate_plans(self) -> list[Plan]:
        plans = []
        if self.strategy in ("auto", "loop"):
            plans.append(Plan("loop", 1, self._batch_for(1)))
        if self.strategy in ("auto", "vmap"):
            for k in (4, 16, 64, 256):
                plans.append(Plan("vmap", k, self._batch_for(k)))
        return plans

    def _next_need(self) -> int:
        """Points the next tuning step needs (the warm-up point first)."""
        if not self._trials and not self._results:
            return 1
        plan = self._trials[0]
        return plan.points if plan.strategy == "vmap" else 2

    def _best_so_far(self) -> Plan:
        if self._results:
            return min(self._results, key=lambda p: p.seconds_per_point)
        return Plan("loop", 1, self._batch_for(1))

    def _tune_step(self, coeffs: Tensor) -> tuple[int, tuple[Tensor, Tensor]]:
        """Run the next trial plan on exactly ``coeffs``; returns (points used, results)."""
        if not self._trials and not self._results:
            self._trials = self._candidate_plans()
            # Warm-up (first-call allocations) on one real point, not timed.
            first = self._trials[0]
            return 1, self._run(Plan(first.strategy, 1, first.batch), coeffs[:1])
        plan = self._trials.pop(0)
        k = coeffs.shape[0]
        t0 = time.perf_counter()
        try:
            res = self._run(plan, coeffs)
        except Exception:
            if plan.strategy == "vmap" and any(p.strategy == "loop" for p in self._results):
                # Not vmappable (e.g. a loss_fn calling .item()): keep the loop strategy.
                self._trials = [p for p in self._trials if p.strategy != "vmap"]
                return 0, (coeffs.new_zeros(0), coeffs.new_zeros(0))
            raise
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        plan.seconds_per_point = (time.perf_counter() - t0) / k
        self._results.append(plan)
        # Stop growing K once a larger K no longer helps.
        prev = self._results[-2] if len(self._results) >= 2 else None
        if (
            plan.strategy == "vmap"
            and prev is not None
            and prev.strategy == "vmap"
            and plan.seconds_per_point > prev.seconds_per_point
        ):
            self._trials = [p for p in self._trials if p.strategy != "vmap"]
        return k, res

    def next_chunk(self) -> int:
        """Points per call that keep the engine efficient (and tuning moving)."""
        if self.plan is None:
            return max(16, self._next_need())
        return self.plan.points

    # --- public --------------------------------------------------------------------------
    def evaluate(self, coeffs) -> dict[str, np.ndarray]:
        """Loss and metrics at ``theta + sum_j coeffs[:, j] * d_j`` for each row of ``coeffs``.

        Args:
            coeffs: ``(P, len(directions))`` array of coordinates.

        Returns:
            ``{metric: (P,) float64 array}``; non-finite losses are NaN.
        """
        c = torch.as_tensor(np.asarray(coeffs, dtype=np.float64)).reshape(-1, len(self.dirs))
        c = c.to(self.device)
        losses, accs = [], []
        self._enter()
        try:
            pos = 0
            while pos < c.shape[0]:
                rest = c.shape[0] - pos
                if self.plan is None and self._next_need() <= rest:
                    used, (lo, ac) = self._tune_step(c[pos : pos + self._next_need()])
                    if not self._trials and self._results:
                        self.plan = self._best_so_far()
                else:
                    plan = self.plan or self._best_so_far()
                    lo, ac = self._run(plan, c[pos:])
                    used = rest
                losses.append(lo)
                accs.append(ac)
                pos += used
        finally:
            self._exit()
        loss = torch.cat(losses).cpu().numpy() if losses else np.zeros(0)
        acc = torch.cat(accs).cpu().numpy() if accs else np.zeros(0)
        bad = ~np.isfinite(loss)
        if bad.any():
            loss = loss.copy()
            loss[bad] = np.nan
            self.nonfinite_points += int(bad.sum())
        self.points_evaluated += int(c.shape[0])
        out = {}
        if "loss" in self.metrics:
            out["loss"] = loss
        if "accuracy" in self.metrics:
            out["accuracy"] = acc
        return out

    def describe(self) -> dict:
        """The chosen plan and the timings of the trials, for status lines and benchmarks."""
        return {
            "device": str(self.device),
            "plan": None if self.plan is None else vars(self.plan).copy(),
            "trials": [vars(p).copy() for p in self._results],
            "activation_bytes_per_sample": self.act_bytes,
        }


def warn_nonfinite(count: int) -> None:
    """Emit the single warning about non-finite losses of one computation."""
    if count:
        warnings.warn(
            f"{count} grid point(s) gave a non-finite loss; they are kept as NaN in the result "
            "(the model diverges there: shrink the range to look closer).",
            RuntimeWarning,
            stacklevel=3,
        )
