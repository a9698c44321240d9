"""Torch's float32 flags under ``precision_flags`` (core/fp32_flags.py), without a GPU.

The CUDA flags live in the CPU process, so a CUDA build of torch sets and reads them with no
GPU; what they do to arithmetic is checked by the CUDA-only test at the end. The oracle for
"restored exactly" is what torch itself reads: every node, every legacy reader (its value
or that it raises), and which nodes inherit (they follow a change of the generic node).
"""

from __future__ import annotations

import threading

import pytest
import torch

from landscape_widget.core.precision import precision_flags
from tests.flag_threads import flags_held_in_thread

B = torch.backends
NODES = {"cuda.matmul": B.cuda.matmul, "cudnn.conv": B.cudnn.conv, "cudnn.rnn": B.cudnn.rnn,
         "mkldnn.matmul": B.mkldnn.matmul, "mkldnn.conv": B.mkldnn.conv,
         "mkldnn.rnn": B.mkldnn.rnn}
LEGACY = {"cuda.matmul.allow_tf32": lambda: B.cuda.matmul.allow_tf32,
          "cudnn.allow_tf32": lambda: B.cudnn.allow_tf32,
          "get_float32_matmul_precision": torch.get_float32_matmul_precision}
ALL = {"generic": ("generic", "all"), "cuda.all": ("cuda", "all"),
       "mkldnn.all": ("mkldnn", "all")}


def _read(fn):
    try:
        return fn()
    except RuntimeError:
        return "raises"


def fingerprint() -> dict:
    """Every flag as torch reads it, and what each node reads under another generic value."""
    out = {k: n.fp32_precision for k, n in NODES.items()}
    out |= {k: _read(f) for k, f in LEGACY.items()}
    out |= {k: torch._C._get_fp32_precision_getter(*key) for k, key in ALL.items()}
    generic = out["generic"]
    for probe in ("ieee", "tf32"):
        B.fp32_precision = probe
        out |= {f"{k} under generic {probe}": n.fp32_precision for k, n in NODES.items()}
    B.fp32_precision = generic
    return out


def factory_flags() -> None:
    """Torch's flags as a fresh process reads them (its cudnn conv/rnn "tf32" is an internal
    default that yields to a generic value; no setter brings that back: see the subprocess
    test below)."""
    for key in ALL.values():
        torch._C._set_fp32_precision_setter(*key, "none")
    B.cudnn.allow_tf32 = True  # conv and rnn "tf32"
    B.cuda.matmul.allow_tf32 = False  # "highest"
    for n in (B.cuda.matmul, B.mkldnn.matmul, B.mkldnn.conv, B.mkldnn.rnn):
        n.fp32_precision = "none"


@pytest.fixture(autouse=True)
def _fresh_flags():
    factory_flags()
    yield
    factory_flags()


def _legacy_api_tf32():  # the legacy API only: consistent
    B.cuda.matmul.allow_tf32 = True
    B.cudnn.allow_tf32 = False


def _medium():  # mkldnn.matmul bf16 (the CPU), cuda.matmul tf32
    torch.set_float32_matmul_precision("medium")


def _generic_tf32():  # the new API's global value: every node inherits it
    B.fp32_precision = "tf32"


def _new_api_mixed():  # the new API only, per op: legacy readers raise for the user already
    B.cuda.matmul.fp32_precision = "tf32"
    B.cudnn.conv.fp32_precision = "ieee"
    B.mkldnn.matmul.fp32_precision = "bf16"


USERS = {"default": lambda: None, "legacy-api-tf32": _legacy_api_tf32, "medium": _medium,
         "generic-tf32": _generic_tf32, "new-api-mixed": _new_api_mixed}
# What the active backend reads inside: (node value, cudnn/cublas allow_tf32).
INSIDE = {("fp32", "cuda"): ("ieee", False), ("tf32", "cuda"): ("tf32", True),
          ("fp32", "cpu"): ("ieee", None), ("tf32", "cpu"): ("ieee", None)}


@pytest.mark.parametrize("user", USERS)
@pytest.mark.parametrize("precision,device", INSIDE)
def test_flags_read_consistently_inside_and_come_back_exactly(user, precision, device):
    USERS[user]()
    before = fingerprint()
    value, tf32 = INSIDE[precision, device]
    ops = [k for k in NODES if k.startswith("mkldnn" if device == "cpu" else "cu")]
    with pytest.raises(KeyError), precision_flags(precision, torch.device(device)):
        inside = {k: _read(f) for k, f in LEGACY.items()}
        assert {k: NODES[k].fp32_precision for k in ops} == dict.fromkeys(ops, value)
        if device == "cuda":
            # Every legacy reader reads, and says what is in force.
            assert inside["cudnn.allow_tf32"] is tf32 and inside["cuda.matmul.allow_tf32"] is tf32
            assert (inside["get_float32_matmul_precision"] == "highest") is not tf32
        else:
            # The matmul precision never raises nor claims bf16 ("medium") while the CPU's
            # matmuls are true fp32; the CUDA side is as the user left it (its matmul reader
            # reads what is in force where the user's mixed flags made it raise).
            assert inside["get_float32_matmul_precision"] in ("highest", "high")
            cublas = inside["cuda.matmul.allow_tf32"]
            assert cublas == (B.cuda.matmul.fp32_precision == "tf32")
            assert before["cuda.matmul.allow_tf32"] in (cublas, "raises")
            assert inside["cudnn.allow_tf32"] == before["cudnn.allow_tf32"]
            assert [NODES[k].fp32_precision for k in NODES if k.startswith("cu")] == \
                [before[k] for k in NODES if k.startswith("cu")]
        raise KeyError("the computation fails")
    after = fingerprint()
    if (user, precision, device) == ("generic-tf32", "fp32", "cuda"):
        # The weaker guarantee: cudnn conv/rnn hold an explicit "tf32" (factory_flags) that
        # reads the same as the generic "tf32" they could inherit. Telling the two apart
        # needs a write to the generic node that another thread would see (rev2 R2), so
        # they count as inheriting and come back inheriting: every node and reader reads
        # as before; only what they read after a later change of the generic node differs.
        before, after = ({k: v for k, v in fp.items() if "under generic" not in k}
                         for fp in (before, after))
    assert after == before


def test_nested_and_two_threads_on_both_backends():
    """An fp32 check inside a tf32 run gets tf32 back; a CUDA and a CPU computation in two
    threads overlap (the CUDA fp32 one must switch the CPU's bf16 matmuls to ieee for the
    legacy matmul precision to say "highest"); the user's flags come back when both end."""
    _medium()
    before = fingerprint()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with precision_flags("tf32", cuda):
        with precision_flags("fp32", cuda):
            assert B.cudnn.conv.fp32_precision == "ieee" and not B.cudnn.allow_tf32
            assert torch.get_float32_matmul_precision() == "highest"
            assert B.mkldnn.matmul.fp32_precision == "ieee"
        assert all(NODES[k].fp32_precision == "tf32" for k in ("cuda.matmul", "cudnn.conv"))
        assert B.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "medium"
        assert B.mkldnn.matmul.fp32_precision == "bf16"  # the user's, as the legacy value says
    assert fingerprint() == before

    with flags_held_in_thread(cpu) as (leave, t), precision_flags("fp32", cuda):
        leave.set()  # the CPU computation ends while the CUDA one still runs
        t.join(10)
        assert not t.is_alive()
        assert {k: _read(f) for k, f in LEGACY.items()} == {
            "cuda.matmul.allow_tf32": False, "cudnn.allow_tf32": False,
            "get_float32_matmul_precision": "highest"}
        assert B.cudnn.rnn.fp32_precision == "ieee"
    assert fingerprint() == before


def test_a_reader_thread_never_sees_an_error_while_computations_come_and_go():
    """Like a notebook cell (or Lightning) reading the legacy flags in a loop while the widget
    computes: each write goes from one consistent state to another."""
    _legacy_api_tf32()
    before = fingerprint()
    errors, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            for name, read in LEGACY.items():
                try:
                    read()
                except RuntimeError as err:
                    errors.append(f"{name}: {err}")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(300):
            device = torch.device("cuda" if i % 3 else "cpu")
            with precision_flags(("fp32", "tf32")[i % 2], device):
                with precision_flags("fp32", torch.device("cuda")):
                    pass
    finally:
        stop.set()
        t.join(10)
    assert not errors, errors[:3]
    assert fingerprint() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the flags above are "
                    "checked without one; this checks what they do to arithmetic")
def test_fp32_flags_give_ieee_and_tf32_flags_give_tf32_arithmetic():
    g = torch.Generator("cuda").manual_seed(0)
    a = torch.randn(512, 512, device="cuda", generator=g)
    b = torch.randn(512, 512, device="cuda", generator=g)
    x = torch.randn(8, 16, 32, 32, device="cuda", generator=g)
    w = torch.randn(16, 16, 3, 3, device="cuda", generator=g)
    exact_mm = (a.double() @ b.double())
    exact_conv = torch.nn.functional.conv2d(x.double(), w.double())

    def errors():
        mm = ((a @ b).double() - exact_mm).abs().max() / exact_mm.abs().max()
        conv = torch.nn.functional.conv2d(x, w).double() - exact_conv
        return float(mm), float(conv.abs().max() / exact_conv.abs().max())

    tf32_hw = torch.cuda.get_device_capability() >= (8, 0)
    for user in ("tf32", "ieee"):  # whatever the user's own setting
        B.cuda.matmul.fp32_precision = B.cudnn.conv.fp32_precision = user
        with precision_flags("fp32", torch.device("cuda")):
            assert max(errors()) < 1e-5
            assert not B.cudnn.allow_tf32 and not B.cuda.matmul.allow_tf32
        with precision_flags("tf32", torch.device("cuda")):
            if tf32_hw:  # TF32 keeps 10 mantissa bits: errors near 2**-11
                assert min(errors()) > 1e-4
            assert B.cudnn.allow_tf32 and B.cuda.matmul.allow_tf32


FRESH = """
import torch
from landscape_widget.core.precision import precision_flags
B = torch.backends
def conv_under_generic(value):
    B.fp32_precision = value
    try:
        return B.cudnn.conv.fp32_precision, B.cudnn.rnn.fp32_precision
    finally:
        B.fp32_precision = "none"
assert conv_under_generic("ieee") == ("ieee", "ieee")  # torch's internal default yields
with precision_flags("fp32", torch.device("cpu")), precision_flags("tf32", torch.device("cuda")):
    assert B.cudnn.conv.fp32_precision == "tf32" and B.cuda.matmul.fp32_precision == "tf32"
assert conv_under_generic("ieee") == ("ieee", "ieee"), "default lost"
with precision_flags("fp32", torch.device("cuda")):
    assert not B.cudnn.allow_tf32
assert (B.cudnn.conv.fp32_precision, B.cudnn.allow_tf32) == ("tf32", True)
print("ok")
"""


def test_torchs_internal_conv_default_survives_cpu_and_tf32_computations():
    """A fresh process's cuDNN conv/rnn "tf32" is an internal default that yields to a later
    generic value; no setter restores it, so only what must change is written: a CPU or a
    tf32 computation leaves it. (True fp32 on CUDA must set the legacy cudnn.allow_tf32,
    whose setter writes conv/rnn: they then read "tf32" as before, explicitly.)"""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_hidden_legacy_values_are_read_without_writing_in_every_mixed_state():
    """The oracle is the value a legacy setter wrote; the new API then mixes the nodes (so
    the readers may raise). read() must tell the value without writing any flag (rev2 R2:
    a write, even for a moment, is seen by another thread): every setter raises here."""
    from landscape_widget.core import fp32_flags

    set_node = torch._C._set_fp32_precision_setter
    cases = []
    for hidden in ("highest", "high", "medium"):
        for cuda in ("none", "ieee", "tf32"):
            for cpu in ("none", "ieee", "bf16", "tf32"):
                torch.set_float32_matmul_precision(hidden)
                set_node("cuda", "matmul", cuda)
                set_node("mkldnn", "matmul", cpu)
                cases.append(((hidden, cuda, cpu), hidden, None))
    for hidden in (False, True):
        for conv in ("ieee", "tf32"):
            for rnn in ("ieee", "tf32"):
                cases.append(((hidden, conv, rnn), None, hidden if conv == rnn else None))
    mp = pytest.MonkeyPatch()
    try:
        for case, matmul, cudnn in cases:
            mp.undo()
            if matmul is not None:
                torch.set_float32_matmul_precision(matmul)
                set_node("cuda", "matmul", case[1])
                set_node("mkldnn", "matmul", case[2])
            else:
                factory_flags()
                B.cudnn.allow_tf32 = case[0]
                set_node("cuda", "conv", case[1])
                set_node("cuda", "rnn", case[2])
            before = fingerprint()
            for name in ("_set_fp32_precision_setter", "_set_cudnn_allow_tf32",
                         "_set_float32_matmul_precision"):
                mp.setattr(torch._C, name, lambda *a, n=name: pytest.fail(f"{n}{a} wrote"))
            flags = fp32_flags.read()
            if matmul is not None:
                assert flags.matmul == matmul, case
            else:
                assert flags.cudnn_tf32 == cudnn, case
            mp.undo()
            assert fingerprint() == before
    finally:
        mp.undo()


def test_a_node_the_user_sets_during_a_cuda_computation_stays():
    """R3 for the nodes of the backend computing: the user's own later choice is kept (it
    takes effect when the computation ends), the rest comes back."""
    before = fingerprint()
    with precision_flags("fp32", torch.device("cuda")):
        B.cuda.matmul.fp32_precision = "tf32"  # the user, in the notebook
        B.mkldnn.conv.fp32_precision = "bf16"
    assert (B.cuda.matmul.fp32_precision, B.mkldnn.conv.fp32_precision) == ("tf32", "bf16")
    assert [NODES[k].fp32_precision for k in ("cudnn.conv", "cudnn.rnn", "mkldnn.matmul")] \
        == [before[k] for k in ("cudnn.conv", "cudnn.rnn", "mkldnn.matmul")]
    assert _read(LEGACY["cudnn.allow_tf32"]) == before["cudnn.allow_tf32"]


@pytest.mark.parametrize("precision,device", [("tf32", "cuda"), ("fp32", "cpu")])
def test_a_legacy_matmul_precision_set_during_a_computation_stays_whole(precision, device):
    """set_float32_matmul_precision("high") writes the hidden precision and both matmul
    nodes; inside a CUDA tf32 computation the precision and cuda.matmul already hold what it
    writes, so only mkldnn.matmul shows the call: the whole pair must stay, not a mix that
    reports "high" with an IEEE cuBLAS node (or raises)."""
    with precision_flags(precision, torch.device(device)):
        torch.set_float32_matmul_precision("high")
    assert (torch.get_float32_matmul_precision(), B.cuda.matmul.allow_tf32,
            B.cuda.matmul.fp32_precision, B.mkldnn.matmul.fp32_precision) == \
        ("high", True, "tf32", "tf32")
