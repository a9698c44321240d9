"""Review 8: points in lanes (core/lanes.py) with models and settings test_lanes does not cover.

Each test checks a property against an independent oracle: the float64 per-point loop of
tests/oracle.py, the same evaluator without lanes, or a full snapshot of the user's model
(tests/snapshots.py).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from oracle import naive_eval
from snapshots import assert_same_snapshot, snapshot
from torch import nn

import landscape_widget as lw
from landscape_widget.core import lane_pool as lanes
from landscape_widget.core.evaluate import Evaluator
from landscape_widget.core.rng import batch_draws

LANES = {"lanes": 2, "strategy": "loop"}


def _data(n: int = 24, features: int = 6, classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


def _grid_coords(surf) -> np.ndarray:
    xs, ys = np.meshgrid(surf.x, surf.y)
    return np.stack([xs.ravel(), ys.ravel()], 1)


class HookFeeds(nn.Module):
    """A forward that reads the features a hook stored into a dict its closure holds (the
    usual feature-extraction pattern)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
        self.feats: dict = {}
        feats = self.feats
        self.body.register_forward_hook(lambda m, i, out: feats.__setitem__("h", out))

    def forward(self, x):
        self.body(x)
        return self.head(torch.tanh(self.feats["h"]))


def test_a_hook_closure_feeding_the_forward_is_the_lanes_own():
    # The lanes' module copies kept the evaluator's hook functions, whose closures hold the
    # evaluator's dict: each lane's forward read stale features (loss off by 0.16).
    model, (x, y) = HookFeeds().eval(), _data()
    dirs = lw.random_directions(model, 2, seed=1)
    before = snapshot(model)
    surf = lw.compute_surface(model, (x, y), directions=dirs, x=(-1, 1, 4), y=(-1, 1, 3),
                              progress=False, evaluator_options=LANES)
    assert surf.spec["plan"]["lanes"] == 2, surf.spec["plan"]
    # A fresh model as the oracle's template: a deep copy's hook would fill the original's dict.
    want, _ = naive_eval(model, x, y, list(dirs), _grid_coords(surf), template=HookFeeds())
    np.testing.assert_allclose(surf.loss.ravel(), want, rtol=1e-5)
    assert_same_snapshot(before, snapshot(model))


_FIRE = {"on": False}  # a global: every copy of the model sees it


class InterruptedOnce(nn.Module):
    """Raises KeyboardInterrupt once, in the calling thread, as Ctrl-C arriving in a pass."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        if _FIRE["on"] and threading.current_thread() is threading.main_thread():
            _FIRE["on"] = False
            raise KeyboardInterrupt
        return self.b(torch.tanh(self.a(x)))


def test_ctrl_c_in_a_lane_stops_the_computation():
    # KeyboardInterrupt in lane 0 was taken for a lane failure: lanes dropped, the points
    # computed again one at a time, and the user's Ctrl-C lost.
    model = InterruptedOnce().eval()
    dirs = lw.random_directions(model, 2, seed=1)
    ev = Evaluator(model, _data(), dirs, stem=False, **LANES)
    ev.expected_points = 6
    ev.evaluate(np.zeros((6, 2)))
    assert ev.plan.lanes == 2
    _FIRE["on"] = True
    try:
        with pytest.raises(KeyboardInterrupt):
            ev.evaluate(np.ones((4, 2)))
        assert not _FIRE["on"]  # it was raised once, in a lane
    finally:
        _FIRE["on"] = False


class FixedNoise(nn.Module):
    """Adds the same noise at every call: drawn from a fixed seed inside ``fork_rng``, so
    the global generator is put back (a forward that draws, whose draws leave no trace)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            noise = torch.randn(h.shape)
        return self.b(h + noise)


def test_a_forward_that_draws_and_puts_the_generator_back_runs_no_lanes():
    # Lanes share torch's global generator: two lanes inside fork_rng at once draw from
    # each other's state (a grid was off by 0.27 now and then), and the generator, put back,
    # showed no draw. The lanes must be dropped whatever the timing.
    model = FixedNoise().eval()
    x, y = _data(32)
    dirs = lw.random_directions(model, 2, seed=1)
    ev = Evaluator(model, (x, y), dirs, stem=False, **LANES)
    ev.evaluate(np.zeros((1, 2)))  # the plan's trial computes it
    coords = np.array([[0.5, -0.5]])  # one point in lanes: lane 0 alone, nothing interleaves
    got = ev.evaluate(coords)["loss"]
    assert ev.plan.lanes == 1 and "draws random numbers" in ev.plan.reason, ev.plan.reason
    want, _ = naive_eval(model, x, y, list(dirs), coords)
    np.testing.assert_allclose(got, want, rtol=1e-5)


class _Seeder:
    """Another thread's seeded pass (a widget worker's), inside ``batch_draws`` until told."""

    def __init__(self):
        self.go = threading.Event()
        self.inside = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        self.inside.wait(10)

    def _run(self):
        with batch_draws(torch.device("cpu"), 64):
            self.inside.set()
            # Seeded passes take turns (rng._LOCK): a lane run that starts while this one
            # is inside waits for it, so it ends by itself, before the lane run's forward.
            self.go.wait(0.5)

    def finish(self):
        self.go.set()
        self.thread.join(10)


_SEEDER: list = []  # the pending other thread, finished by the next forward


class LetsOtherThreadFinish(nn.Module):
    """A deterministic MLP; its first forward lets another thread's seeded pass end."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        if _SEEDER:
            _SEEDER.pop().finish()
        return self.b(torch.tanh(self.a(x)))


def test_another_threads_seeded_passes_do_not_drop_lanes():
    # A pass of another thread (the widget's worker, a second surface) puts the generator
    # back to its own saved state in the middle of a lane run: the lanes took it for a draw
    # of their forward and were dropped (14 of 15 surfaces beside a computing thread), with
    # a false reason, for every later call of the model's plan. Now the lane run waits.
    model = LetsOtherThreadFinish().eval()
    x, y = _data(32)
    dirs = lw.random_directions(model, 2, seed=1)
    ev = Evaluator(model, (x, y), dirs, stem=False, **LANES)
    ev.evaluate(np.linspace(-1, 1, 12).reshape(6, 2))  # the plan; a lane run (its probe)
    coords = np.array([[0.5, -0.5], [-0.5, 0.25]])
    _SEEDER.append(_Seeder())
    try:
        got = ev.evaluate(coords)["loss"]
    finally:
        while _SEEDER:
            _SEEDER.pop().finish()
    assert ev.plan.lanes == 2, ev.plan.reason
    want, _ = naive_eval(model, x, y, list(dirs), coords)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_a_lane_pool_grown_by_another_thread_still_takes_the_lanes(monkeypatch):
    # Another thread needing more lane threads (lanes=4 beside lanes=2) replaced the pool
    # and shut the old one down between a caller's lookup of the pool and its submission:
    # "RuntimeError: cannot schedule new futures after shutdown" reached the user.
    grown = []

    class GrownMeanwhile(ThreadPoolExecutor):
        def submit(self, *args, **kwargs):
            if not grown:
                grown.append(threading.Thread(target=lanes._submit,
                                              args=(self._max_workers + 1, int)))
                grown[0].start()
                grown[0].join(0.5)  # the other thread, if it can get the pool now
            return super().submit(*args, **kwargs)

    monkeypatch.setattr(lanes, "ThreadPoolExecutor", GrownMeanwhile)
    monkeypatch.setattr(lanes, "_POOL", None)
    model, (x, y) = HookFeeds().eval(), _data()
    dirs = lw.random_directions(model, 2, seed=1)
    ev = Evaluator(model, (x, y), dirs, **LANES)
    ev.evaluate(np.zeros((1, 2)))
    coords = np.array([[0.5, -0.5], [-0.5, 0.25]])
    got = ev.evaluate(coords)["loss"]
    grown[0].join(10)
    assert ev.plan.lanes == 2, ev.plan.reason
    want, _ = naive_eval(model, x, y, list(dirs), coords, template=HookFeeds())
    np.testing.assert_allclose(got, want, rtol=1e-5)


class KeepsEnergy(nn.Module):
    """Stores a non-leaf tensor as an attribute (its energy, computed with autograd on)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        with torch.enable_grad():
            xi = x.detach().requires_grad_(True)
            self.energy = torch.tanh(self.a(xi)).pow(2).sum()
        return self.b(torch.tanh(self.a(x)))


class RefusesDeepcopy(nn.Module):
    """A class whose ``__deepcopy__`` raises (its parts can be copied one by one)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def __deepcopy__(self, memo):
        raise TypeError("RefusesDeepcopy cannot be deep-copied")

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("model_class", [KeepsEnergy, RefusesDeepcopy])
def test_models_the_evaluator_can_copy_run_in_lanes(model_class):
    # The evaluator's own copy handles non-leaf tensor attributes and classes refusing
    # deepcopy as a whole; the lanes' copies did not, and these models lost their lanes.
    model, (x, y) = model_class().eval(), _data()
    dirs = lw.random_directions(model, 2, seed=1)
    before = snapshot(model)
    surf = lw.compute_surface(model, (x, y), directions=dirs, x=(-1, 1, 4), y=(-1, 1, 3),
                              progress=False, evaluator_options=LANES)
    assert surf.spec["plan"]["lanes"] == 2, surf.spec["plan"]["reason"]
    want, _ = naive_eval(model, x, y, list(dirs), _grid_coords(surf), template=model_class())
    np.testing.assert_allclose(surf.loss.ravel(), want, rtol=1e-5)
    assert_same_snapshot(before, snapshot(model))


def test_evaluate_takes_a_reversed_coordinate_array():
    # lw.Evaluator(...).evaluate(coords[::-1]) raised torch's "At least one stride in the
    # given numpy array is negative" (a view of the user's array, as numpy hands it out).
    model, data = HookFeeds().eval(), _data()
    dirs = lw.random_directions(model, 2, seed=1)
    ev = lw.Evaluator(model, data, dirs)
    coords = np.array([[0.5, -0.5], [-0.5, 0.25], [0.0, 1.0]])
    forward = ev.evaluate(coords)["loss"]
    np.testing.assert_array_equal(ev.evaluate(coords[::-1])["loss"], forward[::-1])


class _Refusal(Exception):
    """The user's own exception class."""


_LANE_CALLS = {"refuse": False, "others": 0, "refused": threading.Event()}


class RefusesInTheCallingThread(nn.Module):
    """Raises the user's exception in lane 0 (the calling thread); counts the other lane's
    forwards, the first of which waits for the refusal."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        if threading.current_thread() is threading.main_thread():
            if _LANE_CALLS["refuse"]:
                _LANE_CALLS["refused"].set()
                raise _Refusal("refused")
        else:
            _LANE_CALLS["others"] += 1
            _LANE_CALLS["refused"].wait(10)
        return self.b(torch.tanh(self.a(x)))


def test_an_error_in_one_lane_stops_the_others():
    # The user's error (or Ctrl-C) in lane 0 reached the caller only once every other lane
    # had computed its whole block of points: 20 more points here.
    model = RefusesInTheCallingThread().eval()
    dirs = lw.random_directions(model, 2, seed=1)
    ev = Evaluator(model, _data(), dirs, stem=False, **LANES)
    # The plan, and a first lane run: its probe for draws (a forward in the calling thread)
    # is done before the refusal is armed.
    ev.evaluate(np.linspace(-1, 1, 12).reshape(6, 2))
    _LANE_CALLS.update(refuse=True, others=0)
    try:
        with pytest.raises(_Refusal):
            ev.evaluate(np.linspace(-1, 1, 80).reshape(40, 2))  # 20 points per lane
        assert _LANE_CALLS["others"] <= 3, _LANE_CALLS["others"]  # one pass per point
    finally:
        _LANE_CALLS["refuse"] = False
        _LANE_CALLS["refused"].set()


class Attention(nn.Module):
    """Self-attention through ``F.scaled_dot_product_attention`` (no dropout), whose CPU
    kernel carries torch's "may draw" tag for its dropout_p argument."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.head = nn.Linear(3, 24), nn.Linear(8, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 4).unbind(2)
        h = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                       v.transpose(1, 2))
        return self.head(h.transpose(1, 2).reshape(x.shape[0], x.shape[1], 8).mean(1))


def test_attention_without_dropout_keeps_its_lanes():
    # The random-op spy took the attention kernel (tagged: it could draw for dropout_p > 0)
    # for a draw, and every model using scaled_dot_product_attention lost its lanes.
    model = Attention().eval()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(24, 5, 3, generator=g), torch.randint(0, 3, (24,), generator=g)
    dirs = lw.random_directions(model, 2, seed=1)
    surf = lw.compute_surface(model, (x, y), directions=dirs, x=(-1, 1, 4), y=(-1, 1, 3),
                              progress=False, evaluator_options=LANES)
    assert surf.spec["plan"]["lanes"] == 2, surf.spec["plan"]["reason"]
    want, _ = naive_eval(model, x, y, list(dirs), _grid_coords(surf))
    np.testing.assert_allclose(surf.loss.ravel(), want, rtol=1e-5)
