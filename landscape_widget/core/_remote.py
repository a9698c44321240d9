"""What runs on the workers of an executor: the job's payload, its caches, the tasks.

The client side (scheduling, failures, cancel) is :mod:`.distributed`; this module holds
what a worker process imports to run a tile, and what is pickled for it. The payload is
pickled once on the client (with cloudpickle where installed, so models, losses and
``data_fn`` defined in a notebook travel by value) and keyed by a hash of its bytes; a
worker process keeps the last two evaluators and the last data set, so a later job with
the same model, directions and data rebuilds nothing.

A data subset (``samples=``) of a ``data_fn`` is drawn here, on each worker, from the
engine option ``subset=(n, seed)``: see :func:`_subset` for why, and how the workers are
held to one draw.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import io
import os
import pickle
import socket
import threading
import time
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from .data import as_tensors, is_data_fn
from .errors import InputChanged
from .evaluate import Evaluator
from .fingerprints import fingerprint, fingerprint_bytes, legacy_fingerprint
from .params import model_device
from .plans import Plan, _remember
from .subset import data_size, take_subset

try:
    import cloudpickle as _pickler
except ImportError:  # pragma: no cover - cloudpickle comes with dask
    _pickler = pickle


class MissingPayload(RuntimeError):
    """A worker got a task naming a payload it does not hold (the client then resends it)."""


# --- what travels --------------------------------------------------------------------------
def _cpu_module(model: nn.Module) -> nn.Module:
    """The model itself if it is on the CPU, else a copy with CPU tensors.

    ``deepcopy`` with every parameter and buffer pre-mapped to a CPU copy keeps tied
    weights tied and allocates no GPU memory; the user's module is not modified.

    Returns:
        A module with every tensor on the CPU.
    """
    if model_device(model).type == "cpu":
        return model
    memo: dict[int, object] = {id(b): b.detach().cpu() for b in model.buffers()}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach().cpu(), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


class _ContentPickler(_pickler.Pickler):
    """Pickles tensors as hashes of their contents (for cache keys, never for sending).

    A plain pickle holds storage addresses, so equal directions drawn twice, or data read
    into new tensors, would never hit a worker's cache; everything else (the module's
    classes, settings, options) is pickled as it is, so a key still tells functions apart.
    """

    def persistent_id(self, obj):
        if isinstance(obj, torch.Tensor):
            return ("tensor", fingerprint({"t": obj}), type(obj).__name__, obj.requires_grad)
        return None


def _content_key(obj) -> str:
    """A key equal for objects equal in structure and tensor contents."""
    buf = io.BytesIO()
    try:
        _ContentPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    except Exception:  # noqa: BLE001 - then keys fall back to the sent bytes
        return ""
    return fingerprint_bytes(buf.getvalue())


def _dumps(obj, what: str, fix: str) -> bytes:
    try:
        return _pickler.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as err:  # noqa: BLE001 - pickling raises many types
        raise TypeError(
            f"{what} cannot be sent to the executor's workers ({type(err).__name__}: {err}). "
            f"{fix}"
        ) from err


@dataclasses.dataclass(frozen=True)
class Payload:
    """What a worker needs to build the evaluator of a job.

    Attributes:
        key: The evaluator's cache key on workers: model, directions, options and data,
            tensors by content (:func:`_content_key`).
        data_key: The data's cache key, likewise.
        blob: Pickled ``(model, directions, options)``; ``None`` in a bare reference.
        data_blob: Pickled data or ``data_fn``; ``None`` in a bare reference.
        threads: ``torch.set_num_threads`` for the worker (``None``: leave it).
    """

    key: str
    data_key: str
    blob: bytes | None
    data_blob: bytes | None
    threads: int | None = None

    def bare(self) -> Payload:
        """The same reference without the bytes."""
        return dataclasses.replace(self, blob=None, data_blob=None)


def make_payload(model: nn.Module, data, directions, options: dict,
                 threads: int | None = None) -> Payload:
    """Pickle a job once; what cannot travel gets an error that names the fix.

    Data other than a ``data_fn`` is collected into tensors here, once: a ``DataLoader``
    or ``Dataset`` iterated on every worker could give each one other samples (shuffling,
    ``drop_last``, random augmentation), and one grid would mix them. The evaluator cache
    key covers model, directions, options *and* data, so the same model on other data is
    a new evaluator, never a stale one.

    Returns:
        The :class:`Payload`, with its bytes.
    """
    if not is_data_fn(data):
        data = as_tensors(data)
    data_blob = _dumps(
        data, "data",
        "Pass data_fn instead: a zero-argument function defined at module level that "
        "returns (inputs, targets) on the worker, e.g. by loading the data set from disk.",
    )
    if options.get("loss_fn") is not None:
        _dumps(options["loss_fn"], "loss_fn", "Define loss_fn as a module-level function.")
    if options.get("output_fn") is not None:
        _dumps(options["output_fn"], "output_fn", "Define output_fn as a module-level function.")
    if isinstance(options.get("metrics"), dict):
        for name, fn in options["metrics"].items():
            if fn is not None:
                _dumps(fn, f"metrics[{name!r}]", "Define it as a module-level function.")
    dirs = [{k: v.detach().cpu() for k, v in d.items()} for d in directions]
    job = (_cpu_module(model), dirs, options)
    blob = _dumps(
        job, "the model",
        "Define its class in an importable module (or a notebook cell) and remove "
        "unpicklable attributes such as open files, locks or hooks that capture them.",
    )
    data_key = _content_key(data) or fingerprint_bytes(data_blob)
    key = _content_key(job) or fingerprint_bytes(blob)
    return Payload(fingerprint_bytes((key + data_key).encode()), data_key, blob, data_blob,
                   threads)


# --- worker side ---------------------------------------------------------------------------
_EVALUATORS: OrderedDict[str, tuple[Evaluator, threading.Lock]] = OrderedDict()
_DATA: OrderedDict[str, tuple] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}"


def _undo_malloc_trim() -> None:
    """Give glibc back large heap reuse in a Dask worker (once per process).

    Dask's nannies start workers with ``MALLOC_TRIM_THRESHOLD_=65536`` so that freed memory
    returns to the OS. Setting it also freezes glibc's mmap threshold at 128 KiB, so every
    activation buffer of a forward pass is mmap-ed, page-faulted and unmapped again: the
    benchmark CNN ran 3.3x slower. Raising both thresholds (to glibc's own dynamic maxima)
    restores the speed; a worker then keeps up to 64 MiB of freed heap.
    """
    global _MALLOC_DONE
    if _MALLOC_DONE or "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return
    _MALLOC_DONE = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to undo
        pass


_MALLOC_DONE = False


def _evaluator(payload: Payload) -> tuple[Evaluator, threading.Lock]:
    """This process's evaluator of ``payload``: built on its first task, then cached."""
    with _CACHE_LOCK:
        if payload.key in _EVALUATORS:
            _EVALUATORS.move_to_end(payload.key)
            return _EVALUATORS[payload.key]
        if payload.blob is None or (payload.data_key not in _DATA and not payload.data_blob):
            raise MissingPayload(payload.key)
        if payload.threads:
            torch.set_num_threads(payload.threads)
        _undo_malloc_trim()
        if payload.data_key not in _DATA:
            _DATA.clear()  # one data set at a time: it may be large
            _DATA[payload.data_key] = as_tensors(pickle.loads(payload.data_blob))
        model, dirs, options = pickle.loads(payload.blob)
        options = dict(options)
        device = options.pop("device", None)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        data, drawn = _subset(_DATA[payload.data_key], options)
        ev = Evaluator(model.to(device), data, dirs, device=device,
                       **options)  # model: this process's own unpickled copy
        # What the probe reports: the drawn subset, and how many samples it was drawn from.
        ev.subset_fingerprint = drawn  # type: ignore[attr-defined]
        ev.subset_population = options.get("population")  # type: ignore[attr-defined]
        _EVALUATORS[payload.key] = (ev, threading.Lock())
        while len(_EVALUATORS) > 2:
            _EVALUATORS.popitem(last=False)
        return _EVALUATORS[payload.key]


def _subset(data: tuple, options: dict) -> tuple[tuple, str | None]:
    """The data this worker evaluates: all of ``data``, or the subset ``options`` names.

    ``options["subset"] = (n, seed)`` comes only with a ``data_fn`` (other data is subset
    on the client, which then ships just the ``n`` drawn samples). The function loads the
    data on the worker so that it never crosses the network; the client cannot draw the
    indices without knowing the data's size, i.e. without calling ``data_fn`` itself, so
    each worker draws them from ``(N, n, seed)`` with the same seeded
    :func:`~landscape_widget.core.subset.subset_indices` as a local run. The draw is
    identical only if ``data_fn`` returns the same samples in the same order everywhere
    (and torch draws alike): the fingerprint of the drawn samples is returned, and every
    worker compares its own with the first worker's before its first tile
    (:func:`run_tile`), so workers never mix two subsets in one grid.

    Returns:
        ``(data, fingerprint)``: the data to evaluate (``options`` then holds its
        ``population``) and the drawn samples' fingerprint (``None`` without a subset).

    Raises:
        ValueError: If the subset is larger than the data ``data_fn`` returned (the
            message names its size and the fix).
    """
    if options.get("subset") is None:
        options.pop("subset", None)
        return data, None
    n, seed = options.pop("subset")
    population = data_size(data)
    if n > population:  # only here is the data_fn's size known: say what to pass instead
        raise ValueError(
            f"samples={n} exceeds the {population} samples that data_fn returned on the "
            f"executor's worker {_worker_name()}: pass samples={population} or fewer (a random "
            "subset with standard errors), or samples=None (the default) for exact values "
            "on all data.")
    data, options["population"] = take_subset(data, n, seed)
    return data, fingerprint({"x": data[0], "y": data[1]})


def probe(payload: Payload) -> dict:
    """Worker task: build the evaluator (bad input fails here, early) and describe it."""
    ev, _ = _evaluator(payload)
    return {"metrics": list(ev.metrics), "dropped": dict(ev.dropped), "n": ev.n,
            "batch_coupling": ev.batch_coupling,
            "device": str(ev.device), "precision": ev.precision,
            "population": ev.subset_population,
            "subset": ev.subset_fingerprint,
            "data": fingerprint({"x": ev.x, "y": ev.y}), "worker": _worker_name()}


def legacy_data(payload: Payload) -> str:
    """Worker task: the older (BLAKE2b) fingerprint of the data this worker evaluates.

    ``reuse=`` of a result saved before 2026-12 compares it; the data (a ``data_fn``'s
    above all) need not reach the client for that.

    Returns:
        :func:`~.fingerprints.legacy_fingerprint` of the evaluator's ``x`` and ``y``.
    """
    ev, _ = _evaluator(payload)
    return legacy_fingerprint({"x": ev.x, "y": ev.y})


def run_tile(payload: Payload, coords: np.ndarray, total: int, plan: Plan | None,
             subset: str | None = None) -> dict:
    """Worker task: evaluate the points ``coords`` of a grid of ``total`` points.

    ``plan`` is the one the first tile's worker chose; the others adopt it (through the
    per-process plan cache the evaluator reads) instead of timing their own. ``subset``
    is the fingerprint of the subset the first worker drew from a ``data_fn``
    (:func:`_subset`); this worker's draw must equal it.

    Raises:
        RuntimeError: If this worker drew another subset than the first worker.
        InputChanged: If the forward changed this worker's copy of the data (which it
            then forgets, with the evaluator built on it).

    Returns:
        ``{"values", "seconds", "plan", "worker"}``: the metrics at ``coords``, the time,
        the plan used and the worker that ran it.
    """
    ev, lock = _evaluator(payload)
    if subset is not None and ev.subset_fingerprint != subset:
        raise RuntimeError(
            f"samples=: worker {_worker_name()} drew another data subset than the first "
            "worker: data_fn returns other samples (or another order) here, or this worker's "
            "torch draws differently. Make data_fn return the same data in the same order on "
            "every worker (e.g. sort the files it reads), or pass the data itself instead of "
            "data_fn (it is then subset once, on the client).")
    with lock:  # an evaluator is not thread-safe (plan tuning, stem caches)
        ev.expected_points = total
        if plan is not None and ev.plan is None:
            if plan.precision != ev.precision:  # the model failed there at this precision
                ev._adopt_fallback(plan.precision_note)
            _remember(ev._plan_key(), plan)
        t0 = time.perf_counter()
        try:
            values = ev.evaluate(coords)
        except InputChanged:
            # This worker's copy of the data was changed by the forward: cached, the next
            # call of the same payload ran on it and returned a silently wrong surface
            # (the user's own data, pickled, had not changed). Forgotten, it is sent again.
            with _CACHE_LOCK:
                _EVALUATORS.pop(payload.key, None)
                _DATA.pop(payload.data_key, None)
            raise
        seconds = time.perf_counter() - t0
        plan = None if ev.plan is None else ev.reported_plan()
    return {"values": values, "seconds": seconds, "plan": plan, "worker": _worker_name()}
