"""How control changes become jobs: debounced once, in the kernel (``DEBOUNCE_S``).

A mixin of :class:`~landscape_widget.LandscapeWidget`, kept apart so the widget class stays
thin. The front end sends every control change at once, and the kernel, which validates
every message anyway, decides when to compute, so a front end sending many updates cannot
start a job per update: a compute trait changed from Python or the front end cancels the
running job at once and (re)starts a timer; when it fires, the controls' spec is submitted.
Controls set from a ``compute`` message (which submits its own job) are set
:meth:`~DebouncedControls._silently`, scheduling nothing.

The widget provides ``_worker`` (the :class:`~.worker.Worker`), ``spec()``, ``_submit`` and
``_report``, calls :meth:`~DebouncedControls._init_debounce` in its constructor and observes
the compute traits with ``_on_compute_trait``.
"""

from __future__ import annotations

import contextlib
import threading

from .jobs import new_id
from .protocol import ProtocolError, Spec

DEBOUNCE_S = 0.2
"""Seconds without a control change before the controls' spec is computed."""


class DebouncedControls:
    """The debounce timer of the compute traits (a mixin of the widget)."""

    def _init_debounce(self) -> None:
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._quiet = 0

    def _set_controls(self, spec: Spec) -> None:
        with self.hold_sync():
            for k, v in spec.to_dict().items():
                setattr(self, k, v)

    @contextlib.contextmanager
    def _silently(self):
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def _on_compute_trait(self, _change) -> None:
        if self._quiet:
            return
        self._worker.cancel()  # stop wasting time on a grid nobody wants any more
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            timer = threading.Timer(DEBOUNCE_S, self._fire)
            timer.args = (timer,)
            timer.daemon = True
            self._timer = timer
            timer.start()

    def _cancel_timer(self) -> bool:
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        return timer is not None

    def _fire(self, timer: threading.Timer | None = None) -> None:
        """Submit the controls' spec: from the debounce timer, or at once (``timer=None``).

        Runs under the lock, so the widget's ``wait`` cannot slip between the timer firing and the
        job reaching the worker, and a timer cancelled or replaced meanwhile does nothing.
        """
        with self._lock:
            if timer is not None:
                if self._timer is not timer:
                    return
                self._timer = None
            try:
                self._submit(new_id(), self.spec())
            except ProtocolError as err:
                self._report(None, f"Invalid control value: {err}")
            except Exception as err:  # noqa: BLE001 - runs in a timer thread
                self._report(None, f"Internal error ({type(err).__name__}): {err}")
