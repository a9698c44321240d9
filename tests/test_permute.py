"""Permutation directions, the w-basin of Li, Li & Zhan 2024 (PAPERS.md (d) step 2).

The oracle is the network itself: ``theta + d`` must compute the same function as ``theta``
on random inputs (eval mode, float32 rounding), which no bookkeeping error in the
permutation survives. Each case also checks that the permutation really moves the units it
should (a direction of zeros would pass the equality), and that what an operation pins
(a layer norm, a concatenation, a skip from the input) stays where it is. The user's model
is compared bit for bit before and after (tests/snapshots.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from cases import bn_res_cnn, classification_data, reinit, tied_mlp
from snapshots import assert_same_snapshot, snapshot
from torch import nn
from torch.func import functional_call
from torchvision.models.resnet import Bottleneck, ResNet

import landscape_widget as lw


class FunctionalNet(nn.Module):
    """Layers called from a custom forward with functional activations and pooling."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 5, 3, padding=1)
        self.c2 = nn.Conv2d(5, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 2 * 2, 9)
        self.fc2 = nn.Linear(9, 3)

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.c1(x)), 2)
        h = F.gelu(self.bn(self.c2(h)))
        h = torch.flatten(F.adaptive_avg_pool2d(h, 2), 1)
        return self.fc2(torch.tanh(self.fc1(h)))


class MeanNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 6, 3)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(F.relu(self.c(x)).mean((2, 3)))


class ViewBN1d(nn.Module):
    """``x.view(x.size(0), -1)``, a BatchNorm1d over the flattened features, log_softmax."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm1d(6 * 6 * 6)
        self.fc = nn.Linear(6 * 6 * 6, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.relu(self.c(x))
        h = self.bn(h.view(h.size(0), -1))
        return F.log_softmax(self.out(torch.tanh(self.fc(h))), dim=1)


class GatedDepthwise(nn.Module):
    """A squeeze-and-excitation gate (elementwise product) and a depthwise residual conv."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.f1, self.f2 = nn.Linear(8, 4), nn.Linear(4, 8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.act = nn.PReLU(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.c(x))
        g = torch.sigmoid(self.f2(F.relu(self.f1(h.mean((2, 3))))))
        h = h * g[:, :, None, None]
        h = self.act(self.dw(h)) + h
        return self.head(h.mean((2, 3)))


class SharedHidden(nn.Module):
    """One hidden layer applied twice: its inputs and outputs share one permutation."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.b(torch.relu(self.a(x)))))))


class Pinned(nn.Module):
    """A layer norm, a concatenation and a skip from the input pin some units, not all."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)  # added to the input: pinned
        self.b = nn.Linear(4, 6)  # layer-normed: pinned
        self.norm = nn.LayerNorm(6)
        self.c = nn.Linear(6, 5)  # concatenated: pinned
        self.d = nn.Linear(10, 7)  # free
        self.e = nn.Linear(7, 2)

    def forward(self, x):
        h = self.norm(self.b(x + torch.relu(self.a(x))))
        h = torch.cat([torch.relu(self.c(h)), h[:, :5]], 1)
        return self.e(torch.tanh(self.d(h)))


class Sequence(nn.Module):
    """Linear layers on ``(N, T, F)``: units on the last dim, interleaved after a flatten."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(4 * 6, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))).flatten(1))


class LinearOverLength(nn.Module):
    """A Linear layer over the length of a Conv1d's output (not over its channels)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(3, 4, 1)
        self.l = nn.Linear(4, 4)
        self.o = nn.Linear(4 * 4, 2)

    def forward(self, x):
        return self.o(torch.relu(self.l(torch.relu(self.c(x)))).flatten(1))


class MeanOverUnits(nn.Module):
    """The mean over the last dim of a Linear layer's (N, T, C) output averages its units."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(5, 6), nn.Linear(4, 3)

    def forward(self, x):
        return self.c(torch.relu(self.a(x)).mean(2))


def _bn_stats(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm parameters and running statistics (a permutation must move them)."""
    return reinit(model, seed)


# name -> (factory, input shape, parameters that must stay put (pinned or at the output))
PERMUTABLE = {
    "demo-mlp": (lambda: lw.demo.mlp(), (64,), ()),
    "width-7": (lambda: lw.demo.mlp((64, 7, 10)), (64,), ()),
    "no-biases": (lambda: reinit(nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(),
                                               nn.Linear(5, 3, bias=False)), 1), (6,), ()),
    "deep-bn-mlp": (lambda: _bn_stats(lw.demo.mlp((12, 8, 6, 5, 4), bn=True), 2), (12,), ()),
    "demo-cnn-bn": (lambda: _bn_stats(lw.demo.cnn(bn=True, residual=False, width=4), 3),
                    (1, 8, 8), ()),
    "cnn-pool-flatten": (lambda: _bn_stats(nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.2),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 6), nn.Tanh(), nn.Linear(6, 3)), 4), (2, 8, 8), ()),
    "functional-forward": (lambda: _bn_stats(FunctionalNet(), 5), (3, 8, 8), ()),
    "spatial-mean": (lambda: reinit(MeanNet(), 6), (3, 5, 5), ()),
    "view-bn1d-log-softmax": (lambda: _bn_stats(ViewBN1d(), 7), (3, 8, 8), ()),
    "se-gate-depthwise-prelu": (lambda: reinit(GatedDepthwise(), 8), (3, 6, 6), ()),
    "shared-hidden-layer": (lambda: reinit(SharedHidden(), 9), (4,), ()),
    "residual-mlp": (lambda: lw.demo.mlp((8, 6, 6, 3), residual=True), (8,), ()),
    "residual-cnn": (lambda: _bn_stats(lw.demo.cnn(bn=True, residual=True), 10), (1, 8, 8),
                     ()),
    "bn-res-cnn": (lambda: bn_res_cnn(), (3, 8, 8), ()),
    "pinned": (lambda: reinit(Pinned(), 11), (4,),
               ("a.weight", "a.bias", "b.weight", "b.bias", "norm.weight", "c.weight")),
    "sequence-flatten": (lambda: reinit(Sequence(), 14), (4, 5), ()),
    "linear-over-length": (lambda: reinit(LinearOverLength(), 15), (3, 4),
                           ("c.weight", "c.bias")),
    "resnet18": (lambda: _bn_stats(torchvision.models.resnet18(num_classes=10), 12),
                 (3, 32, 32), ()),
    "resnet-bottleneck": (lambda: _bn_stats(ResNet(Bottleneck, [1, 1, 1, 1], num_classes=7), 13),
                          (3, 32, 32), ()),
}


def _endpoint(model: nn.Module, d: dict) -> dict:
    state = {k: v for k, v in model.state_dict().items() if torch.is_floating_point(v)}
    return {k: v + d[k] if k in d else v for k, v in state.items()}


@pytest.mark.parametrize("name", list(PERMUTABLE))
def test_permutation_endpoints_compute_the_same_function(name):
    factory, shape, fixed = PERMUTABLE[name]
    model = factory().eval()
    before = snapshot(model)
    x = torch.randn((8 if name.startswith("resnet") else 64, *shape),
                    generator=torch.Generator().manual_seed(1))
    d = lw.permutation_direction(model, seed=0)
    assert_same_snapshot(before, snapshot(model))
    assert set(d) == {k for k, _ in model.named_parameters()} | {
        k for k, b in model.named_buffers() if torch.is_floating_point(b)}
    checked = lw.permutation_direction(model, seed=0, check_inputs=x[:4])
    assert all(torch.equal(checked[k], d[k]) for k in d)
    with torch.no_grad():
        out0 = model(x)
        out1 = functional_call(model, _endpoint(model, d), (x,))
    scale = float(out0.abs().max())
    assert torch.allclose(out0, out1, atol=1e-5 * max(scale, 1.0), rtol=1e-5), \
        (out0 - out1).abs().max()
    for k in fixed:
        assert not d[k].any(), f"{k} is pinned but moved"
    # Every other weight moves: its rows, its columns or both are permuted.
    weights = [k for k, p in model.named_parameters() if p.dim() > 1 and k not in fixed]
    still = [k for k in weights if not d[k].any()]
    assert not still, f"weights that did not move: {still}"


def test_resnet_groups_follow_the_residual_stream():
    """In a ResNet the stem, every block's last BN and the stage's stream move alike."""
    model = torchvision.models.resnet18(num_classes=10).eval()
    theta = dict(model.named_parameters())

    def perm_of(key):  # recover the permutation of a BN's shift from theta and theta + d
        before, after = theta[key].detach(), theta[key].detach() + d[key]
        return [int((before == a).nonzero()[0]) for a in after]

    for n in range(64):  # distinct values, so the permutation is recoverable
        with torch.no_grad():
            model.bn1.bias[n] = n
            model.layer1[0].bn2.bias[n] = 100 + n
            model.layer1[1].bn2.bias[n] = 200 + n
            model.layer1[0].bn1.bias[n] = 300 + n
    d = lw.permutation_direction(model, seed=1)
    stream = perm_of("bn1.bias")
    assert perm_of("layer1.0.bn2.bias") == stream == perm_of("layer1.1.bn2.bias")
    assert perm_of("layer1.0.bn1.bias") != stream  # a block's inner channels: their own group
    assert sorted(stream) == list(range(64)) and all(stream[i] != i for i in range(64))
    assert not d["fc.bias"].any()  # the outputs stay


def test_permutation_moves_batchnorm_buffers_and_the_engine_follows():
    model, shape = PERMUTABLE["demo-cnn-bn"][0]().eval(), (1, 8, 8)
    d = lw.permutation_direction(model, seed=3)
    assert float(d["1.running_mean"].abs().sum()) > 0 and float(d["1.running_var"].abs().sum()) > 0
    x, y = classification_data(40, shape, 10, seed=7)
    curve = lw.compute_curve(model, (x, y), direction=d, x=(0, 1, 3), progress=False)
    assert curve.loss[0] == pytest.approx(curve.loss[2], abs=1e-6)
    # Without the buffers the end point normalises permuted channels with stale statistics.
    params_only = {k: v for k, v in d.items() if k in dict(model.named_parameters())}
    stale = lw.compute_curve(model, (x, y), direction=params_only, x=(0, 1, 3), progress=False)
    assert abs(stale.loss[2] - stale.loss[0]) > 1e-3
    assert set(lw.permutation_direction(model, buffers=False)) == set(params_only)


def test_resnet_curve_has_equal_ends():
    """Through the engine, on a BN ResNet: the w-basin's two ends have one loss."""
    model = bn_res_cnn().eval()
    x, y = classification_data(32, (3, 8, 8), 5, seed=2)
    d = lw.permutation_direction(model, seed=0)
    curve = lw.compute_curve(model, (x, y), direction=d, x=(0, 1, 5), progress=False)
    assert curve.loss[0] == pytest.approx(curve.loss[-1], rel=1e-5)
    # Halfway the network is no copy of either end (untrained, so no barrier is promised).
    assert abs(curve.loss[2] - curve.loss[0]) > 1e-3


def test_permutation_is_deterministic():
    model = lw.demo.mlp()
    a, b = lw.permutation_direction(model, seed=4), lw.permutation_direction(model, seed=4)
    c = lw.permutation_direction(model, seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


class SharedFromInput(nn.Module):
    """The first layer is applied to the input and to its own output: nothing can move."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.a(torch.relu(self.a(x))))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # control flow on values: torch.fx cannot trace it
            h = -h
        return self.b(h)


@pytest.mark.parametrize("model,match", [
    (nn.Linear(3, 2), "single Linear"),
    (nn.Sequential(nn.Linear(3, 4)), "1 Linear/Conv"),
    (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)), r"no hidden.*LayerNorm"),
    (nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(), nn.Conv2d(4, 2, 1)),
     r"no hidden.*2 groups"),
    (SharedFromInput(), "no hidden unit can be permuted"),
    (tied_mlp(), "tied weights"),
    (nn.Sequential(nn.Linear(3, 1), nn.ReLU(), nn.Linear(1, 2)), "single unit"),
    (nn.Sequential(nn.Linear(3, 4), nn.Softmax(-1), nn.Linear(4, 2)), r"no hidden.*Softmax"),
    (DataDependent(), "could not trace"),
    (MeanOverUnits(), r"no hidden.*reduces over dims"),
])
def test_permutation_refuses_what_it_cannot_permute(model, match):
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        lw.permutation_direction(model)
    assert_same_snapshot(before, snapshot(model))


def test_permutation_type_errors():
    with pytest.raises(TypeError, match="seed must be an int"):
        lw.permutation_direction(lw.demo.mlp(), seed=1.5)
    with pytest.raises(TypeError):
        lw.permutation_direction("not a model")


class CumsumInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=1))  # mixes units in their order


def test_check_inputs_catch_an_analysis_that_is_wrong(monkeypatch):
    """If the graph analysis were wrong, the check on real inputs says so (the safety net
    the widget relies on); here a cumulative sum is wrongly declared per-unit."""
    from landscape_widget.experiments import _permutation_groups as groups

    monkeypatch.setattr(groups, "_PER_UNIT_FUNCTIONS",
                        groups._PER_UNIT_FUNCTIONS | {torch.cumsum})
    model = reinit(CumsumInside(), 3).train()
    before = snapshot(model)
    lw.permutation_direction(model)  # unchecked: silently another function
    with pytest.raises(ValueError, match="computes another function"):
        lw.permutation_direction(model, check_inputs=torch.randn(8, 4))
    assert_same_snapshot(before, snapshot(model))
    assert model.training and all(m.training for m in model.modules())


def test_sample_inputs_reads_only_what_it_needs():
    from torch.utils.data import DataLoader, TensorDataset

    from landscape_widget.core.data import sample_inputs

    x, y = torch.randn(100, 3), torch.randint(0, 2, (100,))
    forms = {"tensors": (x, y), "dataset": TensorDataset(x, y),
             "data_fn": lambda: (x, y)}
    for form, data in forms.items():
        assert torch.equal(sample_inputs(data, 64), x[:64]), form
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    assert torch.equal(sample_inputs(loader, 64), x[:10])  # the first batch only
    with pytest.raises(ValueError, match="no batches"):
        sample_inputs(DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4))
