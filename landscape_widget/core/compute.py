"""The grid job: one surface or curve to compute, validated once, and the local runner.

:func:`grid_job` checks everything before any work (model, axes, directions or points,
region, reuse, options) and returns a :class:`GridJob`: its axes, its directions, the
``spec`` recorded in the result, the points already known (reused, or outside the region)
and the :class:`TileRunner` that computes the others tile by tile. Two runners exist:
:class:`LocalRunner` (the engine on this process) and
:class:`~landscape_widget.core.distributed.ExecutorRunner` (a Dask client's or
``concurrent.futures`` executor's workers).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from .directions import random_directions
from .errors import Cancelled
from .evaluate import METRICS, Evaluator
from .fingerprints import fingerprint, legacy_fingerprint
from .grid import MAX_GRID_POINTS, Tile, axis_range, axis_values, cut_tiles
from .heap import hold_heap
from .params import Params, check_direction
from .plans import Plan, engine_options
from .reuse import (
    check_reusable,
    loss_name,
    model_code_fingerprint,
    reused_points,
    what_is_computed,
)
from .state import bn_batch_size_for

__all__ = ["GridJob", "LocalRunner", "TileRunner", "grid_job"]


@runtime_checkable
class TileRunner(Protocol):
    """What computes the tiles of a :class:`GridJob`, here or on an executor's workers.

    :func:`grid_job` builds one with the engine's arguments; the job's spec, the
    :class:`~landscape_widget.TileStream` and its result read these attributes.

    Attributes:
        metrics: The metrics computed, in order.
        dropped: ``{metric: why}`` of metrics asked for but not computed.
        n: Samples in the data.
        device: Where the points are computed.
        data_fingerprint: Hash of the data as evaluated (for reuse).
        plan: The engine's plan (``None`` until chosen).
        nonfinite_points: Points whose loss was not finite so far.
        expected_points: Points of the whole grid (the engine plans for it).
    """

    metrics: tuple[str, ...]
    dropped: dict[str, str]
    n: int
    device: torch.device | str
    data_fingerprint: str
    plan: Plan | None
    nonfinite_points: int
    expected_points: int

    def describe(self) -> dict:
        """The plan (and engine details) for status lines and ``spec["plan"]``."""
        ...

    def legacy_data_fingerprint(self) -> str:
        """:func:`~.fingerprints.legacy_fingerprint` of the data as evaluated."""
        ...

    def run_tiles(self, job: GridJob, tile_points: int | None,
                  cancel: threading.Event | None) -> Iterator[Tile]:
        """Compute ``job``'s unknown points, yielding one :class:`Tile` at a time.

        Args:
            job: The job this runner was built for.
            tile_points: Fixed points per tile, or ``None``: sized by measured speed.
            cancel: Once set, no further tile starts (the local runner also stops the
                tile in progress at its next batch, once the plan is chosen).
        """
        ...


@dataclass
class GridJob:
    """One grid to compute: axes, directions, spec, runner and the points already known.

    Attributes:
        axes: ``[x]`` for a curve, ``[y, x]`` for a surface (1-D float arrays).
        directions: The directions, or with ``points`` the vertices of a barycentric grid.
        spec: How the grid is computed, as recorded in the result (a dict the caller may
            extend, e.g. with what it is a grid of).
        runner: The :class:`TileRunner` that computes the tiles.
        known: ``{metric: flat array}`` of the values not to compute (see ``known_mask``).
        known_mask: Flat mask of the points not to compute: reused from an earlier result,
            or outside the region (NaN there); ``None`` if every point is computed.
        reused_error: The ``precision_error`` of the result the known points come from.
    """

    axes: list[np.ndarray]
    directions: list[Params]
    spec: dict
    runner: TileRunner
    known: dict[str, np.ndarray] = field(default_factory=dict)
    known_mask: np.ndarray | None = None
    reused_error: float | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """``(nx,)`` or ``(ny, nx)``."""
        return tuple(a.size for a in self.axes)

    @property
    def total(self) -> int:
        """Number of grid points."""
        return int(np.prod(self.shape))

    def coords(self, flat: np.ndarray) -> np.ndarray:
        """``(len(flat), ndim)`` coefficients of the grid points ``flat`` (x first).

        Returns:
            The coordinates, one row per point.

        Example:
            >>> job = GridJob([np.array([0.0, 1.0]), np.array([-1.0, 0.0, 1.0])], [], {}, None)
            >>> job.coords(np.array([0, 5])).tolist()
            [[-1.0, 0.0], [1.0, 1.0]]
        """
        if len(self.axes) == 1:
            return self.axes[0][flat][:, None]
        iy, ix = np.unravel_index(flat, self.shape)
        return np.stack([self.axes[1][ix], self.axes[0][iy]], axis=1)

    def known_values(self, flat: np.ndarray, metrics: Sequence[str]
                     ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The known values of the grid points ``flat`` and the mask of those to compute.

        Returns:
            ``({metric: array}, todo)``: NaN where ``todo`` (still to compute).
        """
        values = {m: np.full(flat.size, np.nan) for m in metrics}
        todo = np.ones(flat.size, dtype=bool)
        if self.known_mask is not None:
            todo = ~self.known_mask[flat]
            for m in metrics:
                values[m][~todo] = self.known[m][flat[~todo]]
        return values, todo

    def restrict(self, region: np.ndarray) -> None:
        """Leave the points outside ``region`` (a mask of the grid's shape) NaN, uncomputed.

        Raises:
            TypeError: If ``region`` is not a boolean array.
            ValueError: If its shape is not the grid's.
        """
        region = np.asarray(region)
        if region.dtype != bool:
            raise TypeError(f"region must be a boolean mask (True: compute), got {region.dtype}.")
        if region.shape != self.shape:
            raise ValueError(f"region has shape {region.shape}; the grid's is {self.shape} "
                             "(rows = y, columns = x).")
        outside = ~region.ravel()
        for m in self.runner.metrics:
            self.known.setdefault(m, np.full(self.total, np.nan))[outside] = np.nan
        mask = np.zeros(self.total, bool) if self.known_mask is None else self.known_mask
        self.known_mask = mask | outside


class LocalRunner(Evaluator):
    """The engine on this process, computing a job's tiles itself (the default runner).

    An :class:`~landscape_widget.core.evaluate.Evaluator` with the tile loop: the same
    arguments, the same points.
    """

    @functools.cached_property
    def data_fingerprint(self) -> str:
        """Hash of the data as held by the engine."""
        return fingerprint({"x": self.x, "y": self.y})

    def legacy_data_fingerprint(self) -> str:
        """The older (BLAKE2b) hash of the same data, as results saved before 2026-12 hold."""
        return legacy_fingerprint({"x": self.x, "y": self.y})

    def tile_size(self, fixed: int | None) -> int:
        """Points of the next tile: ``fixed``, else about a third of a second of work."""
        if fixed:
            return fixed
        if self.plan is None:
            return self.next_chunk()
        # About a third of a second of work (and at least one engine pass), so the stream
        # stays live and a cancel lands quickly.
        per_point = max(self.plan.seconds_per_point, 1e-7)
        size = int(max(self.plan.points, min(4096, 0.3 / per_point)))
        lanes = self.plan.lanes
        return -(-size // lanes) * lanes  # a whole number of points per lane: none idles

    def run_tiles(self, job: GridJob, tile_points: int | None,
                  cancel: threading.Event | None) -> Iterator[Tile]:
        """Compute ``job``'s tiles one after the other (see :meth:`TileRunner.run_tiles`).

        Yields:
            Each :class:`Tile` once computed, coarse to fine.
        """
        with hold_heap():  # one hold for the whole job: see core/heap.py
            yield from self._tiles(job, tile_points, cancel)

    def _tiles(self, job: GridJob, tile_points: int | None,
               cancel: threading.Event | None) -> Iterator[Tile]:
        index = done = 0
        for level, flat in cut_tiles(job.shape, lambda: self.tile_size(tile_points)):
            if cancel is not None and cancel.is_set():
                return
            t0 = time.perf_counter()
            values, todo = job.known_values(flat, self.metrics)
            if todo.any():
                # Once the plan is chosen (the first tile tunes it), a cancel stops the
                # passes at the next batch; only while this tile computes, never between
                # tiles (a direct evaluate() then, or another stream, must not see it).
                self._cancel = cancel if self.plan is not None else None
                try:
                    out = self.evaluate(job.coords(flat[todo]))
                except Cancelled:
                    return  # mid-tile: its points are dropped, as a tile never begun
                finally:
                    self._cancel = None
                for m in self.metrics:
                    values[m][todo] = out[m]
            done += flat.size
            yield Tile(index, level, flat, values, int(todo.sum()), done, job.total,
                       time.perf_counter() - t0)
            index += 1


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
        got = type(directions).__name__
        if isinstance(directions, (list, tuple)):  # e.g. load_directions of a 1D file: [d]
            got = f"a {got} of {len(directions)}"
        one = (" (a directions file with only an xdirection is a line: lw.compute_curve)"
               if ndim == 2 and got.endswith(" of 1") else "")
        raise TypeError(
            f"directions must be {'a direction dict' if ndim == 1 else 'a pair (d1, d2) of dicts'}"
            f"; got {got}{one}. Make them with lw.random_direction(model)."
        )
    for i, d in enumerate(directions):
        check_direction(model, d, name=f"directions[{i}]")
    return list(directions), "given"


def grid_job(model: nn.Module, data, *, axes: Sequence, directions=None,
             points: Sequence[Params] | None = None, region: np.ndarray | None = None,
             reuse=None, loss_fn=None, metrics=METRICS, bn: str = "eval",
             bn_batch_size: int | None = None, device=None, seed: int | None = 0,
             keep_directions: bool = True, evaluator_options: dict | None = None,
             executor=None, output_fn=None) -> GridJob:
    """Validate one grid computation and set it up; no point is computed yet.

    The arguments are those of :func:`~landscape_widget.iter_tiles`, with the axes as a
    list and two more ways to say what the grid is.

    Args:
        model: The model; never modified.
        data: The data (see :func:`~landscape_widget.iter_tiles`).
        axes: ``[x]`` for a curve, ``[y, x]`` for a surface; each a ``(start, stop, num)``
            range or an :class:`~landscape_widget.core.grid.ExactAxis` of coordinates.
        directions: One direction per axis (``None``: random, drawn from ``seed``).
        points: Instead of ``directions``, the ``ndim + 1`` vertices of a barycentric grid
            (full parameter dicts): coordinate ``c`` is ``sum_j c_j * p_j +
            (1 - sum_j c_j) * p_last``, so each vertex is its model exactly.
        region: Boolean mask of the grid's shape: points outside it are never computed
            and stay NaN (also where ``reuse`` had them).
        reuse: An earlier result whose coinciding points are copied, not recomputed.
        loss_fn: The loss (cross-entropy by default).
        metrics: The metrics (see :func:`~landscape_widget.iter_tiles`).
        bn: ``"eval"`` or ``"batch"``.
        bn_batch_size: Samples per BatchNorm batch with ``bn="batch"``.
        device: Where to compute.
        seed: Seed of random directions.
        keep_directions: Keep the directions in the result.
        evaluator_options: More keywords of the engine (:class:`LocalRunner`).
        executor: A Dask client or ``concurrent.futures`` executor whose workers compute
            the tiles (:class:`~landscape_widget.core.distributed.ExecutorRunner`).
        output_fn: Maps the model's outputs to logits.

    Returns:
        The :class:`GridJob`.

    Raises:
        TypeError: If the model, an axis, the directions or points, or an option has the
            wrong type, ``evaluator_options`` names an unknown key, or ``bn_batch_size`` is
            given twice.
        ValueError: If the grid has more than ``MAX_GRID_POINTS`` points, an axis or the
            region is invalid, or ``reuse`` was computed otherwise.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    names = ["x"] if len(axes) == 1 else ["y", "x"]
    values = [axis_values(s, n) for s, n in zip(axes, names, strict=True)]
    total = int(np.prod([a.size for a in values]))
    if total > MAX_GRID_POINTS:
        raise ValueError(f"The grid has {total} points, above the cap of {MAX_GRID_POINTS}.")
    if isinstance(metrics, str):
        metrics = (metrics,)
    options = engine_options(evaluator_options)
    if points is not None:
        if directions is not None:
            raise TypeError("Give directions or points (the vertices of a barycentric grid), "
                            "not both.")
        directions, options["barycentric"] = points, True
    barycentric = bool(options.get("barycentric"))
    dirs, kind = _resolve_directions(model, directions, len(values), seed, barycentric)
    if "bn_batch_size" in options:  # also accepted among the engine's options
        if bn_batch_size is not None:
            raise TypeError("bn_batch_size was given twice (also in evaluator_options).")
        bn_batch_size = options.pop("bn_batch_size")
    bn_batch_size = bn_batch_size_for(bn, bn_batch_size)  # before any work: a clear error
    # Surfaces are (ny, nx) with d1 along x: evaluator coefficient j goes with directions[j].
    if output_fn is not None:
        options["output_fn"] = output_fn
    if executor is None:
        make_runner = LocalRunner
    else:
        from .distributed import ExecutorRunner  # imports dask lazily

        make_runner = functools.partial(ExecutorRunner, executor)
    # The fingerprints hash three times the model's bytes (XXH3: 25 ms of a ResNet-50 call
    # on a 2-core CPU, BLAKE2b took 0.39 s); the hash lets go of the GIL, so they run beside
    # the engine's set-up (its model copy, probes and trace) instead of before it.
    # state_dict() runs here: its hooks are the user's code.
    hashed = {"model": dict(model.state_dict()),
              "directions": {f"{i}/{k}": v for i, d in enumerate(dirs) for k, v in d.items()}}
    pool = ThreadPoolExecutor(2, thread_name_prefix="landscape-fingerprint")
    try:
        digests = {name: pool.submit(fingerprint, t) for name, t in hashed.items()}
        runner = make_runner(model, data, dirs, loss_fn=loss_fn, metrics=metrics, bn=bn,
                             device=device, bn_batch_size=bn_batch_size, **options)
        digests = {name: f.result() for name, f in digests.items()}
    finally:
        pool.shutdown(wait=False)  # a set-up error is raised without waiting for the hash
    spec = {
        "x": axis_range(axes[-1], values[-1]),
        "y": axis_range(axes[0], values[0]) if len(values) == 2 else None,
        "metrics": list(runner.metrics),
        "metrics_dropped": dict(runner.dropped),
        "loss_fn": loss_name(loss_fn),
        **what_is_computed(loss_fn, metrics, options.get("output_fn")),
        "bn": bn,
        "bn_batch_size": bn_batch_size,
        # Why every pass held all data (a forward mixing a batch's samples), or None.
        "batch_coupling": runner.batch_coupling,
        "seed": seed if directions is None else None,
        "direction_kind": kind,
        "model": digests["model"],
        # The local engine hashed it for its plan key already (24 ms for a ResNet-50).
        "model_code": getattr(runner, "_model_code", None) or model_code_fingerprint(model),
        "model_class": type(model).__name__,
        "n_params": sum(p.numel() for p in model.parameters()),
        "directions": digests["directions"],
        "data": runner.data_fingerprint,
        "n_samples": runner.n,
        "device": str(runner.device),
        # What is computed (effective_precision: fp32 for tf32 on a CPU), as the result
        # records it: reuse= compares the two.
        "precision": getattr(runner, "precision", options.get("precision", "fp32")),
    }
    runner.expected_points = total
    job = GridJob(values, dirs, spec, runner)
    job.spec["keep_directions"] = keep_directions
    if reuse is not None:
        # The data's older hash comes from the runner: an executor's data is on its
        # workers (a data_fn's never leaves them).
        check_reusable(job.spec, reuse, runner.metrics, legacy={
            **{name: functools.partial(legacy_fingerprint, t) for name, t in hashed.items()},
            "data": runner.legacy_data_fingerprint,
        })
        job.known, job.known_mask = reused_points(values, reuse, runner.metrics)
        job.reused_error = reuse.spec.get("precision_error")
    if region is not None:
        job.restrict(region)
    return job


