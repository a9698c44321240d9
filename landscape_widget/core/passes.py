"""How the engine evaluates points: one point, or K under vmap, over all data in passes.

:class:`PointPasses` is a mixin of :class:`~landscape_widget.core.evaluate.Evaluator`: it
forms the parameters of a point (or K stacked points), runs the model (or the suffix after
the linear stem, core/stem.py) on a batch of samples, sums the loss and metrics
(core/batch_stats.py) and walks a chunk of points over all data with a
:class:`~landscape_widget.core.plans.Plan`, halving K, then B, on out-of-memory.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
from torch import Tensor
from torch.func import functional_call

from .errors import Cancelled, InputChanged
from .lanes import PointLanes
from .params import Params
from .plans import ROW_SHARE, Plan, _is_oom, free_memory, is_user_error, shrink_after_oom
from .precision import AUTOCAST_DTYPES, autocast, to_float32
from .rng import batch_draws

_FALLBACK_LOCK = threading.Lock()
_FALLBACK_USERS = 0  # the engine's vmap passes running now, in any thread


@contextlib.contextmanager
def quiet_vmap_fallback():
    """Silence torch's "performance drop ... batching rule" warning in the engine's vmaps.

    torch warns each time ``vmap`` falls back to a loop for an operator without a batching
    rule (weight_norm, the Transformer encoder's fused kernel): a note on torch's
    internals, about a ``vmap`` the engine chose, that the widget showed in the notebook
    on every computation. Only that warning is off, through torch's own switch (not the
    warnings filters, which are process-wide and not thread-safe): warnings about the
    user's code still show. The switch is back on once no engine pass needs it off.

    Limitation: a user who switched the warning off
    (``torch._C._functorch._set_vmap_fallback_warning_enabled(False)``) gets it back on
    after the engine's first vmap pass, and must switch it off again. Torch (2.14) has no
    getter for this switch, so its state cannot be saved and put back:
    ``torch._C._functorch`` has only the setter (``_is_vmap_fallback_enabled`` reads
    whether the fallback runs, not whether it warns), and
    ``torch._C._debug_only_are_vmap_fallback_warnings_enabled`` reads the legacy
    ``torch._vmap_internals`` flag (``at::Context``), a separate switch that this one does
    not change (checked 2026-12-05). Probing the state with a vmap under
    ``warnings.catch_warnings`` would touch the process-wide filters this avoids. Torch's
    default, and the state of a fresh process, is on: only that setting is kept.
    """
    global _FALLBACK_USERS
    with _FALLBACK_LOCK:
        _FALLBACK_USERS += 1
        torch._C._functorch._set_vmap_fallback_warning_enabled(False)
    try:
        yield
    finally:
        with _FALLBACK_LOCK:
            _FALLBACK_USERS -= 1
            if not _FALLBACK_USERS:
                torch._C._functorch._set_vmap_fallback_warning_enabled(True)


class PointPasses(PointLanes):
    """Points and chunks of points through the model (a mixin of the Evaluator).

    Uses the evaluator's ``module``, ``stem``, ``base``, ``dirs``, ``keys``, ``x``, ``y``,
    ``n``, ``dtype``, its plan state and its loss sums (``_stats``, ``_batched_stats``,
    ``_values``, ``_denominators``).
    """

    # --- one point, one chunk ------------------------------------------------------------
    def _outputs(self, params: Params, inputs: Tensor, plan: Plan) -> Tensor:
        """Model outputs of one point: the whole model, or the suffix after the stem."""
        target = self._lane_module(plan.stem)  # the calling lane's copy (core/lanes.py)
        if plan.stem:
            params = {k: params[k] for k in self.stem.suffix_keys}
        with autocast(self._active, self.device):
            if plan.compiled and plan.strategy == "loop":
                out = self._compiled_forward(plan)(params, inputs)
            else:
                out = functional_call(target, params, (inputs,))
        # The loss and metrics are computed in float32 (and summed in float64).
        return to_float32(out) if self._active in AUTOCAST_DTYPES else out

    def _inputs(self, layout: str) -> Tensor:
        if layout == "channels_last":
            if self._x_cl is None:
                self._x_cl = self.x.contiguous(memory_format=torch.channels_last)
            return self._x_cl
        return self.x

    def _point(self, c: Tensor, layout: str) -> Params:
        """Parameters of one point: ``(base + sum_{j>=1} c[j] d_j) + c[0] d_0``.

        The first sum is the point's *row* (a surface's points along x share it): it is
        kept for the next point, which then costs one fused ``add`` over the parameters
        instead of two (half the memory traffic: a ResNet-50 point's parameters took 13 ms
        on a 2-core CPU, 8 ms on average over a 5x5 grid with it). The row is built the
        same way whether or not it is kept, so a point's value does not depend on the order
        the points come in. Each sum runs over all moved tensors in one
        ``torch._foreach_add`` (one kernel launch per direction on a GPU, not one per
        tensor). The coefficients are rounded to the model's dtype first, as in
        :meth:`_stacked`.

        Returns:
            A new name -> tensor dict: the base parameters and buffers, with each moved
            parameter replaced by its value at the point (channels-last 4D weights when
            ``layout == "channels_last"``); ``self.base`` is not changed.
        """
        params = dict(self.base)
        coef = c.to(self.dtype if self.dtype.is_floating_point else torch.float32).tolist()
        base, dirs = self._point_terms(layout)
        floats = [k for k in self.keys if base[k].is_floating_point()]
        for k in self.keys:
            if not base[k].is_floating_point():  # an integer buffer: no float alpha
                acc = base[k]
                for j, d in enumerate(dirs):
                    acc = acc + c[j].to(acc.dtype) * d[k]
                params[k] = acc
        if floats:
            row = self._row_sum(floats, base, dirs, coef, layout)
            params.update(zip(floats, torch._foreach_add(row, [dirs[0][k] for k in floats],
                                                         alpha=coef[0]), strict=True))
        return params

    def _row_sum(self, floats: list[str], base: Params, dirs: list[Params], coef: list[float],
                 layout: str) -> list[Tensor]:
        """``base + sum_{j>=1} coef[j] d_j`` over ``floats``, kept for the next point.

        Kept (one copy of the moved parameters per lane) only while it fits
        :data:`~.plans.ROW_SHARE` of the memory free at the lane's first row; otherwise
        rebuilt for every point, with the same operations, hence the same values.

        Returns:
            The row's tensors, in the order of ``floats`` (``base``'s own for one direction).
        """
        if len(dirs) == 1:
            return [base[k] for k in floats]
        key = (layout, tuple(coef[1:]))
        if self._row is not None and self._row[0] == key:
            return self._row[1]
        self._row = None  # the last row's memory goes before the next is built
        row = torch._foreach_add([base[k] for k in floats], [dirs[1][k] for k in floats],
                                 alpha=coef[1])
        for j in range(2, len(dirs)):
            torch._foreach_add_(row, [dirs[j][k] for k in floats], alpha=coef[j])
        if self._row_fits is not False and not self._row_checked:
            # Every lane keeps its own row (core/lanes.py): decided at each lane's first
            # row, with the memory free then (the other lanes' rows taken); decided once
            # for the first lane, L lanes took L x ROW_SHARE. Once it does not fit, never.
            self._row_checked = True
            size = sum(t.numel() * t.element_size() for t in row)
            self._row_fits = size <= ROW_SHARE * free_memory(self.device)
        if self._row_fits:
            self._row = (key, row)
        return row

    def _point_terms(self, layout: str) -> tuple[Params, list[Params]]:
        """The base and directions of the moved entries, 4D ones stored in ``layout``.

        For channels-last plans the 4D weights are kept channels-last once, so that each
        point's sum comes out channels-last instead of being copied into it (6 ms of a
        ResNet-50 point on a 2-core CPU).

        Returns:
            ``(base, dirs)``: ``self.base`` and ``self.dirs``, or for ``"channels_last"``
            copies of their moved 4D entries in that memory format (made once).
        """
        if layout != "channels_last":
            return self.base, self.dirs
        if self._cl_terms is None:
            def cl(t: Tensor) -> Tensor:
                return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t

            self._cl_terms = ({k: cl(self.base[k]) for k in self.keys},
                              [{k: cl(d[k]) for k in self.keys} for d in self.dirs])
        return self._cl_terms

    def _stacked(self, coeffs: Tensor) -> Params:
        """Parameters of K points: base + sum_j c[:, j] * d_j, stacked along a new dim 0."""
        params = dict(self.base)
        for k in self.keys:
            base = self.base[k]
            shape = (coeffs.shape[0],) + (1,) * base.dim()
            acc = base.unsqueeze(0).expand((coeffs.shape[0],) + base.shape)
            for j, d in enumerate(self.dirs):
                acc = acc + coeffs[:, j].to(base.dtype).reshape(shape) * d[k].unsqueeze(0)
            params[k] = acc
        return params

    def _pass(self, plan: Plan, params: Params, coef: Tensor, start: int, stop: int) -> Tensor:
        """One forward pass of one point (loop) or K points (vmap) on samples [start, stop).

        Returns:
            The float64 ``(K, S)`` sums of :meth:`_stats` over samples ``[start, stop)``,
            one row per point (K = 1 for the loop).
        """
        y = self.y[start:stop]
        coef2d = coef.reshape(-1, len(self.dirs))
        # A fresh dict: functional_call writes buffers that forward reassigns back into it.
        params = dict(params)
        lane = self._in_lane()
        if lane is not None:  # the lane's own buffers (core/lanes.py)
            params.update(lane.buffers)
        # Random draws in the forward (a VAE's sampling) are seeded by the batch: the same
        # at every point, the caller's generators untouched (core/rng.py). A lane run is
        # seeded once for all its passes (and refused if the forward draws).
        with batch_draws(self.device, start) if lane is None else contextlib.nullcontext():
            try:
                if plan.stem:
                    inputs, in_dim = self._stem_input(coef2d, start, stop, plan.layout), 0
                else:
                    inputs, in_dim = self._inputs(plan.layout)[start:stop], None
                    if self.input_writes:  # the forward writes to its input (set-up's probe)
                        inputs = inputs.clone()
                    else:
                        return self._checked_pass(plan, params, inputs, y, start)
                return self._forward_stats(plan, params, inputs, in_dim, y, start)
            finally:
                self._end_pass()  # every pass starts from the user's buffers

    def _checked_pass(self, plan: Plan, params: Params, inputs: Tensor, y: Tensor,
                      start: int) -> Tensor:
        """:meth:`_forward_stats` on the data itself, refusing a forward that wrote to it.

        The set-up's probe finds a forward that writes to its input on the first samples;
        one that writes only to later ones (a data-dependent branch) is caught here, after
        the fact: the data has changed by then, so this is an error, not a fallback.

        Returns:
            What :meth:`_forward_stats` returns.

        Raises:
            InputChanged: (a ``ValueError``) If the forward changed its input in place.
        """
        version = _version(inputs)
        out = self._forward_stats(plan, params, inputs, None, y, start)
        if version is not None and _version(inputs) != version:
            raise InputChanged(
                "The model's forward changed its input in place on samples "
                f"{start}-{start + inputs.shape[0] - 1} (not on the first ones, which the "
                "engine checks on a copy and then hands every pass a copy of its batch): "
                "the data it was given changed, and with them your own tensor if the engine "
                "used it as it is (on the model's device, in its dtype, all of it). Compute "
                "out of place in forward (x = x * 2, not x.mul_(2); or x = x.clone() first), "
                "check your data and call again.")
        return out

    def _forward_stats(self, plan: Plan, params: Params, inputs: Tensor, in_dim: int | None,
                       y: Tensor, start: int) -> Tensor:
        """The model on ``inputs`` at ``params`` (one point, or K under vmap): the sums.

        Returns:
            The float64 ``(K, S)`` sums of :meth:`_stats` (see :meth:`_pass`).
        """
        if plan.strategy == "vmap":
            in_dims = ({k: (0 if k in self.keys else None) for k in params}, in_dim)
            if self._batched_ce:
                fn = functools.partial(self._outputs, plan=plan)
                with quiet_vmap_fallback():
                    out = torch.vmap(fn, in_dims=in_dims, randomness="same")(params, inputs)
                return self._batched_stats(out, y, start)
            w = self._denominators(plan.batch)[0][start // plan.batch]

            def stats(p, i):
                return self._stats(self._outputs(p, i, plan), y, w)

            with quiet_vmap_fallback():
                return torch.vmap(stats, in_dims=in_dims, randomness="same")(params, inputs)
        out = self._outputs(params, inputs[0] if plan.stem else inputs, plan)
        if self._batched_ce:
            return self._batched_stats(out.unsqueeze(0), y, start)
        w = self._denominators(plan.batch)[0][start // plan.batch]
        return self._stats(out, y, w).unsqueeze(0)

    def _run_chunk(self, plan: Plan, coeffs: Tensor) -> Tensor:
        """Values of the points ``coeffs`` (K <= plan.points) over all data.

        Returns:
            The float64 ``(K, 2 + len(user_metrics))`` values (plus a ``loss_se`` column
            when a population is set), one row per point of ``coeffs``: mean loss,
            accuracy, then the user metrics, over all data.
        """
        vmap = plan.strategy == "vmap"
        values = []
        # One pass group per K stacked points (vmap) or per point (loop). A loop point's
        # parameters are built just before use: a chunk's points all at once would hold
        # chunk x model-size of parameters (600 MB for 15 points of a 10M-parameter net).
        for coef in [coeffs] if vmap else coeffs:
            params = self._stacked(coef) if vmap else self._point(coef, plan.layout)
            sums = sum(self._pass(plan, params, coef, s, s + plan.batch)
                       for s in self._batch_starts(plan.batch))
            del params
            values.append(self._values(sums, plan.batch))
        return torch.cat(values)

    def _batch_starts(self, batch: int):
        """The first sample of every pass over all data, stopping if the job is cancelled.

        A point is one pass group over all data: seconds for 50,000 images on a CPU. A
        cancel (:attr:`_cancel`, set by the tile runner once the plan is chosen) lands at
        the next batch instead of after the point. :class:`~.errors.Cancelled` is not a
        plan's failure: every handler on the way raises it as it is (``is_user_error``).

        Yields:
            ``0, batch, 2 * batch, ...`` below ``n``.

        Raises:
            Cancelled: If the cancel event is set before a pass.
        """
        for start in range(0, self.n, batch):
            if self._cancel is not None and self._cancel.is_set():
                raise Cancelled("cancelled")
            yield start

    def _run(self, plan: Plan, coeffs: Tensor) -> Tensor:
        """Evaluate every row of ``coeffs`` with ``plan``, halving K (then B) on out-of-memory."""
        if plan.lanes > 1:
            out = self._run_lanes(plan, coeffs)
            if out is not None:
                return out  # else lanes were dropped (recorded): one pass at a time
        values = []
        pos = 0
        while pos < coeffs.shape[0]:
            chunk = coeffs[pos : pos + plan.points]
            try:
                with torch.no_grad():
                    values.append(self._run_chunk(plan, chunk))
            except Exception as err:
                if plan.compiled and not _is_oom(err) and not is_user_error(err):
                    self._compile_failed(plan, err)  # e.g. a recompile for the last batch
                elif plan.strategy == "vmap" and not _is_oom(err) and not is_user_error(err):
                    plan = self._fall_back(err)  # a later batch the trial did not see
                else:
                    shrink_after_oom(plan, err, self.device, self.bn_batch_size is not None,
                                     self.batch_coupling is not None)
                continue
            pos += chunk.shape[0]
        return torch.cat(values)


def _version(t: Tensor) -> int | None:
    """``t``'s version counter (bumped by every in-place write), ``None`` if it has none.

    Returns:
        The counter, or ``None`` for an inference tensor.

    Example:
        >>> t = torch.zeros(2); v = _version(t); _ = t.add_(1)
        >>> _version(t) - v
        1
        >>> with torch.inference_mode():
        ...     _version(torch.zeros(2)) is None
        True
    """
    try:
        return t._version
    except RuntimeError:  # an inference tensor: no counter (and writes to it raise anyway)
        return None
