"""The tuner keeps the fastest plan per point, and no real point a trial computed is lost:
a losing trial over all data (the plain loop's two points) keeps its values, pinned to its
plan, which later calls use for those coordinates again (bit-identical repeats), unless
that plan is over PIN_SLOWDOWN times slower per point.

The trials run for real (their values are real points); only the seconds they report are
fixed here, so that the choice does not depend on this machine's load.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import naive_eval
from torch import nn

import landscape_widget as lw
from landscape_widget.core import plans, tuning
from landscape_widget.core.tuning import PlanTuner

PLAIN = "loop B=60"


def _setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(60, 6, generator=gen), torch.randint(0, 3, (60,), generator=gen)
    return net, (x, y), lw.random_directions(net, 2, seed=8)


@pytest.fixture
def fixed_seconds(monkeypatch):
    """Trials report ``table[label]`` seconds per point (5 for plans not in it); the tuning
    allowance is large enough that every candidate is timed, however loaded the machine."""
    table: dict[str, float] = {}
    monkeypatch.setattr(tuning, "TUNING_FLOOR", 1e3)
    real = PlanTuner._time_pass_once

    def timed(self, plan, c):
        real(self, plan, c)  # the real passes: real trial points
        return table.get(plan.label, 5.0)

    monkeypatch.setattr(PlanTuner, "_time_pass_once", timed)
    plans.forget_plans()
    yield table
    plans.forget_plans()


@pytest.mark.parametrize("plain_seconds,pinned", [(1.03, 2), (3.0, 0)])
def test_the_losing_plain_loops_trial_points_are_kept_and_pinned(fixed_seconds,
                                                                  plain_seconds, pinned):
    """vmap is faster per point and wins; the plain loop's two trial points are kept (the
    first call computes them once) and pinned to it, so the repeated call computes those
    two coordinates with the plain loop again and gives the same bits; 3x slower, they are
    not pinned (a repeated call would pay more than the first saved)."""
    net, (x, y), dirs = _setup()
    fixed_seconds.update({PLAIN: plain_seconds, "loop B=60 stem": 5.0, "vmap K=4 B=60": 1.0,
                          "vmap K=4 B=60 stem": 1.0})
    kw = {"directions": dirs, "x": (-1, 1, 7), "y": (-1, 1, 7), "progress": False,
          "evaluator_options": {"memory_budget": 1 << 22}}
    runs = []
    real_run = lw.Evaluator._run

    def recording(self, plan, coeffs):
        runs.append((plan.label, coeffs.shape[0]))
        return real_run(self, plan, coeffs)

    lw.Evaluator._run = recording
    try:
        first = lw.compute_surface(net, (x, y), **kw)
        # The first call computes the grid less the kept trial points, all with vmap.
        assert sum(k for _, k in runs) == 49 - pinned and {lb for lb, _ in runs} == {
            first.spec["plan"]["label"]}
        runs.clear()
        again = lw.compute_surface(net, (x, y), **kw)
    finally:
        lw.Evaluator._run = real_run
    plan = first.spec["plan"]
    assert plan["strategy"] == "vmap" and len(plan["pinned"]) == pinned, plan
    assert all(p["plan"] == PLAIN for p in plan["pinned"])
    grid = {(float(a), float(b)) for b in first.y for a in first.x}
    assert all(tuple(p["coords"]) in grid for p in plan["pinned"])
    assert again.spec["plan"]["reason"].startswith("reused")
    assert sum(k for label, k in runs if label == PLAIN) == pinned
    assert sum(k for _, k in runs) == 49
    np.testing.assert_array_equal(first.loss, again.loss)
    np.testing.assert_array_equal(first.accuracy, again.accuracy)
    want, _ = naive_eval(net, x, y, list(dirs),
                         np.array([(a, b) for b in first.y for a in first.x]))
    np.testing.assert_allclose(first.loss.ravel(), want, rtol=1e-5, atol=0)


def test_a_job_of_unknown_size_takes_the_fastest_plan_per_point(fixed_seconds):
    net, (x, y), dirs = _setup()
    fixed_seconds.update({PLAIN: 1.0, "loop B=60 stem": 1.0, "vmap K=4 B=60": 0.97,
                          "vmap K=4 B=60 stem": 0.97})
    ev = lw.Evaluator(net, (x, y), list(dirs), memory_budget=1 << 22)
    coeffs = torch.linspace(-1, 1, 12).reshape(6, 2)
    got = ev.evaluate(coeffs)["loss"]
    assert ev.plan.strategy == "vmap"
    want, _ = naive_eval(net, x, y, list(dirs), coeffs.numpy())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("no_stem_k4,timed_both_k16", [(0.95, True), (0.7, False)])
def test_stem_settings_close_at_k4_are_both_timed_at_k16(fixed_seconds, no_stem_k4,
                                                         timed_both_k16):
    """At K=4 the two stem settings within STEM_CLOSE of each other (0.95 against 1.0) go
    on to K=16, and the wider passes follow the faster there (the stem); clearly apart
    (0.7), only the faster at K=4 goes on. Deciding at K=4 alone picked the
    stem-less family for the benchmark MLP in 1 of 12 first calls, 2.3x slower."""
    net, data, dirs = _setup()
    fixed_seconds.update({PLAIN: 3.0, "loop B=60 stem": 3.0, "vmap K=4 B=60": no_stem_k4,
                          "vmap K=4 B=60 stem": 1.0, "vmap K=16 B=60": 0.9,
                          "vmap K=16 B=60 stem": 0.5, "vmap K=64 B=60": 0.8,
                          "vmap K=64 B=60 stem": 0.3})
    surf = lw.compute_surface(net, data, directions=dirs, x=(-1, 1, 9), y=(-1, 1, 9),
                              progress=False)
    timed = {c["plan"] for c in surf.spec["plan"]["candidates"]}
    assert ("vmap K=16 B=60 stem" in timed) == timed_both_k16, timed
    # Close: the stem wins at K=16 and goes on to K=64. Apart: the stem-less family goes
    # on alone, and its K=16 (0.9) stops it at K=4 (0.7).
    want = "vmap K=64 B=60 stem" if timed_both_k16 else "vmap K=4 B=60"
    assert surf.spec["plan"]["label"] == want, timed
