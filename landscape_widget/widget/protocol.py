"""Every wire message between front end and kernel: a parser table in, a builder per kind out.

A leaf of ``widget/``: it imports only the request types (:mod:`.spec`, :mod:`.fit_spec`).
Every inbound message is checked here before anything runs (:data:`PARSERS`). A malformed or hostile
message (wrong types, unknown kinds or fields, huge resolutions, non-finite ranges) raises
:class:`ProtocolError`, which the widget turns into an ``error`` message; nothing else
happens. Error texts quote offending values through :func:`short` so a hostile payload
cannot blow up the reply.

JS -> Python::

    {"kind": "compute", "id": str, "spec": {...}}
    {"kind": "cancel", "id": str}    (the user pressed stop: the running job and one
                                      scheduled by a control change are cancelled)
    {"kind": "sync", "id": str}      (a new view asks for the running job so far: the
                                      reply is ``ready``, then the job's ``start`` and
                                      one ``tile`` of all points computed yet)
    {"kind": "fit", ...}, {"kind": "fit_stop", ...}   (the pattern editor: see .fit_spec)

``spec.vertices`` names the models a multi-model direction type runs through (the
``models=`` of the widget): ``[A, B]`` for ``"interpolate"`` (from A to B, centred at A),
``[A, B, C]`` for ``"plane"`` (the barycentric plane; A at alpha = 1, B at beta = 1, C at
the origin). An empty list picks the first models; other direction types ignore it.

Python -> JS::

    {"kind": "start", "id", "spec", "shape", "metrics", "device"} + [x, y] float32 buffers
    {"kind": "tile", "id", "level", "n", "done", "total"}
        + [flat int32, loss float32, accuracy float32] (accuracy empty if not computed)
    {"kind": "progress", "id", "done", "total", "points_per_s", "eta_s", "device", "plan"}
        (+ ``"stage"`` during a data-subset pass, e.g. ``"subset 256 of 10,000 samples
        (±0.012)"``, also put before ``plan``; see ``spec.samples``)
    {"kind": "done", "id", "seconds", "evaluated", "reused", "nonfinite", "stats"}
        (``stats``: the statistics line of a 2D loss surface, see ``lw.landscape_stats``;
        "" otherwise; a subset result's label comes first)
    {"kind": "cancelled", "id", "done", "total"}
    {"kind": "error", "id", "message"}
    {"kind": "ready", "id"}          (the answer to ``sync``: a kernel is behind the view)
    {"kind": "fit_start" | "fit_update" | "fit_done", ...}   (the pattern editor: see .patterns)

Buffers are little-endian, C-contiguous; NaN marks a point that is not computed (or whose
loss is not finite).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .fit_spec import parse_fit_spec
from .spec import (  # noqa: F401 - re-exported: the spec's names were first defined here
    BN,
    DIRECTION_TYPES,
    MAX_1D,
    MAX_2D,
    MAX_CURVATURE,
    MAX_ID_LENGTH,
    MAX_NAME,
    MAX_PLANE,
    MAX_RANGE,
    MODES,
    NORMS,
    QUANTITIES,
    SHAPE_PLANES,
    SHAPE_TYPES,
    SPEC_FIELDS,
    VERTEX_COUNTS,
    ProtocolError,
    Spec,
    names_of,
    parse_spec,
    short,
)

PARSERS: dict[str, Callable | None] = {
    "compute": parse_spec,
    "cancel": None,
    "sync": None,
    "fit": lambda raw, **_: parse_fit_spec(raw),
    "fit_stop": None,
}
"""Inbound kind -> the parser of its ``spec`` (``None``: the kind carries no spec)."""
INBOUND_KINDS = tuple(PARSERS)


def parse_message(msg, **kwargs) -> tuple[str, str, Spec | object | None]:
    """Validate an inbound message; returns ``(kind, id, spec or None)``.

    Args:
        msg: The decoded JSON content of a custom message.
        **kwargs: Passed to :func:`~.spec.parse_spec` (``directions``, ``models``).

    Returns:
        For ``fit`` messages the third item is a :class:`.fit_spec.FitSpec`.

    Raises:
        ProtocolError: For anything but a well-formed compute, cancel, sync, fit or
            fit_stop message.

    Example:
        >>> parse_message({"kind": "cancel", "id": "a"})
        ('cancel', 'a', None)
    """
    if not isinstance(msg, dict):
        raise ProtocolError(f"message must be an object, got {type(msg).__name__}.")
    kind = msg.get("kind")
    if not isinstance(kind, str) or kind not in PARSERS:
        raise ProtocolError(
            f"unknown message kind {short(kind)}; expected one of {list(INBOUND_KINDS)}."
        )
    parser = PARSERS[kind]
    allowed = {"kind", "id", "spec"} if parser is not None else {"kind", "id"}
    extra = [k for k in msg if k not in allowed]
    if extra:
        raise ProtocolError(f"{kind} message has unknown fields {names_of(extra)}.")
    mid = msg.get("id")
    if not isinstance(mid, str) or not 0 < len(mid) <= MAX_ID_LENGTH:
        raise ProtocolError(f"{kind} message needs an id string of 1..{MAX_ID_LENGTH} characters.")
    if parser is None:
        return kind, mid, None
    if "spec" not in msg:
        raise ProtocolError(f"{kind} message is missing its spec.")
    return kind, mid, parser(msg["spec"], **kwargs)


# --- buffers ------------------------------------------------------------------------------
def f32(values) -> memoryview:
    """A float32 buffer (C order) of ``values``; ``None`` gives an empty buffer."""
    if values is None:
        return memoryview(b"")
    return memoryview(np.ascontiguousarray(values, dtype="<f4").reshape(-1)).cast("B")


def i32(values) -> memoryview:
    """An int32 buffer (C order) of ``values``."""
    return memoryview(np.ascontiguousarray(values, dtype="<i4").reshape(-1)).cast("B")


def decode_buffer(buf, dtype: str = "<f4") -> np.ndarray:
    """Inverse of :func:`f32`/:func:`i32` (for tests and fake front ends).

    Returns:
        A read-only 1D array of ``dtype`` over a copy of the buffer's bytes (empty for the
        empty buffer that ``f32(None)`` gives).

    Example:
        >>> decode_buffer(f32([1.5, 2.0])).tolist()
        [1.5, 2.0]
    """
    return np.frombuffer(bytes(buf), dtype=dtype)


# --- outbound: one builder per kind -------------------------------------------------------
Message = tuple[dict, list]
"""A message and its binary buffers, as ``send(message, buffers)`` takes them."""


def start_message(job_id: str, spec: dict, shape, metrics, device: str, x, y=None,
                  **view) -> Message:
    """``start``: a grid of ``shape`` begins; ``x``, ``y`` (``None`` in 1D) are its axes.

    ``view`` adds what the front end draws besides the grid (``labels``, ``path``,
    ``marks``, ``plane``, ``label``, ``metrics_dropped``).

    Returns:
        ``(message, buffers)``: the ``start`` dict (id, spec, integer shape, metric names,
        device, plus ``view``) and the float32 buffers of ``x`` and ``y`` (empty in 1D).
    """
    msg = {"kind": "start", "id": job_id, "spec": spec, "shape": [int(n) for n in shape],
           "metrics": list(metrics), "device": str(device), **view}
    return msg, [f32(x), f32(y)]


def tile_message(job_id: str, flat, loss, accuracy=None, *, level: int = 0, done: int,
                 total: int) -> Message:
    """``tile``: values at the flat indices ``flat`` (``accuracy`` ``None``: not computed)."""
    flat = np.asarray(flat).reshape(-1)
    msg = {"kind": "tile", "id": job_id, "level": int(level), "n": int(flat.size),
           "done": int(done), "total": int(total)}
    return msg, [i32(flat), f32(loss), f32(accuracy)]


def progress_message(job_id: str, done: int, total: int, points_per_s: float,
                     eta_s: float | None, device: str, plan: str | None,
                     stage: str = "") -> dict:
    """``progress`` of the running job.

    ``plan`` is the engine's strategy, for the status line; ``stage`` labels a subset pass
    (e.g. ``"subset 256 of 10,000 samples (±0.012)"``), shown before the plan.

    Returns:
        The message.
    """
    msg = {"kind": "progress", "id": job_id, "done": done, "total": total,
           "points_per_s": points_per_s, "eta_s": eta_s, "device": device, "plan": plan}
    if stage:
        msg["stage"] = stage
        msg["plan"] = " · ".join(filter(None, [stage, plan]))
    return msg


def done_message(job_id: str, seconds: float, evaluated: int, reused: int, nonfinite: int,
                 stats: str | None = None) -> dict:
    """``done``: every point computed (``stats``: the statistics line, grids only)."""
    msg = {"kind": "done", "id": job_id, "seconds": seconds, "evaluated": evaluated,
           "reused": reused, "nonfinite": nonfinite}
    if stats is not None:
        msg["stats"] = stats
    return msg


def cancelled_message(job_id: str, done: int = 0, total: int = 0) -> dict:
    """``cancelled`` after ``done`` of ``total`` points (0, 0: before the grid began)."""
    return {"kind": "cancelled", "id": job_id, "done": done, "total": total}


def error_message(job_id: str | None, message: str) -> dict:
    """The ``error`` message (``id`` is ``None`` when the bad message had no usable id)."""
    return {"kind": "error", "id": job_id, "message": str(message)[:2000]}


def ready_message(job_id: str) -> dict:
    """``ready``: the answer to ``sync`` (a kernel is behind the view)."""
    return {"kind": "ready", "id": job_id}


def fit_start_message(job_id: str, rows: int, cols: int, steps: int, mask: list,
                      splits: list, note: str = "") -> dict:
    """``fit_start`` of the pattern editor (``mask`` ternary, row-major).

    ``note``: what the fit's user should know (the parameters its networks share), or "".

    Returns:
        The ``fit_start`` message dict.
    """
    return {"kind": "fit_start", "id": job_id, "rows": rows, "cols": cols, "steps": steps,
            "mask": mask, "splits": splits, "note": note}


def fit_update_message(job_id: str, *, step: int, steps: int, rows: int, cols: int,
                       scores: dict, last: dict, seconds: float, mask: list,
                       evals: dict, note: str = "") -> Message:
    """``fit_update`` + [train loss, train accuracy, test loss, test accuracy] buffers.

    ``evals`` maps each split (``"train"``, maybe ``"test"``) to its loss and accuracy maps;
    ``note`` is as in :func:`fit_start_message` (kept with the last update: a re-render
    shows it).

    Returns:
        ``(message, buffers)``: the ``fit_update`` dict (step counts, map size, scores,
        last values, seconds, mask and the splits present) and four float32 buffers, the
        test ones empty when there is no ``"test"`` split.
    """
    splits, train, test = list(evals), evals["train"], evals.get("test", {})
    msg = {"kind": "fit_update", "id": job_id, "step": step, "steps": steps, "rows": rows,
           "cols": cols, "scores": scores, "last": last, "seconds": seconds,
           "splits": splits, "mask": mask, "note": note}
    return msg, [f32(train["loss"]), f32(train["accuracy"]), f32(test.get("loss")),
                 f32(test.get("accuracy"))]


def fit_done_message(job_id: str, step: int, stopped: bool, seconds: float) -> dict:
    """``fit_done``: the fit ended (``stopped``: before its last step)."""
    return {"kind": "fit_done", "id": job_id, "step": step, "stopped": stopped,
            "seconds": seconds}
