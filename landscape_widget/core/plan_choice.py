"""How the first ``evaluate()`` call chooses a plan, and how every call then uses it.

:class:`PlanChoice` is a mixin of :class:`~landscape_widget.core.evaluate.Evaluator`. The
first call takes the plan cached for this model structure (core/plans.py) or tunes one
(core/tuning.py), then compiles it if asked (core/compiled.py). Rows of a call that the
plan's trials computed already are kept, rows pinned to a losing trial's plan are computed
with that plan (so repeated calls stay bit-identical, core/candidates.py), the rest with the
chosen plan.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .plans import _is_oom, _remember, is_user_error
from .precision import AUTOCAST_DTYPES, precision_note


class PlanChoice:
    """Choosing the plan on the first call and running calls with it (a mixin).

    Uses the evaluator's tuner (``_tune``, ``_plain_plan``, ``_cached_plan``,
    ``_plan_key``), its pinned points (``_pin_trial_points``, ``_pinned_groups``), its
    compile and precision state, and :meth:`~.passes.PointPasses._run`.
    """

    def _choose_plan(self, c: Tensor) -> None:
        """The cached plan for this structure, or tune one (then compile if asked)."""
        key = self._plan_key()
        self.plan = self._cached_plan(key)
        if self.plan is not None and self.plan.stem and not self._prepare_stem():
            self.plan = None
        cached = self.plan is not None
        if self.plan is None:
            if self.expected_points <= 2 and self.strategy != "vmap":
                self.plan = self._plain_plan()  # nothing to amortise
                self.plan.reason = "the plain loop: 2 points or fewer, nothing to tune"
                # Not a search: a later, larger grid of this structure tunes its own plan.
                self.plan.complete, self.plan.tuned_for = False, int(self.expected_points)
            else:
                self.plan = self._tune(c, key)
        if (not cached and self.lanes_choice != "auto" and self.plan.strategy == "loop"
                and not self.plan.compiled):
            # Forced (lanes=2): not timed; the lanes' passes together keep to the budget.
            self.plan.lanes = self.lanes_choice
            self.plan.batch = min(self.plan.batch, self._batch_for(self.lanes_choice))
        tuned = self.plan.label
        self._setup_compile(self.plan, c, key)
        if not cached:  # a cached plan keeps the points its search pinned
            self._pin_trial_points(c, tuned)
        if self.plan.layout != "channels_last" and not any(
                p["layout"] == "channels_last" for p in self.plan.pinned):
            self._cl_terms = None  # a trial's channels-last copies, not needed by the plan
        self.plan.precision, self.plan.precision_note = self.precision, (
            self._precision_fallback
            or precision_note(self.asked_precision, self.device, self.dtype, self.out_dtype))
        _remember(key, self.plan)

    def _evaluate(self, c: Tensor) -> Tensor:
        """Values ``(P, 2 + U)`` of the points ``c``; the plan is chosen on the first call.

        Trials over all data evaluated some rows of the first call already: kept. Rows at
        coordinates pinned to another plan (``plan.pinned``) are computed with that plan.

        Returns:
            The float64 ``(P, 2 + U)`` values (plus ``loss_se`` with a population), one row
            per row of ``c`` in order: rows the plan trial computed are reused, the rest
            are evaluated with the chosen plan. ``(0, width)`` for no points.
        """
        width = 2 + len(self.user_metrics) + bool(self.population)
        if not c.shape[0]:
            return torch.zeros(0, width, dtype=torch.float64)
        if self.plan is None:
            self._trial_values.clear()
            try:
                self._choose_plan(c)
            except Exception as err:
                if self._active not in AUTOCAST_DTYPES or _is_oom(err) or is_user_error(err):
                    raise
                self._precision_failed(err)
                self._trial_values.clear()  # rows of the failed precision's trials
                self._choose_plan(c)
        kept, self._kept = self._kept, {}  # only the first call's rows
        groups = self._pinned_groups(c, kept)
        if not kept and not groups:
            return self._run(self.plan, c)
        out = torch.empty(c.shape[0], width, dtype=torch.float64, device=self.device)
        for i, row in kept.items():
            out[i] = row[0]
        done = set(kept)
        for plan, rows in groups:
            out[rows] = self._run(plan, c[rows])
            done.update(rows)
        rest = [i for i in range(c.shape[0]) if i not in done]
        if rest:
            out[rest] = self._run(self.plan, c[rest])
        return out
