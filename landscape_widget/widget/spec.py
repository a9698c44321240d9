"""The compute spec: its fields, their limits and enumerations, written once, and its validation.

:class:`Spec` is the one source of the compute spec. Every other list of its fields is
derived from the dataclass: :data:`SPEC_FIELDS` (the wire types :func:`parse_spec` checks),
:data:`COMPUTE_TRAITS` and :func:`spec_traits` (the widget's traits, an ``Enum`` trait for
every enumeration), and :func:`schema`, which the widget sends to the front end in its
read-only ``_spec_schema`` trait (the JS reads the field names, enumerations, defaults and
limits from there and has no copy of them).

Adding a field is one line in :class:`Spec`, for example (``precision`` and ``samples``
were added so; a bounded int would read ``steps: int = bounded(10, 1, 1_000)``)::

    precision: str = choice("fp32", PRECISIONS)
    samples: str = choice("auto", SAMPLE_MODES)

which gives a widget trait (an ``Enum`` for a :func:`choice`), a wire field checked for type,
enumeration (:func:`choice`) or range (:func:`bounded`), its place in
:meth:`Spec.to_dict`, in ``LandscapeWidget(**traits)`` and in the schema. Checks that tie
several fields together (the resolution cap of each mode, the plane's lattice) are written
in :func:`parse_spec`. A field that changes which points a grid holds also belongs in
:meth:`Spec.direction_key` or the worker's reuse key.

Every error is a :class:`ProtocolError` whose text quotes offending values through
:func:`short`, so a hostile payload cannot blow up the reply.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..core.precision import PRECISIONS, available_precisions, precision_problem
from ..core.progressive import SAMPLE_MODES

MAX_2D = 201
"""Largest resolution per axis in 2D (201 x 201 = 40,401 points)."""
MAX_1D = 1025
"""Largest resolution in 1D."""
MAX_ID_LENGTH = 64
MAX_RANGE = 1e6
MAX_SEED = 2**31 - 1

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


class ProtocolError(ValueError):
    """A message from the front end that cannot be accepted."""


def short(value, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (for error texts about hostile input).

    Returns:
        ``repr(value)`` if it has at most ``limit`` characters, else its first
        ``limit - 3`` characters and ``"..."``; ``"<TypeName>"`` if ``repr`` raises.

    Example:
        >>> short("x" * 100, 10) == repr("x" * 100)[:7] + "..."
        True
        >>> class Hostile:
        ...     def __repr__(self):
        ...         raise RuntimeError
        >>> short(Hostile())
        '<Hostile>'
    """
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a hostile object's __repr__ must not escape
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def names_of(keys) -> list[str]:
    """Sorted, shortened names of dict keys of any type (sorting mixed types would raise)."""
    return sorted(short(k, 40) if not isinstance(k, str) else k[:40] for k in keys)[:10]


# --- how a field is declared ------------------------------------------------------------
def choice(default: str, values: tuple[str, ...]):
    """A string field that takes one of ``values`` (an ``Enum`` trait in the widget)."""
    return field(default=default, metadata={"choices": tuple(values)})


def bounded(default: int, low: int, high: int):
    """An int field in ``[low, high]``."""
    return field(default=default, metadata={"limits": (low, high)})


def list_of(kind: type, default: tuple):
    """A list field of ``kind`` entries (a tuple in :class:`Spec`, a list on the wire)."""
    return field(default=default, metadata={"items": kind})


@dataclass(frozen=True)
class Spec:
    """What to compute; every field validated (the one list of the spec's fields)."""

    mode: str = choice("2d", MODES)
    direction: str = choice("random", DIRECTION_TYPES)
    norm: str = choice("filter", NORMS)
    ignore_biasbn: bool = True
    x_range: tuple[float, float] = list_of(float, (-1.0, 1.0))
    y_range: tuple[float, float] = list_of(float, (-1.0, 1.0))
    resolution: int = 31  # its cap depends on mode, direction and quantity: see parse_spec
    seed: int = bounded(0, 0, MAX_SEED)
    bn: str = choice("eval", BN)
    quantity: str = choice("loss", QUANTITIES)
    vertices: tuple[str, ...] = list_of(str, ())
    precision: str = choice("fp32", PRECISIONS)  # the engine's (core/precision.py)
    samples: str = choice("auto", SAMPLE_MODES)  # data subset stages (core/progressive.py)

    def to_dict(self) -> dict:
        """JSON-ready form (tuples as lists).

        Returns:
            ``{field: value}`` for every field of the spec, in declaration order, tuple
            fields (ranges, vertices) as lists.

        Example:
            >>> Spec(vertices=("a", "b")).to_dict()["vertices"]
            ['a', 'b']
        """
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

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

        Returns:
            ``((x_range[0], x_range[1], resolution), (y_range[0], y_range[1], resolution))``
            in 2D; the second is ``None`` in 1D.

        Example:
            >>> Spec(mode="1d", x_range=(-0.5, 2.0), resolution=11).axes()
            ((-0.5, 2.0, 11), None)
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


FIELDS = {f.name: f for f in dataclasses.fields(Spec)}
"""The spec's fields, in order."""
SPEC_FIELDS = {name: list if isinstance(f.default, tuple) else type(f.default)
               for name, f in FIELDS.items()}
"""Field name -> the JSON type a compute message must give it."""
COMPUTE_TRAITS = tuple(FIELDS)
"""The widget traits that make up the spec (a change schedules a computation)."""
CHOICES = {name: f.metadata["choices"] for name, f in FIELDS.items() if "choices" in f.metadata}
"""Field name -> the values an enumeration takes."""
LIMITS = {name: f.metadata["limits"] for name, f in FIELDS.items() if "limits" in f.metadata}
"""Field name -> ``(low, high)`` of a bounded int."""


def schema(device=None) -> dict:
    """What the front end knows of the spec: fields, defaults, enumerations and limits.

    Sent as the widget's read-only ``_spec_schema`` trait; ``resolution`` maps each case to
    its largest resolution (``"2d"``, ``"1d"``, ``"curvature"``, ``"plane"``). With the
    widget's ``device`` (a ``torch.device``), ``choices["precision"]`` holds only the
    precisions possible there (:func:`~landscape_widget.core.precision.available_precisions`).

    Returns:
        ``{"fields", "defaults", "choices", "limits", "resolution"}``: the field names in
        order, :class:`Spec`'s defaults (JSON form), each enumeration's values, each bounded
        int's ``[low, high]``, and the largest resolution per case; JSON-ready (lists).

    Example:
        >>> s = schema()
        >>> s["fields"] == list(COMPUTE_TRAITS), s["resolution"]["2d"] == MAX_2D
        (True, True)
    """
    choices = {**CHOICES, "precision": available_precisions(device)}
    return {"fields": list(COMPUTE_TRAITS), "defaults": Spec().to_dict(),
            "choices": {k: list(v) for k, v in choices.items()},
            "limits": {k: list(v) for k, v in LIMITS.items()},
            "resolution": {"2d": MAX_2D, "1d": MAX_1D, "curvature": MAX_CURVATURE,
                           "plane": MAX_PLANE}}


def spec_traits() -> dict:
    """The widget's synced traits of the spec's fields, defaults from :class:`Spec`."""
    import traitlets as t

    kinds = {bool: t.Bool, int: t.Int, float: t.Float, str: t.Unicode}
    out = {}
    for name, f in FIELDS.items():
        if "choices" in f.metadata:
            trait = t.Enum(f.metadata["choices"], default_value=f.default)
        elif "items" in f.metadata:
            trait = t.List(kinds[f.metadata["items"]](), default_value=list(f.default))
        else:
            trait = kinds[type(f.default)](f.default)
        out[name] = trait.tag(sync=True)
    return out


# --- validation -------------------------------------------------------------------------
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
        raise ProtocolError(f"spec.vertices names unknown model(s) {names_of(unknown)}; {have}.")
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


def _check_fields(raw, directions: tuple[str, ...]) -> None:
    """Names, JSON types and enumerations of every field."""
    if not isinstance(raw, dict):
        raise ProtocolError(f"spec must be an object, got {type(raw).__name__}.")
    unknown = [k for k in raw if k not in SPEC_FIELDS]
    if unknown:
        raise ProtocolError(
            f"spec has unknown fields {names_of(unknown)}; allowed: {sorted(SPEC_FIELDS)}."
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
    for key, allowed in CHOICES.items():
        allowed = directions if key == "direction" else allowed  # what this widget offers
        if raw[key] not in allowed:
            raise ProtocolError(f"spec.{key}={short(raw[key])} is not one of {list(allowed)}.")


def parse_spec(raw, *, directions: tuple[str, ...] = DIRECTION_TYPES,
               models: tuple[str, ...] = (), device=None) -> Spec:
    """Validate a spec dict from the front end (or from traits).

    For ``"plane"``, ``resolution`` counts grid steps per unit (at most :data:`MAX_PLANE`),
    ``x_range[0]`` is minus the margin (in ``[0, 1]``), the rest of the ranges is unused.
    ``"interpolate"`` and ``"plane"`` refuse curvature maps (those are centred on the
    widget's model); the mined planes ``"saddle"`` and ``"wine-bottle"`` refuse 1D.

    Args:
        raw: The ``spec`` of a compute message.
        directions: Direction types this widget offers (interpolation needs ``model_b``).
        models: Names of the widget's models, which ``spec.vertices`` may name.
        device: Where the widget computes (a ``torch.device``; ``None``: unknown, as with
            an executor): ``spec.precision`` must be possible there (no fp16 on a CPU).

    Returns:
        The validated :class:`Spec`.

    Raises:
        ProtocolError: Naming the first problem found.

    Example:
        >>> parse_spec({**Spec().to_dict(), "resolution": 5}).shape
        (5, 5)
    """
    _check_fields(raw, directions)
    problem = None if device is None else precision_problem(raw["precision"], device)
    if problem is not None:
        raise ProtocolError(f"spec.precision: {problem}")
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
    values = {k: tuple(v) if SPEC_FIELDS[k] is list else v for k, v in raw.items()}
    values["vertices"] = _vertices(raw, tuple(models))
    values["x_range"] = _range(raw["x_range"], "spec.x_range")
    if raw["direction"] == "plane":
        _check_plane(values)
        cap = MAX_PLANE
    else:
        cap = MAX_2D if raw["mode"] == "2d" else MAX_1D
    if not 2 <= raw["resolution"] <= cap:
        raise ProtocolError(
            f"spec.resolution={short(raw['resolution'])} is outside [2, {cap}] for {raw['mode']}."
        )
    for key, (low, high) in LIMITS.items():
        if not low <= raw[key] <= high:
            raise ProtocolError(f"spec.{key}={short(raw[key])} must be in [{low}, {high}].")
    values["y_range"] = _range(raw["y_range"], "spec.y_range")
    return Spec(**values)


__all__ = ["Spec", "ProtocolError", "parse_spec", "schema", "spec_traits", "short", "choice",
           "bounded", "list_of", "SPEC_FIELDS", "COMPUTE_TRAITS", "CHOICES", "LIMITS"]
