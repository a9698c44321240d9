"""Train one architecture with several optimizers from one start (Im, Tao & Branson 2016).

PAPERS (b) B1: every optimizer starts from the same ``theta_0`` (same bytes), sees the same
mini-batches in the same order and the same dropout masks (the global RNG is reseeded per
step inside ``torch.random.fork_rng``, so the caller's RNG is untouched), and a checkpoint is
kept at every epoch (epoch 0 is ``theta_0``). B4 switching continues from another run's
checkpoint with a fresh optimizer on the remaining epochs of the same batch schedule.

This module trains one run (:func:`start_run`, :func:`train_run`); the set of runs,
:func:`~landscape_widget.experiments.runs.compare_optimizers` that makes it, and the analyses
(distances, functional difference, basin size, planes, the table figure) live in
:mod:`.runs`, which imports this module and never the other way round.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.copies import module_copy
from ..core.data import as_tensors
from ..core.fingerprints import state_hash
from ..core.losses import decide_weighting
from ..core.metrics import find_logits, resolve_task
from ..core.model_kinds import check_differentiable, check_runnable
from ..core.params import model_device

OptimizerFactory = Callable[..., torch.optim.Optimizer]


@dataclass
class Run:
    """One optimizer's training run.

    Attributes:
        name: The run's name (an optimizer's key, or ``"adam5-sgd15"`` for a switch).
        checkpoints: ``state_dict`` copies (CPU) after each epoch; ``[0]`` is ``theta_0``.
        history: Per epoch (from 0): ``"train_loss"`` (mean over the epoch's batches, NaN at
            epoch 0), ``"test_loss"`` and ``"test_accuracy"`` when test data was given.
        batch_log: SHA-256 of the sample indices of every step, in order: equal across
            runs when they saw the same batches.
        init: SHA-256 of ``theta_0``'s bytes.
        switched: ``(from_run, at_epoch)`` for a switched run, else ``None``.
        diverged: The epoch at which the loss became non-finite (training stopped), or None.
    """

    name: str
    checkpoints: list[dict[str, Tensor]]
    history: dict[str, list[float]]
    batch_log: str = ""
    init: str = ""
    switched: tuple[str, int] | None = None
    diverged: int | None = None
    optimizer: str = ""


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    """A CPU copy of ``model.state_dict()`` that keeps its ``_metadata`` (module versions).

    A module whose ``_load_from_state_dict`` reads its version (torchvision's MNASNet) refuses
    a plain dict of tensors ("version should be set to 1 or 2 instead of None"), so
    ``model_at`` needs the versions the state was saved with.

    Returns:
        An ``OrderedDict`` of detached CPU tensors with the state dict's ``_metadata``.
    """
    state = model.state_dict()
    out = OrderedDict((k, v.detach().to("cpu", copy=True)) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = copy.copy(metadata)  # type: ignore[attr-defined]
    return out


def initial_model(model_fn, seed: int) -> nn.Module:
    """``theta_0``: ``model_fn()`` built under ``seed`` (global RNG untouched), or a copy.

    Returns:
        A module the caller owns.

    Raises:
        TypeError: If ``model_fn`` is neither a module nor a callable, or builds no module
            that the engine can run (see :func:`~..core.model_kinds.check_runnable`).
    """
    if isinstance(model_fn, nn.Module):
        # The user's module is only read; module_copy: a pruned model's weight is a
        # non-leaf tensor, which copy.deepcopy refuses.
        check_runnable(model_fn)
        return module_copy(model_fn)
    if not callable(model_fn):
        raise TypeError(
            "model_fn must be a zero-argument callable that builds the network (e.g. "
            f"lambda: lw.demo.mlp(seed=None)) or an nn.Module; got {type(model_fn).__name__}."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_fn()
    check_runnable(model, "model_fn()")
    return model


def make_optimizer(name: str, factory, model: nn.Module) -> torch.optim.Optimizer:
    """``factory(model.parameters())``, checked to be a first-order optimizer.

    Returns:
        The optimizer over ``model``'s parameters.

    Raises:
        TypeError: If ``factory`` is not callable, returns no optimizer, or returns one whose
            ``step`` needs a closure.
    """
    if not callable(factory):
        raise TypeError(
            f"optimizers[{name!r}] must build an optimizer from parameters, e.g. "
            "functools.partial(torch.optim.SGD, lr=0.1) or lambda p: torch.optim.Adam(p, 1e-3)."
        )
    opt = factory(model.parameters())
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(
            f"optimizers[{name!r}](params) returned {type(opt).__name__}, not a "
            "torch.optim.Optimizer."
        )
    closure = inspect.signature(opt.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise TypeError(
            f"optimizers[{name!r}] is a {type(opt).__name__}, whose step() needs a closure "
            "that re-evaluates the loss; compare_optimizers runs one forward pass per step "
            "(the shared dropout masks depend on it): use a first-order optimizer."
        )
    return opt


class Schedule:
    """The shared batch order and per-step dropout seeds of a comparison.

    Args:
        n: Number of training samples.
        batch_size: Samples per step; the last, smaller batch of an epoch is kept, except
            that a single leftover sample joins the batch before it (BatchNorm cannot
            train on a batch of one).
        epochs: Number of epochs.
        seed: Seed of the order and of the dropout masks.
    """

    def __init__(self, n: int, batch_size: int, epochs: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.orders = [torch.randperm(n, generator=g) for _ in range(epochs)]
        self.batch_size = batch_size
        self.seed = seed
        self.starts = list(range(0, n, batch_size))
        if len(self.starts) > 1 and n - self.starts[-1] == 1:
            self.starts.pop()
        self.steps_per_epoch = len(self.starts)

    def batches(self, epoch: int):
        """``(global_step, indices)`` of every step of ``epoch`` (0-based)."""
        order = self.orders[epoch]
        ends = self.starts[1:] + [order.numel()]
        for i, (start, end) in enumerate(zip(self.starts, ends, strict=True)):
            yield epoch * self.steps_per_epoch + i, order[start:end]

    def step_seed(self, step: int) -> int:
        """The RNG seed for ``step``'s forward pass (dropout), the same in every run.

        Mixed from ``(seed, step)`` by numpy's ``SeedSequence``, so no step reuses the seed
        that drew ``theta_0`` (``seed`` itself): a dropout mask correlated with the initial
        weights would be a hidden coupling between them.

        Returns:
            A seed for ``torch.manual_seed``.
        """
        state = np.random.SeedSequence([self.seed, step, 0x6F7074]).generate_state(2)
        return int(state[0]) << 31 ^ int(state[1])


def _evaluate(model: nn.Module, x: Tensor, y: Tensor, loss_fn, batch: int = 1024
              ) -> tuple[float, float]:
    """Mean loss and accuracy on ``(x, y)`` in eval mode (training flags restored).

    Batches are weighed and accuracy counted as the surface engine does (:class:`Task`):
    a loss with ``ignore_index`` or class weights gets the full-data value, not a mean of
    batch means; logits are found in dict / ``.logits`` outputs; accuracy is NaN where it
    is undefined (regression targets, outputs without logits). A user loss that is a mean
    of per-sample means (a per-sequence-mean token loss) weighs its batches by samples
    (``decide_weighting``, as the engine does).

    Returns:
        ``(loss, accuracy)``.

    Raises:
        ValueError: If ``x`` takes more than one batch and the user's loss is not a mean
            over samples or counted targets (``check_reduction``: a sum).
    """
    was = model.training
    model.eval()
    user_loss = loss_fn is not None
    loss_fn = loss_fn if user_loss else F.cross_entropy
    total = weight = correct = counted = 0.0
    try:
        with torch.no_grad():
            outs = (model(x[s : s + batch]) for s in range(0, x.shape[0], batch))
            task = None
            for s, out in zip(range(0, x.shape[0], batch), outs, strict=True):
                target = y[s : s + batch]
                if task is None:
                    try:
                        logits = find_logits(out)
                    except TypeError:
                        logits = None
                    task = resolve_task(logits, y, loss_fn, x.shape[0])
                    if user_loss and x.shape[0] > batch:  # a mean of per-sample means weighs
                        decide_weighting(loss_fn, lambda r: model(x[r]), y, task)  # by samples
                w = float(task.loss_weight(target))
                if w > 0:  # a batch whose targets are all ignored adds nothing (its mean is 0/0)
                    total += float(loss_fn(out, target)) * w
                    weight += w
                if task.kind is not None:
                    correct += float(task.correct(find_logits(out), target))
                    counted += float(task.acc_count(target))
    finally:
        model.train(was)
    accuracy = correct / counted if task is not None and task.kind is not None and counted \
        else float("nan")
    return total / weight if weight else float("nan"), accuracy


def train_run(run: Run, model: nn.Module, optimizer: torch.optim.Optimizer,
              schedule: Schedule, epochs: range, data: tuple[Tensor, Tensor],
              test: tuple[Tensor, Tensor] | None, loss_fn, bar=None) -> None:
    """Train ``model`` (ours, a copy) over ``epochs`` of ``schedule``, appending to ``run``."""
    x, y = data
    digest = hashlib.sha256(run.batch_log.encode())
    model.train()
    for epoch in epochs:
        losses = []
        for step, idx in schedule.batches(epoch):
            digest.update(idx.numpy().tobytes())
            idx = idx.to(x.device)
            with torch.random.fork_rng(devices=_rng_devices(x)):
                torch.manual_seed(schedule.step_seed(step))
                loss = loss_fn(model(x[idx]), y[idx])
            check_differentiable(loss, dict(model.named_parameters()), "training")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
        mean = float(np.mean(losses))
        if not np.isfinite(mean):
            run.diverged = epoch + 1
            warnings.warn(
                f"{run.name}: the training loss became non-finite in epoch {epoch + 1}; the run "
                "stops there (lower its learning rate).", RuntimeWarning, stacklevel=3)
            break
        run.history["train_loss"].append(mean)
        _log_test(run, model, test, loss_fn)
        run.checkpoints.append(_cpu_state(model))
    run.batch_log = digest.hexdigest()


def _log_test(run: Run, model: nn.Module, test, loss_fn) -> None:
    if test is not None:
        tl, ta = _evaluate(model, *test, loss_fn)
        run.history["test_loss"].append(tl)
        run.history["test_accuracy"].append(ta)


def held_data(data, model: nn.Module, seed: int) -> tuple[Tensor, Tensor]:
    """``data`` as two tensors on the model's device, floating inputs in its dtype.

    A shuffling ``DataLoader`` is read once under a private RNG seeded with ``seed``: the
    order is then the same on every call with that seed, and the caller's RNG is untouched.

    Returns:
        ``(inputs, targets)``.
    """
    x, y = as_tensors(data, seed=seed)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    device = model_device(model)
    x = x.to(device, dtype) if dtype is not None and x.is_floating_point() else x.to(device)
    return x, y.to(device)


def class_targets(out: Tensor, y: Tensor, what: str) -> Tensor:
    """Class indices from ``y``: as given, or the argmax of one-hot / soft targets.

    Soft targets are rows of class probabilities (non-negative, summing to 1); other
    real-valued targets of the outputs' shape are regression targets, with no classes.

    Returns:
        ``(N,)`` class indices.

    Raises:
        ValueError: If the outputs are not ``(N, C)`` class scores matching ``y``.
    """
    if out.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
        return y
    if (out.dim() == 2 and y.shape == out.shape and bool((y >= 0).all())
            and torch.allclose(y.sum(1), torch.ones((), dtype=y.dtype, device=y.device))):
        return y.argmax(1)
    raise ValueError(f"{what} needs class scores (N, C) and class-index (N,) or one-hot "
                     f"(N, C) targets; got outputs {tuple(out.shape)} and targets "
                     f"{tuple(y.shape)}.")


def _rng_devices(x: Tensor) -> list:
    return [x.device] if x.device.type == "cuda" else []


def new_run(name: str, init_state: dict[str, Tensor], test_logged: bool) -> Run:
    """An empty run whose epoch 0 is ``init_state``."""
    history = {"train_loss": [float("nan")]}
    if test_logged:
        history.update(test_loss=[], test_accuracy=[])
    return Run(name, [init_state], history, init=state_hash(init_state))


def model_at(template: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """A copy of ``template`` holding ``state``, in eval mode."""
    model = module_copy(template)
    model.load_state_dict(state)
    return model.eval()


def start_run(name: str, factory, init: nn.Module, schedule: Schedule, epochs: int,
              data: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor] | None, loss_fn,
              bar=None) -> Run:
    """Train a new run ``name`` with ``factory`` from a copy of ``init`` (its epoch 0)."""
    model = module_copy(init)
    optimizer = make_optimizer(name, factory, model)
    run = new_run(name, _cpu_state(model), test is not None)
    run.optimizer = repr(factory)
    _log_test(run, model, test, loss_fn)
    train_run(run, model, optimizer, schedule, range(epochs), data, test, loss_fn, bar)
    return run
