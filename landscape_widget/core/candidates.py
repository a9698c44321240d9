"""What the tuner may time: the plan-cache key, the plain loop and the candidate plans.

:class:`PlanCandidates` is a mixin of :class:`~landscape_widget.core.evaluate.Evaluator`
(through :class:`~.tuning.PlanTuner`): the samples per pass a memory budget allows, the key
under which a plan is cached and reused, the candidates in the order the search times
them (core/tuning.py), and what becomes of the real grid points their trials computed.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .plans import _PLANS, CPU_CACHE_BUDGET, PIN_SLOWDOWN, Plan, copy_plan

NO_STEM_SPLIT = (
    "stem=True: this model gets no linear stem and is computed without it. The model "
    "cannot be split at its first layer: torch.fx cannot trace its forward (it reads its "
    "input's shape, or branches on values), the forward is hooked or replaced, its output "
    "is not one tensor, it writes to its input or mixes the samples of a batch, or the "
    "first layer's input or weights are used elsewhere.")
NO_STEM_TERMS = (
    "stem=True: this model is computed without its linear stem: the split model did not "
    "reproduce the model on the first samples, the part before the first layer draws "
    "random numbers, or the stem's precomputed terms would not fit stem_budget.")


class PlanCandidates:
    """Plans to time and the cache key (a mixin; uses the evaluator's state)."""

    _stem_warned = False  # the forced stem's refusal was said (once per evaluator)

    def _batch_for(self, points: int, budget: int | None = None) -> int:
        if self.bn_batch_size is not None:  # passes hold exactly the BatchNorm batches
            return min(self.n, self.bn_batch_size)
        if self.forced_batch:
            return int(self.forced_batch)
        budget = min(budget or self.budget, self.budget)
        b = int(max(1, min(self.n, budget // max(1, points * self.act_bytes))))
        # Even batches: 1024 samples in passes of 512 + 512, not 885 + 139.
        return -(-self.n // -(-self.n // b))

    def _plan_key(self) -> tuple:
        """What the speed of a plan depends on: architecture, shapes, device and options.

        Repeated computations with the same key reuse the plan, so they are bit-identical
        (plans differ in float rounding at the 1e-7 level) and skip the timing. The free
        memory is not part of it (it changes from call to call); a memory_budget given is.

        Returns:
            A hashable tuple of the module's class, repr and code (its classes' methods,
            public attributes and hooks: ``model_code_fingerprint``), parameter names/shapes/dtypes,
            data shapes and dtypes, device (and a CPU's intra-op threads) and every option
            that changes the plans timed; the key of the plan cache.
        """
        return (
            type(self.module), repr(self.module), self._model_code,
            tuple((k, tuple(v.shape), v.dtype) for k, v in self.base.items()),
            tuple(self.x.shape), self.x.dtype, tuple(self.y.shape), str(self.device),
            self.bn, self.bn_batch_size, self.metrics,
            getattr(self.loss_fn, "__qualname__", repr(self.loss_fn)),
            self._batched_ce, self.strategy, self._stem_choice, tuple(self.keys), len(self.dirs),
            self.user_budget, self.forced_batch, self.precision, self.compile, self.lanes_choice,
            # The CPU's intra-op threads decide which plans pay (lanes, core/lanes.py).
            torch.get_num_threads() if self.device.type == "cpu" else None,
        )

    def _cached_plan(self, key: tuple) -> Plan | None:
        """The cached plan for ``key`` if its search suits a grid of this size.

        Returns:
            A copy of the cached plan (``precision_error`` cleared, ``tuning_seconds`` 0,
            reason prefixed ``"reused: "``), or None if there is none or its search was cut
            short for a smaller grid than ``expected_points``.
        """
        plan = _PLANS.get(key)
        if plan is None or not (plan.complete or plan.tuned_for >= self.expected_points):
            return None
        # This call timed nothing: its tuning cost is 0 (the candidates are the earlier search's).
        plan = copy_plan(plan, precision_error=None, tuning_seconds=0.0)
        plan.reason = "reused: " + plan.reason.removeprefix("reused: ")
        return plan

    # --- tuning --------------------------------------------------------------------------
    def _plain_plan(self) -> Plan:
        """One point per pass over all data (or the largest batch that fits).

        With ``stem=True`` (forced) through the stem, where the model allows it.

        Returns:
            A new loop plan with K = 1 and the largest batch the memory budget allows
            (or the BatchNorm / forced batch), through the stem only if it was forced.
        """
        stem = self._stem_choice is True and self.stem is not None and self._prepare_stem()
        if self._stem_choice is True and not stem and not self._stem_warned:
            # Forced, and not possible: said, not silently computed without it.
            self._stem_warned = True
            warnings.warn(NO_STEM_SPLIT if self.stem is None else NO_STEM_TERMS,
                          UserWarning, stacklevel=4)
        return Plan("loop", 1, self._batch_for(1), stem=stem, precision=self.precision)

    def _candidate_plans(self) -> list[Plan]:
        """Candidates after the plain loop, the likeliest winners first.

        Full-batch loops in the other layout and with the stem, then cache-sized batches
        (CPU), then vmaps of growing K.

        Returns:
            New plans to time, in that order, limited by ``strategy`` and the grid size,
            without the plain loop itself; each carries the requested precision.
        """
        layouts = ["contiguous"]
        # A forward that draws random numbers gets them per batch (seeded by its first
        # sample, core/rng.py) and in memory order (randn_like of a channels-last input):
        # another batch size or layout gives every point other noise. Its candidates keep
        # the plain loop's batch and layout, so a point has one value whichever plan (a
        # kept trial's too) computes it; the NHWC trial's points were off by 7 %.
        draws = self._forward_draws()
        if self.x.dim() == 4 and torch.is_floating_point(self.x) and not draws:
            # First: oneDNN's and cuDNN's convolutions, pooling and BatchNorm may be faster on
            # NHWC, and a small grid's budget may allow one trial. (On a 2-core CPU a plain
            # loop over a torchvision ResNet-18 ran 1.6x and ResNet-50 1.2x faster in NHWC
            # with an older torch; with torch 2.14.1 on 2026-12-05, 1.06x and 1.03x.)
            layouts.insert(0, "channels_last")
        stems = [True, False] if self.stem is not None else [False]
        if self.stem is not None and self._stem_choice is True and self._prepare_stem():
            stems = [True]
        full = self._batch_for(1)
        plans: list[Plan] = []
        self._size_limited = False
        if self.strategy in ("auto", "loop"):
            plans += [Plan("loop", 1, full, layout, stem) for layout in layouts for stem in stems]
            if self.device.type == "cpu" and self.bn_batch_size is None and not draws:
                # Largest first: _tune stops a family at the first size that does not pay.
                sizes = sorted({self._batch_for(1, CPU_CACHE_BUDGET // f) for f in (16, 4, 1)},
                               reverse=True)
                plans += [Plan("loop", 1, b, layout, stem) for b in sizes if b < full
                          for layout in layouts for stem in stems]
        if self.strategy in ("auto", "vmap") and not self.compile_only_loops:
            budget = CPU_CACHE_BUDGET if self.device.type == "cpu" else self.budget
            for k in (4, 16, 64, 256):  # both stem settings at each K (see _tune)
                if k > max(4, self.expected_points):
                    # A 3x3 grid is not worth timing passes of 256 points; a cached plan
                    # from this search is not reused for a larger grid (_cached_plan).
                    self._size_limited = True
                    break
                b = self._batch_for(k, budget)
                if draws and b != full:
                    continue
                if b >= min(self.n, 8) or k == 4 or self.strategy == "vmap":
                    plans += [Plan("vmap", k, b, "contiguous", stem) for stem in stems]
        plain = self._plain_plan()
        plans = [p for p in plans if (p.strategy, p.batch, p.layout, p.stem) !=
                 (plain.strategy, plain.batch, plain.layout, plain.stem)]
        for p in plans:
            p.precision = self.precision
        return plans

    # --- the trials' real points ---------------------------------------------------------
    def _pin_trial_points(self, c: Tensor, tuned: str) -> None:
        """Keep every real grid point the trials computed; pin the other plans' to them.

        A trial over all data (or over two batches covering it) computes real points
        (``_trial_values``, rows of ``c``). The winner's are its own; a losing plan's are
        kept too, if it is at most :data:`~.plans.PIN_SLOWDOWN` times slower, and recorded
        in ``plan.pinned`` with that plan, so that later calls compute those coordinates with
        it again (bit-identical repeats). Sets ``_kept`` ({row of ``c``: values}).

        Args:
            c: The coordinates the trials took their rows from.
            tuned: The label of the plan the tuner chose (before compiling it: a compiled
                plan's trial rows were computed uncompiled and are pinned too).
        """
        plans = {p.label: p for p in self._results}
        kept = dict(self._trial_values.get(self.plan.label, {}))
        pinned = []
        for label, rows in sorted(self._trial_values.items(), key=lambda kv: kv[0] != tuned):
            p = plans.get(label)
            if label == self.plan.label or p is None or p.strategy != "loop" or (
                    p.seconds_per_point > PIN_SLOWDOWN * self.plan.seconds_per_point):
                continue
            for row, values in rows.items():
                if row not in kept:  # a row two trials computed keeps the first one's
                    kept[row] = values
                    pinned.append({"coords": c[row].tolist(), "plan": label,
                                   "strategy": p.strategy, "batch": p.batch,
                                   "layout": p.layout, "stem": p.stem, "lanes": p.lanes})
        self._trial_values.clear()
        self._kept = kept
        self.plan.pinned = pinned

    def _pinned_groups(self, c: Tensor, skip) -> list[tuple[Plan, list[int]]]:
        """Rows of ``c`` at coordinates ``plan.pinned`` assigns to another plan.

        Returns:
            ``[(plan, rows)]``, one entry per pinned plan met, rows in ``skip`` left out;
            empty if nothing is pinned. A pinned plan needing the stem when it cannot be
            prepared is left out (its rows go to the chosen plan).
        """
        if not self.plan.pinned:
            return []
        where = {tuple(p["coords"]): p for p in self.plan.pinned}
        groups: dict[str, tuple[Plan, list[int]]] = {}
        for i, coords in enumerate(c.tolist()):
            p = where.get(tuple(coords))
            if p is None or i in skip:
                continue
            if p["plan"] not in groups:
                plan = Plan(p["strategy"], 1, p["batch"], p["layout"], p["stem"],
                            lanes=p.get("lanes", 1), precision=self.plan.precision)
                if plan.stem and not self._prepare_stem():
                    continue
                groups[p["plan"]] = (plan, [])
            groups[p["plan"]][1].append(i)
        return list(groups.values())
