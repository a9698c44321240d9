"""Precision, the planner and compiled evaluation (issue 15, items 1-3), against the float64 oracle.

Tolerances: fp32 agrees with the float64 oracle within 1e-5 relative; bf16 (autocast on the
CPU, outputs cast to float32 before the loss) within 3e-2 relative on the loss, which is
bf16's 8-bit mantissa (relative step 2**-8 = 3.9e-3) accumulated over a few layers.
"""

from __future__ import annotations

import concurrent.futures
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import landscape_widget as lw
from landscape_widget.core.evaluate import Evaluator
from landscape_widget.core.plans import forget_plans, free_memory
from landscape_widget.core.precision import precision_flags
from tests.cases import gaussian_direction
from tests.flag_threads import flags_held_in_thread
from tests.oracle import linspace, naive_surface
from tests.snapshots import assert_same_snapshot, snapshot

BF16_RTOL = 3e-2
GRID = ((-1, 1, 5), (-1, 1, 4))


def _cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 3 * 3, 5))
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 5, (64,))
    return model, x, y


class LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 12, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, tokens):
        out, _ = self.lstm(self.emb(tokens))
        return self.head(out[:, -1])


def _lstm():
    torch.manual_seed(1)
    return LSTMClassifier(), torch.randint(0, 20, (48, 6)), torch.randint(0, 3, (48,))


def _surface(model, x, y, **kw):
    d1, d2 = gaussian_direction(model, 1, 0.3), gaussian_direction(model, 2, 0.3)
    surf = lw.compute_surface(model, (x, y), directions=(d1, d2), x=GRID[0], y=GRID[1],
                              progress=False, **kw)
    loss, acc = naive_surface(model, x, y, d1, d2, linspace(GRID[0]), linspace(GRID[1]))
    return surf, loss, acc


@pytest.mark.parametrize("build", [_cnn, _lstm], ids=["cnn-bn", "lstm"])
def test_fp32_is_exact_and_bf16_within_tolerance(build):
    model, x, y = build()
    before = snapshot(model)
    surf, loss, acc = _surface(model, x, y)
    np.testing.assert_allclose(surf.loss, loss, rtol=1e-5)
    np.testing.assert_allclose(surf.accuracy, acc, atol=1e-12)
    assert surf.spec["precision"] == "fp32" and surf.spec["precision_error"] is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        low, _, _ = _surface(model, x, y, precision="bf16")
    assert_same_snapshot(before, snapshot(model))
    if low.spec["precision"] == "fp32":
        # oneDNN has no bf16 LSTM on CPUs without bf16 instructions (this machine's AMD
        # EPYC): the result says so, with a warning, and is the exact one.
        assert build is _lstm, low.spec["plan"]["precision_note"]
        assert "bf16 failed" in low.spec["plan"]["precision_note"]
        assert any("precision='bf16' failed" in str(w.message) for w in caught)
        np.testing.assert_allclose(low.loss, loss, rtol=1e-5)
        return
    np.testing.assert_allclose(low.loss, loss, rtol=BF16_RTOL)
    assert low.spec["precision"] == "bf16" and low.spec["plan"]["precision"] == "bf16"
    assert not np.array_equal(low.loss, surf.loss), "bf16 computed in fp32"
    # The measured error: |bf16 - fp32| at 3 points of this grid, so it is positive and
    # at most the largest difference over the whole grid (fp32 re-evaluated: 1e-6 slack).
    err = low.spec["precision_error"]
    assert 0 < err <= np.abs(low.loss - surf.loss).max() + 1e-6


def test_fp32_accumulates_in_float64_under_bf16():
    """Sums over many batches stay exact: the loss is a float64 mean of float32 batch losses."""
    model, x, y = _cnn()
    surf, loss, _ = _surface(model, x, y, precision="bf16",
                             evaluator_options={"batch_size": 8, "strategy": "loop"})
    np.testing.assert_allclose(surf.loss, loss, rtol=BF16_RTOL)


def test_precision_errors_are_clear():
    model, x, y = _cnn()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        lw.compute_surface(model, (x, y), x=(-1, 1, 3), y=(-1, 1, 3), progress=False,
                           precision="fp16")
    with pytest.raises(ValueError, match="choose one of"):
        Evaluator(model, (x, y), [gaussian_direction(model, 1)], precision="half")
    with pytest.raises(ValueError, match="compile="):
        Evaluator(model, (x, y), [gaussian_direction(model, 1)], compile="yes")


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_flags_set_while_computing_and_restored(device):
    """fp32 switches TF32 off, tf32 on (CUDA); the user's settings come back, also after an
    error. Only the flags are touched, so this runs without a GPU."""
    b = torch.backends
    nodes = ((b.cuda.matmul, b.cudnn.conv, b.cudnn.rnn) if device == "cuda"
             else (b.mkldnn.matmul, b.mkldnn.conv, b.mkldnn.rnn))
    saved = [n.fp32_precision for n in nodes]
    legacy = torch._C._get_cudnn_allow_tf32(), torch._C._get_cublas_allow_tf32()
    try:
        nodes[0].fp32_precision = "tf32" if device == "cuda" else "bf16"  # a user's choice
        user = [n.fp32_precision for n in nodes]
        with precision_flags("fp32", torch.device(device)):
            assert all(n.fp32_precision == "ieee" for n in nodes)
        assert [n.fp32_precision for n in nodes] == user
        with pytest.raises(KeyError), precision_flags("tf32", torch.device(device)):
            want = "tf32" if device == "cuda" else "ieee"
            assert all(n.fp32_precision == want for n in nodes)
            raise KeyError("boom")
        assert [n.fp32_precision for n in nodes] == user
    finally:
        for n, v in zip(nodes, saved, strict=True):
            n.fp32_precision = v
    assert (torch._C._get_cudnn_allow_tf32(), torch._C._get_cublas_allow_tf32()) == legacy


def test_fp32_computes_with_ieee_flags_and_restores_them():
    """A forward hook sees exact fp32 flags on the CPU; the user's flags are back after."""
    model, x, y = _cnn()
    seen = []
    node = torch.backends.mkldnn.matmul
    saved = node.fp32_precision
    try:
        node.fp32_precision = "bf16"
        ev = Evaluator(model, (x, y), [gaussian_direction(model, 1)])
        ev.module.register_forward_hook(lambda *a: seen.append(node.fp32_precision))
        ev.evaluate(np.zeros((2, 1)))
        assert node.fp32_precision == "bf16"
    finally:
        node.fp32_precision = saved
    assert seen and set(seen) == {"ieee"}


def test_plan_times_plain_loop_first_and_is_reused():
    model, x, y = _cnn()
    forget_plans()
    surf, loss, _ = _surface(model, x, y)
    plan = surf.spec["plan"]
    # The plain loop over all 64 samples in one pass is always a candidate, timed first.
    assert plan["candidates"][0]["plan"] == "loop B=64"
    assert all(np.isfinite(c["seconds_per_point"]) for c in plan["candidates"])
    assert plan["reason"] and plan["label"]
    best = min(c["seconds_per_point"] for c in plan["candidates"])
    assert plan["seconds_per_point"] == pytest.approx(best)
    again, _, _ = _surface(model, x, y)
    assert again.spec["plan"]["reason"].startswith("reused")
    assert again.spec["plan"]["label"] == plan["label"]
    assert plan["tuning_seconds"] > 0 and again.spec["plan"]["tuning_seconds"] == 0
    np.testing.assert_array_equal(again.loss, surf.loss)  # the same plan: bit-identical


def test_memory_budget_from_measured_activations():
    """The plain loop takes the largest batch that fits: budget // activations per sample."""
    model, x, y = _cnn()
    ev = Evaluator(model, (x, y), [gaussian_direction(model, 1)], memory_budget=1 << 16)
    want = (1 << 16) // ev.act_bytes
    assert 1 <= want < 64
    assert ev._plain_plan().batch <= want
    ev.expected_points = 9
    np.testing.assert_allclose(
        ev.evaluate(np.array([[0.0], [0.5]]))["loss"],
        Evaluator(model, (x, y), [gaussian_direction(model, 1)]).evaluate(
            np.array([[0.0], [0.5]]))["loss"], rtol=1e-6)
    assert free_memory(torch.device("cpu")) > 1 << 20
    default = Evaluator(model, (x, y), [gaussian_direction(model, 1)])
    assert default._plain_plan().batch == 64  # all data fits the machine's memory


def test_executor_tiles_carry_precision():
    model, x, y = _cnn()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        surf = lw.compute_surface(model, (x, y), x=(-1, 1, 3), y=(-1, 1, 3), progress=False,
                                  precision="bf16", executor=pool)
    assert surf.spec["precision"] == "bf16"
    assert surf.spec["precision_error"] is not None and surf.spec["precision_error"] > 0


def test_compile_auto_skips_small_grids():
    model, x, y = _cnn()
    surf, loss, _ = _surface(model, x, y, compile="auto")
    assert not surf.spec["plan"]["compiled"]
    assert "not compiled" in surf.spec["plan"]["compile_note"]
    np.testing.assert_allclose(surf.loss, loss, rtol=1e-5)


def test_compiled_matches_oracle():
    """torch.compile on the CPU (needs a C++ compiler). One small test: the first compile
    of a process costs ~10-40 s on two shared cores, so only this one compiles."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(40, 6), torch.randint(0, 4, (40,))
    before = snapshot(model)
    surf, loss, acc = _surface(model, x, y, compile=True)
    assert_same_snapshot(before, snapshot(model))
    plan = surf.spec["plan"]
    assert plan["compiled"], plan["compile_note"]
    assert plan["strategy"] == "loop"
    np.testing.assert_allclose(surf.loss, loss, rtol=1e-5)
    np.testing.assert_allclose(surf.accuracy, acc, atol=1e-12)


def test_widget_spec_carries_precision():
    """The widget's precision control: a spec field like every other (the front end sends
    each field of the schema), validated against the engine's precisions."""
    from landscape_widget.core.precision import PRECISIONS
    from landscape_widget.widget.protocol import ProtocolError, Spec, parse_spec
    from landscape_widget.widget.spec import schema

    assert schema()["choices"]["precision"] == list(PRECISIONS)
    raw = Spec(resolution=5).to_dict()
    assert parse_spec(raw).precision == "fp32"
    assert parse_spec({**raw, "precision": "bf16"}).precision == "bf16"
    with pytest.raises(ProtocolError, match="precision"):
        parse_spec({**raw, "precision": "half"})
    del raw["precision"]
    with pytest.raises(ProtocolError, match="precision"):
        parse_spec(raw)


def test_reuse_refuses_another_precision():
    model, x, y = _cnn()
    low = lw.compute_surface(model, (x, y), x=(-1, 1, 3), y=(-1, 1, 3), progress=False,
                             precision="bf16")
    with pytest.raises(ValueError, match="precision"):
        lw.compute_surface(model, (x, y), x=(-1, 1, 5), y=(-1, 1, 5), progress=False,
                           reuse=low)
    again = lw.compute_surface(model, (x, y), x=(-1, 1, 5), y=(-1, 1, 5), progress=False,
                               precision="bf16", reuse=low)
    assert again.spec["reused"] == 9


def test_flags_nested_and_from_two_threads():
    """An fp32 check inside a tf32 run gets tf32 back after it; two threads overlapping
    leave the user's values once both have ended."""

    nodes = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)
    user = [n.fp32_precision for n in nodes]
    cuda = torch.device("cuda")
    with precision_flags("tf32", cuda):
        with precision_flags("fp32", cuda):
            assert nodes[1].fp32_precision == "ieee"
        assert all(n.fp32_precision == "tf32" for n in nodes)
    assert [n.fp32_precision for n in nodes] == user
    with flags_held_in_thread(cuda) as (leave, t), precision_flags("fp32", cuda):
        leave.set()  # the other thread leaves first, while this one still computes
        t.join(10)
        assert all(n.fp32_precision == "ieee" for n in nodes)
    assert [n.fp32_precision for n in nodes] == user


def test_widget_computes_at_its_precision():
    """The widget's precision reaches the engine: its surface equals compute_surface's at
    that precision, records it, and a change of precision computes every point again."""
    model, x, y = _cnn()
    w = lw.LandscapeWidget(model, (x, y), resolution=5, precision="bf16", seed=3)
    try:
        got = w.wait(120)
        assert got is not None and got.spec["precision"] == "bf16", w.status
        d = lw.random_directions(model, 2, seed=3)
        ref = lw.compute_surface(model, (x, y), directions=d, x=(-1, 1, 5), y=(-1, 1, 5),
                                 precision="bf16", progress=False)
        np.testing.assert_allclose(got.loss, ref.loss, rtol=1e-6)
        w.precision = "fp32"
        exact = None
        for _ in range(600):  # the debounced job replaces the bf16 result
            exact = w.wait(120)
            if exact is not None and exact.spec["precision"] == "fp32":
                break
            time.sleep(0.05)
        assert exact.spec["precision"] == "fp32" and exact.spec["reused"] == 0, w.status
    finally:
        w.close()


def test_widget_offers_only_the_precisions_of_its_device():
    """M5: a CPU widget offers no fp16 (its select is built from ``_spec_schema``); asking
    for it anyway, from Python, a state update or a compute message, is refused with the
    reason and the fix, and nothing is computed. The rule is core.precision's alone."""
    import traitlets

    from landscape_widget.core.precision import PRECISIONS, available_precisions, check_precision
    from landscape_widget.widget.models import compute_device
    from landscape_widget.widget.protocol import Spec
    from landscape_widget.widget.spec import schema
    from tests.widget_cases import FakeFrontEnd

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for device in (cpu, cuda):  # the offer is exactly what check_precision accepts
        ok = []
        for p in PRECISIONS:
            try:
                ok.append(check_precision(p, device))
            except ValueError:
                pass
        assert available_precisions(device) == tuple(ok)
        assert schema(device)["choices"]["precision"] == ok
    assert "fp16" not in available_precisions(cpu) and "fp16" in available_precisions(cuda)
    model, x, y = _cnn()
    assert compute_device(model, None, None) == cpu
    assert compute_device(model, "cuda", None) == cuda
    # With an executor the workers pick their device (their GPU if any): all are offered.
    assert compute_device(model, None, object()) is None
    assert schema(None)["choices"]["precision"] == list(PRECISIONS)

    with pytest.raises(ValueError, match="needs a CUDA device.*bf16"):
        lw.LandscapeWidget(model, (x, y), precision="fp16", autostart=False)
    w = lw.LandscapeWidget(model, (x, y), resolution=3, autostart=False)
    try:
        assert w._spec_schema["choices"]["precision"] == ["fp32", "tf32", "bf16"]
        assert w._spec_schema["fit"]  # the rest of the schema is unchanged
        front = FakeFrontEnd(w)
        with pytest.raises(traitlets.TraitError, match="needs a CUDA device"):
            w.precision = "fp16"
        w.set_state({"precision": "fp16"})  # the select's value, if a stale page sent it
        assert w.precision == "fp32"
        spec = {**Spec(resolution=3).to_dict(), "precision": "fp16"}
        w.handle_message({"kind": "compute", "id": "h", "spec": spec})
        errors = [e["message"] for e in front.errors()]
        assert len(errors) == 2 and all("precision='fp16' needs a CUDA device" in e and
                                        "use precision='bf16'" in e for e in errors), errors
        assert "start" not in front.kinds() and w.precision == "fp32" and not w.busy
        w.precision = "bf16"  # a possible one still is accepted
        assert w.spec().precision == "bf16"
    finally:
        w.close()


def test_bf16_note_says_whether_the_cpu_computes_bf16(monkeypatch):
    """spec['plan']['precision_note'] of a CPU bf16 surface says whether this CPU has bf16
    instructions (emulated bf16 was 10-21x slower than fp32 on one without), read from its
    /proc/cpuinfo flags."""
    from landscape_widget.core import precision

    assert precision.cpu_has_bf16("processor : 0\nflags : fpu sse avx512f amx_bf16\n")
    assert not precision.cpu_has_bf16("processor : 0\nflags : fpu sse avx2\n")
    cpu = torch.device("cpu")
    for native, words in [(False, "no bf16 instructions"), (True, "natively"), (None, "")]:
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda native=native: native)
        note = precision.precision_note("bf16", cpu)
        assert note.startswith("forward under torch.autocast('cpu', bf16)")
        assert words in note and (native is not None or "instructions" not in note)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    s = lw.compute_surface(model, (x, y), x=(-1, 1, 2), y=(-1, 1, 2), precision="bf16",
                           progress=False)
    assert "no bf16 instructions" in s.spec["plan"]["precision_note"]
    assert "no bf16" not in precision.precision_note("fp32", cpu)
