"""The linear-stem shortcut (core/stem.py) against the naive float64 loop.

The stem replaces the first layer by a weighted sum of precomputed outputs. These tests
force it on (``stem=True``) and off, with both engine strategies, so that the shortcut is
checked whatever the timing-based choice would have been.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import CASES, build, engine_options, gaussian_direction
from oracle import linspace, naive_surface
from torch import nn

import landscape_widget as lw
from landscape_widget.core.stem import split_stem

# "tied" shares its first weight with the decoder, so it gets no stem (see the test below).
STEM_NAMES = ("mlp", "cnn-bn-res", "cnn-bn-res-batch", "mlp-mse", "mlp-dropout",
              "mlp-loader-shuffled", "resnet18")
STEM_CASES = [c for c in CASES if c["name"] in STEM_NAMES]


@pytest.mark.parametrize("case", STEM_CASES, ids=[c["name"] for c in STEM_CASES])
@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_stem_surface_matches_naive_loop(case, strategy):
    model, x, y, data = build(case)
    # The Gaussian direction also moves the first layer's bias: both stem terms are used.
    d1, d2 = lw.random_direction(model, seed=1), gaussian_direction(model, seed=2)
    opts = engine_options(case, strategy, len(y))
    opts["stem"] = True
    surf = lw.compute_surface(model, data, directions=(d1, d2), x=case["x"], y=case["y"],
                              loss_fn=case["loss_fn"], metrics=case["metrics"], bn=case["bn"],
                              progress=False, evaluator_options=opts)
    assert surf.spec["plan"]["stem"], "the stem applies to this model and was forced on"
    xs, ys = linspace(case["x"]), linspace(case["y"])
    want_loss, want_acc = naive_surface(model, x, y, d1, d2, xs, ys, loss_fn=case["loss_fn"],
                                        bn=case["bn"])
    np.testing.assert_allclose(surf.loss, want_loss, rtol=1e-5, atol=0)
    if "accuracy" in case["metrics"]:
        np.testing.assert_allclose(surf.accuracy, want_acc, rtol=0, atol=1e-12)


def test_stem_is_found_and_used_for_plain_models():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3))
    stem = split_stem(mlp)
    assert stem is not None and stem.name == "1"
    assert "1.weight" not in stem.suffix_keys and "3.weight" in stem.suffix_keys
    data = (torch.randn(20, 1, 8, 8), torch.randint(0, 3, (20,)))
    ev = lw.Evaluator(mlp, data, lw.random_directions(mlp, 2, seed=0), stem=True)
    ev.evaluate(np.zeros((3, 2)))
    assert ev.plan.stem


class InputTwice(nn.Module):
    """Uses its input after the first layer too: no stem is safe."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.a(x) + x)


class TiedFirst(nn.Module):
    """The first layer's weight is also used later."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Branchy(nn.Module):
    """Data-dependent control flow: not traceable."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return -self.a(x)


@pytest.mark.parametrize("cls", [InputTwice, TiedFirst, Branchy])
def test_no_stem_where_unsafe_and_results_still_exact(cls):
    torch.manual_seed(0)
    model = cls()
    assert split_stem(model) is None
    data = (torch.randn(16, 4), torch.randint(0, 2, (16,)))
    d1, d2 = lw.random_directions(model, 2, seed=1)
    surf = lw.compute_surface(model, data, directions=(d1, d2), x=(-1, 1, 3), y=(-1, 1, 3),
                              progress=False, evaluator_options={"stem": True,
                                                                 "strategy": "loop"})
    assert not surf.spec["plan"]["stem"]
    xs = linspace((-1, 1, 3))
    want_loss, _ = naive_surface(model, *data, d1, d2, xs, xs)
    np.testing.assert_allclose(surf.loss, want_loss, rtol=1e-5)


class OOMAbove(nn.Module):
    """Pretends to run out of memory on passes wider than ``limit`` samples x points."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        out = self.lin(x)
        # Under vmap the per-point view hides K: the unwrapped tensor shows the whole pass.
        if torch._C._functorch.is_batchedtensor(out):
            width = torch._C._functorch.get_unwrapped(out).shape[0] * out.shape[0]
        else:
            width = out.shape[0]
        if width > self.limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")
        return out


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_out_of_memory_halves_the_pass_and_results_stay_exact(strategy):
    torch.manual_seed(0)
    model = OOMAbove(limit=24)
    data = (torch.randn(40, 6), torch.randint(0, 3, (40,)))
    d1, d2 = lw.random_directions(model, 2, seed=1)
    surf = lw.compute_surface(model, data, directions=(d1, d2), x=(-1, 1, 9), y=(-1, 1, 9),
                              progress=False,
                              evaluator_options={"strategy": strategy, "batch_size": 40,
                                                 "stem": False})
    plan = surf.spec["plan"]
    assert plan["points"] * plan["batch"] <= 24
    model.limit = 10**9  # the oracle runs all data in one pass
    xs = linspace((-1, 1, 9))
    want_loss, _ = naive_surface(model, *data, d1, d2, xs, xs)
    np.testing.assert_allclose(surf.loss, want_loss, rtol=1e-5)


@pytest.mark.parametrize("strategy,points", [("loop", 1), ("vmap", 4)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_every_stem_plan_matches_naive_loop(strategy, points, layout):
    """Each plan the tuner may pick (stem x layout x strategy) gives the oracle's values."""
    from landscape_widget.core.evaluate import Plan

    case = next(c for c in CASES if c["name"] == "cnn-bn-res")
    model, x, y, data = build(case)
    d1, d2 = lw.random_direction(model, seed=1), gaussian_direction(model, seed=2)
    ev = lw.Evaluator(model, data, [d1, d2], stem=True)
    assert ev._prepare_stem()
    ev.plan = Plan(strategy, points, 7, layout, stem=True)  # 7: batches of uneven size too
    xs, ys = linspace((-1, 1, 3)), linspace((-0.5, 0.5, 2))
    coords = np.array([(a, b) for b in ys for a in xs])
    got = ev.evaluate(coords)
    want_loss, want_acc = naive_surface(model, x, y, d1, d2, xs, ys)
    np.testing.assert_allclose(got["loss"], want_loss.ravel(), rtol=1e-5, atol=0)
    np.testing.assert_allclose(got["accuracy"], want_acc.ravel(), atol=1e-12)


def test_a_trace_in_another_thread_leaves_this_threads_forward_alone():
    """The user's forward pass runs untraced while the widget's worker traces a model.

    torch.fx patches ``nn.Module.__call__`` for every thread during a trace; the plain
    ``fx.symbolic_trace`` fails this test with "module is not installed as a submodule".
    """
    import threading
    import time

    from landscape_widget.core.stem import symbolic_trace

    tracing = threading.Event()

    class Slow(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            tracing.set()
            time.sleep(0.5)  # hold the tracer's patch while the main thread runs its model
            return self.lin(x)

    torch.manual_seed(0)
    slow = Slow()
    user = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    expected = user(x)
    traced = {}
    worker = threading.Thread(target=lambda: traced.setdefault("gm", symbolic_trace(slow)))
    worker.start()
    assert tracing.wait(10)
    outputs = [user(x) for _ in range(20)]  # all inside the 0.5 s trace
    assert worker.is_alive(), "the trace ended before the user's forward passes ran"
    worker.join()
    for out in outputs:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    gm = traced["gm"]
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["lin"]
    torch.testing.assert_close(gm(x), slow.lin(x), rtol=0, atol=0)


class BufferMethods(nn.Module):
    """A forward that calls methods of buffers after the first layer: torch.fx runs them
    at trace time and keeps their values as constants of the traced graph."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(6, 3)
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("log_scale", torch.tensor([0.2, -0.1, 0.3]))
        self.register_buffer("cnt", torch.tensor(3))

    def forward(self, x):
        return self.l(x) * self.mask.float() * self.log_scale.exp() + self.cnt


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_stem_keeps_the_traces_constants(strategy):
    """The suffix's trace constants are its own: the stem applies (it was refused with a
    KeyError, which strategy='vmap' reported as the vmap error), and values equal the
    float64 loop; directions that move a buffer the trace baked in get no stem."""
    torch.manual_seed(0)
    model = BufferMethods()
    x, y = torch.randn(30, 6), torch.randint(0, 3, (30,))
    stem = split_stem(model)
    assert stem is not None and stem.constants and "cnt" in stem.suffix_keys
    d1, d2 = lw.random_direction(model, seed=1), gaussian_direction(model, seed=2)
    xs, ys = (-1, 1, 3), (-1, 1, 3)
    opts = {"strategy": strategy}
    surf = lw.compute_surface(model, (x, y), directions=(d1, d2), x=xs, y=ys, progress=False,
                              evaluator_options={**opts, "stem": True})
    assert surf.spec["plan"]["stem"] and surf.spec["plan"]["vmap_error"] == ""
    want, _ = naive_surface(model, x, y, d1, d2, linspace(xs), linspace(ys))
    np.testing.assert_allclose(surf.loss, want, rtol=1e-5)
    # A direction moving log_scale: exp(log_scale) is a constant of the trace, so the
    # stem would keep theta's value at every point; the whole model is run instead.
    d3 = {**d2, "log_scale": torch.tensor([1.0, -2.0, 0.5])}
    moved = lw.compute_surface(model, (x, y), directions=(d1, d3), x=xs, y=ys,
                               progress=False, evaluator_options={**opts, "stem": True})
    assert not moved.spec["plan"]["stem"]
    want, _ = naive_surface(model, x, y, d1, d3, linspace(xs), linspace(ys))
    np.testing.assert_allclose(moved.loss, want, rtol=1e-5)


class ReadsShape(nn.Module):
    """A forward that reads its input's shape (as a ViT's patch embedding does): torch.fx
    cannot trace it, so no stem."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        if x.shape[-1] != 6:
            raise ValueError("6 features")
        return self.b(torch.relu(self.a(x)))


def test_a_forced_stem_the_model_cannot_have_is_said_not_silently_dropped():
    model = ReadsShape()
    data = (torch.randn(16, 6), torch.randint(0, 3, (16,)))
    d1, d2 = lw.random_directions(model, 2, seed=0)
    with pytest.warns(UserWarning, match="stem=True: this model gets no linear stem"):
        surf = lw.compute_surface(model, data, directions=(d1, d2), x=(-1, 1, 3),
                                  y=(-1, 1, 3), progress=False,
                                  evaluator_options={"stem": True})
    assert not surf.spec["plan"]["stem"]
    want, _ = naive_surface(model, *data, d1, d2, linspace((-1, 1, 3)), linspace((-1, 1, 3)))
    np.testing.assert_allclose(surf.loss, want, rtol=1e-5)


def _cnn_evaluator(**options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3)).eval()
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(24, 1, 6, 6, generator=g), torch.randint(0, 3, (24,), generator=g))
    dirs = [gaussian_direction(model, seed=1), gaussian_direction(model, seed=2)]
    ev = lw.Evaluator(model, data, dirs, stem=True, strategy="loop", batch_size=8, **options)
    assert ev._prepare_stem()
    return model, data, dirs, ev


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_stem_row_kept_gives_the_same_inputs_as_the_unkept_sum(layout):
    # A loop point's stem inputs reuse its row (H0 + c1 H1) from the point before on the same
    # row; they must be bit for bit those of the K-point sum, which builds the row anew,
    # whichever batch and whichever order the points come in.
    _, _, _, ev = _cnn_evaluator()
    c = torch.tensor([[0.3, -0.7], [0.1, -0.7], [0.3, 0.2], [-1.0, 1.0], [0.5, -0.7]],
                     dtype=torch.float64)
    for start, stop in [(0, 8), (8, 16), (16, 24)]:
        together = ev._stem_input(c, start, stop, layout).clone()
        for i in [0, 1, 3, 4, 2, 1]:
            alone = ev._stem_input(c[i : i + 1], start, stop, layout)
            assert torch.equal(alone[0], together[i]), (start, i)
    # Kept: the last point's row (c1 = -0.7, in the model's dtype).
    assert ev._stem_row is not None and ev._stem_row[0] == (layout, float(np.float32(-0.7)))
    # And they are the first layer's outputs at the point (the stem's linearity).
    for i in range(len(c)):
        w = {k: ev.base[k] + sum(float(c[i, j]) * ev.dirs[j][k] for j in range(2))
             for k in ("0.weight", "0.bias")}
        want = torch.nn.functional.conv2d(ev.x[:8], w["0.weight"], w["0.bias"], padding=1)
        got = ev._stem_input(c[i : i + 1], 0, 8, layout)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_stem_row_not_kept_when_it_does_not_fit(monkeypatch):
    from landscape_widget.core import stem_terms

    c = torch.tensor([[0.3, -0.7], [0.1, -0.7]], dtype=torch.float64)
    *_, kept = _cnn_evaluator()
    want = [kept._stem_input(c[i : i + 1], 0, 8, "contiguous").clone() for i in range(2)]
    monkeypatch.setattr(stem_terms, "ROW_SHARE", 0.0)
    *_, ev = _cnn_evaluator()
    for i in range(2):
        assert torch.equal(ev._stem_input(c[i : i + 1], 0, 8, "contiguous"), want[i])
    assert ev._stem_row is None and ev._stem_row_fits is False


def test_stem_loop_surface_does_not_depend_on_point_order():
    model, data, dirs, ev = _cnn_evaluator()
    coords = np.array([(a, b) for b in (-1.0, 0.0, 1.0) for a in (-1.0, -0.5, 0.5, 1.0)])
    ev.expected_points = len(coords)
    first = ev.evaluate(coords)["loss"]
    assert ev.plan.stem and ev.plan.strategy == "loop"
    order = np.random.default_rng(0).permutation(len(coords))
    again = ev.evaluate(coords[order])["loss"]
    np.testing.assert_array_equal(again, first[order])
    want, _ = naive_surface(model, *data, *dirs, np.array([-1.0, -0.5, 0.5, 1.0]),
                            np.array([-1.0, 0.0, 1.0]))
    np.testing.assert_allclose(first, want.ravel(), rtol=1e-5)
