"""Choosing how the engine evaluates points: candidate plans, timing, a per-process cache.

A :class:`Plan` fixes the strategy (one point per pass, or K points per ``torch.vmap``
pass), the samples per pass B, the memory layout and whether the linear stem is used. The
tuner times one pass of each candidate on the real model and data and keeps the fastest;
repeated computations with the same architecture, shapes and options reuse the plan.

The plain point-by-point loop is always a candidate. Any failure of a vmap candidate (not
only known messages: a missing batching rule, an in-place buffer update, ``.item()`` in a
loss) rules vmap out and is recorded in ``Plan.vmap_error``; a failure of the plain loop,
or an exception of the user's own class, is the user's code failing and is raised as it is.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Plan:
    """How points are evaluated: strategy, points per pass K, samples per pass B.

    ``vmap_error`` is empty unless the vmap path failed on this model; it then says how
    (and the plan is a loop).
    """

    strategy: str
    points: int
    batch: int
    layout: str = "contiguous"
    stem: bool = False
    seconds_per_point: float = math.nan
    vmap_error: str = ""

    @property
    def plain(self) -> bool:
        """The plain loop: one point per pass, contiguous inputs, the whole model."""
        return self.strategy == "loop" and self.layout == "contiguous" and not self.stem


def _is_oom(err: BaseException) -> bool:
    msg = str(err).lower()
    return "out of memory" in msg or "can't allocate memory" in msg


_PLANS: dict[tuple, Plan] = {}
_PLANS_MAX = 64


def _remember(key: tuple, plan: Plan) -> None:
    if len(_PLANS) >= _PLANS_MAX:
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[key] = dataclasses.replace(plan)


def shrink_after_oom(plan: Plan, err: BaseException, device: torch.device,
                     fixed_batch: bool = False) -> None:
    """Halve K (then B) of ``plan`` after an out-of-memory ``err``; re-raise anything else.

    Raises:
        MemoryError: If ``fixed_batch`` (B is the BatchNorm batch, ``bn_batch_size``) and
            one point on B samples does not fit.
    """
    if not _is_oom(err) or (plan.points == 1 and plan.batch == 1):
        raise err
    if plan.points == 1 and fixed_batch:
        raise MemoryError(
            f"One forward pass over bn_batch_size={plan.batch} samples runs out of memory; "
            "pass a smaller bn_batch_size (BatchNorm batch statistics need the whole batch in "
            "one pass)."
        ) from err
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if plan.points > 1:
        plan.points //= 2
    else:
        plan.batch = max(1, plan.batch // 2)


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is of the user's own exception class (not Python's or torch's).

    Such an error was raised on purpose by the user's code and reaches the caller even
    when it happens under vmap; any other failure of the vmap path makes the engine
    fall back to the loop, which raises the error again if it is not vmap's.
    """
    module = type(err).__module__
    return module != "builtins" and module.split(".")[0] != "torch"


def _describe_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    first = text.splitlines()[0] if text else type(err).__name__
    return first if len(first) <= 300 else first[:297] + "..."


def _stem_budget(device: torch.device) -> int:
    """Bytes the precomputed first-layer outputs may occupy."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.25)
    return 1 << 30


def _default_budget(device: torch.device) -> int:
    """Bytes of activations one forward pass may use."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.4)
    # On a CPU, working sets that stay near the caches run fastest.
    return 64 * 2**20



class PlanTuner:
    """Plan selection for :class:`~landscape_widget.core.evaluate.Evaluator` (a mixin)."""

    def _batch_for(self, points: int, budget: int | None = None) -> int:
        if self.bn_batch_size is not None:  # passes hold exactly the BatchNorm batches
            return min(self.n, self.bn_batch_size)
        if self.forced_batch:
            return int(self.forced_batch)
        budget = budget or self.budget
        b = int(max(1, min(self.n, budget // max(1, points * self.act_bytes))))
        # Even batches: 1024 samples in passes of 512 + 512, not 885 + 139.
        return -(-self.n // -(-self.n // b))

    def _plan_key(self) -> tuple:
        """What the speed of a plan depends on: architecture, shapes, device and options.

        Repeated computations with the same key reuse the plan, so they are bit-identical
        (plans differ in float rounding at the 1e-7 level) and skip the timing.
        """
        return (
            repr(self.module),
            tuple((k, tuple(v.shape), v.dtype) for k, v in self.base.items()),
            tuple(self.x.shape), self.x.dtype, tuple(self.y.shape), str(self.device),
            self.bn, self.bn_batch_size, self.metrics,
            getattr(self.loss_fn, "__qualname__", repr(self.loss_fn)),
            self._batched_ce, self.strategy, self._stem_choice, tuple(self.keys), len(self.dirs),
            self.budget, self.forced_batch, self.expected_points < 64,
        )

    # --- tuning --------------------------------------------------------------------------
    def _candidate_plans(self) -> list[Plan]:
        """Candidate plans: loops first, then vmaps of growing K.

        Loops vary the layout, the batch size and the stem; jobs of few points get fewer
        candidates.
        """
        layouts = ["contiguous"]
        if self.x.dim() == 4 and torch.is_floating_point(self.x):
            layouts.append("channels_last")
        stems = [False, True] if self.stem is not None else [False]
        if self.stem is not None and self._stem_choice is True and self._prepare_stem():
            stems = [True]
        small = self.expected_points < 64
        # On a CPU, activations that stay in cache can be several times faster than one
        # pass over all data: try working sets of 1/16, 1/4 and 1 x the budget.
        budgets = [self.budget]
        if self.device.type == "cpu" and not small:
            budgets = [self.budget // 16, self.budget // 4, self.budget]
        plans: list[Plan] = []
        if self.strategy in ("auto", "loop"):
            for layout in layouts:
                for stem in stems:
                    sizes = {self._batch_for(1, b) for b in budgets}
                    if not small and self.bn_batch_size is None:
                        sizes.add(self.n)
                    plans += [Plan("loop", 1, b, layout, stem) for b in sorted(sizes)]
        if self.strategy in ("auto", "vmap"):
            for stem in stems:
                for k in (4, 16, 64, 256):
                    if k > max(4, self.expected_points):
                        break  # a 3x3 grid is not worth timing passes of 256 points
                    b = self._batch_for(k)
                    if b >= min(self.n, 8) or k == 4 or self.strategy == "vmap":
                        plans.append(Plan("vmap", k, b, "contiguous", stem))
        return plans

    def _time_pass(self, plan: Plan, c: Tensor) -> float:
        """Seconds per point of ``plan``, from one timed pass on its first batch of samples.

        Out of memory halves K (then B) and tries again, as :meth:`_run` does.
        """
        while True:
            try:
                return self._time_pass_once(plan, c)
            except (RuntimeError, MemoryError) as err:
                shrink_after_oom(plan, err, self.device, self.bn_batch_size is not None)

    def _time_pass_once(self, plan: Plan, c: Tensor) -> float:
        with torch.no_grad():
            if plan.strategy == "vmap":
                coef = c[:1].expand(plan.points, -1)
                params = self._stacked(coef)
            else:
                coef = c[0]
                params = self._point(coef, plan.layout)
            stop = min(plan.batch, self.n)
            best = math.inf
            for _ in range(2):  # the first pass warms up allocators and kernels
                t0 = time.perf_counter()
                self._pass(plan, params, coef, 0, stop)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                best = min(best, time.perf_counter() - t0)
        return best * (self.n / stop) / plan.points

    def _tune(self, c: Tensor) -> Plan:
        """Time one pass of every candidate plan (results discarded) and keep the fastest."""
        errors: list[BaseException] = []
        vmap_errors: list[str] = []
        slower: set[tuple] = set()  # (layout, stem) families where a larger K stopped paying
        last: dict[tuple, float] = {}
        for plan in self._candidate_plans():
            family = (plan.strategy, plan.layout, plan.stem)
            if family in slower or (plan.stem and not self._prepare_stem()):
                continue
            loops = [p for p in self._results if p.strategy == "loop"]
            if plan.strategy == "vmap" and self.stem is not None and self._stem_terms and loops:
                # Try vmap only with the stem setting that won point by point.
                if plan.stem != min(loops, key=lambda p: p.seconds_per_point).stem:
                    continue
            try:
                plan.seconds_per_point = self._time_pass(plan, c)
                self._results.append(plan)
            except Exception as err:
                # The plain loop runs the user's code as written: its errors are the user's.
                # Any other failure (vmap without a batching rule, an in-place buffer
                # update under vmap, a stem or layout the model rejects) rules that
                # family out.
                if (plan.plain or is_user_error(err)) and not _is_oom(err):
                    raise
                why = _describe_error(err)
                self.rejected.append(
                    f"{plan.strategy} K={plan.points} B={plan.batch} {plan.layout}"
                    f"{' stem' if plan.stem else ''}: {why}")
                if plan.strategy == "vmap" and not _is_oom(err):
                    vmap_errors.append(why)
                errors.append(err)
                slower.add(family)
                continue
            if plan.strategy == "vmap":
                # A wider pass that gains under 10 % will not pay for the next, wider trial.
                if plan.seconds_per_point > 0.9 * last.get(family, math.inf):
                    slower.add(family)
                last[family] = plan.seconds_per_point
        if vmap_errors and not any(p.strategy == "loop" for p in self._results):
            # strategy="vmap" asked for vmap alone: the plain loop is always possible.
            return self._fall_back(vmap_errors[0], c)
        if not self._results:
            raise errors[0]
        best = dataclasses.replace(min(self._results, key=lambda p: p.seconds_per_point))
        best.vmap_error = vmap_errors[0] if vmap_errors else ""
        return best

    def _fall_back(self, err: BaseException | str, c: Tensor | None = None) -> Plan:
        """Switch to the plain loop after the vmap path failed with ``err``.

        Recorded in the plan (``vmap_error``) and in ``rejected``; a warning when the user
        asked for ``strategy="vmap"``. Returns the new plan (also ``self.plan``).
        """
        why = err if isinstance(err, str) else _describe_error(err)
        if not isinstance(err, str):
            self.rejected.append(f"vmap K={self.plan.points if self.plan else '?'}: {why}")
        plan = Plan("loop", 1, self._batch_for(1), vmap_error=why)
        if c is not None and c.shape[0]:
            plan.seconds_per_point = self._time_pass(plan, c)
            self._results.append(plan)
        if self.strategy == "vmap":
            warnings.warn(
                f"strategy='vmap' is not possible for this model ({why}); the points are "
                "evaluated one at a time instead (spec['plan']['vmap_error'] records why).",
                RuntimeWarning, stacklevel=4,
            )
        self.plan = plan
        _remember(self._plan_key(), plan)
        return plan

    def next_chunk(self) -> int:
        """Points per call that keep the engine efficient."""
        return self.plan.points if self.plan is not None else 16

