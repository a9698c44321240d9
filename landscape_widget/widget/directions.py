"""The widget's direction types: one registry, one cache.

A direction type is one entry of :data:`TYPES`, keyed by the name a compute message asks
for (:data:`.spec.DIRECTION_TYPES`). Each says

- ``entries(ctx)``: the entries of the ``direction_types`` trait it offers this widget
  (``{"label", "direction", "norm", ...}``; the front end's select lists them; none when
  the widget lacks what the type needs, e.g. ``model_b``);
- ``make(ctx, spec, job)``: the directions (one in 1D, two in 2D), computed in the worker
  thread; slow ones report to ``job.report`` and stop on ``job.cancel``;
- ``key(ctx, spec)``: what the directions depend on (``None``: not cached);
- ``finish(ctx, spec, made)``: optional, applied to the cached value for this spec (the
  curve types add the random y axis of 2D, so a 1D/2D switch re-uses a mined direction);
- ``cancellable``: a result made while the job was cancelled is half made (mining) and
  never cached.

:func:`directions_for` looks the type up and keeps the last :data:`DIRECTION_CACHE`
direction sets of every type in one LRU cache (:class:`DirectionCache`). A new type is one
entry here and its name in :data:`.spec.DIRECTION_TYPES`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..core.directions import interpolation_direction
from ..core.errors import Cancelled
from ..core.fingerprints import fingerprint
from ..core.hessian import hessian_eigenpairs
from ..core.reuse import model_code_fingerprint
from . import models, shapes
from .jobs import Context, Job
from .spec import DIRECTION_TYPES, Spec

DIRECTION_CACHE = 8
"""Direction sets kept per widget, all types together (each holds copies of the weights)."""


def _count(spec: Spec) -> int:
    return 2 if spec.mode == "2d" else 1


def _random(ctx: Context, spec: Spec, job: Job) -> list:
    return ctx.random(spec, _count(spec))


def _interpolation(ctx: Context, spec: Spec, job: Job) -> list:
    """From the model to ``model_b`` on x; in 2D a random y axis normalised as ``spec.norm``."""
    if ctx.model_b is None:
        raise ValueError("interpolation directions need model_b=... in the widget.")
    dirs = [interpolation_direction(ctx.model, ctx.model_b)]
    if _count(spec) == 2:
        dirs.append(ctx.random(spec, 1)[0])
    return dirs


def _pca(ctx: Context, spec: Spec, job: Job) -> list:
    """The first PCA directions of the trajectory (a PCADirections list, with its path)."""
    if ctx.trajectory is None:
        raise ValueError("PCA directions need a trajectory: LandscapeWidget(..., "
                         "trajectory=lw.Trajectory(...)).")
    dirs, _ = ctx.trajectory.pca_directions(k=2)
    if _count(spec) == 2:
        return dirs
    return type(dirs)(dirs[:1], dirs.evr[:1], dirs.path[:, :1])


def _hessian(ctx: Context, spec: Spec, job: Job) -> list:
    """The top Hessian eigenvectors at the model (unit norm; cancellable with the job)."""
    last = [0.0]

    def progress(products: int) -> None:
        now = time.perf_counter()
        if products == 1 or now - last[0] > 0.5:
            last[0] = now
            job.report.status(
                message=f"Hessian eigenvectors: {products} Hessian-vector products")

    _, vecs = hessian_eigenpairs(ctx.model, ctx.data, k=_count(spec), loss_fn=ctx.loss_fn,
                                 device=ctx.device, bn=spec.bn, cancel=job.cancel,
                                 tol=1e-4, on_product=progress,
                                 batch_size=ctx.bn_batch_size if spec.bn == "batch" else None)
    return vecs


def _model_key(ctx: Context, spec: Spec) -> tuple:
    # The model's bytes are in the key: a model trained further gets new directions. Its
    # code, attributes and hooks too: the Hessian of a model given a hook is another one;
    # and the Hessian's data.
    hessian = spec.direction == "hessian"
    return (spec.direction_key(), fingerprint(dict(ctx.model.state_dict())),
            model_code_fingerprint(ctx.model), spec.bn if hessian else None,
            ctx.data_key() if hessian else None)


def _fixed(*entries: dict) -> Callable[[Context], list[dict]]:
    return lambda ctx: [dict(e) for e in entries]


@dataclass(frozen=True)
class DirectionType:
    """How one direction type is offered, made and cached (see the module docstring)."""

    entries: Callable[[Context], list[dict]]
    make: Callable[[Context, Spec, Job], list]
    key: Callable[[Context, Spec], tuple | None] = _model_key
    finish: Callable[[Context, Spec, list], list] | None = None
    cancellable: bool = False


TYPES: dict[str, DirectionType] = {
    "random": DirectionType(_fixed(
        {"label": "random, filter-normalised", "direction": "random", "norm": "filter"},
        {"label": "random, layer-normalised", "direction": "random", "norm": "layer"},
        {"label": "random, raw", "direction": "random", "norm": "none"}), _random),
    "interpolation": DirectionType(
        lambda ctx: [] if ctx.model_b is None else [
            {"label": "interpolation to model_b", "direction": "interpolation",
             "norm": "filter"}], _interpolation),
    "interpolate": DirectionType(lambda ctx: models.entries(ctx.models, "interpolate"),
                                 models.interpolate_directions, models.vertex_key),
    "plane": DirectionType(lambda ctx: models.entries(ctx.models, "plane"),
                           lambda ctx, spec, job: [], lambda ctx, spec: None),
    "pca": DirectionType(
        lambda ctx: [] if ctx.trajectory is None else [
            {"label": "PCA of trajectory", "direction": "pca", "norm": "none"}], _pca),
    "hessian": DirectionType(_fixed(
        {"label": "Hessian top-2 eigenvectors", "direction": "hessian", "norm": "none"}),
        _hessian),
    **{name: DirectionType(lambda ctx, name=name: [shapes.entry(name)], shapes.compute,
                           shapes.key, shapes.finish, cancellable=True)
       for name in shapes.SHAPE_TYPES},
}
"""Every direction type, in the order the front end's select lists them."""
if set(TYPES) != set(DIRECTION_TYPES):  # pragma: no cover - a type added in one place only
    raise ImportError(f"direction types {sorted(set(TYPES) ^ set(DIRECTION_TYPES))} are in "
                      "only one of directions.TYPES and spec.DIRECTION_TYPES.")


def offered(ctx: Context) -> list[dict]:
    """The ``direction_types`` trait of a widget with ``ctx``: every type's entries, in order."""
    return [entry for kind in TYPES.values() for entry in kind.entries(ctx)]


class DirectionCache:
    """The last :data:`DIRECTION_CACHE` direction sets of one widget (an LRU, thread-safe)."""

    def __init__(self, size: int = DIRECTION_CACHE):
        self.size = size
        self.entries: OrderedDict[tuple, list] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> list | None:
        """The cached value of ``key`` (now the most recent), or ``None``."""
        with self._lock:
            if key not in self.entries:
                return None
            self.entries.move_to_end(key)
            return self.entries[key]

    def put(self, key: tuple, value: list) -> None:
        """Keep ``value``; the least recently used set goes when the cache is full."""
        with self._lock:
            self.entries[key] = value
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self.entries)


def directions_for(ctx: Context, cache: DirectionCache, spec: Spec, job: Job) -> list:
    """The directions of ``spec``, from ``cache`` or made by its type (then cached).

    Args:
        ctx: The widget's context.
        cache: The widget's direction cache.
        spec: The validated spec.
        job: The running job (cancel event and reporter).

    Returns:
        A list of direction dicts (with ``axis_labels``, ``marks``, ``path`` or ``note``
        where the type has them).

    Raises:
        Cancelled: If the job was cancelled while a cancellable type computed.
        ValueError: If the type is unknown or the widget lacks what it needs.
    """
    kind = TYPES.get(spec.direction)
    if kind is None:
        raise ValueError(f"direction type {spec.direction!r} is not implemented.")
    key = kind.key(ctx, spec)
    made = None if key is None else cache.get((spec.direction, key))
    if made is None:
        if kind.cancellable and job.cancel.is_set():
            raise Cancelled("cancelled")
        made = kind.make(ctx, spec, job)
        if kind.cancellable and job.cancel.is_set():
            raise Cancelled("cancelled")  # half made (mining stops early): never cached
        if key is not None:
            cache.put((spec.direction, key), made)
    return made if kind.finish is None else kind.finish(ctx, spec, made)


__all__ = ["TYPES", "DirectionType", "DirectionCache", "DIRECTION_CACHE", "directions_for",
           "offered"]
