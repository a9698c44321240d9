"""A float32-flag computation held open in another thread (tests of core/fp32_flags.py)."""

from __future__ import annotations

import contextlib
import threading

from landscape_widget.core.precision import precision_flags


@contextlib.contextmanager
def flags_held_in_thread(device):
    """``precision_flags("fp32", device)`` entered in another thread until ``leave`` is set.

    Yields:
        ``(leave, thread)``: set ``leave`` to make the other thread exit its block, then
        join ``thread``. Both happen at the end of the ``with`` block at the latest.
    """
    entered, leave = threading.Event(), threading.Event()

    def other():
        with precision_flags("fp32", device):
            entered.set()
            leave.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    assert entered.wait(10)
    try:
        yield leave, thread
    finally:
        leave.set()
        thread.join(10)
