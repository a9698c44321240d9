"""The widget's pattern editor (multi-point optimisation): traits and Python controls.

A mixin of :class:`~landscape_widget.LandscapeWidget`, kept apart so the widget class stays
thin. The front end paints the ``pattern`` trait; "Fit" sends a ``fit`` message (see
:mod:`.patterns`); the kernel streams ``fit_update`` messages and keeps the last one in
``pattern_result`` so a re-render or a static export still shows it.
"""

from __future__ import annotations

import numpy as np
import traitlets as t

from .jobs import new_id
from .patterns import FitSpec, PatternRunner, check_pattern, default_binary


class PatternPanel(t.HasTraits):
    """Traits and methods of the pattern editor (mixed into the widget)."""

    pattern = t.List(t.List(t.Int()), default_value=default_binary()).tag(sync=True)
    show_pattern = t.Bool(False).tag(sync=True)
    fit_status = t.Dict().tag(sync=True)
    pattern_result = t.Dict(allow_none=True, default_value=None).tag(sync=True)
    fit_settings = t.Dict().tag(sync=True)
    """The settings of the last fit started (its steps, lr, tau, cells per step, seed,
    batch size), shown by the editor's boxes after a re-render and in the HTML export."""

    def _init_patterns(self, model, data, *, model_fn=None, test_data=None, device=None,
                       eval_samples: int = 256) -> None:
        if model_fn is not None and not callable(model_fn):
            raise TypeError("model_fn must be a zero-argument callable that builds a fresh "
                            "network (or None: re-initialised copies of the model).")
        self._runner = PatternRunner(
            model_fn if model_fn is not None else model, data, test_data=test_data,
            send=self._send_message, on_event=self._on_fit_event, device=device,
            eval_samples=eval_samples)
        self.fit_status = {"state": "idle", "step": 0, "steps": 0}

    # --- public API -------------------------------------------------------------------
    def fit_pattern(self, pattern=None, *, steps: int = 300, lr: float = 3e-3,
                    tau: float = 2.5, cells_per_step: int = 50, batch_size: int = 256,
                    seed: int = 0, every: int = 10, resume: bool = False) -> str:
        """Start an MPO fit of ``pattern`` (default: the drawn one) in the background.

        The live heatmaps show in the pattern panel; :attr:`pattern_fit` is the
        :class:`~landscape_widget.PatternFit` being trained. Arguments as in
        :func:`~landscape_widget.fit_pattern`.

        Returns:
            The job id.
        """
        binary = check_pattern(self.pattern if pattern is None else pattern)
        if pattern is not None:
            self.pattern = binary.astype(int).tolist()
        spec = FitSpec(mask=tuple(map(tuple, binary.astype(int).tolist())), steps=int(steps),
                       lr=float(lr), tau=float(tau), cells_per_step=int(cells_per_step),
                       batch_size=int(batch_size), seed=int(seed), every=int(every),
                       resume=bool(resume))
        return self._start_fit(new_id("fit"), spec)

    def stop_fit(self) -> bool:
        """Stop the running fit (``fit_pattern(resume=True)`` continues it)."""
        return self._runner.stop()

    def wait_fit(self, timeout: float | None = None):
        """Block until the running fit ends; returns :attr:`pattern_fit`."""
        if not self._runner.wait(timeout):
            raise TimeoutError(f"still fitting after {timeout} s.")
        return self.pattern_fit

    @property
    def pattern_fit(self):
        """The :class:`~landscape_widget.PatternFit` of the last fit (``None`` before one)."""
        return self._runner.fit

    @property
    def mask(self) -> np.ndarray:
        """The drawn pattern as a ``uint8`` array (1 = drawn)."""
        return np.asarray(self.pattern, dtype=np.uint8)

    # --- internals --------------------------------------------------------------------
    def _start_fit(self, job_id: str, spec: FitSpec) -> str:
        check_pattern(spec.binary)  # a pattern with nothing to fit gets a clear error
        fit = self._runner.fit
        settings = {"lr": spec.lr, "tau": spec.tau, "cells_per_step": spec.cells_per_step,
                    "seed": spec.seed, "batch_size": spec.batch_size}
        if spec.resume and fit is not None and np.array_equal(fit.binary, spec.binary):
            # A resumed fit keeps training with the settings it was created with.
            settings = {k: fit.config.get(k, v) for k, v in settings.items()}
        self.fit_settings = {**settings, "steps": spec.steps}
        self.fit_status = {"state": "running", "id": job_id, "step": 0, "steps": spec.steps}
        self._runner.submit(job_id, spec)
        return job_id

    def _handle_fit_message(self, kind: str, job_id: str, spec) -> None:
        if kind == "fit":
            try:
                self._start_fit(job_id, spec)
            except ValueError as err:
                self._report(job_id, str(err))
        else:
            self._runner.stop()

    def _on_fit_event(self, msg: dict, buffers: list) -> None:
        kind = msg.get("kind")
        note = {"note": msg["note"]} if msg.get("note") else {}
        if kind == "fit_start":  # the fit's note (shared parameters) from its start on
            self.fit_status = {"state": "running", "id": msg["id"], "step": 0,
                               "steps": msg["steps"], **note}
        elif kind == "fit_update":
            names = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")
            arrays = {n: bytes(b) or None for n, b in zip(names, buffers, strict=True)}
            self.pattern_result = {**msg, **arrays}
            self.fit_status = {"state": "running", "id": msg["id"], "step": msg["step"],
                               "steps": msg["steps"], "scores": msg["scores"], **note}
        elif kind == "fit_done":
            self.fit_status = {**self.fit_status, "id": msg["id"], "step": msg["step"],
                               "state": "stopped" if msg["stopped"] else "done"}
        elif kind == "error":
            self.fit_status = {**self.fit_status, "id": msg["id"], "state": "error",
                               "message": msg["message"]}

    def _close_patterns(self) -> None:
        runner = getattr(self, "_runner", None)
        if runner is not None:
            runner.stop()
