"""The engine's compute precision: "fp32" (exact, the default), "tf32", "bf16", "fp16".

- ``"fp32"``: true float32 arithmetic. Torch enables TF32 for cuDNN convolutions by
  default (``torch.backends.cudnn.conv.fp32_precision == "tf32"``, the legacy
  ``torch.backends.cudnn.allow_tf32 = True``), which rounds the inputs of every
  convolution to a 10-bit mantissa on Ampere and later GPUs. Under ``"fp32"`` the engine
  switches TF32 off for matmuls, convolutions and RNNs while it computes, and puts the
  user's settings back afterwards (:func:`precision_flags`).
- ``"tf32"``: TF32 tensor cores for float32 matmuls and convolutions on CUDA (about 8x the
  fp32 rate on an H200). CPUs have no TF32: on a CPU this computes in fp32 (the plan says so).
- ``"bf16"`` / ``"fp16"``: the forward pass runs under ``torch.autocast`` (matmuls and
  convolutions in 16 bits, reductions and normalisations as autocast decides); the model's
  outputs are cast to float32 before the loss, and losses and accuracies are accumulated
  in float64 as in fp32. ``"fp16"`` only on CUDA (CPUs have no fast fp16 path; use bf16).

The grid points themselves (``theta + sum_j c_j d_j``) are always formed in the model's
dtype, so only the forward pass is approximate; ``spec["precision_error"]`` measures the
effect against fp32 on a few points of the same grid.

Example:
    >>> import torch
    >>> check_precision("bf16", torch.device("cpu"))
    'bf16'
    >>> before = torch.backends.cudnn.conv.fp32_precision
    >>> with precision_flags("fp32", torch.device("cuda")):
    ...     torch.backends.cudnn.conv.fp32_precision
    'ieee'
    >>> torch.backends.cudnn.conv.fp32_precision == before
    True
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from . import fp32_flags
from .params import plain_modes

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Points checked against fp32 for spec["precision_error"].
ERROR_POINTS = 3
# Computations in several threads (the widget's worker and the notebook) share the flags:
# the first to enter saves the user's values, the last to leave puts them back.
_FLAGS_LOCK = threading.Lock()
_ACTIVE: list[tuple[str, str]] = []  # (backend, "ieee" | "tf32") of each computation running
_SAVED: list[fp32_flags.Flags] = []  # [the user's flags, the flags written last] while any runs


def precision_problem(precision, device: torch.device) -> str | None:
    """Why ``precision`` cannot compute on ``device``, or ``None`` if it can.

    The one rule behind :func:`check_precision` and :func:`available_precisions`.

    Returns:
        The error text naming the problem and the fix, or ``None``.
    """
    if not isinstance(precision, str) or precision not in PRECISIONS:
        return (f"precision={precision!r} is not supported; choose one of "
                f"{', '.join(map(repr, PRECISIONS))}.")
    if precision == "fp16" and device.type != "cuda":
        return (f"precision='fp16' needs a CUDA device (this computes on {device.type}, "
                "which has no fast float16 path); use precision='bf16' on a CPU.")
    return None


def check_precision(precision: str, device: torch.device) -> str:
    """``precision`` if it is possible on ``device``.

    Returns:
        ``precision`` unchanged.

    Raises:
        ValueError: If it is not one of :data:`PRECISIONS`, or ``"fp16"`` on a CPU.
    """
    problem = precision_problem(precision, device)
    if problem is not None:
        raise ValueError(problem)
    return precision


def available_precisions(device: torch.device | None) -> tuple[str, ...]:
    """The precisions :func:`check_precision` accepts on ``device`` (all if it is unknown).

    Returns:
        The subset of :data:`PRECISIONS`, in its order.

    Example:
        >>> available_precisions(torch.device("cpu"))
        ('fp32', 'tf32', 'bf16')
    """
    if device is None:  # an executor's workers pick their device: each job checks
        return PRECISIONS
    return tuple(p for p in PRECISIONS if precision_problem(p, device) is None)


def flag_backend(device: torch.device) -> str:
    """The backend whose float32 flags decide how ``device`` computes: "cuda" or "mkldnn"."""
    return "cuda" if device.type == "cuda" else "mkldnn"


@contextlib.contextmanager
def precision_flags(precision: str, device: torch.device) -> Iterator[None]:
    """Torch's float32 flags for ``precision`` while the block runs; the user's afterwards.

    On ``device``'s backend (cuda: cuBLAS matmuls, cuDNN convolutions and RNNs; else
    oneDNN's) every op computes in true IEEE fp32, or TF32 for ``"tf32"`` on CUDA. The
    legacy flags are written with them (:mod:`.fp32_flags`), so code reading
    ``torch.backends.cudnn.allow_tf32``, ``torch.backends.cuda.matmul.allow_tf32`` or
    ``torch.get_float32_matmul_precision()`` meanwhile (another thread: the notebook while
    the widget computes) reads what is in force instead of an error. The flags are
    process-wide: other threads computing float32 meanwhile see them too, and of two
    computations running at once on one backend the later sets the flags for both. The
    user's values come back when the last computation ends, also after an error: every
    node and every legacy reader reads as before (a node that read the same as its parent
    may come back inheriting it: see :func:`.fp32_flags.own_value`). A flag the user sets
    while a computation runs is kept: it takes effect, or stays, when the last one ends.
    Only the nodes of ``device``'s backend that do not already compute as asked, and the
    legacy values that must change, are written; reading the user's state writes nothing.
    """
    backend = flag_backend(device)
    entry = (backend, "tf32" if precision == "tf32" and backend == "cuda" else "ieee")
    with _FLAGS_LOCK:
        if not _ACTIVE:
            _SAVED[:] = [fp32_flags.read()] * 2
        _ACTIVE.append(entry)
        try:
            _update()
        except BaseException:
            _leave(entry)
            raise
    try:
        with plain_modes(device):  # the caller's inference mode and autocast: off
            yield
    finally:
        with _FLAGS_LOCK:
            _leave(entry)


def _leave(entry: tuple[str, str]) -> None:
    # The last equal entry: nested (an fp32 check inside a tf32 run), the outer value again.
    del _ACTIVE[len(_ACTIVE) - 1 - _ACTIVE[::-1].index(entry)]
    _update()  # the user's flags when none is left


def _update() -> None:
    """Write the flags for the computations now running (the latest on each backend wins).

    A flag the user set since the package last wrote (a notebook cell while the widget
    computes) becomes part of the user's state, and the state in force is the one written
    with those changes: so it is not overwritten by the saved value when the computation
    ends (a half-reverted legacy/new pair would report one precision and compute another),
    and takes effect, or stays, once the last computation ends.
    """
    user, written = _SAVED
    user = fp32_flags.adopt(user, written)
    current = fp32_flags.adopt(written, written)
    state = fp32_flags.target(user, dict(_ACTIVE))
    fp32_flags.apply(state, current)
    _SAVED[:] = [user, state]


def autocast(precision: str, device: torch.device):
    """``torch.autocast`` for bf16/fp16, else a null context."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_float32(out):
    """``out`` with every bf16/fp16 tensor cast to float32 (for the loss and metrics)."""
    def cast(t):
        if isinstance(t, Tensor) and t.dtype in (torch.bfloat16, torch.float16):
            return t.float()
        return t

    return tree_map(cast, out)


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of the x86 instructions that compute bf16 natively."""


@functools.cache
def _cpuinfo() -> str | None:
    """The text of /proc/cpuinfo, read once (the CPU does not change); None where absent."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def cpu_has_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), from /proc/cpuinfo.

    On a 2-core AMD EPYC with AVX512-BF16 (Zen 4) bf16 surfaces were 1.3-1.6x faster than
    fp32 ones (benchmarks/models.py, 2026-12-05); on one without, oneDNN emulates bf16 and
    they were 10-21x slower (2026-12-04).

    Args:
        cpuinfo: The text of /proc/cpuinfo (read when not given).

    Returns:
        ``True`` or ``False`` from the CPU's flags; ``None`` where they cannot be read
        (not Linux).

    Example:
        >>> cpu_has_bf16("flags : fpu avx2 avx512f avx512_bf16")
        True
        >>> cpu_has_bf16("flags : fpu avx2")
        False
    """
    if cpuinfo is None:
        cpuinfo = _cpuinfo()
        if cpuinfo is None:
            return None
    flags = {w for line in cpuinfo.splitlines() if line.startswith("flags")
             for w in line.split(":", 1)[-1].split()}
    return any(f in flags for f in BF16_CPU_FLAGS)


NO_EFFECT = "has no effect"
"""Words of every :func:`precision_note` on a precision that computes as fp32 (see
:func:`effective_precision`); a fallback's note reads "<precision> failed" instead."""


def effective_precision(precision: str, device: torch.device, dtype: torch.dtype | None
                        ) -> str:
    """The precision ``precision`` actually computes in on ``device`` for weights of ``dtype``.

    ``"fp32"`` where the precision asked for changes nothing: TF32 on a CPU (which has no
    TF32) or on weights that are not float32, bf16/fp16 on a float64 model
    (``torch.autocast`` leaves float64 tensors as they are). ``spec["precision"]`` records
    this, so it says what was computed, and ``reuse=`` compares these.

    Returns:
        ``"fp32"`` in those cases, else ``precision`` unchanged.

    Example:
        >>> effective_precision("tf32", torch.device("cpu"), torch.float32)
        'fp32'
        >>> effective_precision("bf16", torch.device("cpu"), torch.float64)
        'fp32'
        >>> effective_precision("bf16", torch.device("cpu"), torch.float32)
        'bf16'
    """
    if precision == "tf32" and (device.type != "cuda" or dtype in (
            torch.float64, torch.bfloat16, torch.float16)):
        return "fp32"
    if precision in AUTOCAST_DTYPES and dtype == torch.float64:
        return "fp32"
    return precision


def precision_note(precision: str, device: torch.device, dtype: torch.dtype | None = None,
                   out_dtype: torch.dtype | None = None) -> str:
    """What ``precision`` means on ``device`` for a model of ``dtype``, for ``spec["plan"]``.

    ``out_dtype``: the dtype of the model's logits without the engine's autocast; a half
    one from a model of another dtype means its forward computes in half precision itself.

    Returns:
        One line; for bf16 on a CPU it also says whether the CPU has bf16 instructions
        (without them bf16 is emulated and much slower than fp32).
    """
    inner = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(out_dtype)
    if inner and out_dtype != dtype:
        return precision_note(precision, device, dtype) + (
            f"; the model's forward returns {inner} logits (its own torch.autocast, or a "
            f"cast): those parts compute in {inner}"
            + (", in the fp32 of precision_error too" if precision in AUTOCAST_DTYPES else ""))
    own = {torch.float64: "float64", torch.bfloat16: "bfloat16",
           torch.float16: "float16"}.get(dtype)
    half = own if own != "float64" else None
    if own and precision not in AUTOCAST_DTYPES:
        # The note claimed "true fp32" for a bf16 model, whose forward is bf16 throughout.
        return (f"the model's weights are {own}: computed in {own} ({precision} "
                f"{NO_EFFECT} on them, it applies to float32 models"
                + ("; model.float() computes in fp32)" if half else ")"))
    if precision == "tf32" and device.type != "cuda":
        return f"tf32 {NO_EFFECT} on a CPU: computed in fp32"
    if precision in AUTOCAST_DTYPES and dtype == torch.float64:
        # torch.autocast casts no float64 tensor: the note claimed a bf16 forward for a
        # model computed in float64 (its precision_error was 2e-16).
        return (f"{precision} {NO_EFFECT} on a float64 model (torch.autocast leaves "
                "float64 tensors as they are): computed in float64")
    if precision == "fp32":
        return "true fp32 (TF32 off for matmuls, convolutions and RNNs while computing)"
    if precision == "tf32":
        return "TF32 tensor cores for float32 matmuls and convolutions"
    note = (f"forward under torch.autocast({device.type!r}, {precision}); outputs cast to "
            "float32 before the loss, sums in float64")
    native = cpu_has_bf16() if device.type == "cpu" and precision == "bf16" else None
    if native is False:
        note += ("; this CPU has no bf16 instructions (AVX512-BF16, AMX): bf16 is emulated "
                 "and usually several times slower than fp32")
    elif native:
        note += "; this CPU computes bf16 natively (AVX512-BF16 or AMX)"
    if half:
        note += (f"; the model's weights are {half}: precision_error compares with its "
                 f"{half} forward without autocast, not with fp32")
    return note


class PrecisionCheck:
    """The evaluator's fp32 fallback and its measured ``precision_error`` (a mixin).

    Uses the evaluator's ``precision``, ``device``, ``plan``, ``_run`` and ``_plain_plan``.
    """

    def _precision_failed(self, err: BaseException) -> None:
        """Back to fp32 after the model failed under autocast; the plan and a warning say so.

        (oneDNN has no bf16 LSTM on CPUs without bf16 instructions, for one.)
        """
        why = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        warnings.warn(f"precision={self.precision!r} failed on this model and device ({why}); "
                      "the points are computed in fp32 instead (spec['precision']).",
                      RuntimeWarning, stacklevel=4)
        self._precision_fallback = f"{self.precision} failed ({why}): computed in fp32"
        self.precision = self._active = "fp32"
        self._results.clear()
        self.rejected.clear()
        self._reset_state()

    def _adopt_fallback(self, note: str) -> None:
        """Compute in fp32, as the evaluator that chose the adopted plan did (``note``: why).

        An executor's first tile times the plans on one worker; the others adopt its plan.
        When the model had failed there at this precision, the plan computes in fp32: a
        worker adopting it under autocast failed again, on a pass outside the fallback, and
        the whole grid raised.
        """
        self._precision_fallback = note
        self.precision = "fp32"

    def _check_precision(self, c: Tensor, values: Tensor) -> None:
        """Evaluate some of these points in fp32 too; the largest |loss difference|.

        The first :data:`ERROR_POINTS` points evaluated, spread over the call's rows; and
        up to :data:`ERROR_POINTS` points of each call whose loss is not finite at this
        precision, until one is finite in fp32 (``precision_error`` is then inf): only the
        first were checked, and a grid whose bf16 overflowed away from them (NaN there,
        finite in fp32) reported the small error of the others.
        """
        rows: set[int] = set()
        if self._spread_checked < ERROR_POINTS:
            rows.update(np.unique(np.linspace(
                0, c.shape[0] - 1, min(ERROR_POINTS - self._spread_checked, c.shape[0]))
                .round().astype(int)).tolist())
        spread = len(rows)
        if (self.plan.precision_error or 0.0) < math.inf:
            bad = torch.nonzero(~torch.isfinite(values[:, 0])).flatten().tolist()
            rows.update([r for r in bad if r not in rows][:ERROR_POINTS])
        if not rows:
            return
        rows = sorted(rows)
        plain = self._plain_plan()
        with precision_flags("fp32", self.device):
            self._active = "fp32"
            try:
                exact = self._run(plain, c[rows])
            finally:
                self._active = self.precision
        # Counted once checked: a cancel in the fp32 passes (Cancelled) left them unchecked.
        self._spread_checked += spread
        for i, r in enumerate(rows):
            self._error_pairs.append((float(values[r, 0]), float(exact[i, 0])))
        diffs = [loss_gap(a, b) for a, b in self._error_pairs]
        self.plan.precision_error = float(max(diffs)) if diffs else None


def loss_gap(loss: float, fp32: float) -> float:
    """``|loss - fp32|`` of one checked point, for ``precision_error``.

    A point finite in one precision and not in the other (a bf16/fp16 overflow where fp32
    is finite) is ``inf``: as ``abs(nan - x)`` it was NaN, which ``max`` skips unless it
    comes first, so such a grid reported a precision_error of 0. Points not finite in
    either precision (the model diverges there) agree.

    Returns:
        The gap, ``0.0`` or ``inf`` for non-finite values.

    Example:
        >>> loss_gap(1.0, 1.5), loss_gap(float("nan"), 3e38), loss_gap(float("inf"), float("nan"))
        (0.5, inf, 0.0)
    """
    if math.isfinite(loss) and math.isfinite(fp32):
        return abs(loss - fp32)
    return 0.0 if math.isfinite(loss) == math.isfinite(fp32) else math.inf
