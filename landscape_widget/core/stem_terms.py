"""The stem's terms on the data, and each pass's stem inputs from them (see ``core/stem.py``).

The ``1 + len(directions)`` terms ``stem(x; W, b)`` and ``stem(x; D_j, db_j)`` are computed
once for all data (:meth:`StemTerms._prepare_stem`, checked against the whole model on the
first samples); a pass's inputs to the suffix are then their weighted sum at its points.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.func import functional_call

from .batch_stats import PROBE_SAMPLES
from .fold import fold_pays, split_matches
from .plans import ROW_SHARE, free_memory
from .rng import batch_draws

# Up to this many directions, the stem inputs of K points are summed one direction per pass
# (StemTerms._stem_input). Measured on a 2-core CPU, 64 points: for 1 and 2 directions the
# passes take 0.2x and 0.5-0.9x the GEMM's time; from 3 on, the GEMM is as fast or faster.
FUSED_TERMS = 2


class StemTerms:
    """The precomputed stem terms of :class:`~landscape_widget.core.evaluate.Evaluator`.

    A mixin: it uses the evaluator's ``stem``, ``base``, ``dirs``, ``x``, ``n``, ``module``,
    ``budget``, ``act_bytes``, ``stem_budget``, ``device``, ``_stem_buf``, ``_stem_row``,
    ``_stem_row_fits`` and ``_reset_state``.
    """

    def _stem_input(self, coef: Tensor, start: int, stop: int, layout: str) -> Tensor:
        """The stem's outputs for K points, ``(K, B, ...)``, in one matrix product.

        ``(H0 + sum_{j>=1} c_kj H_j) + c_k0 H_0`` for all k at once, with the sample and
        feature dims flattened: for up to :data:`FUSED_TERMS` directions one ``addcmul``
        pass per direction (faster than ``addmm(H0, C, [H_1; ...; H_m])``, whose broadcast
        of ``H0`` is an extra pass and whose GEMM of inner size 1 or 2 runs far below the
        memory speed), else that one ``addmm``. The bracket is the point's *row*, kept for
        the next point of a loop plan (:meth:`_stem_row_sum`).

        Returns:
            The inputs of the layer after the stem for samples ``start:stop`` at the ``K`` points
            with coordinates ``coef`` (``(K, m)``), shaped ``(K, stop - start, ...)`` (NCHW dims
            with channels-last strides when ``layout`` is ``"channels_last"``).
        """
        base, dirs, cols, channels_last = self._stem_pack(layout)
        b = base[start:stop]
        k = coef.shape[0]
        out = self._stem_buffer(b, k)
        if not cols:  # a copy: the suffix may work in place on its input (core/rewrite.py)
            h = out.copy_(b.reshape(1, -1).expand(k, -1))
        else:
            c = coef[:, cols].to(b.dtype)
            d = dirs[:, start:stop].reshape(len(cols), -1)
            if len(cols) > FUSED_TERMS:
                h = torch.addmm(b.reshape(1, -1), c, d, out=out)
            elif len(cols) == 1:
                h = torch.addcmul(b.reshape(1, -1), c, d, out=out)
            else:
                row = self._stem_row_sum(b, c, d, start, stop, layout) if k == 1 else None
                if row is None:  # the row built in place, as _stem_row_sum builds it
                    h = torch.addcmul(b.reshape(1, -1), c[:, 1:], d[1:], out=out)
                    h.addcmul_(c[:, :1], d[:1])
                else:
                    h = torch.addcmul(row, c[:, :1], d[:1], out=out)
        h = h.view(k, *b.shape)
        if channels_last:  # stored as (N, H, W, C): give each point NCHW with NHWC strides
            h = h.permute(0, 1, 4, 2, 3)
        return h

    def _stem_row_sum(self, b: Tensor, c: Tensor, d: Tensor, start: int, stop: int,
                      layout: str) -> Tensor | None:
        """``H0 + c_1 H_1`` on samples ``start:stop`` for one point, kept for the next point.

        A surface's points along x share it: with it kept, a point's stem inputs cost one
        ``addcmul`` pass instead of two (the stem terms of the benchmark CNN's first conv are
        38 MB a batch of 512, read from memory at every pass). Kept for all samples (one
        copy of the stem's outputs per lane) only while that fits :data:`~.plans.ROW_SHARE`
        of the memory free at the lane's first row; built with the same operation as the
        unkept row, hence the same values whichever order the points come in.

        Returns:
            The row's ``(1, B * features)`` view, or ``None`` where it is not kept.
        """
        key = (layout, float(c[0, 1]))
        kept = self._stem_row
        if kept is None or kept[0] != key:
            if kept is None:
                if self._stem_row_fits is False:
                    return None
                # Every lane keeps its own copy (core/lanes.py): decided at each lane's
                # first row, with the memory free then, the other lanes' copies taken.
                full = self._stem_pack(layout)[0]
                size = full.numel() * full.element_size()
                self._stem_row_fits = size <= ROW_SHARE * free_memory(self.device)
                if not self._stem_row_fits:
                    return None
                rows = torch.empty(full.numel(), dtype=full.dtype, device=full.device)
            else:
                rows = kept[1]  # the last row's memory, rewritten
            kept = self._stem_row = [key, rows, set()]
        per = b[0].numel()
        row = kept[1][start * per : stop * per].view(1, -1)
        if (start, stop) not in kept[2]:
            torch.addcmul(b.reshape(1, -1), c[:, 1:], d[1:], out=row)
            kept[2].add((start, stop))
        return row

    def _stem_buffer(self, like: Tensor, rows: int) -> Tensor:
        """A ``(rows, like.numel())`` tensor that every pass writes its stem inputs into.

        A pass consumes its inputs before the next one starts. Reusing one tensor saves a
        fresh one per pass: on a CPU a fresh 8 MB tensor costs about 1.4 ms of page faults
        (the benchmark MLP's 64 points x 1024 samples x 32 features), as much as the sums
        written into it.

        Returns:
            A view of the evaluator's stem buffer (grown when too small).
        """
        need = rows * like.numel()
        buf = self._stem_buf
        if (buf is None or buf.numel() < need or buf.dtype != like.dtype
                or buf.device != like.device):
            buf = self._stem_buf = torch.empty(need, dtype=like.dtype, device=like.device)
        return buf[:need].view(rows, like.numel())

    def _stem_pack(self, layout: str) -> tuple[Tensor, Tensor | None, list[int], bool]:
        """Stem terms as ``(base (N, ...), stacked directions (m, N, ...), columns, CL)``.

        For channels-last plans of 4D outputs the terms are stored as ``(N, H, W, C)``, so
        that the flattened product already has the channels-last memory order.

        Returns:
            ``(base, dirs, cols, cl)``: the stem output at the base point over all ``N`` samples,
            the per-direction terms stacked (``None`` when no direction reaches the stem), the
            coordinate columns those terms belong to, and whether the tensors are stored
            channels-last. Cached per layout.
        """
        if layout not in self._stem_packs:
            base = self._stem_terms[0]
            cols = [j for j, _ in self._stem_terms[1:]]
            terms = [t for _, t in self._stem_terms[1:]]
            cl = layout == "channels_last" and base.dim() == 4
            if cl:
                base = base.permute(0, 2, 3, 1).contiguous()
                terms = [t.permute(0, 2, 3, 1) for t in terms]
            dirs = torch.stack(terms) if terms else None
            self._stem_packs[layout] = (base, dirs, cols, cl)
        return self._stem_packs[layout]

    def _prepare_stem(self) -> bool:
        """Compute the stem terms for all data once; False if no stem applies."""
        if self._stem_terms is not None:
            return bool(self._stem_terms)
        self._stem_terms = []
        stem = self.stem
        if stem is None:
            return False
        w_key, b_key = f"{stem.name}.weight", f"{stem.name}.bias"
        moving = [j for j, d in enumerate(self.dirs) if w_key in d or b_key in d]
        with torch.no_grad():
            m = min(self.n, PROBE_SAMPLES)
            with batch_draws(self.device, 0):
                once = stem.prefix(self.x[:m])
            with batch_draws(self.device, 1):
                again = stem.prefix(self.x[:m])
            if not torch.equal(once, again):
                # The part before the first layer draws random numbers (noise on the input):
                # the stem's terms, computed once, would freeze one draw for all points.
                return False
            probe = stem.output(self.x[:1], self.base[w_key], self.base.get(b_key))
            need = probe.numel() * probe.element_size() * self.n * (1 + len(moving))
            if need > self.stem_budget:
                return False
            chunk = max(1, self.budget // max(1, self.act_bytes))
            terms = []
            for weight, bias, j in [(self.base[w_key], self.base.get(b_key), None)] + [
                (self.dirs[j].get(w_key, torch.zeros_like(self.base[w_key])),
                 self.dirs[j].get(b_key), j) for j in moving
            ]:
                parts = [stem.output(self.x[s : s + chunk], weight, bias)
                         for s in range(0, self.n, chunk)]
                terms.append((j, torch.cat(parts)))
            # Safety net: the split model must reproduce the whole model, whose outputs on
            # the first samples the set-up's probe has (a forward of the whole model on 2
            # samples here cost a ResNet-50 call 0.1 s: oneDNN kernels for a new batch size).
            sub = {k: self.base[k] for k in stem.suffix_keys}
            out_split = self._split_out(sub, terms[0][1][:m])
            out_full = self._probe(m)
            self._probed = None  # not needed any more
            ok = split_matches(out_split, out_full)
            if not ok and stem.unfolded is not None:
                # Folded BatchNorms round otherwise than the model. The suffix as traced
                # must match entry by entry (one large output, a logit of 1e4, would hide
                # a split gone wrong by O(1) on the outputs' scale); the folded one is kept
                # if it matches on the outputs' scale (fold.split_matches), else dropped.
                self._reset_state()  # what the folded suffix's pass wrote
                ok = split_matches(self._split_out(sub, terms[0][1][:m], stem.unfolded),
                                   out_full)
                if ok and not split_matches(out_split, out_full, folded=True):
                    stem.unfold()
            if not ok:
                return False
            self._reset_state()  # the probe's forward may have changed buffers
        self._stem_terms = [terms[0][1]] + terms[1:]
        return True

    def _fold_pays(self, conv: nn.Module, bn: nn.Module) -> bool:
        """Whether to fold ``bn`` into ``conv`` on this data (:func:`~.fold.fold_pays`).

        Returns:
            :func:`~.fold.fold_pays` for the full-data pass's samples and ``bn``'s outputs
            per sample as the set-up's probe measured them (unknown: False).
        """
        outputs = getattr(self, "out_elements", {}).get(id(bn))
        return fold_pays(self._batch_for(1), outputs, conv)

    def _split_out(self, sub: dict[str, Tensor], stem_out: Tensor,
                   suffix: fx.GraphModule | None = None) -> Tensor:
        """The stem's suffix (or ``suffix``) on ``stem_out`` (the safety net's split model)."""
        with batch_draws(self.device, 0):  # seeded as the set-up's probe
            suffix = self.stem.suffix if suffix is None else suffix
            return functional_call(suffix, sub, (stem_out.clone(),))

