"""Messages between the front end and the kernel: validation, the compute spec, encoders.

Every inbound message is checked here before anything runs. A malformed or hostile
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
    {"kind": "fit", ...}, {"kind": "fit_stop", ...}   (the pattern editor: see .patterns)

``spec.vertices`` names the models a multi-model direction type runs through (the
``models=`` of the widget): ``[A, B]`` for ``"interpolate"`` (from A to B, centred at A),
``[A, B, C]`` for ``"plane"`` (the barycentric plane; A at alpha = 1, B at beta = 1, C at
the origin). An empty list picks the first models; other direction types ignore it.

Python -> JS::

    {"kind": "start", "id", "spec", "shape", "metrics", "device"} + [x, y] float32 buffers
    {"kind": "tile", "id", "level", "n", "done", "total"}
        + [flat int32, loss float32, accuracy float32] (accuracy empty if not computed)
    {"kind": "progress", "id", "done", "total", "points_per_s", "eta_s", "device", "plan"}
    {"kind": "done", "id", "seconds", "evaluated", "reused", "nonfinite", "stats"}
        (``stats``: the statistics line of a 2D loss surface, see ``lw.landscape_stats``;
        "" otherwise)
    {"kind": "cancelled", "id", "done", "total"}
    {"kind": "error", "id", "message"}
    {"kind": "ready", "id"}          (the answer to ``sync``: a kernel is behind the view)

Buffers are little-endian, C-contiguous; NaN marks a point that is not computed (or whose
loss is not finite).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..core.precision import PRECISIONS

MAX_2D = 201
"""Largest resolution per axis in 2D (201 x 201 = 40,401 points)."""
MAX_1D = 1025
"""Largest resolution in 1D."""
MAX_ID_LENGTH = 64
MAX_RANGE = 1e6

SHAPE_TYPES = ("mined-w-peak", "mined-vvv-basin", "permutation", "side", "saddle",
               "wine-bottle")
"""Directions of the curve shapes of Li, Li & Zhan 2024, computed on demand (see .shapes)."""
SHAPE_PLANES = ("saddle", "wine-bottle")
"""Of those, the mined planes ``(u, v)``: 2D only."""
DIRECTION_TYPES = ("random", "interpolation", "pca", "hessian", "interpolate",
                   "plane") + SHAPE_TYPES
VERTEX_COUNTS = {"interpolate": 2, "plane": 3}
"""Direction types through the widget's named models, and how many models each needs."""
MAX_PLANE = 50
"""Largest plane resolution (grid steps per unit of alpha, beta): 201 points per axis at
margin 1, the 2D cap."""
MAX_NAME = 64
QUANTITIES = ("loss", "curvature")
MAX_CURVATURE = 31
"""Largest resolution per axis of a curvature map (every point costs two Lanczos runs)."""
NORMS = ("filter", "layer", "weight", "none")
MODES = ("1d", "2d")
BN = ("eval", "batch")
INBOUND_KINDS = ("compute", "cancel", "sync", "fit", "fit_stop")

SPEC_FIELDS = {
    "mode": str,
    "direction": str,
    "norm": str,
    "ignore_biasbn": bool,
    "x_range": list,
    "y_range": list,
    "resolution": int,
    "seed": int,
    "bn": str,
    "quantity": str,
    "vertices": list,
}


# Fields a front end may leave out (their Spec default applies), checked by their parsers.
OPTIONAL_FIELDS = {"precision": str}


class ProtocolError(ValueError):
    """A message from the front end that cannot be accepted."""


def short(value, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (for error texts about hostile input)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a hostile object's __repr__ must not escape
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names(keys) -> list[str]:
    """Sorted, shortened names of dict keys of any type (sorting mixed types would raise)."""
    return sorted(short(k, 40) if not isinstance(k, str) else k[:40] for k in keys)[:10]


@dataclass(frozen=True)
class Spec:
    """What to compute; every field validated."""

    mode: str = "2d"
    direction: str = "random"
    norm: str = "filter"
    ignore_biasbn: bool = True
    x_range: tuple[float, float] = (-1.0, 1.0)
    y_range: tuple[float, float] = (-1.0, 1.0)
    resolution: int = 31
    seed: int = 0
    bn: str = "eval"
    quantity: str = "loss"
    vertices: tuple[str, ...] = ()
    precision: str = "fp32"  # the engine's compute precision (core/precision.py)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        d = asdict(self)
        d["x_range"], d["y_range"] = list(self.x_range), list(self.y_range)
        d["vertices"] = list(self.vertices)
        return d

    def direction_key(self) -> tuple:
        """Specs with equal keys share directions (and so can reuse computed points)."""
        # Vertices left over from an earlier choice must not split the cache of others.
        through = self.vertices if self.direction in VERTEX_COUNTS else ()
        return (self.mode, self.direction, self.norm, self.ignore_biasbn, self.seed, through)

    @property
    def margin(self) -> float:
        """The plane's margin beyond the triangle: ``-x_range[0]`` (``"plane"`` only)."""
        return -self.x_range[0]

    def axes(self) -> tuple[tuple, tuple | None]:
        """``(x, y)`` as ``(start, stop, num)`` for :func:`~landscape_widget.iter_tiles`.

        ``y`` is ``None`` in 1D.
        """
        x = (self.x_range[0], self.x_range[1], self.resolution)
        y = (self.y_range[0], self.y_range[1], self.resolution) if self.mode == "2d" else None
        return x, y

    @property
    def shape(self) -> tuple[int, ...]:
        """``(ny, nx)`` in 2D, ``(n,)`` in 1D."""
        n = self.resolution
        if self.direction == "plane":
            # As experiments.triangle.lattice: -margin .. 1 + 2 * margin in steps of 1/n.
            n += 3 * math.floor(self.margin * self.resolution + 1e-9) + 1
        return (n, n) if self.mode == "2d" else (n,)


def _range(value, name: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ProtocolError(f"{name} must be [start, stop], got {short(value)}.")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ProtocolError(f"{name} entries must be numbers, got {short(v)}.")
        # abs() first: math.isfinite(10**400) would raise OverflowError.
        if abs(v) > MAX_RANGE or not math.isfinite(v):
            raise ProtocolError(f"{name} entries must be finite and at most 1e6, got {short(v)}.")
        out.append(float(v))
    if out[0] >= out[1]:
        raise ProtocolError(f"{name} start must be below stop, got {out}.")
    return out[0], out[1]


def _vertices(raw: dict, models: tuple[str, ...]) -> tuple[str, ...]:
    """``spec.vertices``, checked against the widget's model names (defaults filled in)."""
    value, direction = raw["vertices"], raw["direction"]
    if len(value) > 3 or not all(isinstance(v, str) and 0 < len(v) <= MAX_NAME for v in value):
        raise ProtocolError(f"spec.vertices must be a list of at most three model names, "
                            f"got {short(value)}.")
    unknown = [v for v in value if v not in models]
    if unknown:
        have = f"the widget's models are {list(models)[:10]}" if models else (
            "this widget has no named models (pass models={name: model, ...})")
        raise ProtocolError(f"spec.vertices names unknown model(s) {_names(unknown)}; {have}.")
    if len(set(value)) != len(value):
        raise ProtocolError(f"spec.vertices repeats a model: {short(value)}.")
    need = VERTEX_COUNTS.get(direction)
    if need is None:
        return tuple(value)
    if not value:
        value = list(models[:need])  # the first models, in the order the user gave them
    if len(value) != need:
        what = "interpolation from A to B" if need == 2 else "plane through three models"
        raise ProtocolError(
            f"direction {direction!r} ({what}) needs {need} distinct models of the "
            f"widget in spec.vertices, got {short(raw['vertices'])}"
            + ("." if len(models) >= need else f"; the widget has only {len(models)}."))
    return tuple(value)


def _check_plane(raw: dict) -> None:
    """The plane is a 2D loss map on its own lattice; refuse what does not apply to it."""
    if raw["mode"] != "2d" or raw["quantity"] != "loss":
        raise ProtocolError(f"the plane through three models is a 2D loss map; got "
                            f"mode={short(raw['mode'])}, quantity={short(raw['quantity'])}.")
    if not 2 <= raw["resolution"] <= MAX_PLANE:
        raise ProtocolError(f"spec.resolution={short(raw['resolution'])}: for the plane it "
                            f"counts grid steps per unit of alpha and beta, in [2, {MAX_PLANE}].")
    start = raw["x_range"][0]
    if not -1 <= start <= 0:
        raise ProtocolError(f"for the plane, spec.x_range[0] is minus the margin beyond the "
                            f"triangle (margin in [0, 1]), got {short(start)}.")


def parse_spec(raw, *, directions: tuple[str, ...] = DIRECTION_TYPES,
               models: tuple[str, ...] = ()) -> Spec:
    """Validate a spec dict from the front end (or from traits).

    For ``"plane"``, ``resolution`` counts grid steps per unit (at most :data:`MAX_PLANE`),
    ``x_range[0]`` is minus the margin (in ``[0, 1]``), the rest of the ranges is unused.
    ``"interpolate"`` and ``"plane"`` refuse curvature maps (those are centred on the
    widget's model); the mined planes ``"saddle"`` and ``"wine-bottle"`` refuse 1D.

    Args:
        raw: The ``spec`` of a compute message.
        directions: Direction types this widget offers (interpolation needs ``model_b``).
        models: Names of the widget's models, which ``spec.vertices`` may name.

    Returns:
        The validated :class:`Spec`.

    Raises:
        ProtocolError: Naming the first problem found.

    Example:
        >>> parse_spec({**Spec().to_dict(), "resolution": 5}).shape
        (5, 5)
    """
    if not isinstance(raw, dict):
        raise ProtocolError(f"spec must be an object, got {type(raw).__name__}.")
    unknown = [k for k in raw if k not in SPEC_FIELDS and k not in OPTIONAL_FIELDS]
    if unknown:
        raise ProtocolError(
            f"spec has unknown fields {_names(unknown)}; allowed: "
            f"{sorted(SPEC_FIELDS) + sorted(OPTIONAL_FIELDS)}."
        )
    missing = sorted(set(SPEC_FIELDS) - set(raw))
    if missing:
        raise ProtocolError(f"spec is missing fields {missing}.")
    for key, typ in SPEC_FIELDS.items():
        v = raw[key]
        ok = isinstance(v, typ) and not (typ is int and isinstance(v, bool))
        if typ is list:
            ok = isinstance(v, (list, tuple))
        if not ok:
            raise ProtocolError(f"spec.{key} must be of type {typ.__name__}, got {short(v)}.")
    for key, allowed in (("mode", MODES), ("direction", directions), ("norm", NORMS), ("bn", BN),
                         ("quantity", QUANTITIES)):
        if raw[key] not in allowed:
            raise ProtocolError(f"spec.{key}={short(raw[key])} is not one of {list(allowed)}.")
    if raw["quantity"] == "curvature" and (raw["mode"] != "2d"
                                           or raw["resolution"] > MAX_CURVATURE):
        raise ProtocolError(f"a curvature map is 2D with resolution <= {MAX_CURVATURE}; got "
                            f"mode={raw['mode']}, resolution={short(raw['resolution'])}.")
    if raw["quantity"] == "curvature" and raw["direction"] == "interpolate":
        raise ProtocolError("a curvature map is centred on the widget's model; pick a random, "
                            "PCA or Hessian direction for it.")
    if raw["direction"] in SHAPE_PLANES and raw["mode"] != "2d":
        raise ProtocolError(f"direction {raw['direction']!r} is a mined plane (u, v), a 2D "
                            f"surface: set mode to '2d' (for a 1D curve pick a curve type "
                            f"such as 'mined-w-peak').")
    vertices = _vertices(raw, tuple(models))
    x_range = _range(raw["x_range"], "spec.x_range")
    if raw["direction"] == "plane":
        _check_plane({**raw, "x_range": x_range})
        cap = MAX_PLANE
    else:
        cap = MAX_2D if raw["mode"] == "2d" else MAX_1D
    if not 2 <= raw["resolution"] <= cap:
        raise ProtocolError(
            f"spec.resolution={short(raw['resolution'])} is outside [2, {cap}] for {raw['mode']}."
        )
    if not 0 <= raw["seed"] < 2**31:
        raise ProtocolError(f"spec.seed={short(raw['seed'])} must be in [0, 2**31).")
    return Spec(
        mode=raw["mode"],
        direction=raw["direction"],
        norm=raw["norm"],
        ignore_biasbn=raw["ignore_biasbn"],
        x_range=x_range,
        y_range=_range(raw["y_range"], "spec.y_range"),
        resolution=raw["resolution"],
        seed=raw["seed"],
        bn=raw["bn"],
        quantity=raw["quantity"],
        vertices=vertices,
        precision=_precision(raw),
    )


def parse_message(msg, **kwargs) -> tuple[str, str, Spec | object | None]:
    """Validate an inbound message; returns ``(kind, id, spec or None)``.

    Args:
        msg: The decoded JSON content of a custom message.
        **kwargs: Passed to :func:`parse_spec` (``directions``, ``models``).

    Returns:
        For ``fit`` messages the third item is a :class:`.patterns.FitSpec`.

    Raises:
        ProtocolError: For anything but a well-formed compute, cancel, sync, fit or
            fit_stop message.
    """
    if not isinstance(msg, dict):
        raise ProtocolError(f"message must be an object, got {type(msg).__name__}.")
    kind = msg.get("kind")
    if not isinstance(kind, str) or kind not in INBOUND_KINDS:
        raise ProtocolError(
            f"unknown message kind {short(kind)}; expected one of {list(INBOUND_KINDS)}."
        )
    allowed = {"kind", "id", "spec"} if kind in ("compute", "fit") else {"kind", "id"}
    extra = [k for k in msg if k not in allowed]
    if extra:
        raise ProtocolError(f"{kind} message has unknown fields {_names(extra)}.")
    mid = msg.get("id")
    if not isinstance(mid, str) or not 0 < len(mid) <= MAX_ID_LENGTH:
        raise ProtocolError(f"{kind} message needs an id string of 1..{MAX_ID_LENGTH} characters.")
    if kind not in ("compute", "fit"):
        return kind, mid, None
    if "spec" not in msg:
        raise ProtocolError(f"{kind} message is missing its spec.")
    if kind == "fit":
        from .patterns import parse_fit_spec  # patterns imports this module

        return kind, mid, parse_fit_spec(msg["spec"])
    return kind, mid, parse_spec(msg["spec"], **kwargs)


# --- outbound ---------------------------------------------------------------------------
def f32(values) -> memoryview:
    """A float32 buffer (C order) of ``values``; ``None`` gives an empty buffer."""
    if values is None:
        return memoryview(b"")
    return memoryview(np.ascontiguousarray(values, dtype="<f4").reshape(-1)).cast("B")


def i32(values) -> memoryview:
    """An int32 buffer (C order) of ``values``."""
    return memoryview(np.ascontiguousarray(values, dtype="<i4").reshape(-1)).cast("B")


def error_message(job_id: str | None, message: str) -> dict:
    """The ``error`` message (``id`` is ``None`` when the bad message had no usable id)."""
    return {"kind": "error", "id": job_id, "message": str(message)[:2000]}


def decode_buffer(buf, dtype: str = "<f4") -> np.ndarray:
    """Inverse of :func:`f32`/:func:`i32` (for tests and fake front ends)."""
    return np.frombuffer(bytes(buf), dtype=dtype)


def _precision(raw: dict) -> str:
    """``spec.precision`` (optional: a front end without the control means fp32)."""
    value = raw.get("precision", "fp32")
    if not isinstance(value, str) or value not in PRECISIONS:
        raise ProtocolError(f"spec.precision={short(value)} is not one of {list(PRECISIONS)}.")
    return value
