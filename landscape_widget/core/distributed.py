"""Tiles on other processes: a Dask ``Client`` or any ``concurrent.futures.Executor``.

``iter_tiles(..., executor=...)`` (so also ``compute_surface``, ``compute_curve`` and the
widget) ships the local engine instead of replacing it: each worker builds the same
:class:`~landscape_widget.core.evaluate.Evaluator` once and evaluates tiles with it.

- **Payload, once** (:mod:`._remote`, what workers run). The client pickles (with
  cloudpickle, so notebook-defined models, losses and ``data_fn`` travel by value) a CPU
  copy of the model (the user's module is never touched), the directions and the engine
  options; apart from them the data, or a ``data_fn``: a zero-argument callable that
  returns the data *on the worker*, so a large data set never crosses the network. Both
  are keyed by a hash of their bytes and cached per worker process (two evaluators, one
  data set), so a widget recomputing with the same model and directions rebuilds nothing,
  and new directions reload no data.
- **Dask** scatters the payload to every worker once (``broadcast=True``); tile tasks name
  it as a dependency, so each runs on the copy its worker holds.
- **Other executors** cannot address workers. Trade-off chosen: the payload rides with the
  tasks until as many distinct workers as the executor has slots have answered; later
  tasks carry only the key, and a process without it (a replacement) raises
  :class:`MissingPayload`, whereupon that tile is sent again with it (``"resent"``).
- **Order.** Tiles are cut coarse to fine and submitted in that order with two per worker
  slot in flight, so coarse levels finish first as far as the schedule allows; each is
  yielded as it finishes. The first tile goes alone: its worker times the engine's plans
  and the others adopt the winner, so all tiles share one plan (and its rounding).
  Without ``tile_points`` a tile aims at :data:`TILE_SECONDS` of worker time, measured on
  the first tiles (more than the local 0.3 s: task overhead).
- **Data subsets** (``samples=N``). Tensors, a ``Dataset`` or a ``DataLoader`` are subset
  on the client, as in a local run, so only the ``N`` drawn samples are pickled and
  shipped; a ``data_fn``'s data never leaves the workers, so each draws the same indices
  from the same seed there, and a worker whose draw differs from the first worker's is
  refused (see :func:`._remote._subset`). ``loss_se`` comes back with every tile.
- **Failures.** Dask reruns the tasks of a dead worker on the others by itself; the tiles
  it had (running, queued, or finished but not collected) are counted from the scheduler's
  ``remove-worker`` events into ``result.spec["executor"]["lost_tiles"]``. A dead process
  breaks a whole ``ProcessPoolExecutor``; that is reported with Dask as the fix.
- **Cancel.** Setting ``cancel`` (the widget does) or leaving the loop cancels every
  outstanding future.
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import threading
import time
import uuid
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from ._remote import MissingPayload, legacy_data, make_payload, probe, run_tile
from .coupling import COUPLING_WARNING
from .executors import DaskBackend, FuturesBackend, executor_kind, explain_failure
from .grid import Tile, cut_tiles
from .plans import UNKNOWN_POINTS, Plan, copy_plan

TILE_SECONDS = 1.0
"""Worker time a tile aims at when ``tile_points`` is not given."""

POLL_S = 0.05
"""How often the client looks at ``cancel`` while it waits for tiles."""


# --- the client's side ---------------------------------------------------------------------
class ExecutorRunner:
    """The :class:`~landscape_widget.core.compute.TileRunner` on an executor's workers.

    :func:`~landscape_widget.core.compute.grid_job` builds it where it would build the
    local runner, with the same arguments; it ships them, lets one worker build the real
    evaluator (so bad input fails here, before any tile) and runs the tiles there.

    Args:
        executor: A ``dask.distributed.Client`` or a ``concurrent.futures.Executor``.
        model: The model; never modified (a CPU copy travels).
        data: The data, or a ``data_fn`` that each worker calls once.
        directions: The directions (or points) of the grid.
        device: Where workers compute (default: their GPU if they have one, else the CPU).
        **options: The other keywords of :class:`Evaluator`.
    """

    def __init__(self, executor, model: nn.Module, data, directions, *, device=None,
                 **options):
        kind = executor_kind(executor)
        self.backend = DaskBackend(executor) if kind == "dask" else FuturesBackend(executor)
        payload = make_payload(model, data, directions, dict(options, device=device),
                               self.backend.threads)
        self.shipped = self.backend.ship(payload)
        info = self.backend.submit(probe, self.shipped, key=f"lw-probe-{uuid.uuid4().hex}",
                                   full=True).result()
        self.backend.seen.add(info["worker"])
        self.metrics = tuple(info["metrics"])
        self.dropped = dict(info.get("dropped", {}))
        self.batch_coupling: str | None = info.get("batch_coupling")
        if self.batch_coupling and not info["worker"].endswith(f":{os.getpid()}"):
            # The evaluator's warning went to the worker process's stderr, not to the caller.
            warnings.warn(COUPLING_WARNING, UserWarning, stacklevel=4)
        self.n, self.device = int(info["n"]), info["device"]
        self.data_fingerprint = info["data"]
        # samples=: the data's size (the subset's population) and, for a subset each
        # worker draws from a data_fn, the first draw's fingerprint that every tile checks.
        self.population: int | None = info.get("population")
        self.subset: str | None = info.get("subset")
        self.plan: Plan | None = None
        # What the probing worker computes (effective_precision); the plan's is used.
        self.precision = info.get("precision", options.get("precision", "fp32"))
        self.nonfinite_points = 0
        self.expected_points = UNKNOWN_POINTS
        self.seconds_per_point: float | None = None
        self.workers: set[str] = set()  # those that returned tiles

    def describe(self) -> dict:
        """The plan of the latest tile, as :meth:`Evaluator.describe` reports it."""
        # With its label, as the local engine's: spec["plan"]["label"] was a KeyError here.
        plan = None if self.plan is None else dict(vars(copy_plan(self.plan)),
                                                   label=self.plan.label)
        return {"device": self.device, "plan": plan,
                "trials": [], "rejected": [], "executor": self.backend.kind}

    def legacy_data_fingerprint(self) -> str:
        """The older (BLAKE2b) hash of the workers' data (``reuse=`` of an older result).

        A worker computes it: the data (a ``data_fn``'s above all) need not come here.

        Returns:
            :func:`~landscape_widget.core.fingerprints.legacy_fingerprint` of the data.
        """
        return self.backend.submit(legacy_data, self.shipped,
                                   key=f"lw-legacy-{uuid.uuid4().hex}", full=True).result()

    def _cuts(self, job, fixed: int | None, window: int) -> Iterator[tuple]:
        """``(level, flat, todo, values)`` in coarse-to-fine order, sized as they are cut."""
        total = remaining = job.total

        def size() -> int:
            if fixed:
                return int(fixed)
            if self.seconds_per_point is None:
                n = min(64, math.ceil(total / (4 * window)))
            else:
                n = max(int(TILE_SECONDS / max(self.seconds_per_point, 1e-7)),
                        self.plan.points if self.plan else 1)
            # The last tiles shrink so that every worker still gets a share.
            return max(1, min(n, 4096, math.ceil(remaining / window)))

        for level, flat in cut_tiles(job.shape, size):
            remaining -= flat.size
            values, todo = job.known_values(flat, self.metrics)
            yield level, flat, todo, values

    def run_tiles(self, job, tile_points: int | None,
                  cancel: threading.Event | None) -> Iterator[Tile]:
        """The tile loop of ``job`` on the executor, tiles yielded as they finish.

        Args:
            job: The :class:`~landscape_widget.core.compute.GridJob` built with this
                runner.
            tile_points: Fixed tile size, or ``None`` for about :data:`TILE_SECONDS` each.
            cancel: Once set, outstanding futures are cancelled and the loop ends.

        Yields:
            :class:`Tile` objects in completion order (``index`` counts them).
        """
        backend = self.backend
        total = job.total
        window = max(2, 2 * backend.slots)
        cuts = self._cuts(job, tile_points, window)
        flights: dict[int, tuple] = {}
        finished: queue.SimpleQueue = queue.SimpleQueue()
        keys: set[str] = set()
        ids, run = itertools.count(), uuid.uuid4().hex[:10]
        stats = {"kind": backend.kind, "slots": backend.slots, "workers": 0, "tiles": 0,
                 "lost_tiles": 0, "resent": 0}
        index = done = 0

        def submit(cut, full=False):
            tid = next(ids)
            keys.add(f"lw-tile-{run}-{tid}")
            fut = backend.submit(run_tile, self.shipped, job.coords(cut[1][cut[2]]),
                                 total, self.plan, self.subset, key=f"lw-tile-{run}-{tid}",
                                 full=full)
            flights[tid] = (fut, cut)
            fut.add_done_callback(lambda _f, tid=tid: finished.put(tid))

        try:
            while cancel is None or not cancel.is_set():
                # The first tile goes alone: its worker times the plans, the others adopt
                # the winner (one timing, not one per worker, and the same arithmetic).
                limit = window if self.plan is not None or stats["tiles"] else 1
                while len(flights) < limit and (cut := next(cuts, None)) is not None:
                    if cut[2].any():
                        submit(cut)
                        continue
                    done += cut[1].size  # every point reused: nothing to send
                    yield Tile(index, cut[0], cut[1], cut[3], 0, done, total, 0.0)
                    index += 1
                if not flights:
                    return
                try:
                    fut, cut = flights.pop(finished.get(timeout=POLL_S))
                except queue.Empty:
                    if isinstance(backend, DaskBackend) and time.monotonic() - backend.polled > 2:
                        backend.polled = time.monotonic()
                        backend.addresses |= set(backend.client.nthreads())
                    continue
                except KeyError:  # a future that was already dealt with
                    continue
                try:
                    res = fut.result()
                except MissingPayload:
                    stats["resent"] += 1
                    submit(cut, full=True)
                    continue
                except BaseException as err:
                    clearer = explain_failure(err)
                    if clearer is None:
                        raise
                    raise clearer from err
                level, flat, todo, values = cut
                self._record(res, int(todo.sum()))
                for m in self.metrics:
                    values[m][todo] = res["values"][m]
                done += flat.size
                stats.update(workers=len(self.workers), tiles=stats["tiles"] + 1)
                job.spec["executor"] = dict(stats)
                yield Tile(index, level, flat, values, int(todo.sum()), done, total,
                           res["seconds"])
                index += 1
        finally:
            backend.cancel([f for f, _ in flights.values()])
            try:
                stats["lost_tiles"] = backend.lost(keys)
            except Exception:  # noqa: BLE001 - a closed client: the count is unknown
                stats["lost_tiles"] = None
            stats["workers"] = len(self.workers)
            job.spec["executor"] = stats
            release = getattr(self.shipped, "release", None)  # Dask: free workers' copies
            if release is not None:
                release()

    def _record(self, res: dict, points: int) -> None:
        self.backend.seen.add(res["worker"])
        self.workers.add(res["worker"])
        last, self.plan = self.plan, res["plan"] or self.plan
        if self.plan is not last and last is not None:
            # Each worker measures precision_error on its own first points: the grid's is
            # the largest (the latest tile's alone hid another worker's overflow).
            errors = [e for e in (last.precision_error, self.plan.precision_error)
                      if e is not None]
            self.plan.precision_error = max(errors) if errors else None
        if self.plan is not None and self.plan.precision != self.precision and (
                last is None or last.precision == self.precision):
            # The evaluator's warning went to the worker's stderr, not to the caller.
            warnings.warn(f"precision={self.precision!r} failed on this model on the "
                          f"executor's workers ({self.plan.precision_note}; "
                          "spec['precision']).", RuntimeWarning, stacklevel=4)
        if "loss" in res["values"]:
            self.nonfinite_points += int(np.isnan(res["values"]["loss"]).sum())
        if points:
            spp, old = res["seconds"] / points, self.seconds_per_point
            if old is None and self.plan is not None and self.plan.seconds_per_point > 0:
                old = spp = self.plan.seconds_per_point  # the first tile's time includes tuning
            self.seconds_per_point = spp if old is None else 0.5 * (old + spp)


def local_gpu_executor(gpus=None, *, threads_per_worker: int = 1,
                       dashboard_address: str = ":8787", **worker_options):
    """A Dask client with one worker process per local GPU, each pinned to its device.

    Each worker is a ``distributed.Nanny`` process started with ``CUDA_VISIBLE_DEVICES``
    set to its GPU, so torch there sees exactly one device (and ``device=None`` uses it).
    Close with ``client.close(); client.cluster.close()``.

    Args:
        gpus: GPU indices to use (default: every visible one).
        threads_per_worker: Tiles a worker runs at once (1: one at a time per GPU).
        dashboard_address: Where the scheduler serves its dashboard (``":0"``: any port).
        **worker_options: More ``Nanny`` options (``memory_limit``, ``silence_logs``...).

    Returns:
        A ``dask.distributed.Client`` on a ``SpecCluster`` of one worker per GPU.

    Raises:
        RuntimeError: If torch sees no CUDA device, or an index is out of range.
    """
    count = torch.cuda.device_count()
    if count == 0:
        raise RuntimeError(
            "local_gpu_executor needs CUDA GPUs, and torch sees none here. For worker "
            "processes on the CPU use Client(LocalCluster(n_workers=2, threads_per_worker=1))."
        )
    gpus = list(range(count)) if gpus is None else [int(g) for g in gpus]
    bad = [g for g in gpus if not 0 <= g < count]
    if bad or not gpus:
        raise RuntimeError(f"GPU indices {bad or gpus} are not among the {count} visible ones.")
    from distributed import Client, Nanny, Scheduler, SpecCluster

    env = dict(worker_options.pop("env", None) or {})
    # Indices count the devices this process sees: under CUDA_VISIBLE_DEVICES=2,3 (a batch
    # scheduler's allocation) GPU 0 is physical device 2, which the worker must be given.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(count)]
    workers = {
        f"gpu-{g}": {"cls": Nanny, "options": {
            "nthreads": threads_per_worker, "env": {**env, "CUDA_VISIBLE_DEVICES": names[g]},
            "resources": {"GPU": 1}, **worker_options}}
        for g in gpus
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": dashboard_address}}
    return Client(SpecCluster(workers=workers, scheduler=scheduler, name="landscape-gpus"))
