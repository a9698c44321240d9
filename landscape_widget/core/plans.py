"""What a plan is, and what the tuner needs to know of memory and failures.

A :class:`Plan` fixes the strategy (one point per pass, or K points per ``torch.vmap``
pass), the samples per pass B, the memory layout and whether the linear stem is used.
This module also holds the per-process plan cache, the memory budgets (from the free
memory of the device), the tuning constants, and how out-of-memory errors and the user's
own exceptions are told apart. The search itself is :class:`~.tuning.PlanTuner`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Plan:
    """How points are evaluated: strategy, points per pass K, samples per pass B.

    ``vmap_error`` is empty unless the vmap path failed on this model; it then says how
    (and the plan is a loop). ``reason`` says why this plan was chosen, ``candidates`` the
    measured seconds per point of every plan timed (``spec["plan"]`` shows both).
    """

    strategy: str
    points: int
    batch: int
    layout: str = "contiguous"
    stem: bool = False
    # Points computed at once in threads of their own (a loop plan on a CPU, core/lanes.py).
    lanes: int = 1
    seconds_per_point: float = math.nan
    vmap_error: str = ""
    precision: str = "fp32"
    precision_error: float | None = None
    precision_note: str = ""
    compiled: bool = False
    compile_note: str = ""
    # Eval-mode BatchNorms the stem's suffix runs folded into their convolutions
    # (core/fold.py); set where the plan is reported (Evaluator.describe, a remote tile).
    folded_batchnorms: int = 0
    reason: str = ""
    candidates: list = dataclasses.field(default_factory=list)
    tuning_seconds: float = 0.0
    # Points of the grid the search was sized for (the cache re-tunes for larger grids).
    tuned_for: int = 0
    complete: bool = True
    # Grid points a losing trial computed (a loop over all data computes real points): each
    # {"coords": [...], "plan": label, "strategy", "batch", "layout", "stem"}. They keep the
    # trial's values, and later calls compute those coordinates with that plan again, so
    # repeated calls stay bit-identical (plans differ in float rounding at the 1e-7 level).
    pinned: list = dataclasses.field(default_factory=list)

    @property
    def plain(self) -> bool:
        """The plain loop: one point per pass, contiguous inputs, the whole model."""
        return (self.strategy == "loop" and self.layout == "contiguous" and not self.stem
                and self.lanes == 1)

    @property
    def label(self) -> str:
        """``"loop B=128 channels_last stem lanes=2"`` and the like."""
        k = f" K={self.points}" if self.strategy == "vmap" else ""
        extra = (" " + self.layout if self.layout != "contiguous" else "") + (
            " stem" if self.stem else "") + (" compiled" if self.compiled else "") + (
            f" lanes={self.lanes}" if self.lanes > 1 else "")
        return f"{self.strategy}{k} B={self.batch}{extra}"


def _is_oom(err: BaseException) -> bool:
    msg = str(err).lower()
    return "out of memory" in msg or "can't allocate memory" in msg


_PLANS: dict[tuple, Plan] = {}
_PLANS_MAX = 64


def copy_plan(plan: Plan, **changes) -> Plan:
    """A copy of ``plan`` sharing no list or dict with it (``pinned``, ``candidates``).

    The plan cache, the evaluators and the results' ``spec["plan"]`` each hold their own:
    a user editing a result's ``spec["plan"]["pinned"]`` changed which plan later calls
    used for those points (tests/test_review5.py::test_r3).

    Returns:
        The copy, with ``changes`` applied as in :func:`dataclasses.replace`.

    Example:
        >>> p = Plan("loop", 1, 8, pinned=[{"coords": [0.0], "plan": "loop B=8"}])
        >>> q = copy_plan(p)
        >>> q.pinned[0]["coords"].append(1.0)
        >>> p.pinned[0]["coords"]
        [0.0]
    """
    plan = dataclasses.replace(plan, **changes)
    plan.pinned, plan.candidates = copy.deepcopy(plan.pinned), copy.deepcopy(plan.candidates)
    return plan


def _remember(key: tuple, plan: Plan) -> None:
    """Cache a copy of ``plan`` under ``key``, evicting the oldest entry if full.

    Example:
        >>> forget_plans()
        >>> for i in range(_PLANS_MAX):
        ...     _remember(("k", i), Plan("loop", 1, 8))
        >>> _remember(("k", 5), Plan("loop", 1, 16))  # an update evicts nothing
        >>> len(_PLANS), ("k", 0) in _PLANS, _PLANS[("k", 5)].batch
        (64, True, 16)
        >>> forget_plans()
    """
    if key not in _PLANS and len(_PLANS) >= _PLANS_MAX:
        # Tolerant of another thread evicting at the same time (the widget's worker and the
        # notebook may both compute): the oldest key may already be gone.
        _PLANS.pop(next(iter(_PLANS), None), None)
    _PLANS[key] = copy_plan(plan)


# Seconds per point of the plans a search timed when the grid's size cut it short (plan
# label -> seconds), per plan-cache key: the search for a larger grid starts from them.
_SEARCHES: dict[tuple, dict[str, float]] = {}


def _remember_search(key: tuple, timings: dict[str, float]) -> None:
    if key not in _SEARCHES and len(_SEARCHES) >= _PLANS_MAX:
        _SEARCHES.pop(next(iter(_SEARCHES), None), None)  # as in _remember
    _SEARCHES[key] = dict(timings)


def forget_plans() -> None:
    """Empty the plan cache and the cut-short searches: the next call tunes from scratch.

    For benchmarks and tests of a session's first call.

    Example:
        >>> _SEARCHES[("k",)] = {"loop B=8": 0.1}
        >>> forget_plans()
        >>> _PLANS, _SEARCHES
        ({}, {})
    """
    _PLANS.clear()
    _SEARCHES.clear()


def shrink_after_oom(plan: Plan, err: BaseException, device: torch.device,
                     fixed_batch: bool = False, coupled: bool = False) -> None:
    """Halve K (then B) of ``plan`` after an out-of-memory ``err``; re-raise anything else.

    Raises:
        MemoryError: If ``fixed_batch`` (B is the BatchNorm batch, ``bn_batch_size``) or
            ``coupled`` (B is all data: the forward mixes the samples of a batch, see
            core/coupling.py) and one point on B samples does not fit.
    """
    if not _is_oom(err) or (plan.points == 1 and plan.batch == 1):
        raise err
    if plan.points == 1 and fixed_batch:
        raise MemoryError(
            f"One forward pass over bn_batch_size={plan.batch} samples runs out of memory; "
            "pass a smaller bn_batch_size (BatchNorm batch statistics need the whole batch in "
            "one pass)."
        ) from err
    if plan.points == 1 and coupled:
        # Smaller passes would change the loss of such a model (and spec["batch_coupling"]
        # would still say every pass held all data): say so instead.
        raise MemoryError(
            f"One forward pass over all {plan.batch} samples runs out of memory, and the "
            "model's outputs for a sample depend on the other samples of its batch, so "
            "smaller passes would change its loss. Pass fewer samples (samples=k, or a "
            "subset of the data), or choose the batching with evaluator_options="
            "{'batch_size': B}."
        ) from err
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if plan.points > 1:
        plan.points //= 2
    else:
        plan.batch = max(1, plan.batch // 2)


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is of the user's own exception class (not Python's or torch's).

    Such an error was raised on purpose by the user's code and reaches the caller even
    when it happens under vmap; any other failure of the vmap path makes the engine
    fall back to the loop, which raises the error again if it is not vmap's.

    Returns:
        True if the class of ``err`` is defined outside ``builtins`` and ``torch`` (the
        engine then raises it instead of falling back or shrinking).
    """
    module = type(err).__module__
    return module != "builtins" and module.split(".")[0] != "torch"


def _describe_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    first = text.splitlines()[0] if text else type(err).__name__
    return first if len(first) <= 300 else first[:297] + "..."


def cgroup_available(root: str = "/sys/fs/cgroup") -> int | None:
    r"""Bytes this process's memory cgroup still allows (a container's limit), if it has one.

    The limit less the usage, plus the inactive file cache the kernel reclaims first;
    cgroup v2 (``memory.max``) or v1 (``memory/memory.limit_in_bytes``).

    Returns:
        Those bytes (at least 0), or ``None`` without a limit (or without cgroup files).

    Example:
        >>> import pathlib, tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "memory.max").write_text("1000000\n")
        >>> _ = (d / "memory.current").write_text("300000\n")
        >>> _ = (d / "memory.stat").write_text("anon 200000\ninactive_file 50000\n")
        >>> cgroup_available(str(d))
        750000
        >>> _ = (d / "memory.max").write_text("max\n")
        >>> cgroup_available(str(d)) is None
        True
    """
    for limit, usage, stat, key in (
            ("memory.max", "memory.current", "memory.stat", "inactive_file"),
            ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
             "memory/memory.stat", "total_inactive_file")):
        try:
            with open(f"{root}/{limit}") as f:
                raw = f.read().strip()
            if raw == "max" or int(raw) >= 1 << 60:  # v2's "max", v1's page-rounded 2**63
                return None
            with open(f"{root}/{usage}") as f:
                used = int(f.read())
            cache = 0
            with open(f"{root}/{stat}") as f:
                for line in f:
                    name, _, value = line.partition(" ")
                    if name == key:
                        cache = int(value)
            return max(int(raw) - used + cache, 0)
        except (OSError, ValueError):
            continue
    return None


def free_memory(device: torch.device) -> int:
    """Bytes free for the engine: CUDA's free memory, or the CPU's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    # Linux first: reading /proc/meminfo takes microseconds, importing psutil ~15 ms of a
    # first call.
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    # A container's memory limit (docker --memory) is not the host's RAM:
                    # past it the kernel kills the process, the notebook's kernel with it.
                    limited = cgroup_available()
                    return available if limited is None else min(available, limited)
    except OSError:
        pass
    try:
        import psutil  # optional: only used when installed (macOS, Windows)

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    return 4 << 30  # nothing to read (not Linux, no psutil): assume a small machine


# Share of the free memory one forward pass may fill with activations, and the stem terms.
ACTIVATION_SHARE = {"cuda": 0.4, "cpu": 0.25}
STEM_SHARE = 0.25
# Share of the free memory the point build's kept row sum (one copy of the moved parameters,
# see PointPasses._point) may take; past it, each point rebuilds its row.
ROW_SHARE = 0.1
# CPU working sets that stay near the caches can beat one pass over all data: the cache-
# sized candidates use 1/16, 1/4 and 1 x this many bytes of activations.
CPU_CACHE_BUDGET = 64 * 2**20
# Tuning may cost this share of the predicted grid time (beyond the trials over all data,
# whose points are kept): a losing search costs at most 5 %, which the
# fused point build (see Evaluator._point) recovers on large models.
TUNING_SHARE = 0.05
# ... or this many seconds, too little to notice, for grids that take no time at all.
TUNING_FLOOR = 0.02
# Grids of this many points always time the first candidate, if it is a loop over all data.
FIRST_TRIAL_POINTS = 16
# A losing trial's real points are kept (pinned to its plan) if that plan is at most this
# many times slower per point than the winner: a repeated call then computes them with it
# at most as much slower as the first call saved (the MLP's plain loop, 12x slower than its
# vmap plan, is not pinned; ResNet-50's, 1.2x slower than channels-last, is).
PIN_SLOWDOWN = 2.0
# The expected points of a job of unknown size (not a grid): no candidate is too wide for
# it, and its tuning allowance has no bound from a grid's predicted time.
UNKNOWN_POINTS = 1 << 30
# Timed passes of a trial, the fastest counts: the first warms up (oneDNN primitives for a
# new shape, the allocator's first pages).
TRIAL_PASSES = 2
# Under vmap, stem settings whose narrowest (K = 4) trials are within this factor of each
# other are both timed at K = 16 before the wider passes follow the faster (core/tuning.py).
STEM_CLOSE = 1.25
# Rounds of a lanes trial (core/lanes.py; each: one real grid point per lane, then one with
# the plan it is compared with, side by side): the fastest of each counts.
LANE_ROUNDS = 3


def _stem_budget(device: torch.device) -> int:
    """Bytes the precomputed first-layer outputs may occupy."""
    return int(free_memory(device) * STEM_SHARE)


def _default_budget(device: torch.device) -> int:
    """Bytes of activations one forward pass may use: a share of the free memory."""
    return int(free_memory(device) * ACTIVATION_SHARE.get(device.type, 0.25))


def check_positive(name: str, value, auto: str):
    """``value`` of a size option (batch_size, memory_budget, tile_points): None or > 0.

    A negative batch size used to stop the first pass with "'int' object is not
    subscriptable", ``0`` meant automatic, ``2.5`` was cut to 2 and a negative or NaN
    budget gave one-sample passes: all silently or cryptically.

    Args:
        name: The option's name, for the message.
        value: The value given.
        auto: What ``None`` does, for the message.

    Returns:
        ``value`` (a numpy integer as an int).

    Raises:
        TypeError: If ``value`` is not an int (``memory_budget``: not a number).
        ValueError: If it is not above 0 (or not finite).
    """
    if value is None:
        return None
    fix = f"pass a positive int, or {name}=None ({auto})"
    whole = name != "memory_budget"  # a budget in bytes may be written 2e9
    kinds = (int, np.integer) if whole else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'an int' if whole else 'a number'}, got "
                        f"{value!r}; {fix}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r} is not a positive size; {fix}.")
    return int(value) if whole else value


ENGINE_OPTIONS = ("strategy", "memory_budget", "batch_size", "bn_batch_size", "stem",
                  "stem_budget", "precision", "compile", "lanes")
"""The keys of ``evaluator_options`` (the :class:`~.evaluate.Evaluator`'s keywords that
:func:`grid_job` does not set itself); ``population``, ``subset`` and ``barycentric`` are
set by the package's own callers."""
_INTERNAL_OPTIONS = ("population", "subset", "barycentric")
_OWN_ARGUMENTS = ("loss_fn", "metrics", "bn", "device", "output_fn")


def engine_options(evaluator_options) -> dict:
    """A copy of ``evaluator_options``, checked against :data:`ENGINE_OPTIONS`.

    Returns:
        ``dict(evaluator_options)`` (``{}`` for ``None``).

    Raises:
        TypeError: If it is not a mapping, or names a key the engine does not take (a list
            or a misspelt key reached the engine as "cannot convert dictionary update
            sequence" or "Evaluator.__init__() got an unexpected keyword argument").
    """
    if evaluator_options is None:
        return {}
    if not isinstance(evaluator_options, Mapping):
        raise TypeError(f"evaluator_options must be a dict of engine options such as "
                        f"{{'strategy': 'loop'}}, got {type(evaluator_options).__name__}.")
    unknown = sorted(map(str, set(evaluator_options) - set(ENGINE_OPTIONS + _INTERNAL_OPTIONS)))
    if unknown:
        own = [k for k in unknown if k in _OWN_ARGUMENTS]
        raise TypeError(
            f"evaluator_options has unknown key(s) {unknown}; the engine takes "
            f"{list(ENGINE_OPTIONS)}" + (f" ({', '.join(own)}: pass as an argument of "
                                         "its own, e.g. compute_surface(..., loss_fn=...))"
                                         if own else "") + ".")
    return dict(evaluator_options)
