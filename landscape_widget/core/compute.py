"""Grid jobs: validation, reuse of computed points and the tile stream behind ``iter_tiles``."""

from __future__ import annotations

import functools
import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .directions import random_directions
from .evaluate import Evaluator
from .fingerprints import callable_fingerprint
from .grid import MAX_GRID_POINTS, match_axis, parse_axis, progressive_order
from .params import Params, check_direction
from .state import bn_batch_size_for


@dataclass
class Tile:
    """A batch of finished grid points, as streamed to a progress bar or the widget.

    Attributes:
        index: Position in the stream.
        level: Coarseness (points lie on the lattice of every ``2**level``-th index).
        flat: Flat indices into the grid (row-major; rows = y for surfaces).
        values: ``{metric: array}`` aligned with ``flat``.
        evaluated: How many of these points were computed (the others were reused).
        done: Points finished so far, this tile included.
        total: Points in the whole grid.
        seconds: Wall time spent on this tile.
    """

    index: int
    level: int
    flat: np.ndarray
    values: dict[str, np.ndarray]
    evaluated: int
    done: int
    total: int
    seconds: float


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A short hash of tensor names, shapes, dtypes and bytes (used to decide reuse)."""
    h = hashlib.blake2b(digest_size=12)
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _loss_name(loss_fn) -> str:
    if loss_fn is None:
        return "cross_entropy"
    return getattr(loss_fn, "__qualname__", None) or type(loss_fn).__name__


def _what_is_computed(loss_fn, metrics, output_fn) -> dict:
    """Fingerprints of the loss and of the user metrics (with ``output_fn``), for reuse.

    ``None`` where a function cannot be fingerprinted reliably (see core/fingerprints.py).
    """
    user = {k: v for k, v in metrics.items() if v is not None} if isinstance(metrics, dict) else {}
    parts = {name: callable_fingerprint(fn) for name, fn in sorted(user.items())}
    if output_fn is not None:
        parts["output_fn"] = callable_fingerprint(output_fn)
    unreliable = [k for k, v in parts.items() if v is None]
    return {
        "loss_fingerprint": callable_fingerprint(loss_fn) if loss_fn is not None
        else "cross_entropy",
        "metrics_fingerprint": None if unreliable else fingerprint_text(repr(parts)),
    }


def fingerprint_text(text: str) -> str:
    """A short hash of a string."""
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def metric_values(result, name: str):
    """The array of metric ``name`` in a Surface/Curve (None if it was not computed)."""
    if name in ("loss", "accuracy"):
        return getattr(result, name, None)
    return (getattr(result, "extra_metrics", None) or {}).get(name)


@dataclass
class _Job:
    """Everything :func:`iter_tiles` needs, validated once."""

    axes: list[np.ndarray]
    directions: list[Params]
    spec: dict
    evaluator: Evaluator
    known: dict[str, np.ndarray] = field(default_factory=dict)
    known_mask: np.ndarray | None = None


def _resolve_directions(model, directions, ndim, seed, points: bool = False
                        ) -> tuple[list[Params], str]:
    if points:  # barycentric: ndim + 1 vertices (see Evaluator)
        if not isinstance(directions, (list, tuple)) or len(directions) != ndim + 1:
            raise TypeError(f"barycentric grids need {ndim + 1} points (parameter dicts).")
        for i, d in enumerate(directions):
            check_direction(model, d, name=f"points[{i}]")
        return list(directions), "barycentric points"
    if directions is None:
        return random_directions(model, ndim, seed=seed), "random filter-normalised"
    if ndim == 1 and isinstance(directions, dict):
        directions = [directions]
    if not isinstance(directions, (list, tuple)) or len(directions) != ndim:
        raise TypeError(
            f"directions must be {'a direction dict' if ndim == 1 else 'a pair (d1, d2) of dicts'}"
            f"; got {type(directions).__name__}. Make them with lw.random_direction(model)."
        )
    for i, d in enumerate(directions):
        check_direction(model, d, name=f"directions[{i}]")
    return list(directions), "given"


def _reuse(job: _Job, reuse, metrics: Sequence[str]) -> None:
    """Copy the values of ``reuse`` at coordinates that coincide with the new grid."""
    for key, what in (("loss_fingerprint", "loss_fn"), ("metrics_fingerprint", "metrics")):
        if job.spec.get(key) is None or reuse.spec.get(key) is None:
            if reuse.spec.get("source") == "loss-landscape" and job.spec.get(key) is not None:
                continue  # checked by recomputing a few points (check_foreign_reuse)
            which = "this call's" if job.spec.get(key) is None else "reuse='s"
            raise ValueError(
                f"reuse= cannot tell whether {which} {what} is the one the points were "
                "computed with: it holds a value that cannot be fingerprinted (an object with "
                "no state or stable repr), or the result predates fingerprints. Compute "
                "without reuse=, or use a loss module / module-level function."
            )
    same = ("model", "directions", "loss_fn", "loss_fingerprint", "metrics_fingerprint", "bn",
            "bn_batch_size", "n_samples", "data")
    # A loss-landscape file records none of these: its values are checked by recomputing
    # a few of them instead (check_foreign_reuse in landscape.py).
    foreign = reuse.spec.get("source") == "loss-landscape"
    diff = [] if foreign else [k for k in same if reuse.spec.get(k) != job.spec.get(k)]
    # Results from before precision= were fp32.
    if not foreign and reuse.spec.get("precision", "fp32") != job.spec.get("precision", "fp32"):
        diff.append("precision")
    if "loss_fingerprint" in diff and "loss_fn" not in diff:
        diff[diff.index("loss_fingerprint")] = "loss (same name, other settings or code)"
    missing = [m for m in metrics if metric_values(reuse, m) is None]
    if diff or missing:
        raise ValueError(
            f"reuse= was computed with a different {', '.join(diff) or 'set of metrics'}; "
            "only a result of the same model, directions, data, loss and bn mode can be reused."
        )
    old_axes = [reuse.x] if len(job.axes) == 1 else [reuse.y, reuse.x]
    maps = [match_axis(new, old) for new, old in zip(job.axes, old_axes, strict=True)]
    shape = tuple(a.size for a in job.axes)
    mask = np.ones(shape, dtype=bool)
    if len(maps) == 1:
        mask &= maps[0] >= 0
        src = (maps[0][mask],)
    else:
        mask &= np.logical_and.outer(maps[0] >= 0, maps[1] >= 0)
        iy, ix = np.nonzero(mask)
        src = (maps[0][iy], maps[1][ix])
    for m in metrics:
        arr = np.full(shape, np.nan)
        arr[mask] = np.asarray(metric_values(reuse, m))[src]
        job.known[m] = arr.ravel()
    # NaN: not computed (a cancelled run, an unfinished loss-landscape file) or non-finite:
    # computed (again).
    for m in metrics:
        mask &= ~np.isnan(job.known[m].reshape(shape))
    job.known_mask = mask.ravel()


def remote_evaluators(executor) -> Callable | None:
    """The ``make_evaluator`` of :func:`_prepare` for ``executor`` (``None``: local)."""
    if executor is None:
        return None
    from .distributed import RemoteEvaluator  # imports dask lazily

    return functools.partial(RemoteEvaluator, executor)


def _prepare(model, data, *, directions, axes_spec, loss_fn, metrics, bn, device, seed,
             reuse, keep_directions, evaluator_options, make_evaluator=None,
             bn_batch_size: int | None = None, output_fn=None) -> _Job:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    names = ["x"] if len(axes_spec) == 1 else ["y", "x"]
    axes = [parse_axis(s, n) for s, n in zip(axes_spec, names, strict=True)]
    total = int(np.prod([a.size for a in axes]))
    if total > MAX_GRID_POINTS:
        raise ValueError(f"The grid has {total} points, above the cap of {MAX_GRID_POINTS}.")
    if isinstance(metrics, str):
        metrics = (metrics,)
    points = bool((evaluator_options or {}).get("barycentric"))
    dirs, kind = _resolve_directions(model, directions, len(axes), seed, points)
    options = dict(evaluator_options or {})
    if "bn_batch_size" in options:  # also accepted among the engine's options
        if bn_batch_size is not None:
            raise TypeError("bn_batch_size was given twice (also in evaluator_options).")
        bn_batch_size = options.pop("bn_batch_size")
    bn_batch_size = bn_batch_size_for(bn, bn_batch_size)  # before any work: a clear error
    # Surfaces are (ny, nx) with d1 along x: evaluator coefficient j goes with directions[j].
    # make_evaluator: a stand-in whose tiles run on an executor (core/distributed.py).
    if output_fn is not None:
        options["output_fn"] = output_fn
    evaluator = (make_evaluator or Evaluator)(model, data, dirs, loss_fn=loss_fn,
                                              metrics=metrics, bn=bn, device=device,
                                              bn_batch_size=bn_batch_size, **options)
    spec = {
        "x": list(axes_spec[-1]) if len(axes) == 2 else list(axes_spec[0]),
        "y": list(axes_spec[0]) if len(axes) == 2 else None,
        "metrics": list(evaluator.metrics),
        "metrics_dropped": dict(getattr(evaluator, "dropped", {})),
        "loss_fn": _loss_name(loss_fn),
        **_what_is_computed(loss_fn, metrics, options.get("output_fn")),
        "bn": bn,
        "bn_batch_size": bn_batch_size,
        "seed": seed if directions is None else None,
        "direction_kind": kind,
        "model": fingerprint(dict(model.state_dict())),
        "model_class": type(model).__name__,
        "n_params": sum(p.numel() for p in model.parameters()),
        "directions": fingerprint(
            {f"{i}/{k}": v for i, d in enumerate(dirs) for k, v in d.items()}
        ),
        "data": getattr(evaluator, "data_fingerprint", None)
        or fingerprint({"x": evaluator.x, "y": evaluator.y}),
        "n_samples": evaluator.n,
        "device": str(evaluator.device),
        "precision": options.get("precision", "fp32"),
    }
    evaluator.expected_points = total
    job = _Job(axes, dirs, spec, evaluator)
    job.spec["keep_directions"] = keep_directions
    if reuse is not None:
        _reuse(job, reuse, evaluator.metrics)
    return job


def _coords(axes: list[np.ndarray], flat: np.ndarray) -> np.ndarray:
    if len(axes) == 1:
        return axes[0][flat][:, None]
    ny, nx = axes[0].size, axes[1].size
    iy, ix = np.unravel_index(flat, (ny, nx))
    return np.stack([axes[1][ix], axes[0][iy]], axis=1)


def known_values(job: _Job, flat: np.ndarray, metrics: Sequence[str]
                 ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The known values of the grid points ``flat`` and the mask of those still to compute.

    Known points were reused from an earlier result or lie outside the region (a plane
    through three models); the others are NaN until computed.

    Returns:
        ``({metric: array}, todo)``.
    """
    values = {m: np.full(flat.size, np.nan) for m in metrics}
    todo = np.ones(flat.size, dtype=bool)
    if job.known_mask is not None:
        todo = ~job.known_mask[flat]
        for m in metrics:
            values[m][~todo] = job.known[m][flat[~todo]]
    return values, todo


def _tile_size(ev: Evaluator, fixed: int | None) -> int:
    if fixed:
        return fixed
    if ev.plan is None:
        return ev.next_chunk()
    # About a third of a second of work (and at least one engine pass), so the stream
    # stays live and a cancel lands quickly.
    per_point = max(ev.plan.seconds_per_point, 1e-7)
    return int(max(ev.plan.points, min(4096, 0.3 / per_point)))


def _tiles(job: _Job, tile_points: int | None, cancel: threading.Event | None) -> Iterator[Tile]:
    shape = tuple(a.size for a in job.axes)
    total = int(np.prod(shape))
    ev = job.evaluator
    index = done = 0
    for level, idx in progressive_order(shape):
        pos = 0
        while pos < idx.size:
            if cancel is not None and cancel.is_set():
                return
            t0 = time.perf_counter()
            flat = idx[pos : pos + _tile_size(ev, tile_points)]
            pos += flat.size
            values, todo = known_values(job, flat, ev.metrics)
            if todo.any():
                out = ev.evaluate(_coords(job.axes, flat[todo]))
                for m in ev.metrics:
                    values[m][todo] = out[m]
            done += flat.size
            yield Tile(index, level, flat, values, int(todo.sum()), done, total,
                       time.perf_counter() - t0)
            index += 1
