"""The graph rewrites of core/rewrite.py: same values as the layers they replace.

Oracles: torch's own ``F.avg_pool2d`` in float64, the untouched traced module in float64,
and the per-point float64 loop for whole surfaces through the stem.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from oracle import linspace, naive_surface
from torch import nn

import landscape_widget as lw
from landscape_widget.core.rewrite import avg_pool2d, optimise
from landscape_widget.core.stem import split_stem


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 5, 7, 9), (1, 16, 6, 4), (2, 2, 2, 5)])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided"])
def test_avg_pool2d_equals_torchs_in_float64(k, shape, layout):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(shape[0], shape[1], shape[2], 2 * shape[3], generator=gen,
                        dtype=torch.float64)[..., ::2]
    try:
        want = F.avg_pool2d(x, k)
    except RuntimeError:  # a kernel larger than the input: the same error from ours
        with pytest.raises(RuntimeError, match="too small"):
            avg_pool2d(x, k)
        return
    got = avg_pool2d(x, k)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-15)
    if layout == "nhwc" and got.numel():
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_avg_pool2d_under_vmap_and_in_float32():
    x = torch.randn(4, 2, 3, 6, 6)
    want = torch.stack([F.avg_pool2d(xi, 2) for xi in x])
    torch.testing.assert_close(torch.vmap(lambda t: avg_pool2d(t, 2))(x), want)
    torch.testing.assert_close(avg_pool2d(x[0], 2), want[0], rtol=1e-6, atol=1e-7)


class Residual(nn.Module):
    """A ReLU whose input is read again afterwards: an in-place ReLU would change ``h``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        h = self.conv(x)
        return self.act(h) + h


class ViewThenRelu(nn.Module):
    """A ReLU of a view of the input (flatten): must not write into the caller's tensor."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.fc = nn.Linear(32, 3)

    def forward(self, x):
        return self.fc(self.act(x.flatten(1)))


class FunctionalRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def _rewritten(module):
    gm = fx.symbolic_trace(module)
    return gm, optimise(gm)


def test_only_safe_relus_become_in_place():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    res = Residual().double()
    gm, n = _rewritten(res)
    assert n == 0  # h has two users
    torch.testing.assert_close(gm(x), res(x))

    view = ViewThenRelu().double()
    xv = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    keep = xv.clone()
    gm, n = _rewritten(view)
    assert n == 0  # flatten returns a view of the caller's input
    torch.testing.assert_close(gm(xv), view(xv))
    assert torch.equal(xv, keep)

    fun = FunctionalRelu().double()
    xf = torch.randn(4, 6, dtype=torch.float64)
    gm, n = _rewritten(fun)
    assert n == 1 and "relu_" in gm.code  # F.relu of a fresh Linear output
    torch.testing.assert_close(gm(xf), fun(xf))


def test_hooked_and_unusual_layers_are_left_alone():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AvgPool2d(2, stride=1),
                        nn.AvgPool2d(2, padding=1), nn.AvgPool2d(2, ceil_mode=True))
    gm, n = _rewritten(net)
    assert n == 1  # only the ReLU: none of these pools is k == stride without padding
    hooked = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AvgPool2d(2))
    seen = []
    hooked[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    hooked[2].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    gm, n = _rewritten(hooked)
    assert n == 0
    gm(torch.randn(1, 1, 6, 6))
    assert len(seen) == 2


def test_stem_input_is_placeholder_and_terms_survive():
    """The stem's suffix works in place on its input; the stored stem terms must not change."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    stem = split_stem(net)
    assert stem is not None and "relu_" in stem.suffix.code
    x, y = torch.randn(30, 1, 8, 8), torch.randint(0, 3, (30,))
    d = lw.random_directions(net, 2, seed=0)
    ev = lw.Evaluator(net, (x, y), d, stem=True, strategy="loop")
    ev.evaluate(np.zeros((1, 2)))
    before = [t.clone() for t in [ev._stem_terms[0]] + [t for _, t in ev._stem_terms[1:]]]
    ev.evaluate(np.random.default_rng(0).uniform(-1, 1, (5, 2)))
    after = [ev._stem_terms[0]] + [t for _, t in ev._stem_terms[1:]]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cnn_surface_through_the_rewritten_suffix_matches_the_float64_loop(strategy, layout):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AvgPool2d(3),
                        nn.Flatten(), nn.Linear(6 * 2 * 2, 3)).eval()
    x, y = torch.randn(40, 1, 12, 12), torch.randint(0, 3, (40,))
    d1, d2 = lw.random_directions(net, 2, seed=3)
    from landscape_widget.core import plans

    plans.forget_plans()
    opts = {"stem": True, "strategy": strategy}
    if strategy == "loop":
        opts["batch_size"] = 16
    axis = (-1.0, 1.0, 4)
    surf = lw.compute_surface(net, (x, y), directions=(d1, d2), x=axis, y=axis,
                              progress=False, evaluator_options=opts)
    assert surf.spec["plan"]["stem"]
    want, acc = naive_surface(net, x, y, d1, d2, linspace(axis), linspace(axis))
    np.testing.assert_allclose(surf.loss, want, rtol=1e-5, atol=0)
    np.testing.assert_allclose(surf.accuracy, acc, rtol=0, atol=1e-12)
    ev = lw.Evaluator(net, (x, y), (d1, d2), stem=True, strategy="loop", batch_size=16)
    ev._prepare_stem()
    from landscape_widget.core.plans import Plan

    ev._active = "fp32"
    got = ev._run(Plan("loop", 1, 16, layout, True), torch.tensor([[0.3, -0.7]],
                                                                   dtype=torch.float64))
    want1, _ = naive_surface(net, x, y, d1, d2, np.array([0.3]), np.array([-0.7]))
    np.testing.assert_allclose(got[0, 0].item(), want1.ravel()[0], rtol=1e-5)


def test_a_first_layer_with_a_replaced_forward_gets_no_stem():
    """A forward set on the instance need not be linear in the weights: no stem for it."""
    import types

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    net[0].forward = types.MethodType(
        lambda self, x: F.linear(x, self.weight, self.bias) ** 2, net[0])
    assert split_stem(net) is None
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    d1, d2 = lw.random_directions(net, 2, seed=0)
    axis = (-2.0, 2.0, 3)
    surf = lw.compute_surface(net, (x, y), directions=(d1, d2), x=axis, y=axis,
                              progress=False, evaluator_options={"stem": True})
    want, _ = naive_surface(net, x, y, d1, d2, linspace(axis), linspace(axis))
    np.testing.assert_allclose(surf.loss, want, rtol=1e-5, atol=0)
