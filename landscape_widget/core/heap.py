"""Keeping freed memory in the process heap while the engine computes (Linux, glibc).

Every forward pass of a CPU model allocates its activations afresh and frees them when the
pass ends. glibc's ``malloc`` gives the freed top of its heap back to the kernel as soon as
it exceeds the trim threshold, so the next pass takes new pages, and each new 4 KiB page
costs a page fault and its zeroing. On a 2-core VM a torchvision ResNet-50 forward over
32 images at 64 px took 20,000 page faults (80 MB), at 2 us each a quarter of the pass
(measured: 155-190 ms per forward, 130-140 ms with the heap kept). This is why CPU
inference guides recommend jemalloc or tcmalloc; the engine cannot swap the allocator of
the user's kernel, but it can tell glibc to keep its heap while computing.

:func:`hold_heap` raises glibc's trim threshold (:data:`HEAP_TRIM_HOLD`) while any
computation runs (reference-counted across threads: the widget's worker and a notebook cell
may compute at once) and, when the last one ends, sets it to :data:`HEAP_TRIM_AFTER` and
hands the free memory back at once (``malloc_trim(0)``). Large blocks come from the heap
too while it holds (:data:`HEAP_MMAP_HOLD`), not from ``mmap``, which would fault every
page afresh. (A thread other than the main one allocates from its own arena, whose heaps
glibc caps at 64 MiB: larger blocks there are still mapped.)

Side effect on the process, after the first call: glibc's thresholds stay fixed at
:data:`HEAP_MMAP_AFTER` and :data:`HEAP_TRIM_AFTER` instead of adapting. Those are the
values glibc's own adaptive rule reaches once a program has freed a block of 32 MiB (any
model of a few million parameters does), so the user's process behaves as a warmed-up one.
Elsewhere (macOS, Windows, musl) this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import threading
from collections.abc import Iterator

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Free heap kept while computing: the largest value mallopt takes (a C int, 2 GiB - 1).
HEAP_TRIM_HOLD = (1 << 31) - 1
# Blocks up to this size come from the heap while computing (an ImageNet ResNet-50 over 64
# images has 200 MB activations: mapped afresh, each would fault 50,000 pages per pass).
HEAP_MMAP_HOLD = 1 << 30
# After: glibc's largest adaptive mmap threshold on 64-bit systems, and twice it for the
# trim threshold, as its adaptive rule sets them.
HEAP_MMAP_AFTER = 32 << 20
HEAP_TRIM_AFTER = 64 << 20

_LOCK = threading.Lock()
_HOLDERS = 0


def _glibc():
    """The C library, if it is glibc with ``mallopt`` and ``malloc_trim``; else ``None``."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        lib = ctypes.CDLL(None)
        lib.mallopt.argtypes, lib.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        lib.malloc_trim.argtypes, lib.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return lib


_LIBC = _glibc()


def _after_fork_in_child() -> None:
    """A forked child starts with no holders and a free lock.

    The child inherits the count and, if another thread held it at the fork, a lock nobody
    will release: its first computation would deadlock. Its heap settings are the parent's
    at the fork; its first hold sets them again.
    """
    global _LOCK, _HOLDERS
    _LOCK, _HOLDERS = threading.Lock(), 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def hold_heap() -> Iterator[bool]:
    """Keep freed memory in the heap while the block runs (see the module docstring).

    Nested and concurrent holds are counted: the thresholds change when the first starts
    and are put back, with the free memory returned, when the last ends.

    Yields:
        Whether the heap is held (False where the C library is not glibc).

    Example:
        >>> with hold_heap() as held:
        ...     isinstance(held, bool)
        True
    """
    global _HOLDERS
    if _LIBC is None:
        yield False
        return
    with _LOCK:
        _HOLDERS += 1
        if _HOLDERS == 1:
            _LIBC.mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_HOLD)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_HOLD)
    try:
        yield True
    finally:
        with _LOCK:
            _HOLDERS -= 1
            if _HOLDERS == 0:
                _LIBC.mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_AFTER)
                _LIBC.mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_AFTER)
                _LIBC.malloc_trim(0)


def holding_heap(fn):
    """Decorate ``fn`` to run under :func:`hold_heap` (its signature and docstring kept).

    Returns:
        The wrapped function.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with hold_heap():
            return fn(*args, **kwargs)

    return wrapper


def holders() -> int:
    """How many computations hold the heap now (for tests)."""
    return _HOLDERS
