"""The pattern editor's kernel side: fit messages and the thread that runs MPO fits.

JS -> Python::

    {"kind": "fit", "id": str, "spec": {"mask": [[0|1, ...], ...], "steps", "lr", "tau",
     "cells_per_step", "batch_size", "seed", "every", "resume"}}
    {"kind": "fit_stop", "id": str}

Python -> JS::

    {"kind": "fit_start", "id", "rows", "cols", "steps", "mask" (ternary, row-major),
     "splits", "note"}
    {"kind": "fit_update", "id", "step", "steps", "rows", "cols", "scores", "last",
     "seconds", "splits", "note"} + [train loss, train accuracy, test loss,
     test accuracy] float32 (row-major H x W; the test buffers are empty without test data)
    ("note": the parameters the fit's networks share, which fit_pattern warns of, or "")
    {"kind": "fit_done", "id", "step", "stopped", "seconds"}

A fit runs in its own daemon thread (one at a time: a new fit stops the old one first), so
surfaces and fits do not queue behind each other. ``resume`` continues the last fit when
its mask is the one sent; otherwise a new fit starts.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from ..core.data import as_tensors
from ..experiments.masks import ternary_mask
from ..experiments.mpo import fit_pattern, kept_note
from ..experiments.pattern_fit import PatternFit
from . import protocol
from .fit_spec import FIT_FIELDS, LIMITS, FitSpec, check_mask, parse_fit_spec
from .jobs import Job


class PatternRunner:
    """Runs MPO fits for a widget, one at a time, each in a daemon thread.

    Args:
        model_fn: Builds fresh networks (or the widget's model, re-initialised per copy).
        data: Training data.
        test_data: Optional test data for the test heatmaps.
        send: ``send(message, buffers)``.
        on_event: Called with every ``fit_update``, ``fit_done`` and ``error`` message and
            its buffers (the widget keeps the last update and the state in traits).
        device: Where to train.
        eval_samples: Samples of each split used for the live heatmaps.
    """

    def __init__(self, model_fn, data, *, test_data=None,
                 send: Callable[[dict, list], None], on_event: Callable[[dict, list], None],
                 device=None, eval_samples: int = 256):
        self.model_fn, self.device = model_fn, device
        self._data, self._test = data, test_data
        self.send, self.on_event = send, on_event
        self.eval_samples = int(eval_samples)
        self.fit: PatternFit | None = None
        self._job: Job | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._tensors: dict | None = None

    def submit(self, job_id: str, spec: FitSpec) -> Job:
        """Start a fit; the running one is stopped first."""
        job = Job(job_id, spec)
        with self._lock:
            old, previous = self._job, self._thread
            if old is not None:
                old.cancel.set()
            thread = threading.Thread(target=self._main, args=(job, previous), daemon=True,
                                      name="landscape-pattern-fit")
            self._job, self._thread = job, thread
            thread.start()
        return job

    def stop(self) -> bool:
        """Stop the running fit (it can be resumed); returns whether one was running."""
        with self._lock:
            job = self._job
        if job is not None and job.state in ("pending", "running"):
            job.cancel.set()
            return True
        return False

    @property
    def busy(self) -> bool:
        """Whether a fit thread is alive."""
        with self._lock:
            thread = self._thread
        return thread is not None and thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the running fit ends; ``False`` on timeout."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    # --- fit thread ----------------------------------------------------------------------
    def _emit(self, message: dict, buffers: list | None = None) -> None:
        for deliver in (self.send, self.on_event):
            try:
                deliver(message, buffers or [])
            except Exception:  # noqa: BLE001 - a closed comm must not kill the thread
                pass

    def _splits(self) -> dict:
        """Training tensors and the evaluation subsets (first ``eval_samples`` of each)."""
        if self._tensors is None:
            x, y = as_tensors(self._data)
            splits = {"train": (x[:self.eval_samples], y[:self.eval_samples])}
            if self._test is not None:
                tx, ty = as_tensors(self._test)
                splits["test"] = (tx[:self.eval_samples], ty[:self.eval_samples])
            self._tensors = {"train_full": (x, y), "eval": splits}
        return self._tensors

    def _main(self, job: Job, previous: threading.Thread | None) -> None:
        if previous is not None:
            previous.join()
        if job.cancel.is_set():
            job.state = "stopped"
            self._emit(protocol.fit_done_message(job.id, 0, True, 0.0))
            return
        job.state = "running"
        try:
            self._run(job)
        except Exception as err:  # noqa: BLE001 - user code (model_fn, the model) may raise
            job.state = "error"
            self._emit(protocol.error_message(job.id, f"pattern fit: {type(err).__name__}: {err}"))

    def _run(self, job: Job) -> None:
        spec, t0 = job.spec, time.perf_counter()
        tensors = self._splits()
        train = tensors["train_full"]
        binary = spec.binary
        fit = self.fit
        if not (spec.resume and fit is not None and np.array_equal(fit.binary, binary)):
            fit = fit_pattern(self.model_fn, train, binary, steps=0, lr=spec.lr, tau=spec.tau,
                              cells_per_step=spec.cells_per_step, batch_size=spec.batch_size,
                              seed=spec.seed, device=self.device, progress=False)
            self.fit = fit
        rows, cols = fit.shape
        splits = list(tensors["eval"])
        target = fit.step + spec.steps
        self._emit(protocol.fit_start_message(job.id, rows, cols, target,
                                              fit.mask.reshape(-1).tolist(), splits,
                                              note=fit_note(fit)))

        def update(f: PatternFit) -> None:
            self._emit(*self._update(job, f, target, t0))

        if fit.step == 0:
            update(fit)  # the plane before training: the picture to compare with
        # The editor has no strategy field: "auto" loops a model vmap cannot run (LSTM,
        # GRU, QAT, the fused Transformer kernels), whose fit failed naming
        # strategy='loop', which the front end cannot send; a resumed fit keeps its path.
        strategy = ("auto" if fit.step == 0 or fit.batched is None
                    else "vmap" if fit.batched else "loop")
        fit.train(train, spec.steps, progress=False, callback=update, every=spec.every,
                  cancel=job.cancel, strategy=strategy)
        stopped = fit.step < target
        if stopped and (not fit.history or fit.step % spec.every):
            update(fit)
        job.state = "stopped" if stopped else "done"
        self._emit(protocol.fit_done_message(job.id, fit.step, stopped,
                                             time.perf_counter() - t0))

    def _update(self, job: Job, fit: PatternFit, target: int, t0: float):
        with torch.no_grad():
            evals = {name: fit.evaluate(data) for name, data in self._splits()["eval"].items()}
        scores = {name: fit.scores(ev) for name, ev in evals.items()}
        last = fit.history[-1] if fit.history else {}
        return protocol.fit_update_message(
            job.id, step=fit.step, steps=target, rows=fit.shape[0], cols=fit.shape[1],
            scores=_finite(scores), last=_finite(last), seconds=time.perf_counter() - t0,
            mask=fit.mask.reshape(-1).tolist(), evals=evals, note=fit_note(fit))


def fit_note(fit: PatternFit) -> str:
    """What the editor's user should know of ``fit``: the parameters its networks share.

    ``fit_pattern`` warns of them (``kept_note``), but in the fit's thread, where the
    editor's user never saw it.

    Returns:
        The note, or ``""``.
    """
    return kept_note(fit.config.get("kept_parameters") or [])


def _finite(d: dict) -> dict:
    """JSON-safe copy: NaN and inf become ``None`` (JSON has no NaN)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = _finite(v)
        elif isinstance(v, float) and not math.isfinite(v):
            out[k] = None
        else:
            out[k] = v
    return out


def default_binary(rows: int = 8, cols: int = 8) -> list[list[int]]:
    """An empty pattern of ``rows x cols`` cells (the editor's starting grid)."""
    return [[0] * cols for _ in range(rows)]


def check_pattern(pattern) -> np.ndarray:
    """A pattern from Python or the ``pattern`` trait, checked; with a trainable mask."""
    binary = np.asarray(check_mask([list(map(int, r)) for r in pattern])
                        if isinstance(pattern, list) else pattern)
    mask = ternary_mask(binary)
    if not (mask == 1).any():
        raise ValueError("the pattern has no good cell: draw some cells first (an empty or "
                         "all-drawn pattern has nothing to fit).")
    return binary


__all__ = ["PatternRunner", "check_pattern", "default_binary",
           # re-exported from .fit_spec, where they moved:
           "FIT_FIELDS", "LIMITS", "FitSpec", "check_mask", "parse_fit_spec"]
