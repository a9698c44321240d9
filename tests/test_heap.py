"""core/heap.py: freed memory stays in the heap while the engine computes, and goes back after.

Oracles: the kernel's own counters (minor page faults from ``getrusage`` in a fresh
process, the resident set from ``/proc/self/statm``), not timings.
"""

from __future__ import annotations

import ast
import contextlib
import os
import platform
import signal
import subprocess
import sys
import threading
from pathlib import Path

import torch
from torch import nn

import landscape_widget as lw
from landscape_widget.core import heap

GLIBC = heap._LIBC is not None
BLOCK = 24 << 20  # bytes


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# A fresh process, glibc's thresholds at their initial values, runs a CNN whose activations
# are 18 MB per layer: the page faults of one forward, with and without the hold.
FORWARD = """
import resource, sys, torch
from torch import nn
from landscape_widget.core import heap
# glibc's documented initial thresholds (128 KiB each), fixed: its adaptive rule may or may
# not have raised them while torch was imported, which made the baseline flaky.
heap._LIBC.mallopt(-1, 128 << 10)
heap._LIBC.mallopt(-3, 128 << 10)
if sys.argv[1] == "off":
    heap._LIBC = None
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                    nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()).eval()
x = torch.randn(16, 3, 96, 96)
with torch.no_grad(), heap.hold_heap():
    net(x); net(x)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        net(x)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) // 3)
"""


def _run(script: str, *args: str):
    """The value a script prints last, run in a fresh process (glibc's heap untouched)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, check=True,
                         capture_output=True, text=True, timeout=300)
    return ast.literal_eval(out.stdout.strip().splitlines()[-1].replace("] [", "], ["))


def _forward_faults(mode: str) -> int:
    return _run(FORWARD, mode)


def test_this_machine_runs_the_real_thing():
    """CI runs on Linux with glibc: the hold is exercised, not its no-op fallback."""
    assert platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert GLIBC


def test_inside_the_hold_a_forward_reuses_its_pages():
    pages = (16 * 32 * 96 * 96 * 4) // os.sysconf("SC_PAGE_SIZE")  # one activation
    off = _forward_faults("off")
    on = _forward_faults("on")
    assert off > pages  # glibc alone faults activations afresh in every pass (the oracle
    assert on < 0.1 * off  # sees the mechanism), and the hold removes that


# A fresh process churns a 96 MB block (over glibc's adaptive limit of 32 MiB, so glibc
# alone maps it afresh every time) inside the hold, then after it: faults of each round.
CHURN = """
import resource, torch
from landscape_widget.core import heap

def rounds(n):
    out = []
    for _ in range(n):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty((96 << 20) // 4).fill_(1.0)
        del t
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return out

with heap.hold_heap():
    held = rounds(8)
print(held, rounds(5))
"""


def test_blocks_larger_than_glibcs_adaptive_limit_are_reused_too():
    pages = (96 << 20) // os.sysconf("SC_PAGE_SIZE")
    held, after = _run(CHURN)
    assert max(held[4:]) < 0.02 * pages  # the first rounds take the pages, then reused
    # The oracle sees the mechanism: outside the hold glibc maps the block afresh (its
    # first rounds fault every page). Later rounds outside it took no fault at all in two
    # CI runs of 2026-12-05 ([24576, 24575, 0, 0, 0]), for a reason not found yet.
    assert max(after) > 0.9 * pages, after


def test_after_the_hold_the_free_memory_goes_back():
    with heap.hold_heap():
        blocks = [torch.empty(BLOCK // 4).fill_(1.0) for _ in range(8)]
        high = _rss()
        del blocks
        kept = _rss()  # the freed block stays resident while held
    after = _rss()
    assert kept > high - BLOCK  # still held: at most a little went back
    assert after < kept - 6 * BLOCK  # returned when the hold ended


@contextlib.contextmanager
def _held_by_another_thread(make_context):
    """Run the block while another thread sits inside ``make_context()``."""
    inside, release = threading.Event(), threading.Event()

    def worker():
        with make_context():
            inside.set()
            release.wait(10)

    th = threading.Thread(target=worker)
    th.start()
    inside.wait(10)
    try:
        yield
    finally:
        release.set()
        th.join()


def test_holds_nest_across_threads_and_end_on_errors():
    assert heap.holders() == 0
    with _held_by_another_thread(heap.hold_heap):
        assert heap.holders() == 1
        with heap.hold_heap():
            assert heap.holders() == 2
    assert heap.holders() == 0

    model = nn.Sequential(nn.Linear(4, 3)).eval()
    data = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    bad = (torch.randn(8, 5), torch.randint(0, 3, (8,)))  # wrong width: the call fails
    try:
        lw.compute_surface(model, bad, x=(-1, 1, 3), y=(-1, 1, 3), progress=False)
    except Exception:  # noqa: BLE001 - whatever the error, the hold must end
        pass
    assert heap.holders() == 0
    lw.compute_surface(model, data, x=(-1, 1, 3), y=(-1, 1, 3), progress=False)
    lw.hessian_trace(model, data, samples=2)
    assert heap.holders() == 0


def test_a_computation_holds_the_heap_while_it_runs():
    """Held through a tile stream (between tiles too), nested in each evaluation."""
    in_loss, between = [], []
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    data = (torch.randn(8, 4), torch.randint(0, 3, (8,)))

    def loss(out, y):
        in_loss.append(heap.holders())
        return nn.functional.cross_entropy(out, y)

    for _tile in lw.iter_tiles(model, data, x=(-1, 1, 3), y=(-1, 1, 3), loss_fn=loss):
        between.append(heap.holders())
    assert between and min(between) == 1
    assert max(in_loss) == 2  # the set-up's checks run before, the points inside both holds
    assert heap.holders() == 0


def test_a_child_forked_while_held_computes_and_holds_afresh():
    """A fork while another thread holds the heap (its lock taken) must not deadlock."""
    if not hasattr(os, "fork"):
        return
    # A thread inside hold_heap's critical section (its lock taken) at the fork.
    with _held_by_another_thread(lambda: heap._LOCK):
        pid = os.fork()
        if pid == 0:  # the child: compute under a hold, report through the exit status
            code = 1
            signal.alarm(20)  # a deadlocked child dies instead of hanging the test
            try:
                with heap.hold_heap():
                    code = 0 if heap.holders() == 1 else 2
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
