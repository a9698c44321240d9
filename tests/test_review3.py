"""Review 3 findings on the changes since f00a637 (engine cross-entropy, class-major head,
stem buffer, plan searches, fingerprint pool, curvature subsets).

Oracles: torch's own ``F.cross_entropy`` in float64 and the float64 per-point loop
(tests/oracle.py).
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


def _confident(shift: float):
    """Logits of 512 samples whose target leads by ~9 (loss ~3e-3), all shifted by ``shift``."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 512, 10, generator=gen)
    y = torch.randint(0, 10, (512,), generator=gen)
    logits[0, torch.arange(512), y] += 9
    return logits + shift, y


@pytest.mark.parametrize("shift", [30.0, 1000.0])
def test_r2_batched_cross_entropy_keeps_float32_accuracy_for_large_logits(shift):
    """R2: ``lse = log(sum) + top`` then ``lse - picked`` cancels two numbers of the
    logits' size, so small per-sample losses lose the precision torch's
    ``(x - max) - log(sum)`` keeps: mean loss relative error 1.5e-5 at logits ~30 and
    1.8e-4 at ~1000 (torch's float32: ~1e-7)."""
    logits, y = _confident(shift)
    want = F.cross_entropy(logits[0].double(), y, reduction="none")
    torch_f32 = F.cross_entropy(logits[0], y, reduction="none").double()
    for stored in (logits, logits.transpose(1, 2).contiguous().transpose(1, 2)):
        loss, _ = batched_cross_entropy(stored, y)
        err = abs(float(loss.double().mean() / want.mean()) - 1)
        assert err < max(3e-6, 10 * abs(float(torch_f32.mean() / want.mean()) - 1))
        torch.testing.assert_close(loss[0].double(), want, rtol=1e-5, atol=5e-7)


def test_r2_engine_surface_of_a_confident_model_with_a_large_logit_offset():
    """R2 through the engine: a head bias of +1000 on every class (the loss is unchanged)
    must still match the float64 loop to 1e-5 (before the fix: 3.9e-5; after: 2.9e-6)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 6, generator=gen)
    with torch.no_grad():
        net[2].weight.mul_(30)
        y = net(x).argmax(-1)
        net[2].bias.add_(1000.0)
    d = list(lw.random_directions(net, 2, seed=0))
    coords = np.array([[0.0, 0.0], [0.001, -0.001], [0.002, 0.001]])
    plans.forget_plans()
    got = lw.Evaluator(net, (x, y), d, stem=True, strategy="vmap").evaluate(coords)
    want, _ = naive_eval(net, x, y, d, coords)
    np.testing.assert_allclose(got["loss"], want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("bad", [5, -1])
def test_r1_out_of_range_target_past_the_probe_still_names_the_target(bad):
    """R1: a class index out of range after the first 8 samples (the probe) used to raise
    torch's ``IndexError: Target 5 is out of bounds.``; the engine's cross-entropy now
    raises ``RuntimeError: index 5 is out of bounds for dimension 2 with size 3`` from its
    ``gather``, which names neither the targets nor the fix."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(64, 6)
    y = torch.zeros(64, dtype=torch.long)
    y[20] = bad
    with pytest.raises(IndexError, match=f"[Tt]arget {bad}"):
        lw.compute_surface(net, (x, y), x=(-1, 1, 3), y=(-1, 1, 3), progress=False)


class MaskedClassZero(nn.Module):
    """A classifier that rules class 0 out with a -inf logit (action masking, say)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 4)

    def forward(self, x):
        out = self.fc2(torch.relu(self.fc1(x)))
        minus_inf = torch.full_like(out[:, :1], float("-inf"))
        return torch.cat([minus_inf, out[:, 1:]], dim=1)


def test_r3_ignored_target_with_a_minus_inf_class_zero_logit_counts_zero():
    """R3: an ignored target (-100) is gathered as class 0; where class 0's logit is -inf
    its loss is +inf, and ``inf * 0`` (the mask of counted targets) is NaN: the whole
    point's loss turns NaN where torch's cross-entropy (and the engine before f00a637)
    gives the finite mean over the counted targets."""
    logits = torch.tensor([[[float("-inf"), 1.0, 2.0], [float("-inf"), 0.5, 0.0]]])
    y = torch.tensor([-100, 2])
    loss, hit = batched_cross_entropy(logits, y)
    want = F.cross_entropy(logits[0].double(), y, reduction="none")
    torch.testing.assert_close(loss[0].double(), want)
    torch.manual_seed(0)
    net = MaskedClassZero().eval()
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(40, 6, generator=gen), torch.randint(1, 4, (40,), generator=gen)
    y[::5] = -100
    d = list(lw.random_directions(net, 2, seed=1))
    coords = np.array([[0.0, 0.0], [0.5, -0.5]])
    plans.forget_plans()
    got = lw.Evaluator(net, (x, y), d, strategy="vmap").evaluate(coords)
    want, _ = naive_eval(net, x, y, d, coords, loss_fn=F.cross_entropy)
    np.testing.assert_allclose(got["loss"], want, rtol=1e-5, atol=0)


def test_r4_uint8_class_156_is_not_the_ignore_index():
    """R4: with uint8 targets ``y != -100`` compares against -100 cast to uint8, which is
    156: class 156 of a 200-class task (Tiny ImageNet labels stored as uint8) counts as
    ignored. Torch's cross-entropy counts it. (Before f00a637 the loss's denominators
    dropped it while torch's loss summed it: also wrong, another value.)"""
    logits = torch.randn(1, 3, 210, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([156, 3, 200])
    loss, _ = batched_cross_entropy(logits, y.to(torch.uint8))
    torch.testing.assert_close(loss[0].double(),
                               F.cross_entropy(logits[0].double(), y, reduction="none"))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=gen), torch.randint(0, 200, (64,), generator=gen)
    y[::4] = 156
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 200)).eval()
    d = list(lw.random_directions(net, 2, seed=0))
    coords = np.array([[0.0, 0.0], [0.5, 0.5]])
    plans.forget_plans()
    got = lw.Evaluator(net, (x, y.to(torch.uint8)), d).evaluate(coords)
    want, want_acc = naive_eval(net, x, y, d, coords)
    np.testing.assert_allclose(got["loss"], want, rtol=1e-5, atol=0)
    np.testing.assert_allclose(got["accuracy"], want_acc, atol=1e-12)
