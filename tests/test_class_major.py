"""The engine's own cross-entropy and its class-major classifier head (issue 15, CPU speed).

Oracles: torch's ``F.cross_entropy`` and ``argmax`` in float64 for the batched loss, and
the per-point float64 loop (tests/oracle.py) for whole surfaces through the rewritten head
and the one-pass-per-direction stem sums.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import naive_eval
from torch import nn

import landscape_widget as lw
from landscape_widget.core import plans
from landscape_widget.core.batched_ce import batched_cross_entropy
from landscape_widget.core.plans import PIN_SLOWDOWN
from landscape_widget.core.rewrite import head_linear
from landscape_widget.core.stem import split_stem


def _layouts(logits):
    """The logits as stored contiguously and class-major (what head_linear returns)."""
    return {"contiguous": logits.contiguous(),
            "class-major": logits.transpose(1, 2).contiguous().transpose(1, 2)}


def _oracle(logits, y):
    ref = logits.double()
    loss = torch.stack([F.cross_entropy(r, y, reduction="none") for r in ref])
    hit = (ref.argmax(-1) == y) & (y != -100)
    return loss, hit


@pytest.mark.parametrize("kind", ["random", "ties", "ignored", "minus-inf"])
@pytest.mark.parametrize("layout", ["contiguous", "class-major"])
def test_batched_cross_entropy_equals_torchs_in_float64(kind, layout):
    gen = torch.Generator().manual_seed(0)
    k, b, c = 5, 64, 7
    logits = torch.randn(k, b, c, generator=gen, dtype=torch.float64) * 3
    y = torch.randint(0, c, (b,), generator=gen)
    if kind == "ties":  # small integers: many rows with two or more largest logits
        logits = torch.randint(0, 3, (k, b, c), generator=gen).double()
        logits[:, :3] = 1.0  # every class tied
    elif kind == "ignored":
        y[::3] = -100
    elif kind == "minus-inf":
        logits[0, :4, 0] = float("-inf")
        y[:2] = 0  # an impossible target: loss +inf, as torch's
    got_loss, got_hit = batched_cross_entropy(_layouts(logits)[layout], y)
    want_loss, want_hit = _oracle(logits, y)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-12, atol=1e-12)
    assert torch.equal(got_hit, want_hit)
    if kind == "ties":
        assert int(want_hit.sum()) > 0 and int(((logits == logits.amax(-1, keepdim=True))
                                                 .sum(-1) > 1).sum()) > 50


@pytest.mark.parametrize("scale,offset", [(0.1, 0), (1, 0), (10, 0), (100, 0), (3, 1000)])
def test_float32_cross_entropy_is_as_accurate_as_torchs(scale, offset):
    """exp as exp2(x log2 e) and the finite check on the maxima's sum: against float64, the
    error of each sample's loss is within torch's own float32 error (and 1e-7), the mean
    loss within 1e-7 relative; hits equal argmax's, ties included (integer logits)."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 256, 10, generator=gen) * scale + offset
    logits[:, :40] = torch.randint(0, 3, (6, 40, 10), generator=gen).float() * scale + offset
    y = torch.randint(0, 10, (256,), generator=gen)
    want_loss, want_hit = _oracle(logits, y)
    torch_err = (torch.stack([F.cross_entropy(r, y, reduction="none") for r in logits])
                 .double() - want_loss).abs().max()
    for stored in _layouts(logits).values():
        loss, hit = batched_cross_entropy(stored, y)
        assert (loss.double() - want_loss).abs().max() <= 1.5 * torch_err + 1e-7
        assert abs(loss.double().mean() - want_loss.mean()) <= 1e-7 * want_loss.mean()
        assert torch.equal(hit, want_hit)


def test_uint8_targets_which_torchs_cross_entropy_takes_too():
    """Review of this change: uint8 class indices failed in ``gather`` (int64 wanted)."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 30, 4, generator=gen)
    y = torch.randint(0, 4, (30,), generator=gen)
    for stored in _layouts(logits).values():
        loss, hit = batched_cross_entropy(stored, y.to(torch.uint8))
        want_loss, want_hit = _oracle(logits, y)
        torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=1e-6)
        assert torch.equal(hit, want_hit)
    net = _mlp()  # 3 classes
    x, y = torch.randn(30, 6, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    d = list(lw.random_directions(net, 2, seed=0))
    coords = np.array([[0.0, 0.0], [0.5, -1.0], [1.0, 1.0]])
    plans.forget_plans()
    got = lw.Evaluator(net, (x, y.to(torch.uint8)), d, stem=True, strategy="vmap").evaluate(coords)
    want = lw.Evaluator(net, (x, y), d, stem=True, strategy="vmap").evaluate(coords)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
    np.testing.assert_array_equal(got["accuracy"], want["accuracy"])


def test_batched_cross_entropy_float32_and_nonfinite_fall_back():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 40, 10, generator=gen)
    y = torch.randint(0, 10, (40,), generator=gen)
    for stored in _layouts(logits).values():
        loss, hit = batched_cross_entropy(stored, y)
        want_loss, want_hit = _oracle(logits, y)
        torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=1e-6)
        assert torch.equal(hit, want_hit)
    for bad in (float("nan"), float("inf")):
        spoilt = logits.clone()
        spoilt[1, 7, 3] = bad
        assert batched_cross_entropy(spoilt, y) is None  # torch's own rules decide


def _mlp(out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, out)).eval()


class TwiceHead(nn.Module):
    """The head's output is used by a later operation: not the model's output itself."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) * 2


def test_only_a_small_stock_final_linear_becomes_class_major():
    assert "head_linear" in split_stem(_mlp(), class_major_head=True).suffix.code
    assert "head_linear" not in split_stem(_mlp(), class_major_head=False).suffix.code
    assert "head_linear" not in split_stem(_mlp(out=33), class_major_head=True).suffix.code
    hooked = _mlp()
    hooked[2].register_forward_hook(lambda m, i, o: o + 1)
    assert "head_linear" not in split_stem(hooked, class_major_head=True).suffix.code
    twice = split_stem(TwiceHead(), class_major_head=True)
    assert "head_linear" not in twice.suffix.code
    nobias = _mlp()
    nobias[2] = nn.Linear(16, 3, bias=False)
    stem = split_stem(nobias, class_major_head=True)
    assert "head_linear" in stem.suffix.code
    h = torch.randn(5, 16)
    torch.testing.assert_close(stem.suffix(h), nobias[2](torch.relu(h)))


def test_head_linear_under_vmap_with_an_unbatched_bias():
    x, w, b = torch.randn(4, 9, 5), torch.randn(4, 3, 5), torch.randn(3)
    got = torch.vmap(head_linear, in_dims=(0, 0, None))(x, w, b)
    torch.testing.assert_close(got, torch.stack([F.linear(x[i], w[i], b) for i in range(4)]))
    got = torch.vmap(head_linear, in_dims=(None, None, 0))(x[0], w[0], torch.randn(4, 3))
    assert got.shape == (4, 9, 3)
    x3 = torch.randn(2, 9, 5)  # not 2D: F.linear
    torch.testing.assert_close(head_linear(x3, w[0], b), F.linear(x3, w[0], b))


@pytest.mark.parametrize("ndirs", [1, 2, 3])
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("ignored", [False, True])
def test_mlp_values_through_stem_and_head_match_the_float64_loop(ndirs, strategy, ignored):
    """1-3 directions (the per-direction passes and the GEMM), ignored targets, both plans."""
    net = _mlp()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(50, 6, generator=gen), torch.randint(0, 3, (50,), generator=gen)
    if ignored:
        y[::4] = -100
    dirs = lw.random_directions(net, ndirs, seed=4)
    dirs = list(dirs) if isinstance(dirs, (list, tuple)) else [dirs]
    coords = np.random.default_rng(0).uniform(-2, 2, (9, ndirs))
    plans.forget_plans()
    ev = lw.Evaluator(net, (x, y), dirs, stem=True, strategy=strategy)
    got = ev.evaluate(coords)
    assert ev.plan.stem and "head_linear" in ev.stem.suffix.code
    oracle_y = y.clone()
    loss_fn = None
    if ignored:
        loss_fn = F.cross_entropy  # the oracle's mean over counted targets (ignore_index)
    want_loss, _ = naive_eval(net, x, oracle_y, dirs, coords, loss_fn=loss_fn)
    np.testing.assert_allclose(got["loss"], want_loss, rtol=1e-5, atol=0)
    # Accuracy over counted targets, argmax in float64.
    for i, c in enumerate(coords):
        params = {k: v.double() for k, v in net.state_dict().items()}
        for cj, d in zip(c, dirs, strict=True):
            for k, v in d.items():
                params[k] = params[k] + float(cj) * v.double()
        out = torch.func.functional_call(net.double(), params, (x.double(),))
        net.float()
        keep = y != -100
        want_acc = float((out.argmax(-1)[keep] == y[keep]).double().mean())
        assert got["accuracy"][i] == pytest.approx(want_acc, abs=1e-12)


def test_tied_logits_count_for_the_first_class_as_argmax_does():
    """A head of zeros: every sample's logits are the bias, with classes 0 and 2 tied."""
    net = _mlp()
    with torch.no_grad():
        net[2].weight.zero_()
        net[2].bias.copy_(torch.tensor([1.0, 0.0, 1.0]))
    y = torch.tensor([0, 1, 2, 0, 2, 2, 1, 0])
    x = torch.randn(8, 6)
    d = {k: torch.zeros_like(v) for k, v in net.named_parameters()}
    d["0.weight"] = torch.randn_like(net[0].weight)  # moves the stem only: ties stay
    for strategy in ("loop", "vmap"):
        plans.forget_plans()
        ev = lw.Evaluator(net, (x, y), [d], stem=True, strategy=strategy)
        got = ev.evaluate(np.array([[0.0], [1.5]]))
        np.testing.assert_array_equal(got["accuracy"], [3 / 8, 3 / 8])


def test_fingerprints_hashed_beside_the_setup_equal_the_direct_hashes():
    """compute.grid_job hashes the model and directions in threads: same digests as before."""
    from landscape_widget.core.fingerprints import fingerprint

    net = _mlp()
    x, y = torch.randn(30, 6), torch.randint(0, 3, (30,))
    d1, d2 = lw.random_directions(net, 2, seed=7)
    s = lw.compute_surface(net, (x, y), directions=(d1, d2), x=(-1, 1, 3), y=(-1, 1, 3),
                           progress=False)
    assert s.spec["model"] == fingerprint(dict(net.state_dict()))
    want = fingerprint({f"{i}/{k}": v for i, d in enumerate((d1, d2)) for k, v in d.items()})
    assert s.spec["directions"] == want
    with pytest.raises(ValueError, match="loss_fn"):  # a set-up error still reaches the caller
        lw.compute_surface(net, (x, y), directions=(d1, d2), x=(-1, 1, 3), y=(-1, 1, 3),
                           loss_fn=lambda out, t: out.sum(1), progress=False)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_reused_stem_buffer_with_the_stem_as_the_whole_model(strategy):
    """A model that is its stem: the suffix returns the reused buffer itself as the logits."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 3)).eval()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 6, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    dirs = list(lw.random_directions(net, 2, seed=2))
    coords = np.random.default_rng(1).uniform(-3, 3, (11, 2))
    plans.forget_plans()
    ev = lw.Evaluator(net, (x, y), dirs, stem=True, strategy=strategy, batch_size=16)
    got = ev.evaluate(coords)
    assert ev.plan.stem
    want, _ = naive_eval(net, x, y, dirs, coords)
    np.testing.assert_allclose(got["loss"], want, rtol=1e-5, atol=0)


def test_a_larger_grid_goes_on_from_the_search_a_small_grid_cut_short():
    """A 3 x 3 grid's search stops at K = 4 (its size); a 9 x 9 grid then starts from those
    timings (no trial repeated) and times the wider plans; values match the float64 loop."""
    from landscape_widget.core.plans import _SEARCHES

    net = _mlp()
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(64, 6, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    d1, d2 = lw.random_directions(net, 2, seed=5)
    plans.forget_plans()
    _SEARCHES.clear()
    small = lw.compute_surface(net, (x, y), directions=(d1, d2), x=(-1, 1, 3), y=(-1, 1, 3),
                               progress=False)
    assert not small.spec["plan"]["complete"] and len(_SEARCHES) == 1
    first = {c["plan"]: c["seconds_per_point"] for c in small.spec["plan"]["candidates"]}
    assert not any(" K=16 " in label or " K=64 " in label for label in first)
    axis = (-2.0, 2.0, 9)
    large = lw.compute_surface(net, (x, y), directions=(d1, d2), x=axis, y=axis,
                               progress=False)
    plan = large.spec["plan"]
    again = {c["plan"]: c["seconds_per_point"] for c in plan["candidates"]}
    shared = [label for label in first if label in again]
    assert shared and all(again[label] == first[label] for label in shared)
    assert f"({len(shared)} of them for an earlier, smaller grid)" in plan["reason"]
    assert any(" K=16 " in label for label in again)  # the wider plans were timed now
    # 81 points still cut the search short (K = 256 > 81): the grown search is kept.
    (kept,) = _SEARCHES.values()
    assert kept == again
    want, _ = naive_eval(net, x, y, [d1, d2],
                         np.array([(a, b) for b in np.linspace(*axis) for a in np.linspace(*axis)]))
    np.testing.assert_allclose(large.loss.ravel(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("batch", [30, 32])  # 60 samples: two equal batches, or 32 + 28
def test_a_trial_over_two_batches_is_a_real_point_equal_to_the_plans_own(batch):
    """A loop plan whose two trial passes cover all data computes one real point, kept if
    it wins: the first call equals the plan reused (bit for bit) and the float64 loop."""
    net = _mlp()
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(60, 6, generator=gen), torch.randint(0, 3, (60,), generator=gen)
    d1, d2 = lw.random_directions(net, 2, seed=8)
    kw = {"directions": (d1, d2), "x": (-1, 1, 5), "y": (-1, 1, 5), "progress": False,
          "evaluator_options": {"strategy": "loop", "batch_size": batch}}
    plans.forget_plans()
    seen = []
    real_pass = lw.Evaluator._pass

    def counting(self, plan, params, coef, start, stop):
        seen.append((start, stop))
        return real_pass(self, plan, params, coef, start, stop)

    lw.Evaluator._pass = counting
    try:
        first = lw.compute_surface(net, (x, y), **kw)
    finally:
        lw.Evaluator._pass = real_pass
    again = lw.compute_surface(net, (x, y), **kw)
    assert first.spec["plan"]["batch"] == batch
    np.testing.assert_array_equal(first.loss, again.loss)
    np.testing.assert_array_equal(first.accuracy, again.accuracy)
    want, _ = naive_eval(net, x, y, [d1, d2],
                         np.array([(a, b) for b in first.y for a in first.x]))
    np.testing.assert_allclose(first.loss.ravel(), want, rtol=1e-5, atol=0)
    # 25 points of 2 passes each: every trial's point is one of the 25 (a losing trial's
    # is pinned to its plan, which computes it again in the repeated call), unless that
    # plan was over PIN_SLOWDOWN times slower: then its point is computed again.
    plan = first.spec["plan"]
    lost = [c["seconds_per_point"] for c in plan["candidates"] if c["plan"] != plan["label"]]
    pinned = sum(t <= PIN_SLOWDOWN * plan["seconds_per_point"] for t in lost)
    assert len(plan["pinned"]) == pinned
    assert len(seen) == 2 * (25 + len(lost) - pinned)


def test_a_full_plan_cache_evicts_even_when_another_thread_emptied_it():
    """Review 3: eviction popped the oldest key, which another thread may have popped."""
    from landscape_widget.core.plans import _PLANS, _PLANS_MAX, Plan, _remember

    plans.forget_plans()
    for i in range(_PLANS_MAX):
        _PLANS[("k", i)] = Plan("loop", 1, 8)

    class Racing(dict):  # the oldest key is gone by the time it is popped
        def __iter__(self):
            keys = list(super().__iter__())
            super().pop(keys[0])
            return iter(keys)

    racing = Racing(_PLANS)
    try:
        plans._PLANS = racing
        _remember(("new",), Plan("loop", 1, 8))  # raised KeyError before
        assert ("new",) in racing
    finally:
        plans._PLANS = _PLANS
        plans.forget_plans()


def test_target_checks_made_once_per_batch_and_still_guard_bad_targets(monkeypatch):
    """The targets' checks (a device sync each on a GPU) run once per batch of the data,
    not in every pass of every point; the surface still equals the float64 oracle, and a
    target outside the classes still gets torch's own error."""
    from landscape_widget.core import batch_stats

    calls = []
    real = batch_stats.target_checks
    monkeypatch.setattr(batch_stats, "target_checks",
                        lambda y, *a: calls.append(int(y.shape[0])) or real(y, *a))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    x, y = torch.randn(40, 6), torch.randint(0, 4, (40,))
    y[::5] = -100
    d1, d2 = lw.random_directions(model, 2, seed=1)
    plans.forget_plans()
    s = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-1, 1, 4), y=(-1, 1, 4),
                           progress=False, evaluator_options={"batch_size": 16})
    assert s.spec["plan"]["batch"] == 16
    # One check per batch start (0, 16, 32): 3, however many passes the 16 points took.
    assert sorted(calls) == [8, 16, 16]
    coords = [(float(a), float(b)) for b in s.y for a in s.x]
    want_loss, want_acc = naive_eval(model, x, y, [d1, d2], coords)
    np.testing.assert_allclose(np.asarray(s.loss).ravel(), want_loss, rtol=1e-5)
    # The oracle's accuracy is over all 40 samples; the engine's over the 32 counted ones.
    np.testing.assert_allclose(np.asarray(s.accuracy).ravel(), want_acc * 40 / 32,
                               atol=1e-12)
    with pytest.raises((ValueError, IndexError, RuntimeError), match="out of bounds|class"):
        lw.compute_surface(model, (x, torch.full((40,), 4)), directions=(d1, d2),
                           x=(-1, 1, 2), y=(-1, 1, 2), progress=False)
