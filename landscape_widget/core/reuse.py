"""Reuse of computed points: what must match, and where old points fall on a new grid.

A result records in its ``spec`` fingerprints of the model, directions, data, loss and
metrics (:func:`what_is_computed`, :mod:`.fingerprints`). ``reuse=`` copies the points of
an earlier result whose coordinates coincide with the new grid's (:func:`reused_points`)
once :func:`check_reusable` has found it computed alike; a loss-landscape file records no
fingerprints and is checked by recomputing two of its points instead
(:func:`~landscape_widget.core.tile_stream.check_foreign_reuse`).
"""

from __future__ import annotations

import collections
import dis
import types
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from torch import nn

from .errors import ReuseMismatch
from .fingerprints import DIGEST_SIZE, _is_library, callable_fingerprint, fingerprint_text
from .grid import match_axis
from .precision import NO_EFFECT

# The hook tables of a module (and torch's global ones) that change what its forward returns.
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def loss_name(loss_fn) -> str:
    """The name recorded as ``spec["loss_fn"]``."""
    if loss_fn is None:
        return "cross_entropy"
    return getattr(loss_fn, "__qualname__", None) or type(loss_fn).__name__


def what_is_computed(loss_fn, metrics, output_fn) -> dict:
    """Fingerprints of the loss and of the user metrics (with ``output_fn``), for reuse.

    ``None`` where a function cannot be fingerprinted reliably (see :mod:`.fingerprints`).

    Returns:
        ``{"loss_fingerprint", "metrics_fingerprint"}`` for the spec.
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


# Globals a model's method may append to or fill as it runs (a log of its calls): by identity.
_LOGS = (list, dict, set, collections.deque)


def _globals_of(code: types.CodeType) -> tuple[set[str], set[str]]:
    """The global names a function (or one it defines) reads, and those it assigns."""
    read, written = set(), set()
    for i in dis.get_instructions(code):
        if i.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            read.add(i.argval)
        elif i.opname in ("STORE_GLOBAL", "DELETE_GLOBAL"):
            written.add(i.argval)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            more = _globals_of(c)
            read, written = read | more[0], written | more[1]
    return read, written


def _as_code(fn: types.FunctionType) -> types.FunctionType:
    """``fn`` with only the globals that decide what it computes.

    Its ``co_names`` also hold the attributes it reads (``self.a``, ``h.mean``): a notebook
    global of that name (``a = lw.compute_surface(...)``) was hashed too, and assigning
    it made the model "a different model" for ``reuse=``. A global the function assigns
    (``global calls; calls += 1``) is its running state, changed by every pass the engine
    runs, and is left out; a list, dict, set or deque (a log it may append to) counts by
    identity. Globals it only reads (a scale, a flag, another function) are hashed.

    Returns:
        A function of ``fn``'s code, defaults and closure over those globals alone.
    """
    read, written = _globals_of(fn.__code__)
    env = {"__name__": fn.__globals__.get("__name__")}
    for k in read - written:
        if k in fn.__globals__:
            v = fn.__globals__[k]
            env[k] = f"id:{type(v).__qualname__}:{id(v)}" if isinstance(v, _LOGS) else v
    copy = types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    return copy


def model_code_fingerprint(model: nn.Module) -> str:
    """A hash of what decides ``model``'s outputs besides its state_dict (``spec["model_code"]``).

    ``spec["model"]`` hashes the ``state_dict`` only: a forward hook registered, a flag
    attribute switched, an activation function attribute swapped or a non-persistent
    buffer filled left it as it was, and ``reuse=`` copied the old model's values. This
    hashes every submodule's class and methods (their code, for classes outside installed
    packages), its public attributes (``training`` aside: the engine sets the modes
    itself), its forward hooks and pre-hooks and its buffers registered with
    ``persistent=False`` (not in the ``state_dict``), and torch's global forward hooks. A
    value that cannot be hashed reliably (see :func:`~.fingerprints.callable_fingerprint`)
    counts by its identity: the same object matches, another one does not.

    Returns:
        24 hex digits.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> before = model_code_fingerprint(net)
        >>> handle = net[0].register_forward_hook(lambda m, i, o: 2 * o)
        >>> model_code_fingerprint(net) == before
        False
        >>> handle.remove()
        >>> model_code_fingerprint(net) == before
        True
    """
    def part(value) -> str:
        try:
            # (An installed package's function is hashed by its name alone: as it is.)
            found = callable_fingerprint(_as_code(value) if isinstance(
                value, types.FunctionType) and not _is_library(value) else value)
        except Exception:  # noqa: BLE001 - the user's objects (a repr that raises): by identity
            found = None
        return found or f"id:{type(value).__qualname__}:{id(value)}"

    parts = []
    classes: dict[type, tuple] = {}  # each class's part once (a ResNet-50 has 161 modules)
    for name, m in model.named_modules(remove_duplicate=False):
        public = {k: part(v) for k, v in sorted(vars(m).items())
                  if not k.startswith("_") and k != "training"}
        hooks = {t: [part(h) for h in getattr(m, t, {}).values()] for t in _HOOK_TABLES}
        # Buffers registered with persistent=False are not in the state_dict.
        hidden = {k: part(v) for k, v in sorted(m._buffers.items())
                  if k in m._non_persistent_buffers_set and v is not None}
        # The methods of its classes (the forward and the helpers it calls): a class
        # redefined in a notebook keeps its name.
        cls = type(m)
        if cls not in classes:
            classes[cls] = (part(cls), [
                (c.__qualname__, {k: part(v) for k, v in sorted(vars(c).items())
                                  if isinstance(v, types.FunctionType)})
                for c in cls.__mro__ if c not in (nn.Module, object)])
        parts.append((name, *classes[cls], public, hooks, hidden))
    glob = nn.modules.module
    parts.append([part(h) for t in ("_global_forward_pre_hooks", "_global_forward_hooks")
                  for h in getattr(glob, t, {}).values()])
    return fingerprint_text(repr(parts))


def metric_values(result, name: str):
    """The array of metric ``name`` in a Surface/Curve (None if it was not computed)."""
    if name in ("loss", "accuracy", "loss_se"):
        return getattr(result, name, None)
    return (getattr(result, "extra_metrics", None) or {}).get(name)


def check_reusable(spec: dict, reuse, metrics: Sequence[str],
                   legacy: Mapping[str, Callable[[], str]] | None = None) -> None:
    """Refuse ``reuse`` unless it was computed like the grid of ``spec``.

    Args:
        spec: The new grid's spec.
        reuse: The earlier result.
        metrics: The metrics the new grid computes.
        legacy: For ``"model"``, ``"directions"`` and ``"data"``, a function giving the
            :func:`~.fingerprints.legacy_fingerprint` of the tensors hashed into ``spec``'s
            fingerprint: a result saved before 2026-12 holds these older BLAKE2b
            fingerprints. Called only for such a result (for the data of an executor's
            workers it is a task on one of them: the data may never reach this process).

    Raises:
        ReuseMismatch: (a ``ValueError``) If the model, directions, data, loss, metrics, bn
            mode or sample count differ, a metric is missing, or a loss or metric cannot be
            fingerprinted.
    """
    for key, what in (("loss_fingerprint", "loss_fn"), ("metrics_fingerprint", "metrics")):
        if spec.get(key) is None or reuse.spec.get(key) is None:
            if reuse.spec.get("source") == "loss-landscape" and spec.get(key) is not None:
                continue  # checked by recomputing a few points (check_foreign_reuse)
            which = "this call's" if spec.get(key) is None else "reuse='s"
            raise ReuseMismatch(
                f"reuse= cannot tell whether {which} {what} is the one the points were "
                "computed with: it holds a value that cannot be fingerprinted (an object with "
                "no state or stable repr), or the result predates fingerprints. Compute "
                "without reuse=, or use a loss module / module-level function."
            )
    same = ("model", "directions", "loss_fn", "loss_fingerprint", "metrics_fingerprint", "bn",
            "bn_batch_size", "n_samples", "data")
    if "model_code" in reuse.spec:  # results saved before it was recorded have no model_code
        same += ("model_code",)
    # A loss-landscape file records none of these: its values are checked by recomputing
    # a few of them instead (check_foreign_reuse in tile_stream.py).
    foreign = reuse.spec.get("source") == "loss-landscape"
    diff = [] if foreign else [k for k in same if reuse.spec.get(k) != spec.get(k)
                               and not _legacy_match(reuse.spec.get(k), (legacy or {}).get(k))]
    # Results from before precision= were fp32.
    if not foreign and computed_precision(reuse.spec) != spec.get("precision", "fp32"):
        diff.append("precision")
    if "model_code" in diff:
        diff[diff.index("model_code")] = ("model (same state_dict, other code, attributes, "
                                          "hooks or non-persistent buffers)")
    if "loss_fingerprint" in diff and "loss_fn" not in diff:
        diff[diff.index("loss_fingerprint")] = "loss (same name, other settings or code)"
    missing = [m for m in metrics if metric_values(reuse, m) is None]
    if missing == ["loss_se"] and not diff:
        # "a different set of metrics" said nothing of the subset: only samples= asks for it.
        raise ReuseMismatch(
            "reuse= holds values computed on all data (no standard errors), and this call "
            "computes on a samples= subset; drop samples= to reuse them, or drop reuse=.")
    if diff or missing:
        raise ReuseMismatch(
            f"reuse= was computed with a different {', '.join(diff) or 'set of metrics'}; "
            "only a result of the same model, directions, data, loss and bn mode can be reused."
            + (_precision_hint(reuse.spec, spec) if "precision" in diff else "")
        )


def computed_precision(spec: dict) -> str:
    """The precision a result's points were computed in.

    ``spec["precision"]``, except for results saved before it recorded what was computed
    (``effective_precision``): one asked at tf32 on a CPU recorded "tf32" for fp32 values,
    its plan's note saying the precision had no effect.

    Returns:
        One of :data:`~.precision.PRECISIONS` (``"fp32"`` for results before precision=).
    """
    have = spec.get("precision", "fp32")
    note = (spec.get("plan") or {}).get("precision_note") or ""
    return "fp32" if NO_EFFECT in note and not note.startswith(f"{have} failed") else have


def _precision_hint(old: dict, new: dict) -> str:
    """What precision ``reuse=`` holds, and how to reuse it (for the mismatch message).

    A result whose precision fell back to fp32 (the model failed under autocast) records
    fp32: reusing it in a second call at the precision asked for was refused as computed
    with "a different precision", with nothing on why or what to pass.

    Returns:
        `` It holds ... values; ...`` naming the fallback if there was one, and the fix.
    """
    have, want = computed_precision(old), new.get("precision", "fp32")
    note = (old.get("plan") or {}).get("precision_note") or ""
    why = f" ({note})" if note.startswith(f"{want} failed") else ""
    return (f" It holds {have} values{why}, this call computes {want}: pass "
            f"precision={have!r} to reuse them, or compute without reuse=.")


def _legacy_match(recorded, legacy: Callable[[], str] | None) -> bool:
    """Whether an older result's 24-digit fingerprint ``recorded`` equals ``legacy()``."""
    return (legacy is not None and isinstance(recorded, str)
            and len(recorded) == 2 * DIGEST_SIZE and recorded == legacy())


def reused_points(axes: list[np.ndarray], reuse, metrics: Sequence[str]
                  ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The values of ``reuse`` at the coordinates of ``axes`` that it holds.

    Args:
        axes: ``[x]`` or ``[y, x]`` of the new grid.
        reuse: A :class:`~.surface.Surface` or :class:`~.surface.Curve` checked by
            :func:`check_reusable`.
        metrics: The metrics to copy.

    Returns:
        ``({metric: flat array}, flat mask)``: values (NaN elsewhere) and where every metric
        has a value.

    Example:
        >>> from landscape_widget.core.surface import Curve
        >>> old = Curve(np.linspace(-1, 1, 3), np.array([3.0, 1.0, np.nan]), None, {})
        >>> known, mask = reused_points([np.linspace(-1, 1, 5)], old, ["loss"])
        >>> known["loss"].tolist()[:3], mask.tolist()
        ([3.0, nan, 1.0], [True, False, True, False, False])
    """
    old_axes = [reuse.x] if len(axes) == 1 else [reuse.y, reuse.x]
    maps = [match_axis(new, old) for new, old in zip(axes, old_axes, strict=True)]
    shape = tuple(a.size for a in axes)
    mask = np.ones(shape, dtype=bool)
    if len(maps) == 1:
        mask &= maps[0] >= 0
        src = (maps[0][mask],)
    else:
        mask &= np.logical_and.outer(maps[0] >= 0, maps[1] >= 0)
        iy, ix = np.nonzero(mask)
        src = (maps[0][iy], maps[1][ix])
    known = {}
    for m in metrics:
        arr = np.full(shape, np.nan)
        arr[mask] = np.asarray(metric_values(reuse, m))[src]
        known[m] = arr.ravel()
    # NaN: not computed (a cancelled run, an unfinished loss-landscape file) or non-finite:
    # computed (again).
    for m in metrics:
        mask &= ~np.isnan(known[m].reshape(shape))
    return known, mask.ravel()
