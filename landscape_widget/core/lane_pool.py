"""The lanes' threads and state: a process-wide pool, and what each lane owns.

:mod:`~.lanes` runs several grid points at once on a CPU; this module holds what it runs
them with: the pool of lane threads (lane 0 is always the calling thread), the check
that torch's OpenMP backend lets each thread have its own intra-op thread count, the
validation of ``lanes=``, and :class:`Lane`, the state one lane's passes write.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor, nn

from .params import Params
from .state import plain_attributes, restore_attributes

# The process's lane threads (lane 0 is always the calling thread): kept between calls, so
# that their OpenMP teams, oneDNN scratchpads and heap arenas stay warm (a fresh thread per
# call costs a team of OpenMP threads on a many-core CPU, and page faults everywhere).
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _submit(workers: int, fn, *args) -> Future:
    """Run ``fn(*args)`` on the lane threads, at least ``workers`` of them (grown if fewer).

    The submission holds the lock: a thread growing the pool shuts the old one down, which
    refuses any later submission (another caller's, between its look-up and its submit).

    Returns:
        The future of ``fn(*args)``.
    """
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers:
            old, _POOL = _POOL, ThreadPoolExecutor(max(1, workers),
                                                   thread_name_prefix="landscape-lane")
            if old is not None:
                old.shutdown(wait=False)  # its queued lanes still run
        return _POOL.submit(fn, *args)


def _after_fork_in_child() -> None:
    # The parent's lane threads do not exist in a forked child: its first lane run starts
    # new ones (a pool whose threads are gone would wait forever).
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@functools.cache
def openmp_backend() -> bool:
    """Whether torch runs intra-op work on OpenMP, where each thread sets its own count.

    (torch's native thread pool is one for the process: ``torch.set_num_threads`` in a lane
    would only warn.)

    Returns:
        True for torch's OpenMP backend (the default of the Linux, macOS and Windows wheels).
    """
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def check_lanes(lanes: int | str, device: torch.device) -> int | str:
    """Validate the ``lanes=`` option of the engine.

    Returns:
        ``"auto"`` or the int given.

    Raises:
        ValueError: If ``lanes`` is neither ``"auto"`` nor an int >= 1, or is more than 1
            on a device other than the CPU.

    Example:
        >>> check_lanes("auto", torch.device("cpu")), check_lanes(2, torch.device("cpu"))
        ('auto', 2)
    """
    if lanes == "auto":
        return lanes
    if isinstance(lanes, np.integer):
        lanes = int(lanes)
    if isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 1:
        raise ValueError(f"lanes must be 'auto' or an int >= 1 (points computed at once on "
                         f"a CPU; 1: one at a time), got {lanes!r}.")
    if lanes > 1 and device.type != "cpu":
        raise ValueError(f"lanes={lanes} is for CPUs; on {device} pass lanes='auto' or 1 (a "
                         "GPU computes one pass at a time).")
    return lanes


class Lane:
    """What one lane's passes write: module copies, buffers, row sum, stem inputs.

    Args:
        module: The lane's copy of the evaluator's module (``None`` for the home lane,
            which uses the evaluator's own).
        suffix: The lane's copy of the stem's suffix, if the evaluator has a stem.
        flats: The evaluator's ``(flat buffers, pristine copy)`` pairs; the lane keeps
            its own flat copies.
        slots: ``{buffer name: (flat index, offset, shape)}`` of the buffers no direction
            moves (moved ones are built fresh at every point).
    """

    def __init__(self, module: nn.Module | None = None, suffix: nn.Module | None = None,
                 flats: list[tuple[Tensor, Tensor]] = (), slots: dict | None = None):
        self.module, self.suffix = module, suffix
        self.flats = [(pristine.clone(), pristine) for _, pristine in flats]
        self.buffers: Params = {
            k: self.flats[i][0][pos : pos + math.prod(shape)].view(shape)
            for k, (i, pos, shape) in (slots or {}).items()}
        # The copies' own plain attributes, put back as the evaluator's (core/state.py).
        self.attributes = plain_attributes(module) + plain_attributes(suffix)
        self.row: tuple | None = None  # the point build's kept row sum (PointPasses._point)
        self.row_checked = False  # whether this lane checked the row's memory (_row_sum)
        self.stem_buf: Tensor | None = None  # the stem inputs' buffer (StemTerms)
        self.stem_row: list | None = None  # the stem inputs' kept row (StemTerms._stem_row_sum)

    def reset(self) -> None:
        """Put the lane's buffers and attributes back to the user's (after every pass)."""
        with torch.no_grad():
            for flat, pristine in self.flats:
                flat.copy_(pristine)
        restore_attributes(self.attributes)

