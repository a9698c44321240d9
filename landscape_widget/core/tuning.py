"""Choosing how the engine evaluates points: the search over candidate plans.

The tuner times one pass of each candidate (:class:`~.plans.Plan`) on the real model and
data and keeps the fastest; repeated computations with the same architecture, shapes and
options reuse the plan (the cache and the budgets are in core/plans.py).

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

import torch
from torch import Tensor

from .candidates import PlanCandidates
from .plans import (
    _SEARCHES,
    FIRST_TRIAL_POINTS,
    STEM_CLOSE,
    TRIAL_PASSES,
    TUNING_FLOOR,
    TUNING_SHARE,
    Plan,
    _describe_error,
    _is_oom,
    _remember,
    _remember_search,
    is_user_error,
    shrink_after_oom,
)


class PlanTuner(PlanCandidates):
    """Plan selection for :class:`~landscape_widget.core.evaluate.Evaluator` (a mixin).

    The plain loop (one point per pass over all data, or the largest batch that fits the
    memory budget) is timed first on two real grid points, whose values are kept whichever
    plan wins (as are those of any trial over all data); the other candidates are timed on
    one batch each, as long as their trials fit :data:`TUNING_SHARE` of the grid's time
    predicted with the fastest plan timed so far.
    """

    def _time_pass(self, plan: Plan, c: Tensor) -> float:
        """Seconds per point of ``plan``, from one timed pass on its first batch of samples.

        Out of memory halves K (then B) and tries again, as :meth:`_run` does.

        Returns:
            The measured seconds per point (``plan`` may have a smaller K or B than given).

        Raises:
            RuntimeError: The error of the pass, re-raised if it is not out of memory (or
                nothing is left to halve).
            MemoryError: If out of memory with the BatchNorm batch fixed and K = 1
                (``shrink_after_oom``), or re-raised as for ``RuntimeError``.
        """
        while True:
            try:
                return self._time_pass_once(plan, c)
            except (RuntimeError, MemoryError) as err:
                shrink_after_oom(plan, err, self.device, self.bn_batch_size is not None,
                                 self.batch_coupling is not None)

    def _time_pass_once(self, plan: Plan, c: Tensor) -> float:
        """Seconds per point of ``plan``: the fastest of its :data:`TRIAL_PASSES` passes.

        A loop over all data in one pass evaluates real points: the two passes take the
        next two rows of ``c`` no trial has computed yet, and their values are kept
        (``self._trial_values``) whichever plan wins: a losing plan's points are pinned to it
        (:meth:`~landscape_widget.core.evaluate.Evaluator._pin_trial_points`).

        Returns:
            Seconds of the faster pass, scaled to all ``n`` samples and divided by the
            points per pass: the predicted cost of one grid point.
        """
        whole = plan.strategy == "loop" and plan.batch >= self.n
        if plan.strategy == "loop" and not whole and self.n <= TRIAL_PASSES * plan.batch:
            return self._time_split_point(plan, c)
        with torch.no_grad():
            stop = min(plan.batch, self.n)
            best = math.inf
            times = []
            rows = {}
            for _ in range(TRIAL_PASSES):
                t0 = time.perf_counter()
                if plan.strategy == "vmap":
                    coef = c[:1].expand(plan.points, -1)
                    self._pass(plan, self._stacked(coef), coef, 0, stop)
                else:
                    row = self._next_trial_row(c) if whole else 0
                    sums = self._pass(plan, self._point(c[row], plan.layout), c[row], 0, stop)
                    if whole:
                        rows[row] = self._values(sums, plan.batch)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                times.append(time.perf_counter() - t0)
                best = min(best, times[-1])
        # What a first pass costs beyond the second (oneDNN primitives for a new shape,
        # allocator growth): every other trial pays it too (see _trial_cost).
        self._warmup = max(getattr(self, "_warmup", 0.0), times[0] - best)
        if whole:
            self._trial_values[plan.label] = rows
        return best * (self.n / stop) / plan.points

    def _next_trial_row(self, c: Tensor) -> int:
        """The next row of ``c`` no trial has computed yet (then any row again)."""
        row = self._trial_row % c.shape[0]
        self._trial_row += 1
        return row

    def _time_split_point(self, plan: Plan, c: Tensor) -> float:
        """Seconds per point of a loop plan whose trial passes cover all data: one real point.

        The passes go over consecutive batches of the next row of ``c`` no trial has
        computed, exactly as the plan computes a point, so its value is kept
        (``_trial_values``) whichever plan wins: a cache-sized trial with batches of half
        the data then costs no point (the Transformer of benchmarks/models.py: 128 of 256).

        Returns:
            The fastest pass's seconds, scaled to all ``n`` samples (its first pass warms
            up, as in :meth:`_time_pass_once`).
        """
        row = self._next_trial_row(c)
        times = []
        with torch.no_grad():
            params = self._point(c[row], plan.layout)
            sums = 0
            for start in range(0, self.n, plan.batch):
                t0 = time.perf_counter()
                sums = sums + self._pass(plan, params, c[row], start, start + plan.batch)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                size = min(plan.batch, self.n - start)
                times.append((time.perf_counter() - t0) * self.n / size)
            self._trial_values[plan.label] = {row: self._values(sums, plan.batch)}
        best = min(times)
        share = min(plan.batch, self.n) / self.n
        self._warmup = max(getattr(self, "_warmup", 0.0), (times[0] - best) * share)
        return best

    def _trial_cost(self, plan: Plan, plain_spp: float, last: dict) -> float:
        """Predicted seconds of timing ``plan``: its trial passes over its first batch.

        A vmap plan is predicted from the narrower K of its family timed before, if any.

        Returns:
            Predicted seconds: the trial passes of ``plan.points`` points on its batch's share
            of the data, plus the warm-up cost measured so far.
        """
        share = min(plan.batch, self.n) / self.n
        family = (plan.strategy, plan.layout, plan.stem)
        # A family never timed may cost more per point than the plain loop (vmap's first
        # pass, small batches' per-pass cost): predicted at twice the plain loop's rate,
        # unless it is a loop over all data (its two points are real and kept).
        whole = plan.strategy == "loop" and plan.batch >= self.n
        spp = last.get(family, plain_spp if whole else 2 * plain_spp)
        return TRIAL_PASSES * spp * share * plan.points + getattr(self, "_warmup", 0.0)

    def _tune(self, c: Tensor, key: tuple) -> Plan:
        """Time the plain loop, then the other candidates as far as the budget allows.

        Keeps the fastest per point. A candidate whose trial would push the tuning time past
        :data:`TUNING_SHARE` of the grid's time predicted with the fastest plan so far is
        skipped (and the plan says so). ``key`` is the plan-cache key (:meth:`_plan_key`),
        under which a search cut short by the grid's size is kept for a larger grid.

        Returns:
            A copy of that plan, with the candidates' timings, the tuning time,
            whether the search was complete and a ``reason`` naming the speed-up over the
            plain loop; or the plain loop of :meth:`_fall_back` if only vmap was asked for
            and every vmap plan failed.

        Raises:
            Exception: An exception of the user's own class (:func:`is_user_error`) raised
                by a trial, as is; or, if no plan at all could be timed, the first error.
        """
        t_start = time.perf_counter()
        self._warmup = 0.0
        self._trial_row = 0
        plain = self._plain_plan()
        predicted = allowance = math.inf
        # A search cut short by a smaller grid of this structure (a 4 x 4 look first) timed
        # some candidates already: their timings are taken, the search goes on from there.
        prior = _SEARCHES.pop(key, {})
        from_prior = 0
        if self.strategy != "vmap":  # strategy="vmap" times vmap plans only
            if plain.label in prior:
                plain.seconds_per_point, from_prior = prior[plain.label], 1
            else:
                plain.seconds_per_point = self._time_pass(plain, c)
            self._results.append(plain)
            predicted = plain.seconds_per_point * self.expected_points
            allowance = max(TUNING_SHARE * predicted, TUNING_FLOOR)
        spent = 0.0
        errors: list[BaseException] = []
        vmap_errors: list[str] = []
        skipped = 0
        # (strategy, layout, stem) families where a larger K or a smaller B stopped paying.
        slower: set[tuple] = set()
        last: dict[tuple, float] = {}  # the latest seconds per point of each family
        gains: dict[tuple, float] = {}  # what the latest step of each family saved (share)
        if plain.seconds_per_point == plain.seconds_per_point:  # timed (not NaN)
            last[(plain.strategy, plain.layout, plain.stem)] = plain.seconds_per_point
        for plan in self._candidate_plans():
            family = (plan.strategy, plan.layout, plan.stem)
            if family in slower:
                continue
            if plan.strategy == "vmap" and self.stem is not None and self._stem_terms:
                # Both stem settings are timed at the narrowest K; wider passes only with the
                # faster of the two. (Point by point the two are within noise on an MLP, and
                # deciding there picked the slower vmap for the benchmark MLP's 41 x 41 grid
                # half the time: 0.36 s instead of 0.19.)
                if self._slower_stem(plan):
                    continue
            if self._results and self.strategy != "vmap":
                # The share is of the grid's time with the fastest plan found so far: once a
                # plan 2x faster than the plain loop is known, half as much search is left.
                fastest = min(p.seconds_per_point for p in self._results)
                predicted = fastest * self.expected_points
                allowance = max(TUNING_SHARE * predicted, TUNING_FLOOR)
            if family in last:
                # The next step of a family (a wider K, a smaller B) is timed only if a gain
                # like its last one (or 40 % for its first step) could beat the fastest plan:
                # the benchmark CNN's channels_last loop at 41 ms/point cannot catch the stem
                # at 19 ms by halving its batch.
                hope = max(gains.get(family, 0.4), 0.1)
                if last[family] * (1 - hope) >= min(p.seconds_per_point for p in self._results):
                    slower.add(family)
                    continue
            known = prior.get(plan.label)
            if known is not None:  # timed for the smaller grid: no trial
                if plan.stem and not self._prepare_stem():
                    continue
                plan.seconds_per_point = known
                self._results.append(plan)
                from_prior += 1
            else:
                cost = self._trial_cost(plan, plain.seconds_per_point, last)
                # Past the allowance, the next step of a family that just gained g (a wider K, a
                # smaller B) is still timed if it costs under half of what g again would save.
                paying = family in gains and cost <= 0.5 * gains[family] * predicted
                # The likeliest winner (channels_last with the stem for images) is timed on any
                # grid of FIRST_TRIAL_POINTS or more: a loop over all data computes two real
                # points, kept whichever plan wins, so its trial costs only its first pass's
                # warm-up (1.2x on a CPU ResNet-50 at 5 x 5 was out of reach of the 5 %
                # allowance).
                paying = paying or (len(self._results) == 1 and plan.strategy == "loop"
                                    and plan.batch >= self.n
                                    and self.expected_points >= FIRST_TRIAL_POINTS)
                if self._results and spent + cost > allowance and not paying:
                    skipped += 1
                    # Its next plans (smaller B, larger K) are not timed either: they only make
                    # sense after this one paid.
                    slower.add(family)
                    continue
                t0 = time.perf_counter()
                try:
                    if plan.stem and not self._prepare_stem():
                        continue
                    plan.seconds_per_point = self._time_pass(plan, c)
                    self._results.append(plan)
                except Exception as err:
                    # Any failure of another plan than the plain loop (vmap without a batching
                    # rule, an in-place buffer update under vmap, a stem or layout the model
                    # rejects) rules that family out; the user's own exceptions are raised.
                    if is_user_error(err) and not _is_oom(err):
                        raise
                    why = _describe_error(err)
                    self.rejected.append(f"{plan.label}: {why}")
                    if plan.strategy == "vmap" and not _is_oom(err):
                        vmap_errors.append(why)
                    errors.append(err)
                    slower.add(family)
                    continue
                finally:
                    spent += time.perf_counter() - t0
            if family in last:
                gains[family] = max(0.0, 1.0 - plan.seconds_per_point / last[family])
            if plan.strategy == "vmap":
                # A wider pass that gains under 10 % will not pay for the next, wider trial.
                if plan.seconds_per_point > 0.9 * last.get(family, math.inf):
                    slower.add(family)
                last[family] = plan.seconds_per_point
            else:
                # Smaller batches of a layout come after its full-data loop, largest first:
                # one that gains under 3 % over the larger one stops the family (small
                # batches pay a per-pass cost the trial's prediction does not see: a
                # Transformer's batches of 8 took 2.5x longer per point than all 256).
                if plan.seconds_per_point > 0.97 * last.get(family, math.inf):
                    slower.add(family)
                last[family] = min(plan.seconds_per_point, last.get(family, math.inf))
        if self._results and self.strategy != "vmap":
            # The fastest loop, several points at once (core/lanes.py), within the allowance.
            fastest = min(p.seconds_per_point for p in self._results)
            allowance = max(TUNING_SHARE * fastest * self.expected_points, TUNING_FLOOR)
            skipped += self._try_lanes(c, allowance - spent)
        if vmap_errors and not self._results:
            # strategy="vmap" asked for vmap alone: the plain loop is always possible.
            return self._fall_back(vmap_errors[0], c)
        if not self._results:
            raise errors[0]
        # The fastest per point: every real point a trial computed is kept whichever plan
        # wins (the losers' are pinned to their plan, see Evaluator._pin_trial_points).
        best = dataclasses.replace(min(self._results, key=lambda p: p.seconds_per_point))
        best.vmap_error = vmap_errors[0] if vmap_errors else ""
        best.candidates = [{"plan": p.label, "seconds_per_point": p.seconds_per_point}
                           for p in self._results]
        best.tuning_seconds = time.perf_counter() - t_start
        best.tuned_for = int(self.expected_points)
        best.complete = not skipped and not self._size_limited
        if self._size_limited:  # a larger grid goes on from these timings
            _remember_search(key, {p.label: p.seconds_per_point for p in self._results})
        if self.strategy == "vmap":
            best.reason = "strategy='vmap' asked for; the fastest K"
        elif best.label == plain.label:
            best.reason = ("the plain loop (one point per pass over all data"
                           f"{'' if plain.batch >= self.n else f', in batches of {plain.batch}'}"
                           ") was the fastest")
        else:
            best.reason = (f"{plain.seconds_per_point / best.seconds_per_point:.2f}x faster "
                           "than the plain loop (measured)")
        best.reason += (f"; {len(self._results)} plan(s) timed" +
                        (f" ({from_prior} of them for an earlier, smaller grid)"
                         if from_prior else "") +
                        (f", {skipped} skipped to keep tuning under "
                         f"{TUNING_SHARE:.0%} of the predicted {predicted:.3g} s"
                         f" (or {TUNING_FLOOR} s)" if skipped
                         else ""))
        return best

    def _slower_stem(self, plan: Plan) -> bool:
        """Whether ``plan`` (vmap) has the stem setting that is slower so far.

        Both settings are timed at K = 4; if they are within :data:`STEM_CLOSE` of each
        other there, both go on to K = 16; wider passes go on with the setting whose best
        vmap time so far is lower (at K = 4 the two are within noise on the benchmark MLP,
        and deciding there picked the stem-less family in 1 of 12 first calls: 0.19 s for
        its 41 x 41 grid instead of 0.08-0.10).

        Returns:
            True if ``plan`` should be skipped.
        """
        vmaps = [p for p in self._results if p.strategy == "vmap"]
        best = {s: min((p.seconds_per_point for p in vmaps if p.stem == s), default=None)
                for s in (True, False)}
        narrow = {p.stem: p.seconds_per_point for p in vmaps if p.points == 4}
        if None in best.values() or len(narrow) < 2 or plan.points <= 4:
            return False
        if plan.points == 16 and max(narrow.values()) <= STEM_CLOSE * min(narrow.values()):
            return False  # close at K = 4: both settings are timed at K = 16
        return plan.stem != min(best, key=best.get)

    def _fall_back(self, err: BaseException | str, c: Tensor | None = None) -> Plan:
        """Switch to the plain loop after the vmap path failed with ``err``.

        Recorded in the plan (``vmap_error``) and in ``rejected``; a warning when the user
        asked for ``strategy="vmap"``.

        Returns:
            The new plain-loop plan (also set as ``self.plan`` and cached), timed on ``c``
            when rows are given; its ``vmap_error`` says why vmap failed.
        """
        why = err if isinstance(err, str) else _describe_error(err)
        if not isinstance(err, str):
            self.rejected.append(f"vmap K={self.plan.points if self.plan else '?'}: {why}")
        plan = Plan("loop", 1, self._batch_for(1), vmap_error=why, precision=self.precision,
                    reason="the vmap path failed on this model")
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

