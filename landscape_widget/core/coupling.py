"""Forwards whose outputs for a sample depend on the other samples of its batch.

A custom ``h - h.mean(0)``, a normalisation over the batch, attention across the batch
dimension: the loss of such a model depends on how the data are split into passes, which
the engine's plan chooses (all data when they fit the memory budget, else smaller batches).
:class:`BatchCoupling` (a mixin of :class:`~landscape_widget.core.evaluate.Evaluator`) runs
the set-up's first samples once more, half of them alone, and compares their outputs with
those of the set-up's probe (:meth:`~.batch_stats.LossStats._probe`). When they differ,
every pass holds all the data, as one ``functional_call`` over the data does, and the result
says so; ``evaluator_options={"batch_size": B}`` chooses another batching.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.func import functional_call
from torch.utils._pytree import tree_flatten

from .metrics import find_logits
from .precision import precision_flags
from .rng import batch_draws

COUPLING_TOLERANCE = {"fp32": 1e-3, "tf32": 1e-2, "bf16": 5e-2, "fp16": 5e-2}
"""Largest relative difference of the first samples' outputs, run with others or alone,
taken for rounding (kernels for another batch size) rather than coupling; per precision."""

SENTINEL_RATIO = 1e3
SENTINEL_MIN = 1e6
"""Entries equal in both runs, at least this large and :data:`SENTINEL_RATIO` times larger
than the typical entry that differs are taken for a mask's fill (-1e9, ``finfo.min``), not
left in the scale that relative differences are taken against. (Without the floor, an exact
pass-through of 1e4 left out of the scale made a per-sample autoencoder's cancelling
residuals, 1e-3 apart between batch sizes, read as coupling: review 11c. Fills of -1e4, as
fp16-safe code uses, are therefore not recognised.)"""

COUPLING_WARNING = (
    "The model's outputs for a sample depend on the other samples of its batch (its "
    "forward mixes them, like h - h.mean(0)), so its loss depends on how the data are "
    "batched. Every pass holds all the data, as one call of the model on the data "
    "does; pass evaluator_options={'batch_size': B} to choose another batching.")
"""The warning of a forward found mixing its batch (also the client's, core/distributed.py)."""


def first_rows_difference(full, part, m: int, h: int) -> float | None:
    """Largest relative difference between the first ``h`` sample rows of two outputs.

    ``full`` holds ``m`` samples, ``part`` the first ``h`` of them run alone. Each tensor
    leaf is compared along the one dimension where the two differ (``m`` against ``h``):
    the samples' dimension, first or not (a sequence-first RNN's ``(T, N, H)``).

    Args:
        full: The model's outputs for ``m`` samples (a tensor, or tuples/lists/dicts of them).
        part: Its outputs for the first ``h < m`` of those samples.
        m: Samples in ``full``.
        h: Samples in ``part``.

    Returns:
        ``max |a - b| / max |a|`` over the floating leaves with a samples' dimension (a
        leaf holding other values counts when not equal: 1.0), or None when no leaf can
        be compared (other structures, no samples' dimension, a size-1 squeeze). Masked
        entries (-1e9, -inf) are left out of the scale, see :func:`_float_difference`.

    Example:
        >>> h = torch.arange(8.0).reshape(4, 2)
        >>> first_rows_difference(h * 2, h[:2] * 2, 4, 2)
        0.0
        >>> round(first_rows_difference(h - h.mean(0), h[:2] - h[:2].mean(0), 4, 2), 3)
        0.667
        >>> first_rows_difference({"y": h}, (h[:2],), 4, 2) is None
        True
    """
    a_leaves, a_spec = tree_flatten(full)
    b_leaves, b_spec = tree_flatten(part)
    if a_spec != b_spec:
        return None
    worst: float | None = None
    for a, b in zip(a_leaves, b_leaves, strict=True):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.dim() != b.dim():
            continue
        dims = [d for d in range(a.dim()) if a.shape[d] != b.shape[d]]
        if len(dims) != 1 or a.shape[dims[0]] != m or b.shape[dims[0]] != h:
            continue
        a = a.detach().narrow(dims[0], 0, h)
        if a.is_floating_point() or a.is_complex():
            value = _float_difference(a, b.detach().to(a.dtype))
            if value is None:  # NaN outputs only: nothing to compare
                continue
        else:
            value = 0.0 if torch.equal(a, b.detach()) else 1.0
        worst = value if worst is None else max(worst, value)
    return worst


def _float_difference(a: Tensor, b: Tensor) -> float | None:
    """``max |a - b| / scale`` over the entries both hold as numbers; None if none do.

    The scale is the largest magnitude, leaving out entries equal in both, at least
    :data:`SENTINEL_MIN` and :data:`SENTINEL_RATIO` times the typical entry that differs:
    a mask's fill (``masked_fill(mask, -1e9)``), not a value the model computed. In the
    scale, a batch-coupled model's differences of 0.5 on logits of 1 read as 5e-10 and
    went unnoticed; ``-inf`` fills made every difference NaN, and the leaf was skipped.

    Returns:
        The relative difference; 1.0 where an infinity is on one side only; None when
        every entry is NaN in one of them.

    Example:
        >>> a = torch.tensor([1.0, 2.0, -1e9, float("-inf")])
        >>> _float_difference(a, torch.tensor([1.5, 2.0, -1e9, float("-inf")]))
        0.25
        >>> _float_difference(a, a.clone())
        0.0
        >>> _float_difference(a, torch.tensor([1.0, 2.0, -1e9, 0.0]))  # an inf on one side
        1.0
    """
    nan = a.isnan() | b.isnan()
    finite = a.isfinite() & b.isfinite()
    if bool((~finite & ~nan & (a != b)).any()):
        return 1.0
    if not bool(finite.any()):
        return None
    a, b = a[finite], b[finite]
    same = a == b
    if bool(same.all()):
        return 0.0
    mag = torch.maximum(a.abs(), b.abs())
    moved = mag[~same]
    # The median of at most 2**16 of them: an LM's 4 x 128 x 50k logits would take seconds.
    ref = float(moved[:: max(1, moved.numel() >> 16)].median())
    scale = float(mag[~same | (mag <= max(SENTINEL_RATIO * ref, SENTINEL_MIN))].max())
    return float((a - b).abs().max()) / scale


class BatchCoupling:
    """Checks whether the model mixes the samples of a batch (a mixin of the Evaluator).

    Uses the evaluator's ``module``, ``base``, ``x``, ``n``, ``device``, ``dtype``,
    ``precision``, ``output_fn``, ``_user_loss`` and ``user_metrics``, its probe
    (``_probe``), draws' probe (``_probe_draws``) and state (``_enter``/``_exit``,
    ``_generators``).
    """

    batch_coupling: str | None = None
    """Why every pass holds all the data (the forward mixes the samples of a batch), or None."""

    def _check_coupling(self, m: int) -> None:
        """Hold all data in one pass if the first samples' outputs depend on their batch.

        The first ``m // 2`` samples run alone, seeded and with the state put back as the
        probe was. A forward that draws random numbers (from the process's generators or
        one it holds) is not judged: its draws differ with the batch's size anyway; nor
        one that fails on the half batch (it takes only some batch sizes).

        Warns:
            UserWarning: When the outputs differ: the loss depends on the batching; every
                pass then holds all ``n`` samples (``spec["batch_coupling"]`` says why).
        """
        h = m // 2
        if h < 1 or self.bn_batch_size is not None or self.forced_batch:
            return
        full = self._probe(m)
        with torch.inference_mode(False):
            x = self.x[:h].clone()
        cuda = self.device.type == "cuda"
        self._enter()
        try:
            with torch.no_grad(), precision_flags(self.precision, self.device), batch_draws(
                    self.device, 0):
                before = torch.default_generator.get_state()
                before_cuda = torch.cuda.get_rng_state(self.device) if cuda else None
                # Not under DrawSpy: a torch function mode routes calls through other
                # kernels (a Transformer's fast path is off under it, and that path's
                # padded tokens are 0): its outputs differed from the probe's by 0.39.
                part = functional_call(self.module, dict(self.base), (x,))
                moved = not torch.equal(before, torch.default_generator.get_state()) or (
                    cuda and not torch.equal(before_cuda, torch.cuda.get_rng_state(self.device)))
            drew = moved or any(
                not torch.equal(g.get_state(), state) for g, state in self._generators)
        except Exception:  # noqa: BLE001 - the user's forward, on a batch the engine chose
            # A forward that takes only some batch sizes (a multiple of 8, x.view(-1, 8, d))
            # ran on the probe's samples and on the passes' batches; this check's half
            # batch is the engine's own. Not judged, as before the check existed.
            return
        finally:
            self._exit()
        if drew:
            self._draws = True  # (the plan candidates' question too, see _forward_draws)
            return
        if not self._user_loss and not self.user_metrics:
            # The default loss and accuracy see the logits alone (find_logits: output_fn, a
            # dict's "logits"): another output that mixes the batch (a batch-wide weighting
            # it logs) changes no value computed, and forcing all data in one pass could
            # run a GPU out of memory for nothing.
            try:
                full, part = find_logits(full, self.output_fn), find_logits(part, self.output_fn)
            except Exception:  # noqa: BLE001 - the user's output_fn on the half batch
                pass
        diff = first_rows_difference(full, part, m, h)
        tolerance = COUPLING_TOLERANCE.get(self.precision, 1e-3)
        half = (torch.bfloat16, torch.float16)
        if self.dtype in half or any(isinstance(t, Tensor) and t.dtype in half
                                     for t in tree_flatten(part)[0]):
            # A bf16/fp16 model (its logits cast to float or not) or a forward under its own
            # autocast, at "fp32": it rounds to 8 or 11 bits, and a GEMM for another batch
            # size (cuBLAS's split-K) moves it by ulps that grow layer by layer.
            tolerance = max(tolerance, COUPLING_TOLERANCE["bf16"])
        if diff is None or diff <= tolerance:
            return
        # Draws inside the forward's own fork_rng (fixed noise) leave the states as they
        # were: DrawSpy sees them, on a forward of its own whose values are not compared.
        self._draws = self._probe_draws()
        if self._draws:
            return
        self.forced_batch = self.n
        self.batch_coupling = (
            f"the model's outputs for a sample depend on the other samples of its batch (the "
            f"first {h} samples' outputs differ by {diff:.2g}, relative, when run alone rather "
            f"than with {m}): every pass holds all {self.n} samples, as one call of the model "
            "on the data does")
        warnings.warn(COUPLING_WARNING, UserWarning, stacklevel=2)
