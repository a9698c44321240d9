"""Private helpers of the mined directions: the functional loss around theta, and Adam.

See :mod:`.mining` for the conventions (functional evaluation, eval mode, BatchNorm).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..core.copies import true_gradients
from ..core.data import as_tensors
from ..core.directions import random_directions
from ..core.losses import check_cross_entropy_targets, decide_weighting
from ..core.metrics import find_logits, resolve_task
from ..core.model_kinds import check_differentiable, check_runnable
from ..core.params import (
    Params,
    buffers_of,
    evaluation_copy,
    model_device,
    parameters_of,
    plain_modes,
    weights_dtype,
)
from ..core.state import (
    check_no_renorm,
    check_running_stats,
    held_generators,
    plain_attributes,
    restore_attributes,
    set_flags,
)

Callback = Callable[[int, int, float], None]


class _Objective:
    """``L(theta + shift)`` on minibatches or on all data, through ``functional_call``.

    Args:
        model: The model (never written to).
        data: ``(inputs, targets)``, a ``Dataset`` or a ``DataLoader``.
        loss_fn: Mean loss of a batch; cross-entropy by default.
        bn: ``"eval"`` or ``"batch"``.
        ignore: ``"biasbn"``: directions live on tensors of dim > 1; ``None``: on all.
        device: Where to compute (default: the model's device).
    """

    @torch.inference_mode(False)  # the caller's inference mode: no inference tensors here
    def __init__(self, model: nn.Module, data, *, loss_fn: Callable | None, bn: str,
                 ignore: str | None, device=None):
        check_runnable(model)
        if data is None:
            raise ValueError("no data: pass the training data as data=(inputs, targets) (or a "
                             "Dataset/DataLoader); the loss along a direction needs samples.")
        if bn not in ("eval", "batch"):
            raise ValueError(f"bn={bn!r}: choose 'eval' (running statistics) or 'batch'.")
        check_running_stats(model, bn)  # else the loss would depend on the minibatches
        check_no_renorm(model)  # max_norm writes the weight in forward
        if ignore not in ("biasbn", None):
            raise ValueError(f"ignore={ignore!r}: choose 'biasbn' (directions on weights of "
                             "dim > 1) or None (all parameters).")
        self.model, self.bn, self.ignore = model, bn, ignore
        self.device = torch.device(device) if device is not None else model_device(model)
        # Private: its flags are ours to set. Embeddings' scale_grad_by_freq off: the
        # gradients are the loss's own (side directions, mining), not rescaled ones.
        self.module = true_gradients(evaluation_copy(model))
        # What a forward changes and every forward starts from (see session).
        self._attributes: list = []
        self._generators: list = []
        params = {k: v.to(self.device) for k, v in parameters_of(model).items()}
        self.theta = params
        self.keys = [k for k, v in params.items() if ignore is None or v.dim() > 1]
        if not self.keys:
            raise ValueError("the model has no parameters of dim > 1 to move; pass "
                             "ignore=None.")
        self.buffers = {k: v.to(self.device) for k, v in buffers_of(model).items()}
        # The weights' dtype, as the engine's and the Hessian's (core/params.py): the first
        # tensor's, a float64 temperature registered first, made the inputs float64 and
        # the float32 layers failed ("mat1 and mat2 must have the same dtype").
        self.dtype = weights_dtype(params) or next(iter(params.values())).dtype
        # A shuffling DataLoader is read once under a fixed private seed: the samples'
        # order (which the seeded minibatches index) is then the same on every call, and
        # the caller's RNG is not consumed.
        x, y = as_tensors(data, seed=0)
        if torch.is_floating_point(x):
            x = x.to(self.dtype)
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.n = int(self.x.shape[0])
        if loss_fn is None:
            check_cross_entropy_targets(self.y)
        self.loss_fn = loss_fn if loss_fn is not None else _cross_entropy
        # Chunks weigh by their counted targets (ignore_index, class weights), as the
        # engine's surfaces do; resolve_task needs no outputs for that.
        self._task = resolve_task(None, self.y, loss_fn, self.n)
        # Whether a user loss is a mean over counted targets or a mean of per-sample means
        # (decide_weighting) is decided at the first full_loss in more than one chunk.
        self._decided = loss_fn is None
        if not float(self._task.loss_weight(self.y)):
            raise ValueError("every target is ignored (ignore_index): the loss is a mean over "
                             "no targets. Pass data with counted targets.")

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Eval mode (and batch-statistics BN) for the block, on the private copy."""
        set_flags(self.module, self.bn)  # batch statistics untracked: nothing is updated
        # Attributes and generators a forward changes are put back after every forward,
        # as the engine's passes do (core/state.py): a call counter the forward used made
        # every minibatch's loss another function (and full_loss differ call to call).
        # Taken here, after the flags: put back from before them, BatchNorm went back to
        # tracking and wrote the user's running statistics.
        self._attributes = plain_attributes(self.module)
        self._generators = held_generators(self.module)
        with plain_modes(self.device):  # the caller's inference mode and autocast: off
            yield

    def loss(self, shift: Params, x: Tensor, y: Tensor) -> Tensor:
        """Mean loss of ``theta + shift`` on ``(x, y)``; differentiable in ``shift``.

        ``shift`` may also move floating-point buffers (a permutation direction moves the
        BatchNorm statistics with their units).

        Returns:
            The loss of the model with parameters (and buffers) ``theta + shift`` on ``(x, y)``, a
            scalar tensor with a graph back to ``shift``.
        """
        # Copies of the buffers, every call: a forward that writes into its buffers (a
        # counter, QAT observers) must reach neither the user's model, whose tensors
        # these are, nor the next call (each loss starts from the model's state).
        p = {**{k: b.clone() for k, b in self.buffers.items()}, **self.theta}
        for k, s in shift.items():
            p[k] = p[k] + s.to(p[k].device, p[k].dtype)
        loss = self.loss_fn(self._outputs(p, x), y)
        check_differentiable(loss, shift, "gradient directions")  # a no_grad forward
        return loss

    def _outputs(self, p: Params, x: Tensor):
        """The private copy's outputs with parameters and buffers ``p`` on ``x``."""
        # A copy of the batch: a forward writing to its input would change the user's data.
        try:
            return functional_call(self.module, p, (x.clone(),))
        finally:
            restore_attributes(self._attributes)
            for g, state in self._generators:
                g.set_state(state)

    def full_loss(self, shift: Params, chunk: int = 2048) -> Tensor:
        """Mean loss over all data (the engine's weighting); differentiable in ``shift``.

        Returns:
            The loss at ``theta + shift``: chunks of ``chunk`` samples weighed by their
            counted targets, or by their samples for a mean of per-sample means.

        Raises:
            ValueError: If the data takes more than one chunk and the user's loss is not a
                mean over samples or counted targets (``check_reduction``: a sum).
        """
        if not self._decided and chunk < self.n:
            # Chunks of a per-sequence-mean token loss weigh by their sequences, not by
            # their counted tokens (the engine's and the Hessian's rule, losses.py).
            p = {**{k: b.clone() for k, b in self.buffers.items()}, **self.theta}
            with torch.no_grad():
                decide_weighting(self.loss_fn, lambda r: self._outputs(p, self.x[r]),
                                 self.y, self._task)
            self._decided = True
        total, weight = 0.0, float(self._task.loss_weight(self.y))
        for s in range(0, self.n, chunk):
            xb, yb = self.x[s:s + chunk], self.y[s:s + chunk]
            w = float(self._task.loss_weight(yb))
            if w:  # a chunk of ignored targets only has a NaN mean and no weight
                total = total + self.loss(shift, xb, yb) * (w / weight)
        return total

    @torch.no_grad()
    def curve(self, d: Params, alphas) -> np.ndarray:
        """``L(theta + alpha d)`` over all data at each ``alpha`` (call inside :meth:`session`)."""
        return np.array([float(self.full_loss({k: float(a) * v for k, v in d.items()}))
                         for a in alphas])

    def scales(self) -> dict[str, float]:
        """The unit of each moved tensor: the RMS of its weights.

        Mining measures its steps (Adam's learning rate) and its radius in these units, so
        it does the same on a model whose layers are rescaled (``W1 * c``, ``W2 / c`` in a
        ReLU net: the same function) and needs no retuning for the size of the weights. A
        tensor that is all zero takes the RMS over all moved weights (1 if they are all zero).

        Returns:
            Moved tensor name -> RMS of its entries at ``theta`` (the RMS over all moved weights
            where that is zero or not finite; 1.0 if every moved weight is zero).
        """
        sq = {k: self.theta[k].double().pow(2) for k in self.keys}
        total = float(sum(v.sum() for v in sq.values()))
        count = sum(v.numel() for v in sq.values())
        overall = math.sqrt(total / count) if total > 0 else 1.0
        out = {}
        for k, v in sq.items():
            rms = math.sqrt(float(v.mean())) if v.numel() else 0.0
            out[k] = rms if rms > 0 and math.isfinite(rms) else overall
        return out

    def batches(self, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Endless minibatches: epochs of a private seeded permutation (all data if small)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
        return self._batches(batch_size, torch.Generator().manual_seed(seed))

    def _batches(self, batch_size: int, gen: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            if batch_size >= self.n:
                yield self.x, self.y
                continue
            order = torch.randperm(self.n, generator=gen).to(self.device)
            # An epoch's last, smaller batch is skipped: every step averages batch_size
            # samples, so the objective's noise is the same at every step.
            for s in range(0, self.n - batch_size + 1, batch_size):
                idx = order[s:s + batch_size]
                yield self.x[idx], self.y[idx]

    def start(self, count: int, seed: int, scale: float) -> list[Params]:
        """``count`` filter-normalised Gaussian directions times ``scale``, on the keys."""
        dirs = random_directions(self.model, count, norm="filter", ignore=self.ignore, seed=seed)
        return [{k: (scale * d[k]).to(self.device, self.theta[k].dtype) for k in self.keys}
                for d in dirs]

    def direction(self, d: Params) -> Params:
        """A full direction dict (zeros off the keys) on each parameter's device and dtype."""
        out = {}
        for k, p in parameters_of(self.model).items():
            out[k] = d[k].detach().to(p.device, p.dtype).clone() if k in d else torch.zeros_like(p)
        return out


def _norm(d: Params, scales: dict[str, float] | None = None) -> Tensor:
    """Euclidean norm, or with ``scales`` the norm of ``d_k / scales[k]`` (scale-free)."""
    if scales is None:
        return torch.sqrt(sum((v.double() ** 2).sum() for v in d.values()))
    return torch.sqrt(sum((v.double() ** 2).sum() / scales[k] ** 2 for k, v in d.items()))


def _dot(a: Params, b: Params, scales: dict[str, float] | None = None) -> Tensor:
    """Inner product, weighted by ``1 / scales[k]**2`` when given (matches :func:`_norm`)."""
    w = scales or {}
    return sum((a[k].double() * b[k].double()).sum() / w.get(k, 1.0) ** 2 for k in a)


def _check_common(steps, scale, lr, seed) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}.")
    for name, value in (("scale", scale), ("lr", lr)):
        if (isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
                or not math.isfinite(value)):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}.")


def _adam(leaves: list[Params], objective: Callable[[int], Tensor],
          project: Callable[[], None], *, steps: int, lr: float, desc: str, progress: bool,
          cancel: threading.Event | None, callback: Callback | None,
          scales: dict[str, float] | None = None) -> int:
    """Adam on the direction tensors, projecting after every step; returns steps taken.

    With ``scales``, tensor ``k`` steps with learning rate ``lr * scales[k]`` (``lr`` is then
    relative to the size of each tensor's weights).

    ``cancel`` is checked before every step: the directions are then those after the last
    completed (and projected) step, so a cancelled run still satisfies the norm constraint.

    Returns:
        The number of completed steps: ``steps``, or fewer when ``cancel`` was set.

    Raises:
        TypeError: If ``cancel`` has no callable ``is_set`` or ``callback`` is not callable.
    """
    if cancel is not None and not callable(getattr(cancel, "is_set", None)):
        raise TypeError(f"cancel must be a threading.Event (or None), got {cancel!r}.")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(step, steps, value), got "
                        f"{callback!r}.")
    tensors = [t for d in leaves for t in d.values()]
    for t in tensors:
        t.requires_grad_(True)
    w = scales or {}
    groups = [{"params": [t], "lr": lr * w.get(k, 1.0)} for d in leaves for k, t in d.items()]
    opt = torch.optim.Adam(groups, lr=lr)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, unit="step")
    done = 0
    try:
        for step in range(1, steps + 1):
            if cancel is not None and cancel.is_set():
                break
            opt.zero_grad(set_to_none=True)
            loss = objective(step)
            loss.backward()
            opt.step()
            with torch.no_grad():
                project()
            done = step
            value = float(loss.detach())
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"objective {value:.4g}", refresh=False)
            if callback is not None:
                callback(step, steps, value)
    finally:
        if bar is not None:
            bar.close()
        for t in tensors:
            t.requires_grad_(False)
    return done


def _check_attempts(attempts) -> None:
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ValueError(f"attempts must be an int >= 1 (tries before giving up), got "
                         f"{attempts!r}.")


def _retry(run: Callable[[dict], object], check: Callable[[object], dict], plan: list[dict],
           cancel: threading.Event | None) -> tuple[object, list, dict | None, bool]:
    """Try the settings of ``plan`` in order until ``check`` says one reached its shape.

    ``run(settings)`` builds a candidate; ``check(candidate)`` returns ``{"achieved",
    "reason", "ok", "score"}`` (plus optional ``"curve"``), lower ``score`` being closer to
    the requested shape. Returns ``(candidate, attempts, chosen check, cancelled)``: the
    first success, else the failure with the lowest score; a cancelled run is returned as
    it is, unchecked, and stops the retries.

    Returns:
        ``(candidate, attempts, check, cancelled)``: the first candidate whose check is ``ok``, else
        the lowest-scoring one; the :class:`Attempt` record of every checked setting; that
        candidate's check dict (``None`` when cancelled); and whether ``cancel`` was set.
    """
    from .curves import Attempt

    attempts, best = [], None
    for settings in plan:
        candidate = run(settings)
        if cancel is not None and cancel.is_set():
            return candidate, attempts, None, True
        found = check(candidate)
        attempts.append(Attempt(dict(settings), found["achieved"], found["reason"]))
        if found["ok"]:
            return candidate, attempts, found, False
        if best is None or found["score"] < best[1]["score"]:
            best = (candidate, found)
    return best[0], attempts, best[1], False


def _cross_entropy(out, y: Tensor) -> Tensor:
    """The default loss: cross-entropy on the logits (dict and ``ModelOutput`` outputs too)."""
    return F.cross_entropy(find_logits(out), y)
