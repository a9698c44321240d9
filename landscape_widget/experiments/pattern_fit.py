"""The result of a pattern fit: a resumable trainer, evaluation on the plane, plots and files."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..core.data import as_tensors
from ..core.heap import holding_heap
from ..core.landscape import compute_surface
from ..core.params import outside_inference_mode
from .pattern_files import PatternFiles
from .pattern_targets import cells_cross_entropy, check_pattern_logits, check_pattern_targets
from .plane import FlatLayout, PatternPlane, cell_losses, mpo_loss


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err)


class _BatchedStepFailed(RuntimeError):
    """A ``torch.vmap``-batched step failed for another reason than memory."""


class PatternFit(PatternFiles):
    """A plane of networks trained to show a pattern (see :func:`fit_pattern`).

    Attributes:
        layout: The flat-vector layout of the architecture (:class:`FlatLayout`).
        plane: The trainable state, ``w0, w1, w2`` and ``s`` (:class:`PatternPlane`);
            nothing per cell is ever stored.
        binary: The drawn pattern (``uint8``, 1 = drawn).
        mask: The ternary mask (``int8``: +1 good, -1 bad, 0 ignored).
        config: The hyperparameters.
        history: One dict per step: ``step``, ``loss``, ``good_ce``, ``bad_ce``, ``scale``.
        step: Steps taken so far.
    """

    def __init__(self, layout: FlatLayout, plane: PatternPlane, binary: np.ndarray,
                 mask: np.ndarray, config: dict):
        self.layout, self.plane = layout, plane
        self.binary, self.mask, self.config = binary, mask, dict(config)
        self.history: list[dict] = []
        self.step = 0
        self.optimizer = torch.optim.Adam(plane.parameters(), lr=self.config["lr"])
        seed = self.config["seed"]
        self._cells_rng = np.random.default_rng(seed)
        self._batch_gen = torch.Generator().manual_seed(seed + 1)
        self._order: Tensor | None = None
        self._cursor = 0
        self.chunk: int | None = None
        self.batched: bool | None = True  # vmap over cells; None while "auto" is timing
        self._trial: dict[bool, float] = {}
        self.last_evaluation: dict | None = None
        self._default_data: tuple | None = None  # views of the last training data
        h, w = mask.shape
        ij = np.indices((h, w)).reshape(2, -1).T - np.array([h // 2, w // 2])
        self._good = ij[(mask == 1).reshape(-1)]
        self._bad = ij[(mask == -1).reshape(-1)]

    # --- state --------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of the mask."""
        return tuple(self.mask.shape)

    @property
    def weights(self) -> dict[str, Tensor]:
        """Detached ``w0, w1, w2`` (flat, BN scales minus one) and the scale ``s``."""
        p = self.plane
        return {"w0": p.w0.detach(), "w1": p.w1.detach(), "w2": p.w2.detach(),
                "s": p.s.detach()}

    def state_size(self) -> int:
        """Number of trainable numbers the fit keeps: ``3 P + 1``."""
        return sum(p.numel() for p in self.plane.parameters())

    def cell_vector(self, i: int, j: int) -> Tensor:
        """The flat vector of cell ``(i, j)`` (row, column of the mask)."""
        h, w = self.shape
        if not (0 <= i < h and 0 <= j < w):
            raise IndexError(f"cell ({i}, {j}) is outside the {h}x{w} mask.")
        with torch.no_grad():
            off = torch.tensor([[i - h // 2, j - w // 2]], device=self.plane.w0.device)
            return self.plane.cells(off)[0]

    def materialize(self, i: int, j: int) -> nn.Module:
        """A standalone network for cell ``(i, j)`` (its BatchNorm uses batch statistics)."""
        return self.layout.module_at(self.cell_vector(i, j))

    # --- training -----------------------------------------------------------------------
    def _minibatch(self, n: int) -> Tensor:
        b = min(self.config["batch_size"], n)
        if self._order is None or self._order.numel() != n or self._cursor + b > n:
            self._order = torch.randperm(n, generator=self._batch_gen)
            self._cursor = 0
        idx = self._order[self._cursor:self._cursor + b]
        self._cursor += b
        return idx

    def _sample(self, cells: np.ndarray) -> np.ndarray:
        k = min(self.config["cells_per_step"], len(cells))
        return cells[self._cells_rng.choice(len(cells), size=k, replace=False)] if k else cells

    def _chunk_size(self, x: Tensor, total: int) -> int:
        """Cells per forward pass, from a memory budget (activations + the flat vectors)."""
        if self.chunk is not None:
            return self.chunk
        dev = x.device
        budget = (int(torch.cuda.mem_get_info(dev)[0] * 0.4) if dev.type == "cuda"
                  else 1 << 30)
        per_cell = 4 * self.layout.size * 4
        acts = _activation_bytes(self.layout, self.plane.w0, x[:2]) * x.shape[0] * 3
        return int(max(1, min(total, budget // max(1, per_cell + acts))))

    @outside_inference_mode
    def step_once(self, x: Tensor, y: Tensor, batched: bool = True) -> dict:
        """One MPO step on the minibatch ``(x, y)``; returns its history entry.

        ``batched=False`` evaluates the cells one by one (same maths, one
        ``functional_call`` and one backward per cell, as the paper's code did); it exists
        as the benchmark's baseline.

        Returns:
            The entry appended to :attr:`history`: ``{"step", "loss", "good_ce", "bad_ce",
            "scale"}`` with the new step number, the MPO loss of this minibatch (mean good
            cross-entropy minus ``coef`` times the mean bad one clamped to ``[0, tau]``),
            the mean cross-entropies of the sampled good and bad cells (NaN if none was
            sampled) and the scale ``s`` after the Adam step.

        Raises:
            RuntimeError: What the forward or backward pass raised, unless it is a
                batched pass running out of memory: then the cells are split into smaller
                chunks and the step retried; re-raised once a single cell runs out of
                memory.
            _BatchedStepFailed: A RuntimeError: any other failure of a batched pass,
                naming ``strategy='loop'`` (the original error chained).
        """
        good, bad = self._sample(self._good), self._sample(self._bad)
        offsets = torch.as_tensor(np.concatenate([good, bad]), device=x.device)
        ng, nb, cfg = len(good), len(bad), self.config
        while True:
            self.optimizer.zero_grad(set_to_none=True)
            chunk = self._chunk_size(x, ng + nb) if batched else 1
            try:
                ces = []
                for start in range(0, ng + nb, chunk):
                    off = offsets[start:start + chunk]
                    flats = self.plane.cells(off)
                    if batched:
                        ce = cell_losses(self.layout, flats, x, y)
                    else:
                        ce = cells_cross_entropy(
                            self.layout.forward_one(flats[0], x).unsqueeze(0), y)
                    g = max(0, min(ng - start, len(off)))
                    mpo_loss(ce[:g], ce[g:], ng, nb, cfg["tau"], cfg["coef"]).backward()
                    ces.append(ce.detach())
                break
            except RuntimeError as err:
                if "modified by an inplace operation" in str(err):  # torch's words only
                    raise RuntimeError(
                        "The model's forward changes a tensor in place after using it (e.g. "
                        "self.scale.mul_(1.5) after out = h * self.scale), so autograd cannot "
                        "differentiate the cells' loss, which MPO trains. Compute out of place "
                        f"in forward (self.scale = self.scale * 1.5). torch: {err}") from err
                if batched and not _is_oom(err):
                    # torch's own message ("Batching rule not implemented for aten::lstm")
                    # does not say that the same step runs cell by cell.
                    raise _BatchedStepFailed(
                        f"The batched MPO step (all sampled cells in one torch.vmap pass) "
                        f"failed: {type(err).__name__}: {err}. Layers torch.vmap cannot "
                        "batch or differentiate (nn.LSTM, nn.GRU, QAT fake quantisation, "
                        "the fused Transformer kernels) run with strategy='loop' (cell by "
                        "cell, the same maths) or strategy='auto'.") from err
                if not batched or chunk == 1:
                    raise
                self.chunk = max(1, chunk // 2)
                if x.device.type == "cuda":
                    torch.cuda.empty_cache()
            finally:
                self.layout._reset_state()  # the template as the fit found it, for module_at
        penalty = self.plane.penalty()
        if penalty.requires_grad:
            penalty.backward()
        torch.nn.utils.clip_grad_norm_(self.plane.parameters(), cfg["clip"])
        self.optimizer.step()
        ce = torch.cat(ces)
        good_ce = float(ce[:ng].mean()) if ng else float("nan")
        bad_ce = float(ce[ng:].mean()) if nb else float("nan")
        loss = good_ce - (cfg["coef"] * float(ce[ng:].clamp(0, cfg["tau"]).mean()) if nb else 0)
        self.step += 1
        entry = {"step": self.step, "loss": loss, "good_ce": good_ce, "bad_ce": bad_ce,
                 "scale": float(self.plane.s.detach())}
        self.history.append(entry)
        return entry

    @outside_inference_mode
    @holding_heap
    def train(self, data, steps: int, *, progress: bool = True,
              callback: Callable[[PatternFit], None] | None = None, every: int = 10,
              cancel: threading.Event | None = None, strategy: str = "vmap") -> PatternFit:
        """Take ``steps`` more steps on ``data`` (resumes the optimizer and the samplers).

        ``strategy``: ``"vmap"`` evaluates all sampled cells in one batched pass;
        ``"loop"`` one cell at a time (same maths); ``"auto"`` times one step of each and
        keeps the faster (a convnet on a CPU can be faster looped: ``vmap`` turns its
        convolutions into grouped ones; a model ``vmap`` cannot run, such as an LSTM, is
        looped). See :func:`fit_pattern` for the other arguments.

        Returns:
            This fit itself (trained in place), after ``steps`` steps or fewer if
            ``cancel`` was set.

        Raises:
            ValueError: If ``steps`` is not an int >= 0, ``strategy`` is not ``"vmap"``,
                ``"loop"`` or ``"auto"``, or (through
                :func:`~landscape_widget.core.data.as_tensors`) the data is empty or its
                inputs and targets differ in length, or the targets or logits are not
                what MPO's cross-entropy takes (see
                :mod:`~landscape_widget.experiments.pattern_targets`: regression or 0/1
                multi-label targets, one logit, classes last).
            TypeError: If the data is of an unsupported form (see
                :func:`~landscape_widget.core.data.as_tensors`).
            RuntimeError: If a step fails (see :meth:`step_once`).
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}.")
        if strategy not in ("vmap", "loop", "auto"):
            raise ValueError(f"strategy={strategy!r}: choose 'vmap', 'loop' or 'auto'.")
        if strategy == "auto":
            self.batched, self._trial = None, {}
        else:
            self.batched = strategy == "vmap"
        x, y = as_tensors(data)
        check_pattern_targets(y)
        dev = self.plane.w0.device
        x = x.to(dev, self.layout.dtype if torch.is_floating_point(x) else x.dtype)
        y = y.to(dev)
        with torch.no_grad():
            check_pattern_logits(self.layout.forward_one(self.plane.w0, x[:2]), y)
        self.layout._reset_state()
        self._default_data = (x[:512], y[:512])
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="pattern fit", unit="step")
        try:
            for k in range(steps):
                if cancel is not None and cancel.is_set():
                    break
                idx = self._minibatch(x.shape[0]).to(dev)
                if self.batched is None:  # "auto": two real steps, one per path, are timed
                    batched = True not in self._trial
                    t = time.perf_counter()
                    try:
                        entry = self.step_once(x[idx], y[idx], batched=batched)
                    except _BatchedStepFailed:  # the loop is the only way: no trial
                        self.batched, self._trial = False, {}
                        entry = self.step_once(x[idx], y[idx], batched=False)
                    else:
                        self._trial[batched] = time.perf_counter() - t
                    if len(self._trial) == 2:
                        self.batched = self._trial[True] <= self._trial[False]
                else:
                    entry = self.step_once(x[idx], y[idx], batched=self.batched)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(good=f"{entry['good_ce']:.3f}", bad=f"{entry['bad_ce']:.3f}",
                                    refresh=False)
                if callback is not None and ((k + 1) % every == 0 or k + 1 == steps):
                    callback(self)
        finally:
            if bar is not None:
                bar.close()
        return self

    # --- evaluation ---------------------------------------------------------------------
    @outside_inference_mode
    def evaluate(self, data, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Loss and accuracy of every cell's network on ``data``: ``(H, W)`` arrays.

        Computed by the surface engine on the plane ``w0 + a * s * right + b * s * up`` at
        integer ``(a, b)``; BatchNorm uses the statistics of each batch of ``batch_size``
        samples (the training minibatch size by default), as in training.

        Returns:
            ``{"loss": array, "accuracy": array}``, float64 ``(H, W)`` arrays in the
            mask's row/column order: the mean cross-entropy and the accuracy on ``data`` of
            the network at each cell. Also kept as ``last_evaluation``.

        Raises:
            ValueError: If the targets are not what MPO's cross-entropy takes (see
                :func:`~landscape_widget.experiments.pattern_targets.check_pattern_targets`).
        """
        h, w = self.shape
        x, y = as_tensors(data)
        check_pattern_targets(y)  # multi-label rows: another loss, and no accuracy
        with torch.no_grad():
            right, up = self.plane.basis()
            s = self.plane.s
            center = self.layout.module_at(self.plane.w0)
            d_right = self.layout.unflatten(s * right, offset=False)
            d_up = self.layout.unflatten(s * up, offset=False)
        surf = compute_surface(
            center, (x, y), directions=(d_right, d_up),
            x=(-(w // 2), w - 1 - w // 2, w), y=(-(h // 2), h - 1 - h // 2, h),
            bn="batch", progress=False,
            bn_batch_size=int(batch_size or self.config["batch_size"]),
        )
        out = {"loss": surf.loss, "accuracy": surf.accuracy}
        self.last_evaluation = out
        return out

    def scores(self, data_or_evaluation) -> dict[str, float]:
        """``acc_diff``, ``good_acc`` and ``bad_acc`` (mean accuracy over +1 / -1 cells)."""
        ev = (data_or_evaluation if isinstance(data_or_evaluation, dict)
              else self.evaluate(data_or_evaluation))
        acc = ev["accuracy"]
        good = float(acc[self.mask == 1].mean())
        bad = float(acc[self.mask == -1].mean()) if (self.mask == -1).any() else float("nan")
        return {"acc_diff": good - bad, "good_acc": good, "bad_acc": bad}

    def acc_diff(self, data_or_evaluation) -> float:
        """Mean accuracy on +1 cells minus mean accuracy on -1 cells (ignored cells excluded).

        Args:
            data_or_evaluation: Data to evaluate on, or a dict from :meth:`evaluate`.

        Returns:
            The mean accuracy over the good (+1) cells minus that over the bad (-1) cells,
            as a float in [-1, 1]; NaN if the mask has no bad cell.
        """
        return self.scores(data_or_evaluation)["acc_diff"]

    def to_plotly(self, data=None, metric: str = "loss", log: bool = True):
        """The ternary mask next to the plane's ``metric`` heatmap (rows as in the mask).

        Args:
            data: Data to evaluate on; default the last :meth:`evaluate` result, else the
                first 512 samples of the training data.
            metric: ``"loss"`` or ``"accuracy"``.
            log: Colour the loss on a log2 scale (as the paper's figures).

        Returns:
            A plotly figure with two panels: the ternary mask (good, bad and ignored
            cells) and the heatmap of ``metric`` over the cells, titled with the step.

        Raises:
            ValueError: If ``metric`` is not ``"loss"`` or ``"accuracy"``, or ``data`` is
                not given and nothing was evaluated or trained on yet.
        """
        from .plots import pattern_figure

        if metric not in ("loss", "accuracy"):
            raise ValueError("metric must be 'loss' or 'accuracy'.")
        ev = self.evaluate(data) if data is not None else self.last_evaluation
        if ev is None and self._default_data is not None:
            ev = self.evaluate(self._default_data)
        if ev is None:
            raise ValueError("nothing evaluated yet: pass data, e.g. fit.to_plotly(test_data).")
        return pattern_figure(self.mask, ev[metric], metric, log and metric == "loss",
                              title=f"step {self.step}")

    def __repr__(self) -> str:
        h, w = self.shape
        return (f"PatternFit({h}x{w} mask, {int((self.mask == 1).sum())} good / "
                f"{int((self.mask == -1).sum())} bad cells, step {self.step}, "
                f"P={self.layout.size}, s={float(self.plane.s.detach()):.4g})")


def _activation_bytes(layout: FlatLayout, flat: Tensor, x: Tensor) -> int:
    """Bytes of module outputs per sample, from one forward pass on ``x`` (2 samples)."""
    total = 0

    def hook(_m, _i, out):
        nonlocal total
        if isinstance(out, Tensor):
            total += out.numel() * out.element_size()

    handles = [m.register_forward_hook(hook) for m in layout.template.modules()]
    try:
        with torch.no_grad():
            layout.forward_one(flat, x)
    finally:
        for h in handles:
            h.remove()
        layout._reset_state()  # the probe's writes too (see FlatLayout)
    return max(1, total // max(1, x.shape[0]))
