"""Review 5 findings on 2f1835b (trial points kept and pinned), 8da295d (the engine's
exp2 cross-entropy), 6572f6c + 4952fb8 (the stem's check against the set-up probe) and
e93a88d (one set-up forward also measures act_bytes), on models and settings nobody had
tested.

Oracles: torch's cross-entropy and argmax in float64 on the very logits the model
returns; the float64 per-point loop (tests/oracle.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import naive_eval
from torch import nn
from torch.func import functional_call

import landscape_widget as lw
from landscape_widget.core import plans, tuning
from landscape_widget.core.tuning import PlanTuner


class DictOut(nn.Module):
    """Returns ``{"logits": ...}``: the default loss goes through ``_stats``, not the
    batched cross-entropy."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return {"logits": self.net(x)}


def _float64_curve(net, x, y, d, coords):
    """Cross-entropy (mean) and accuracy of the model's own logits, in float64."""
    loss, acc = [], []
    for a in coords:
        params = {k: v + float(a) * d[k].to(v.dtype) if k in d else v
                  for k, v in net.named_parameters()}
        with torch.no_grad():
            out = functional_call(net, params, (x,))
        logits = (out["logits"] if isinstance(out, dict) else out).double()
        loss.append(F.cross_entropy(logits, y).item())
        acc.append((logits.argmax(-1) == y).double().mean().item())
    return np.array(loss), np.array(acc)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model,strategy", [("tensor", "loop"), ("tensor", "vmap"),
                                            ("dict", "loop")])
def test_r1_half_precision_models_losses_are_summed_in_float(dtype, model, strategy):
    """A model in bf16/fp16 returns half-precision logits: the loss must be the float64 mean
    of their cross-entropies (the engine sums in float64 whatever the precision), not a
    bf16 sum of bf16 per-sample losses (0.3 % off for 2000 samples before the fix)."""
    torch.manual_seed(0)
    net = (DictOut() if model == "dict" else
           nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 10)))
    net = net.to(dtype).eval()
    x, y = torch.randn(2000, 6).to(dtype), torch.randint(0, 10, (2000,))
    d = lw.random_directions(net, 1, seed=1)[0]
    # Without the linear stem: its bf16 sums of precomputed terms round otherwise than the
    # oracle's plain forward (2e-5 relative), and the sum of the losses is what is tested.
    curve = lw.compute_curve(net, (x, y), direction=d, x=(-1, 1, 3), progress=False,
                             evaluator_options={"strategy": strategy, "stem": False})
    want, acc = _float64_curve(net, x, y, d, curve.x)
    # Under vmap the model's own bf16 matmuls round differently from the oracle's plain
    # forward (3e-5 relative here), which is the model's precision, not the loss's sum.
    rtol = 1e-5 if strategy == "loop" else 3e-4
    np.testing.assert_allclose(curve.loss, want, rtol=rtol, atol=0)
    if strategy == "loop":
        np.testing.assert_array_equal(curve.accuracy, acc)


def flag_offset(h):
    """``h``, plus 1e-2 when oneDNN matmuls may use TF32 (``set_float32_matmul_precision``)."""
    return h + 1e-2 * (torch.backends.mkldnn.matmul.fp32_precision == "tf32")


torch.fx.wrap("flag_offset")  # read when it runs, not when the stem's split is traced


class FlagSensitive(nn.Module):
    """Computes differently under reduced-precision float32 flags, as a CUDA convolution
    does under the TF32 that torch enables for cuDNN by default (1e-3 relative; this CPU
    has no TF32, so the difference is made visible by hand)."""

    def forward(self, h):
        return flag_offset(h)


def test_r2_the_stems_check_compares_outputs_computed_under_the_same_float32_flags():
    """The stem's safety net compares the split model (run while evaluating, under the
    requested precision's flags: true fp32) with the set-up probe's outputs, which ran under
    the user's flags: with TF32 allowed there (torch's default for cuDNN) the two differ
    and the stem was refused for every such model. The probe now runs under the same flags;
    the values stay the fp32 oracle's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), FlagSensitive(), nn.ReLU(), nn.Linear(16, 3)).eval()
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    dirs = lw.random_directions(net, 2, seed=4)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # the user's choice: TF32 where it exists
    try:
        ev = lw.Evaluator(net, (x, y), list(dirs), stem=True, strategy="loop")
        coords = np.array([[0.0, 0.0], [0.5, -0.25], [-1.0, 1.0]])
        got = ev.evaluate(coords)["loss"]
        assert ev.plan.stem, ev.describe()["plan"]
        assert torch.get_float32_matmul_precision() == "high"  # given back
    finally:
        torch.set_float32_matmul_precision(saved)
    want, _ = naive_eval(net, x, y, list(dirs), coords)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)


@pytest.fixture
def vmap_wins(monkeypatch):
    """The trials run for real (real trial points) but report fixed seconds: vmap plans 1,
    loops over all data 1.5 (within PIN_SLOWDOWN: their trial points are pinned), others 5;
    every candidate is timed however loaded the machine."""
    monkeypatch.setattr(tuning, "TUNING_FLOOR", 1e3)
    real = PlanTuner._time_pass_once

    def timed(self, plan, c):
        real(self, plan, c)
        if plan.strategy == "vmap":
            return 1.0
        return 1.5 if plan.batch >= self.n and plan.layout == "contiguous" else 5.0

    monkeypatch.setattr(PlanTuner, "_time_pass_once", timed)
    plans.forget_plans()
    yield
    plans.forget_plans()


@pytest.mark.parametrize("executor", [False, True])
def test_r3_editing_a_results_spec_does_not_change_later_results(vmap_wins, executor):
    """spec["plan"]["pinned"] (and the other lists of the plan) was the very list the plan
    cache holds: a user clearing or editing it in their result changed which plan later
    calls use for those points, so a repeated call was no longer bit-identical (1e-7)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    kw = {"directions": lw.random_directions(net, 2, seed=8), "x": (-1, 1, 5),
          "y": (-1, 1, 5), "progress": False}
    pool = ThreadPoolExecutor(2) if executor else None
    try:
        if pool is not None:
            kw["executor"] = pool
        first = lw.compute_surface(net, (x, y), **kw)
        spec = first.spec["plan"]
        assert spec["pinned"], spec  # the plain loop's trial points
        pinned = [dict(p) for p in spec["pinned"]]
        spec["pinned"].clear()
        spec["candidates"].clear()
        again = lw.compute_surface(net, (x, y), **kw)
    finally:
        if pool is not None:
            pool.shutdown()
    assert again.spec["plan"]["pinned"] == pinned
    np.testing.assert_array_equal(first.loss, again.loss)
    np.testing.assert_array_equal(first.accuracy, again.accuracy)
