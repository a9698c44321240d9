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
from torch import nn

from ..core.compute import fingerprint
from ..core.directions import interpolation_direction
from ..core.landscape import TileStream
from ..core.params import check_module, check_same_placement
from ..core.surface import Curve, Surface
from ..experiments.triangle import TriangleSurface, triangle_stream
from . import extra_jobs
from .protocol import MAX_NAME, Spec, short

DIRECTION_CACHE = 8
"""Direction sets kept per worker (as the worker's own cache)."""


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


def direction_entries(names) -> list[dict]:
    """Entries of the ``direction_types`` trait for the named models.

    ``models`` are the names the front end's vertex selects offer, ``count`` how many it
    shows.
    """
    names = list(names)
    out = []
    if len(names) >= 2:
        out.append({"label": "interpolate between two models", "direction": "interpolate",
                    "norm": "filter", "models": names, "count": 2})
    if len(names) >= 3:
        out.append({"label": "plane through three models", "direction": "plane",
                    "norm": "none", "models": names, "count": 3})
    return out


def _named(worker, name: str) -> nn.Module:
    try:
        return worker.models[name]
    except KeyError:
        raise ValueError(f"no model named {name!r}; the widget's models are "
                         f"{sorted(worker.models)}.") from None


def centre(worker, spec: Spec) -> nn.Module:
    """The model a grid of ``spec`` is centred at: A for ``"interpolate"``."""
    return _named(worker, spec.vertices[0]) if spec.direction == "interpolate" else worker.model


class _Labelled(list):
    """Directions with axis labels and the named points to mark on the plot."""

    axis_labels: list[str]
    marks: list[dict]


def directions(worker, spec: Spec) -> list:
    """Directions of the ``"interpolate"`` and ``"plane"`` types (cached like the others).

    The plane has none: :func:`plane_stream` weighs the three models themselves.
    """
    if spec.direction == "plane":
        return []
    a_name, b_name = spec.vertices
    a, b = _named(worker, a_name), _named(worker, b_name)
    # The models' bytes are in the key: a model trained further gets new directions.
    key = ("vertices", spec.direction_key(), fingerprint(dict(a.state_dict())),
           fingerprint(dict(b.state_dict())))
    cache = worker._directions
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    dirs = _Labelled([interpolation_direction(a, b)])
    dirs.axis_labels = [f"α ({a_name} → {b_name})"]
    if spec.mode == "2d":
        dirs += worker.random_for(spec, 1, model=a)
        dirs.axis_labels.append("β (random direction)")
    dirs.marks = [{"name": a_name, "x": 0.0, "y": 0.0}, {"name": b_name, "x": 1.0, "y": 0.0}]
    cache[key] = dirs
    while len(cache) > DIRECTION_CACHE:
        cache.popitem(last=False)
    return dirs


def plane_stream(worker, job) -> TileStream:
    """The plane through ``job.spec.vertices`` as a stream of tiles (cancellable)."""
    spec = job.spec
    names = list(spec.vertices)
    models = [_named(worker, n) for n in names]
    while True:
        try:
            return triangle_stream(
                models, worker.grid_data, resolution=spec.resolution, margin=spec.margin,
                loss_fn=worker.loss_fn, metrics=worker.metrics, bn=spec.bn,
                device=worker.device, names=names, tile_points=worker.tile_points,
                cancel=job.cancel, evaluator_options=worker.evaluator_options,
                executor=worker.executor)
        except ValueError as err:
            if "accuracy" in worker.metrics and str(err).startswith("accuracy needs"):
                worker.metrics = ("loss",)  # not a classification task; the loss still is
            else:
                raise


def view_info(dirs, stream: TileStream) -> dict:
    """What the front end draws besides the grid: labels, path, named points, the plane.

    For the plane: ``{"plane": {"names", "margin", "resolution", "outside"}}``, where
    ``outside`` counts the grid points beyond the region, never evaluated (NaN).
    """
    info = extra_jobs.path_info(dirs)
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


__all__ = ["resolve_models", "direction_entries", "centre", "directions", "plane_stream",
           "view_info", "outside", "as_triangle"]
