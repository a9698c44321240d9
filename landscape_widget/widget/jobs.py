"""A job of the widget, its id, what it computes with, and the reporter bound to it.

- :class:`Job`: one request of the front end (a grid, or a pattern fit) with its cancel
  event; :func:`new_id` names the ones the kernel starts itself.
- :class:`Context`: what every job of one widget computes with (the model, data, loss,
  device, executor...) and the state jobs share (the metrics, the last complete grid,
  the direction cache). The direction types (:mod:`.directions`) and the job runners
  (:mod:`.grid_job`, :mod:`.curvature_job`) take it instead of reaching into the worker.
- :class:`Reporter`: the messages and status updates of one job; ``send`` and
  ``on_status`` raising (a closed comm) never kills the worker.
- :class:`Labelled`: directions with what the front end draws besides them.
"""

from __future__ import annotations

import functools
import itertools
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.data import is_data_fn
from ..core.directions import random_directions
from ..core.fingerprints import fingerprint
from ..core.metrics import METRICS
from . import protocol

Send = Callable[[dict, list], None]
"""``send(message, buffers)``: delivers one message to the front end."""

STATUS_DEFAULTS = {"state": "idle", "device": "", "done": 0, "total": 0, "points_per_s": 0.0,
                   "eta_s": None, "message": ""}
"""The status line's fields and their values when nothing runs."""

_ids = itertools.count(1)


def new_id(prefix: str = "py") -> str:
    """A fresh job id (unique within the process).

    Returns:
        ``"{prefix}-{n}"`` with ``n`` counting up from 1 over the process.

    Example:
        >>> a, b = new_id("t"), new_id("t")
        >>> a.startswith("t-"), int(b.split("-")[1]) - int(a.split("-")[1])  # counts up by one
        (True, 1)
    """
    return f"{prefix}-{next(_ids)}"


@dataclass
class Job:
    """One request of the front end: a grid to compute, or a pattern fit.

    ``spec`` is a :class:`.spec.Spec` or a :class:`.fit_spec.FitSpec`; ``report`` is set
    by the worker when the job runs.
    """

    id: str
    spec: Any
    cancel: threading.Event = field(default_factory=threading.Event)
    state: str = "pending"
    view: dict = field(default_factory=dict)  # the start message's extras, for a joining view
    report: Reporter | None = None
    stream: Any = None  # the running grid's TileStream, for a joining view's snapshot


class Labelled(list):
    """Directions with what the front end draws besides them.

    ``axis_labels`` name the axes, ``marks`` are named points on the plot (see
    :mod:`.models`), ``note`` says what a curve-shape method fell short of (``""`` when it
    got its shape; see :mod:`.shapes`), shown in the status line of the finished job.
    """

    axis_labels: list[str]
    marks: list[dict]
    note: str = ""


class Reporter:
    """The messages and status updates of one job.

    Args:
        job_id: The job's id (every message and status carries it).
        send: ``send(message, buffers)``.
        on_status: Called with the full status dict (see :data:`STATUS_DEFAULTS`).
        device: The device shown until the job knows where it computes.
    """

    def __init__(self, job_id: str, send: Send, on_status: Callable[[dict], None] | None,
                 device: str = ""):
        self.job_id, self.device, self._first_device = job_id, device, device
        self._send, self._on_status = send, on_status

    def emit(self, message: dict, buffers: list | None = None) -> None:
        """Send one message (a closed comm is ignored)."""
        try:
            self._send(message, buffers or [])
        except Exception:  # noqa: BLE001 - a closed comm must not kill the worker
            pass

    def status(self, state: str = "running", message: str = "", *, done: int = 0,
               total: int = 0, points_per_s: float = 0.0, eta_s: float | None = None,
               **extra) -> None:
        """Update the status line (fields not given take :data:`STATUS_DEFAULTS`)."""
        if self._on_status is None:
            return
        status = {"state": state, "id": self.job_id, "device": self.device, "done": done,
                  "total": total, "points_per_s": points_per_s, "eta_s": eta_s,
                  "message": message}
        status.update(extra)
        try:
            self._on_status(status)
        except Exception:  # noqa: BLE001 - same as emit
            pass

    def cancelled(self, done: int = 0, total: int = 0) -> None:
        """The ``cancelled`` message and status."""
        self.emit(protocol.cancelled_message(self.job_id, done, total))
        self.status("cancelled", "cancelled", done=done, total=total)

    def failed(self, err: BaseException) -> None:
        """The ``error`` message and status of a job that raised ``err``.

        The status keeps the formatted traceback (``traceback``): the front end shows
        ``Type: message``, the user finds where it was raised in ``widget.last_error``.
        """
        message = f"{type(err).__name__}: {err}"
        self.emit(protocol.error_message(self.job_id, message))
        self.status("error", message, device=self._first_device,
                    traceback="".join(traceback.format_exception(err)))


@dataclass
class Context:
    """What every job of one widget computes with, and the state the jobs share.

    See :class:`.worker.Worker` for the arguments. ``data`` is the loaded data (a
    ``data_fn`` is called at most once, lazily); ``grid_data`` is what the grid engine gets
    (with an executor, the ``data_fn`` itself, so the workers load the data where they
    run). ``metrics`` drops ``"accuracy"`` for good once the task turns out to have none;
    ``complete`` is ``(reuse key, result)`` of the last complete grid, ``latest`` the last
    result (complete or not).
    """

    model: Any
    data: Any
    loss_fn: Callable | None = None
    device: Any = None
    model_b: Any = None
    models: dict = field(default_factory=dict)
    trajectory: Any = None
    executor: Any = None
    tile_points: int | None = None
    evaluator_options: dict | None = None
    mining_steps: int | None = None
    bn_batch_size: int | None = None
    grid_data: Any = None
    metrics: tuple[str, ...] = METRICS
    complete: tuple | None = None
    latest: Any = None

    def __post_init__(self):
        # A data_fn is loaded here at most once (lazily); an executor's workers get the
        # function itself, so they load the data where they run.
        self.grid_data = self.data
        if is_data_fn(self.data):
            self.data = functools.cache(self.data)
        if self.executor is None:
            self.grid_data = self.data
        self.models = dict(self.models or {})

    def random(self, spec, count: int, model=None) -> list:
        """``count`` random directions as ``spec`` says (norm, bias+BN, seed).

        Args:
            spec: The view's :class:`.spec.Spec`.
            count: How many directions (drawn one after another from ``spec.seed``).
            model: Where to draw them (default: the widget's model).

        Returns:
            A list of ``count`` direction dicts.
        """
        return random_directions(
            self.model if model is None else model, count,
            norm=None if spec.norm == "none" else spec.norm,
            ignore="biasbn" if spec.ignore_biasbn else None, seed=spec.seed,
        )

    def data_key(self) -> str | None:
        """A fingerprint of the data if they are tensors, for the direction cache's keys.

        Hessian and mined directions depend on the data: changed in place, they were the old
        data's. (Other data, a ``Dataset`` or ``DataLoader``, are not read for a key: ``None``.)

        Returns:
            The fingerprint of the tensors, or ``None``.
        """
        data = self.data
        if isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data):
            return fingerprint({str(i): t for i, t in enumerate(data)})
        return None

    @property
    def device_name(self) -> str:
        """The device as the status line shows it before a job knows better."""
        return str(self.device or "")


__all__ = ["Job", "new_id", "Labelled", "Reporter", "Context", "STATUS_DEFAULTS", "Send"]
