"""One interface over the executors tiles run on: a Dask ``Client`` or a futures executor.

:func:`executor_kind` tells them apart; :class:`FuturesBackend` and :class:`DaskBackend`
each ship the engine's payload (with the first tasks, or scattered once), submit and cancel
tile tasks, and count the tiles lost with a dead worker; :func:`explain_failure` turns an
executor's own failures into errors that name the fix. The client's loop that uses them is
:class:`~landscape_widget.core.distributed.ExecutorRunner` (see :mod:`.distributed` for the
trade-offs).
"""

from __future__ import annotations

import os
import time

from ._remote import Payload


def executor_kind(executor) -> str:
    """``"dask"`` for a ``distributed.Client``, ``"concurrent.futures"`` for an executor."""
    if not callable(getattr(executor, "submit", None)):
        raise TypeError(
            "executor must be a dask.distributed.Client or a concurrent.futures.Executor, "
            f"got {type(executor).__name__}."
        )
    dask = callable(getattr(executor, "scatter", None)) and hasattr(executor, "nthreads")
    return "dask" if dask else "concurrent.futures"


class FuturesBackend:
    """Any ``concurrent.futures.Executor``: payload with the first tasks, then the key."""

    kind = "concurrent.futures"

    def __init__(self, executor):
        self.executor = executor
        self.slots = int(getattr(executor, "_max_workers", 0) or os.cpu_count() or 1)
        self.seen: set[str] = set()  # workers known to hold the payload
        # Processes of a local pool share its cores: one slot's share each.
        process = "Process" in type(executor).__name__
        self.threads = max(1, (os.cpu_count() or 1) // self.slots) if process else None

    def ship(self, payload: Payload) -> Payload:
        """The payload as tasks take it: itself (it rides with the tasks).

        Returns:
            ``payload``.
        """
        return payload

    def submit(self, fn, payload: Payload, *args, key: str, full: bool = False):
        """Submit ``fn(payload, *args)``; the payload only until every slot has seen it.

        Returns:
            The future (``key`` names Dask's tasks only).
        """
        ref = payload if full or len(self.seen) < self.slots else payload.bare()
        return self.executor.submit(fn, ref, *args)

    def cancel(self, futures) -> None:
        """Cancel the futures not started yet."""
        for f in futures:
            f.cancel()  # a running task finishes in the background; its result is dropped

    def lost(self, keys: set[str]) -> int:
        """Tiles lost with a dead worker: none known (a dead process breaks the pool).

        Returns:
            0.
        """
        return 0


class DaskBackend:
    """A ``distributed.Client``: payload scattered once, lost tiles from scheduler events."""

    kind = "dask"
    threads = None  # Dask's nannies start workers with OMP_NUM_THREADS=1

    def __init__(self, client):
        self.client = client
        if getattr(client, "status", "running") in ("closing", "closed"):
            raise RuntimeError("The Dask client is closed; connect a new one "
                               "(Client(cluster) or Client('tcp://scheduler:8786')).")
        nthreads = client.nthreads()
        if not nthreads:
            raise RuntimeError("The Dask cluster has no workers; start some, or wait for them "
                               "with client.wait_for_workers(n).")
        self.slots = int(sum(nthreads.values()))
        self.addresses = set(nthreads)  # whose event topics say which workers died
        self.seen: set[str] = set()
        self.polled = time.monotonic()

    def ship(self, payload: Payload):
        """Scatter the payload to every worker once.

        Returns:
            The scattered payload's future, which the tasks name as a dependency.
        """
        return self.client.scatter(payload, broadcast=True, hash=False)

    def submit(self, fn, shipped, *args, key: str, full: bool = False):
        """Submit ``fn(shipped, *args)`` as the task ``key``.

        Returns:
            The Dask future.
        """
        return self.client.submit(fn, shipped, *args, key=key, pure=False)

    def cancel(self, futures) -> None:
        """Cancel the futures."""
        if futures:
            self.client.cancel(list(futures))

    def lost(self, keys: set[str]) -> int:
        """How many of the tasks ``keys`` a dead worker had, from the scheduler's events.

        Returns:
            The count of ``keys`` in the ``remove-worker`` events of the known workers.
        """
        if not keys:
            return 0
        self.addresses |= set(self.client.nthreads()) | self.seen
        count = 0
        for address in self.addresses:  # not the "all" topic: some of its events won't pickle
            try:
                events = self.client.get_events(address)
            except Exception:  # noqa: BLE001 - a forgotten worker has no topic
                continue
            for _, msg in events:
                if isinstance(msg, dict) and msg.get("action") == "remove-worker":
                    for field in ("processing-tasks", "lost-computed-tasks"):
                        count += len(keys & set(msg.get(field) or ()))
        return count


def explain_failure(err: BaseException) -> BaseException | None:
    """A clearer error for an executor's own failures (``None``: re-raise ``err``)."""
    if type(err).__name__ == "BrokenProcessPool":
        return RuntimeError(
            "A process of the ProcessPoolExecutor died (out of memory, or killed), which "
            "breaks the whole pool. Use a Dask cluster, e.g. Client(LocalCluster(n_workers=2, "
            "threads_per_worker=1)), to survive it: lost tiles are rerun on other workers."
        )
    if type(err).__name__ == "KilledWorker":
        return RuntimeError(
            f"A tile killed several Dask workers in a row ({err}); it probably runs out of "
            "memory: lower evaluator_options={'memory_budget': ...} or tile_points."
        )
    return None
