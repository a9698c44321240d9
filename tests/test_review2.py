"""Review round 2 (helper rev2): failing tests for the findings in /work/notes/rev2-findings.md.

Each test states a property of the documented behaviour against an independent oracle
(the float64 per-point loop of tests/oracle.py, torch's own flag readers, the widget's
documented fixed-subset rule). Every test failed on main at 840010b.
"""

from __future__ import annotations

import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from oracle import linspace, naive_surface
from torch import nn

import landscape_widget as lw
from landscape_widget.core import fp32_flags, plans
from landscape_widget.core.precision import precision_flags

# --- R1: core/rewrite.py replaces a ReLU whose forward the user replaced ----------------------

def _clipped(self, x):
    """A ReLU6 made from an nn.ReLU instance (its forward replaced, as patching libraries do)."""
    return torch.clamp(x, 0.0, 6.0)


def test_a_relu_with_a_replaced_forward_is_not_rewritten_to_relu_():
    """The stem's rewrite turns every nn.ReLU of a fresh tensor into torch.relu_, looking at
    type(mod) and its hooks only: an instance whose forward was replaced (here clamping at 6)
    silently loses it. At the base point no activation reaches 6, so the stem's safety net
    (2 samples, base point) passes; far from it the loss is ~2.6x the truth."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    net[1].forward = types.MethodType(_clipped, net[1])
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    d1, d2 = lw.random_directions(net, 2, seed=0)
    axis = (-20.0, 20.0, 3)
    want, _ = naive_surface(net, x, y, d1, d2, linspace(axis), linspace(axis))
    for strategy in ("loop", "vmap"):
        plans.forget_plans()
        surf = lw.compute_surface(net, (x, y), directions=(d1, d2), x=axis, y=axis,
                                  progress=False,
                                  evaluator_options={"stem": True, "strategy": strategy})
        np.testing.assert_allclose(surf.loss, want, rtol=1e-5, err_msg=strategy)


def test_an_avgpool_with_a_replaced_forward_is_not_rewritten():
    """Same for nn.AvgPool2d(k): its forward replaced (here the mean clipped at 6) is
    computed as the plain mean of strided views (rewrite.avg_pool2d)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(4 * 16, 3)).eval()
    net[1].forward = types.MethodType(
        lambda self, x: nn.functional.avg_pool2d(x, self.kernel_size).clamp(max=6.0), net[1])
    x, y = torch.randn(30, 1, 8, 8), torch.randint(0, 3, (30,))
    d1, d2 = lw.random_directions(net, 2, seed=0)
    axis = (-20.0, 20.0, 3)
    want, _ = naive_surface(net, x, y, d1, d2, linspace(axis), linspace(axis))
    plans.forget_plans()
    surf = lw.compute_surface(net, (x, y), directions=(d1, d2), x=axis, y=axis,
                              progress=False, evaluator_options={"stem": True,
                                                                 "strategy": "loop"})
    np.testing.assert_allclose(surf.loss, want, rtol=1e-5)


# --- R2: core/fp32_flags.read() writes process-wide CUDA flags during a CPU computation ------

def _cuda_side():
    """What a CUDA computation in another thread would use / read right now."""
    out = [torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
           torch.backends.cudnn.rnn.fp32_precision]
    for reader in (torch.get_float32_matmul_precision,
                   lambda: torch.backends.cuda.matmul.allow_tf32):
        try:
            out.append(reader())
        except RuntimeError:
            out.append("raises")
    return tuple(out)


def test_a_cpu_computation_never_changes_the_cuda_flags_even_for_a_moment(monkeypatch):
    """With torch's documented new API set to true fp32 (torch.backends.fp32_precision =
    "ieee"), entering a CPU computation (fp32_flags.read -> own_value / _probe) flips the
    generic node and cuDNN's conv/rnn to "tf32" for a moment: a GPU computation of the user
    in another thread runs in TF32 meanwhile, and get_float32_matmul_precision() /
    cuda.matmul.allow_tf32 raise (the F5 crash). Seen after every single flag write."""
    saved = torch.backends.fp32_precision
    torch.backends.fp32_precision = "ieee"
    seen = []
    real_set = fp32_flags._set

    def recording_set(backend, op, value):
        real_set(backend, op, value)
        seen.append(((backend, op, value), _cuda_side()))

    try:
        user = _cuda_side()
        monkeypatch.setattr(fp32_flags, "_set", recording_set)
        with precision_flags("fp32", torch.device("cpu")):
            pass
        monkeypatch.setattr(fp32_flags, "_set", real_set)
        changed = [(write, state) for write, state in seen if state != user]
        assert not changed, f"user's CUDA side {user}; after these writes: {changed[:3]}"
        assert _cuda_side() == user
    finally:
        monkeypatch.setattr(fp32_flags, "_set", real_set)
        torch.backends.fp32_precision = saved


def test_a_flag_the_user_sets_during_a_computation_is_not_half_reverted():
    """The user runs torch.set_float32_matmul_precision("medium") in the notebook while the
    widget computes on the CPU. After the computation, get_float32_matmul_precision() says
    "medium" but the CPU's matmul node is back to the saved value: CPU matmuls run in fp32
    while torch reports bf16 (torch itself sets mkldnn.matmul to "bf16" for "medium")."""
    before = fp32_flags.read()
    try:
        with precision_flags("fp32", torch.device("cpu")):
            torch.set_float32_matmul_precision("medium")
        state = (torch.get_float32_matmul_precision(),
                 torch.backends.mkldnn.matmul.fp32_precision)
        assert state == ("medium", "bf16"), state
    finally:
        fp32_flags.apply(before, fp32_flags.read())


# --- R3: the widget's fixed subset with an executor's data_fn smaller than the subset -------

N_SMALL = 600


def small_data_fn():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N_SMALL, 6, generator=g), torch.randint(0, 3, (N_SMALL,), generator=g)


def test_a_fixed_subset_larger_than_an_executors_data_fn_is_exact_not_an_error():
    """samples="1k" on 600 samples is exact with a note (widget/grid_job._samples_note) for
    tensors, locally or on an executor, and for a local data_fn; for a data_fn on an
    executor the job fails with "samples=1000 exceeds the 600 samples ... or samples=None",
    a fix the widget's user cannot apply (there is no samples= in the widget)."""
    from widget_cases import Recorder

    from landscape_widget.widget.protocol import Spec
    from landscape_widget.widget.worker import Worker

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    rec, statuses = Recorder(), []
    with ThreadPoolExecutor(1) as pool:
        worker = Worker(model, small_data_fn, send=rec, tile_points=5, executor=pool,
                        on_status=statuses.append)
        try:
            worker.submit("j", Spec(resolution=3, seed=3, samples="1k"))
            assert worker.wait(120)
        finally:
            worker.close()
    errors = [m["message"] for m, _ in rec.of("j", "error")]
    assert not errors, errors
    assert worker.latest.spec["samples"] is None
    assert "all of them were used (exact)" in statuses[-1]["message"]


# --- R4: a computation of <= 2 points caches an untuned plan for every later grid ------------

def test_a_one_point_computation_does_not_stop_a_later_grid_from_being_tuned():
    """compute_surface on 1 point caches "the plain loop: 2 points or fewer, nothing to tune"
    with complete=True, so a later 9 x 9 grid of the same model and data reuses it without
    timing any candidate (_cached_plan only re-tunes size-limited searches)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    d = lw.random_directions(net, 2, seed=0)
    plans.forget_plans()
    lw.compute_surface(net, (x, y), directions=d, x=(0, 0, 1), y=(0, 0, 1), progress=False)
    surf = lw.compute_surface(net, (x, y), directions=d, x=(-1, 1, 9), y=(-1, 1, 9),
                              progress=False)
    assert "nothing to tune" not in surf.spec["plan"]["reason"], surf.spec["plan"]["reason"]
    assert surf.spec["plan"]["candidates"], "the 81-point grid timed no plan"
