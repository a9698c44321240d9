"""BatchNorm folded into the convolution before it (core/fold.py) against independent oracles.

``conv_bn`` against the two modules run one after the other in float64; the folding pass
against what it must leave alone; and the engine's stem plans (whose suffix graph is
folded) against the naive float64 per-point loop, with directions that move the
convolutions only and ones that also move BatchNorm's scale and shift.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from cases import gaussian_direction
from oracle import linspace, naive_surface
from torch import nn

import landscape_widget as lw
from landscape_widget.core.fold import conv_bn, fold_batchnorm


def _stats(bn: nn.Module, seed: int) -> nn.Module:
    """Running statistics and an affine map far from the defaults (identity would hide a
    missing term)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 3 + 0.2)
        if bn.affine:
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    return bn.eval()


@pytest.mark.parametrize("dims,kw", [
    (1, {"stride": 2, "padding": 1}),
    (2, {"padding": 2, "dilation": 2, "bias": False}),
    (2, {"groups": 2, "stride": (2, 1)}),
    (3, {"padding": 1}),
])
@pytest.mark.parametrize("affine", [True, False])
def test_conv_bn_is_bn_after_conv_in_float64(dims, kw, affine):
    torch.manual_seed(dims)
    conv = getattr(nn, f"Conv{dims}d")(4, 6, 3, **kw).double()
    bn = _stats(getattr(nn, f"BatchNorm{dims}d")(6, eps=1e-3, affine=affine), dims).double()
    x = torch.randn((3, 4) + (7,) * dims, dtype=torch.float64)
    want = bn(conv(x))
    got = conv_bn(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                  bn.running_var, bn.eps, dims, conv.stride, conv.padding, conv.dilation,
                  conv.groups)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


class ConvNet(nn.Module):
    """conv-BN-ReLU twice and a head; optional second reader of the first convolution."""

    def __init__(self, reread: bool = False, bn_train: bool = False, padding_mode="zeros"):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, padding_mode=padding_mode)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)
        self.reread = reread
        _stats(self.b1, 1), _stats(self.b2, 2)
        self.eval()
        if bn_train:
            self.b2.train()

    def forward(self, x):
        h = self.c1(x)
        a = torch.relu(self.b1(h))
        if self.reread:
            a = a + h
        a = torch.relu(self.b2(self.c2(a)))
        return self.head(a.mean((2, 3)))


def _folded(gm: fx.GraphModule) -> int:
    return sum(n.op == "call_function" and n.target is conv_bn for n in gm.graph.nodes)


def test_fold_takes_only_pairs_that_are_one_affine_map():
    x = torch.randn(4, 3, 6, 6)
    cases = {
        "plain": (ConvNet(), 2),
        "conv read twice": (ConvNet(reread=True), 1),
        "train-mode BN": (ConvNet(bn_train=True), 1),
        "reflect padding": (ConvNet(padding_mode="reflect"), 1),
    }
    hooked = ConvNet()
    hooked.b2.register_forward_hook(lambda m, i, o: o * 2)
    cases["hooked BN"] = (hooked, 1)
    stats_free = ConvNet()
    stats_free.b1 = nn.BatchNorm2d(8, track_running_stats=False).eval()
    cases["no running stats"] = (stats_free, 1)
    for name, (net, want) in cases.items():
        gm = fx.symbolic_trace(net)
        with torch.no_grad():
            before = net(x)
            assert fold_batchnorm(gm) == want == _folded(gm), name
            torch.testing.assert_close(gm(x), before, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("moved", ["conv", "all"])
def test_folded_stem_plans_match_the_naive_float64_loop(strategy, moved):
    torch.manual_seed(0)
    model = ConvNet()
    x, y = torch.randn(24, 3, 8, 8), torch.randint(0, 5, (24,))
    if moved == "conv":  # filter-normalised, BatchNorm left alone ("biasbn")
        d1, d2 = lw.random_directions(model, 2, seed=0)
    else:  # BatchNorm's scale and shift move too
        d1, d2 = gaussian_direction(model, seed=1), gaussian_direction(model, seed=2)
    spec = (-1.0, 1.0, 3)
    ev = lw.Evaluator(model, (x, y), [d1, d2], stem=True, strategy=strategy)
    assert ev.stem is not None and _folded(ev.stem.suffix) == 1  # b2; b1 reads the stem
    surf = lw.compute_surface(model, (x, y), directions=(d1, d2), x=spec, y=spec,
                              progress=False,
                              evaluator_options={"stem": True, "strategy": strategy})
    assert surf.spec["plan"]["stem"] and surf.spec["plan"]["folded_batchnorms"] == 1
    want, _ = naive_surface(model, x, y, d1, d2, linspace(spec), linspace(spec))
    np.testing.assert_allclose(surf.loss, want, rtol=1e-5, atol=0)


def test_half_models_and_mixed_dtypes_are_not_folded():
    x = torch.randn(4, 3, 6, 6, dtype=torch.bfloat16)
    whole = ConvNet().to(torch.bfloat16)
    mixed = ConvNet().to(torch.bfloat16)
    mixed.b1.float(), mixed.b2.float()  # BatchNorm kept in float32, a common mixed set-up
    for net in (whole, mixed):
        gm = fx.symbolic_trace(net)
        with torch.no_grad():
            before = net(x)
            assert fold_batchnorm(gm) == 0
            torch.testing.assert_close(gm(x), before, rtol=0, atol=0)
class HalfTail(nn.Module):
    """A float32 stem, then a half convolution read by a float32 BatchNorm (torch runs it in
    mixed precision), then a float32 head."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1).to(dtype)
        self.b2 = _stats(nn.BatchNorm2d(8), 2)
        self.head = nn.Linear(8, 5)
        self.dtype = dtype
        self.eval()

    def forward(self, x):
        h = torch.relu(self.c1(x)).to(self.dtype)
        return self.head(torch.relu(self.b2(self.c2(h))).float().mean((2, 3)))


def _native_loop(model, x, y, d1, d2, xs, ys):
    """The per-point loop in the model's own dtypes (the float64 oracle cannot cast a
    model that casts inside its forward): ``(ny, nx)`` cross-entropies in float64."""
    ref = copy.deepcopy(model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    out = np.empty((len(ys), len(xs)))
    for iy, b in enumerate(ys):
        for ix, a in enumerate(xs):
            ref.load_state_dict({k: v + float(a) * d1[k].to(v.dtype) + float(b) * d2[k].to(
                v.dtype) if k in d1 else v for k, v in base.items()})
            with torch.no_grad():
                out[iy, ix] = float(F.cross_entropy(ref(x).double(), y))
    return out


def _stem_matches_native_loop(model, x, y, d1, d2, rtol: float) -> None:
    """A forced stem plan on a 2x2 grid against :func:`_native_loop` within ``rtol``."""
    spec = (-0.5, 0.5, 2)
    surf = lw.compute_surface(model, (x, y), directions=(d1, d2), x=spec, y=spec,
                              progress=False,
                              evaluator_options={"stem": True, "strategy": "loop"})
    assert surf.spec["plan"]["stem"]
    want = _native_loop(model, x, y, d1, d2, linspace(spec), linspace(spec))
    np.testing.assert_allclose(surf.loss, want, rtol=rtol, atol=0)


def test_a_half_convolution_before_a_float32_batchnorm_is_computed_not_refused():
    """Folded, the float32 scale made the weight float32 and the half convolution raised
    ("Input type (c10::Half) and bias type (float) should be the same")."""
    torch.manual_seed(0)
    model = HalfTail(torch.float16)
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 5, (16,))
    d1, d2 = gaussian_direction(model, seed=1), gaussian_direction(model, seed=2)
    # Half precision: the stem's sums round differently from the plain forward.
    _stem_matches_native_loop(model, x, y, d1, d2, rtol=2e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_bfloat16_model_keeps_its_stem(seed):
    """In bfloat16, ``W * s`` rounded to 8 bits moved the split model's outputs past the
    stem's safety net (rtol 1e-4): the stem was dropped without a word."""
    torch.manual_seed(seed)
    model = ConvNet().to(torch.bfloat16)
    x, y = torch.randn(16, 3, 8, 8, dtype=torch.bfloat16), torch.randint(0, 5, (16,))
    d1, d2 = gaussian_direction(model, seed=1), gaussian_direction(model, seed=2)
    _stem_matches_native_loop(model, x, y, d1, d2, rtol=2e-2)


class Calibrated(nn.Module):
    """Three conv-BN-ReLU blocks whose convolutions add a large constant (bias 300) that
    their BatchNorms, with statistics taken from the data as training leaves them, take
    out again: the folded sums cancel otherwise than the model's own."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.convs = nn.ModuleList([nn.Conv2d(16, 16, 3, padding=1) for _ in range(3)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(16, momentum=None) for _ in range(3)])
        self.head = nn.Linear(16, 10)
        with torch.no_grad():
            for c in self.convs:
                c.bias.fill_(300.0)
            self.train()(x)  # momentum=None: the running statistics are the data's
        self.eval()

    def forward(self, x):
        h = torch.relu(self.stem(x))
        for c, b in zip(self.convs, self.bns, strict=True):
            h = torch.relu(b(c(h)))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("seed", [0, 1])
def test_a_fold_that_rounds_otherwise_than_the_model_is_kept_and_exact(seed):
    """The folded suffix was 1.4-1.9x the safety net's entry-by-entry tolerance from the
    model here (a torchvision ResNet-50 with its statistics from the data: 2-10x): first
    the stem was dropped without a word, then (review 11a) the fold was. Judged against the
    outputs' scale (fold.split_matches) the fold is kept, and its points are the float64 loop's."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(32, 3, 8, 8, generator=g) + 1.0
    y = torch.randint(0, 10, (32,), generator=g)
    model = Calibrated(x)
    d1, d2 = lw.random_directions(model, 2, seed=0)
    ev = lw.Evaluator(model, (x, y), [d1, d2], stem=True, strategy="loop")
    assert ev._prepare_stem() and _folded(ev.stem.suffix) == 3
    spec = (-0.5, 0.5, 3)
    for strategy in ("loop", "vmap"):
        surf = lw.compute_surface(model, (x, y), directions=(d1, d2), x=spec, y=spec,
                                  progress=False,
                                  evaluator_options={"stem": True, "strategy": strategy})
        assert surf.spec["plan"]["stem"], strategy
        want, _ = naive_surface(model, x, y, d1, d2, linspace(spec), linspace(spec))
        np.testing.assert_allclose(surf.loss, want, rtol=1e-5, atol=0, err_msg=strategy)


def _off(*args) -> torch.Tensor:
    """A fold gone wrong: :func:`conv_bn` plus 0.01."""
    return conv_bn(*args) + 0.01


def test_a_folded_suffix_the_safety_net_refuses_is_replaced_by_the_traced_one():
    """Whatever makes the folded suffix differ from the model, the stem stays, unfolded,
    and its points are the float64 loop's."""
    torch.manual_seed(0)
    model = ConvNet()
    x, y = torch.randn(24, 3, 8, 8), torch.randint(0, 5, (24,))
    d1, d2 = gaussian_direction(model, seed=1), gaussian_direction(model, seed=2)
    ev = lw.Evaluator(model, (x, y), [d1, d2], stem=True, strategy="loop")
    gm = ev.stem.suffix
    for node in gm.graph.nodes:
        if node.target is conv_bn:
            node.target = _off
    gm.recompile()
    assert ev._prepare_stem()
    assert _folded(ev.stem.suffix) == 0
    assert not any(n.target is _off for n in ev.stem.suffix.graph.nodes)
    xs = linspace((-1.0, 1.0, 3))
    got = ev.evaluate(np.array([(a, b) for b in xs for a in xs]))
    assert ev.plan.stem
    want, _ = naive_surface(model, x, y, d1, d2, xs, xs)
    np.testing.assert_allclose(got["loss"], want.ravel(), rtol=1e-5, atol=0)


def test_a_bfloat16_model_with_a_small_head_keeps_its_stem():
    """Review 11a: the class-major head (core/rewrite.py) of a bf16 Linear rounded otherwise
    than F.linear by more than the safety net allows, so such models always lost the stem."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(8 * 36, 5)).to(torch.bfloat16)
    x, y = torch.randn(16, 3, 6, 6, dtype=torch.bfloat16), torch.randint(0, 5, (16,))
    ev = lw.Evaluator(m, (x, y), lw.random_directions(m, 2, seed=0), stem=True,
                      strategy="loop")
    assert ev._prepare_stem()
    _stem_matches_native_loop(m, x, y, *lw.random_directions(m, 2, seed=0), rtol=2e-2)


def test_a_pair_is_folded_only_where_its_activations_outweigh_its_weights():
    """fold_pays: the fold reads and writes the convolution's weights, BatchNorm the pass's
    activations. 24 images of 8 x 8: b2's outputs are 21x c2's weights (folded); 2 images
    of 1 x 1: 0.03x (left as it is)."""
    model = ConvNet()
    for shape, folds in (((24, 3, 8, 8), 1), ((2, 3, 1, 1), 0)):
        x, y = torch.randn(*shape), torch.randint(0, 5, (shape[0],))
        ev = lw.Evaluator(model, (x, y), lw.random_directions(model, 2, seed=0), stem=True)
        assert ev.stem.folded == folds, shape


def _nudged(out: torch.Tensor) -> torch.Tensor:
    """A split gone wrong, not by the fold: every output moved by 0.05."""
    return out + 0.05


def _nudge(gm: fx.GraphModule) -> None:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        moved = gm.graph.call_function(_nudged, (out.args[0],))
    out.args = (moved,)
    gm.recompile()


def test_one_large_output_does_not_hide_a_wrong_split_behind_the_fold():
    """The scale-relative check is for the fold's rounding only: a logit of 1e4 made
    1e-4 of the largest output 1.0, and a split 0.05 off on every O(1) output (folded
    or not) passed as a folded suffix, keeping a wrong stem."""
    torch.manual_seed(0)
    model = ConvNet()
    with torch.no_grad():
        model.head.bias[0] = 1e4
    x, y = torch.randn(24, 3, 8, 8), torch.randint(0, 5, (24,))
    ev = lw.Evaluator(model, (x, y), lw.random_directions(model, 2, seed=0), stem=True,
                      strategy="loop")
    assert ev.stem.folded == 1
    _nudge(ev.stem.suffix)
    _nudge(ev.stem.unfolded)
    assert not ev._prepare_stem()
