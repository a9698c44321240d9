"""What an :class:`~landscape_widget.core.evaluate.Evaluator` reports of the plan it chose.

A mixin of the Evaluator: :meth:`EvaluatorReport.reported_plan` (a copy of the plan with
the BatchNorms its stem folded counted, as results and executors record it) and
:meth:`EvaluatorReport.describe` (the plan, the trials' timings, what was rejected, for
status lines, result specs and benchmarks). Both return copies: a caller editing them
reaches neither the evaluator's plan nor the plan cache.
"""

from __future__ import annotations

from .plans import Plan, copy_plan


class EvaluatorReport:
    """The evaluator's report of its plan (a mixin of the Evaluator).

    Uses the evaluator's ``plan``, ``stem``, ``device``, ``precision``, ``_results``,
    ``rejected``, ``bn_batch_size``, ``batch_coupling`` and ``act_bytes``.
    """

    def reported_plan(self) -> Plan:
        """A copy of the plan, with the BatchNorms its stem runs folded counted."""
        plan = copy_plan(self.plan)
        plan.folded_batchnorms = self.stem.folded if plan.stem and self.stem else 0
        return plan

    def describe(self) -> dict:
        """The chosen plan and the timings of the trials, for status lines and benchmarks."""
        return {
            "device": str(self.device),
            # Copies: a caller editing the result's spec must not reach the plan (or the cache).
            "plan": None if self.plan is None else dict(
                vars(self.reported_plan()), label=self.plan.label),
            "precision": self.precision,
            "precision_error": None if self.plan is None else self.plan.precision_error,
            "trials": [vars(copy_plan(p)) for p in self._results],
            "rejected": list(self.rejected),
            "bn_batch_size": self.bn_batch_size,
            "batch_coupling": self.batch_coupling,
            "activation_bytes_per_sample": self.act_bytes,
        }
