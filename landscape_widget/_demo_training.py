"""The tiny trainer of :mod:`landscape_widget.demo`: :func:`train` and :func:`accuracy`.

Ordinary PyTorch mini-batch training and evaluation, deterministic for a given seed (the batch
order comes from a private :class:`torch.Generator`). Use them as ``lw.demo.train`` and
``lw.demo.accuracy``; they live here only to keep ``demo.py`` (the models and the recipes
that train them) short.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["train", "accuracy", "SMALL_MODEL_PARAMS"]

Data = tuple[Tensor, Tensor]

SMALL_MODEL_PARAMS = 100_000
"""Models with fewer parameters train on one CPU thread by default (see :func:`train`)."""


@contextmanager
def _cpu_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the old value after it."""
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train(
    model: nn.Module,
    data: Data,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    batch_size: int = 128,
    optimizer: str = "adam",
    seed: int = 0,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    callback: Callable[[int, nn.Module, float], None] | None = None,
    num_threads: int | None = None,
) -> list[float]:
    """Train ``model`` in place with mini-batches (this is your training, not the library's).

    Each epoch visits the samples in an order drawn from a private generator seeded with
    ``seed``; the last, smaller batch of an epoch is used too. The model is in training mode
    during the run, and its train/eval flags are restored afterwards.

    Small models (fewer than :data:`SMALL_MODEL_PARAMS` parameters) on the CPU train on one
    thread by default: their matrices are too small for intra-op parallelism to pay, and
    when the cores are busy with other work several OpenMP threads can make each step ten
    times slower. The previous thread count is restored afterwards.

    Args:
        model: The model to train (modified in place).
        data: ``(inputs, targets)`` tensors on the model's device.
        steps: Number of optimiser steps.
        lr: Learning rate.
        batch_size: Samples per step; ``>= len(data)`` means full-batch training.
        optimizer: ``"adam"`` or ``"sgd"``.
        seed: Seed of the batch order.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty of the optimiser.
        loss_fn: ``loss_fn(outputs, targets)``; cross-entropy by default.
        callback: Called as ``callback(step, model, loss)`` after every step (``step``
            counts from 1), e.g. to record checkpoints of a trajectory.
        num_threads: CPU threads for the run (``torch.set_num_threads``); ``None`` picks 1
            for small models on the CPU and leaves the setting alone otherwise.

    Returns:
        The training loss of every step's batch.

    Raises:
        ValueError: If ``optimizer`` is not ``"adam"`` or ``"sgd"``, ``steps`` is not an int >= 0,
            ``batch_size`` not an int >= 1, or the inputs and targets have different or zero
            lengths.

    Example:
        >>> from landscape_widget import datasets
        >>> from landscape_widget.demo import mlp
        >>> X, y = datasets.synthetic_classification(200, features=4, classes=3)
        >>> net = mlp((4, 16, 3))
        >>> losses = train(net, (X, y), steps=50, batch_size=50)
        >>> losses[-1] < losses[0]
        True
    """
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer={optimizer!r} is not supported; choose 'adam' or 'sgd'.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
    x, y = data
    n = int(x.shape[0])
    if n == 0 or n != int(y.shape[0]):
        raise ValueError(f"data must be (inputs, targets) with equal, non-zero lengths; got {n} "
                         f"inputs and {int(y.shape[0])} targets.")
    loss_fn = loss_fn or F.cross_entropy
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(int(seed))
    if num_threads is None and x.device.type == "cpu":
        small = sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS
        num_threads = 1 if small else None
    flags = [(m, m.training) for m in model.modules()]
    losses: list[float] = []
    model.train()
    try:
        with _cpu_threads(num_threads):
            order = torch.empty(0, dtype=torch.long)
            pos = 0
            for step in range(1, steps + 1):
                if pos >= order.numel():
                    order = torch.randperm(n, generator=gen).to(x.device)
                    pos = 0
                idx = order[pos : pos + batch_size]
                pos += batch_size
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                value = float(loss.detach())
                losses.append(value)
                if callback is not None:
                    callback(step, model, value)
    finally:
        for m, flag in flags:
            m.training = flag
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, data: Data) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``data`` in eval mode.

    The model's train/eval flags are restored afterwards.

    Returns:
        ``(loss, accuracy)`` with accuracy in [0, 1].
    """
    x, y = data
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        out = model(x)
    finally:
        for m, flag in flags:
            m.training = flag
    return float(F.cross_entropy(out, y)), float((out.argmax(-1) == y).double().mean())

