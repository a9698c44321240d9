"""The widget's named models: interpolation between two of them, the plane through three.

``LandscapeWidget(models={"sgd": m1, "adam": m2, "rmsprop": m3}, data=...)`` offers two
direction types for comparing optimizers (Im, Tao & Branson 2016, PAPERS (b)):

- ``"interpolate"``: ``theta_A + alpha * (theta_B - theta_A)``, centred at model A, so
  alpha = 0 is A and alpha = 1 is B (:func:`~landscape_widget.interpolation_direction`,
  BatchNorm statistics included). In 2D the second axis is a random direction drawn at A
  and normalised as ``spec.norm`` says, as the ``"interpolation"`` type to ``model_b`` does.
- ``"plane"``: the barycentric plane through A, B, C, streamed coarse to fine by
  :func:`~landscape_widget.experiments.triangle.triangle_stream` on its exact lattice, so
  each vertex is its model bit for bit. ``spec.resolution`` counts grid steps per unit of
  alpha and beta, ``-spec.x_range[0]`` is the margin beyond the triangle; the rest of the
  ranges is unused. The result is a :class:`~landscape_widget.TriangleSurface`.

``spec.vertices`` names the models. The front end lists one entry per type and shows a
select per vertex, rather than an entry per ordered pair and per triple: that list grows
as n^3 (five optimizers would give 30 entries), the selects stay two or three.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from ..core.directions import interpolation_direction
from ..core.fingerprints import fingerprint
from ..core.landscape import TileStream
from ..core.params import check_module, check_same_placement, model_device
from ..core.surface import Curve, Surface
from ..experiments.triangle import TriangleSurface, triangle_stream
from .encode import path_info
from .jobs import Context, Job, Labelled
from .spec import MAX_NAME, VERTEX_COUNTS, Spec, short


def resolve_models(model, models) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The centre model and the named models of the widget's constructor.

    Args:
        model: The centre model (random, PCA and Hessian directions start there), or
            ``None`` to take the first of ``models``.
        models: ``{name: model}``, or ``None``.

    Returns:
        ``(centre, {name: model})``; the dict is empty without ``models``.

    Raises:
        TypeError: Without any model, or for names or models of the wrong type.
    """
    if models is None:
        if model is None:
            raise TypeError("LandscapeWidget needs a model: LandscapeWidget(model, data) or "
                            "LandscapeWidget(models={'sgd': m1, 'adam': m2}, data=data).")
        check_module(model, "model")
        return model, {}
    if not isinstance(models, Mapping) or not models:
        raise TypeError(f"models must be a non-empty dict of name -> torch.nn.Module, got "
                        f"{short(models, 60)}.")
    named: dict[str, nn.Module] = {}
    for name, m in models.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise TypeError(f"model names must be strings of 1 to {MAX_NAME} characters, got "
                            f"{short(name)}.")
        check_module(m, f"models[{name!r}]")
        named[name] = m
    # Models of different architectures are allowed: the compare panel (.compare) shows
    # each one's surface; "interpolate" and "plane" are offered only for one architecture.
    check_same_placement(list(named.values()), [f"models[{n!r}]" for n in named])
    centre = next(iter(named.values())) if model is None else model
    check_module(centre, "model")
    return centre, named


def compute_device(model: nn.Module, device, executor) -> torch.device | None:
    """Where the widget's grids compute (for the precisions it offers).

    Returns:
        ``device`` if given, else the model's device; ``None`` when an executor's workers
        pick theirs (their GPU if they have one) or the model has no single device (the
        engine reports that when it computes).
    """
    if device is not None:
        return torch.device(device)
    if executor is not None:
        return None
    try:
        return model_device(model)
    except ValueError:
        return None


def entries(names, direction: str) -> list[dict]:
    """The ``direction_types`` entry of ``direction`` (``"interpolate"`` or ``"plane"``).

    None without enough named models (two for interpolate, three for the plane).
    ``models`` are the names the front end's vertex selects offer, ``count`` how many it
    shows.

    Returns:
        A list holding the one entry of ``direction`` (its ``label``, ``direction``, ``norm``,
        ``models`` and ``count``), or an empty list with fewer names than the type needs.

    Example:
        >>> [e["count"] for e in entries(["a", "b"], "interpolate") + entries(["a", "b"], "plane")]
        [2]
    """
    names = list(names)
    if len(names) < VERTEX_COUNTS[direction]:
        return []
    if direction == "interpolate":
        return [{"label": "interpolate between two models", "direction": "interpolate",
                 "norm": "filter", "models": names, "count": 2}]
    return [{"label": "plane through three models", "direction": "plane", "norm": "none",
             "models": names, "count": 3}]


def _named(ctx: Context, name: str) -> nn.Module:
    try:
        return ctx.models[name]
    except KeyError:
        raise ValueError(f"no model named {name!r}; the widget's models are "
                         f"{sorted(ctx.models)}.") from None


def centre(ctx: Context, spec: Spec) -> nn.Module:
    """The model a grid of ``spec`` is centred at: A for ``"interpolate"``."""
    return _named(ctx, spec.vertices[0]) if spec.direction == "interpolate" else ctx.model


def vertex_key(ctx: Context, spec: Spec) -> tuple:
    """What ``"interpolate"`` directions depend on (their cache key in :mod:`.directions`)."""
    a, b = (_named(ctx, name) for name in spec.vertices)
    # The models' bytes are in the key: a model trained further gets new directions.
    return (spec.direction_key(), fingerprint(dict(a.state_dict())),
            fingerprint(dict(b.state_dict())))


def interpolate_directions(ctx: Context, spec: Spec, job: Job | None = None) -> Labelled:
    """Directions of the ``"interpolate"`` type: A to B on x, in 2D a random y drawn at A.

    The plane has none: :func:`plane_stream` weighs the three models themselves.

    Returns:
        A :class:`Labelled` list: ``B - A`` (with float buffers) and, in 2D, a random direction at
        A; with its axis labels and the marks of A at 0 and B at 1.

    Raises:
        ValueError: If a vertex names no model of the widget, or A and B differ in their parameters
            or layers.
    """
    a_name, b_name = spec.vertices
    a, b = _named(ctx, a_name), _named(ctx, b_name)
    dirs = Labelled([interpolation_direction(a, b)])
    dirs.axis_labels = [f"α ({a_name} → {b_name})"]
    if spec.mode == "2d":
        dirs += ctx.random(spec, 1, model=a)
        dirs.axis_labels.append("β (random direction)")
    dirs.marks = [{"name": a_name, "x": 0.0, "y": 0.0}, {"name": b_name, "x": 1.0, "y": 0.0}]
    return dirs


def plane_stream(ctx: Context, job: Job) -> TileStream:
    """The plane through ``job.spec.vertices`` as a stream of tiles (cancellable).

    Returns:
        The :class:`~landscape_widget.TileStream`, computed at the widget's ``precision``
        like the other grids (the result's ``spec["precision"]`` and
        ``spec["precision_error"]`` say what was computed).
    """
    spec = job.spec
    names = list(spec.vertices)
    return triangle_stream(
        [_named(ctx, n) for n in names], ctx.grid_data, resolution=spec.resolution,
        margin=spec.margin, loss_fn=ctx.loss_fn, metrics=ctx.metrics, bn=spec.bn,
        device=ctx.device, names=names, tile_points=ctx.tile_points, cancel=job.cancel,
        evaluator_options=ctx.evaluator_options, executor=ctx.executor,
        precision=spec.precision)


def view_info(dirs, stream: TileStream) -> dict:
    """What the front end draws besides the grid: labels, path, named points, the plane.

    For the plane: ``{"plane": {"names", "margin", "resolution", "outside"}}``, where
    ``outside`` counts the grid points beyond the region, never evaluated (NaN).

    Returns:
        The dict of :func:`path_info` (axis labels and path), plus ``"marks"`` (the named points)
        and, for a plane, ``"plane"``.
    """
    info = path_info(dirs)
    marks = getattr(dirs, "marks", None)
    if marks:
        info["marks"] = [dict(m) for m in marks]
    spec = stream.spec
    if spec.get("kind") == "triangle":
        beta, alpha = np.meshgrid(*stream.axes, indexing="ij")
        outside = int((alpha + beta > 1 + spec["margin"] + 1e-9).sum())
        info["plane"] = {"names": list(spec["names"]), "margin": float(spec["margin"]),
                         "resolution": int(spec["resolution"]), "outside": outside}
    return info


def outside(info: dict) -> int:
    """Grid points of the plane beyond its region (the engine counts them as reused)."""
    return int(info.get("plane", {}).get("outside", 0))


def as_triangle(result: Surface | Curve | None) -> Surface | Curve | TriangleSurface | None:
    """A plane's result as a :class:`~landscape_widget.TriangleSurface`; others unchanged."""
    plane = result.spec.get("plane") if isinstance(result, Surface) else None
    if not plane:
        return result
    alpha, beta = np.meshgrid(result.x, result.y)
    return TriangleSurface(alpha, beta, result.loss, result.accuracy, list(plane["names"]),
                           dict(result.spec))


__all__ = ["resolve_models", "compute_device", "entries", "centre", "vertex_key",
           "interpolate_directions", "plane_stream", "view_info", "outside", "as_triangle"]
