"""Small models and a tiny trainer, for tutorials, tests and benchmarks on a CPU.

Everything here trains in seconds on two CPU cores and is deterministic for a given seed:
initialisation runs under :func:`torch.random.fork_rng` (so the global torch RNG is left as
it was) and the batch order comes from a private :class:`torch.Generator`.

Example::

    import landscape_widget as lw
    model, (X, y) = lw.demo.trained_mlp()
    surface = lw.compute_surface(model, (X, y))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import datasets

# The trainer lives in its own module; SMALL_MODEL_PARAMS stays importable from here.
from ._demo_training import SMALL_MODEL_PARAMS, accuracy, train  # noqa: F401

__all__ = [
    "mlp",
    "cnn",
    "train",
    "accuracy",
    "trained_mlp",
    "trained_cnn",
    "default_model",
    "ResidualLinear",
    "ResidualConv",
]

Data = tuple[Tensor, Tensor]


class ResidualLinear(nn.Module):
    """``relu(x + bn(linear(x)))`` with ``residual=True``, ``relu(bn(linear(x)))`` otherwise.

    Args:
        width: Input and output features.
        bn: Add a ``BatchNorm1d`` after the linear layer.
        residual: Add the skip connection.
    """

    def __init__(self, width: int, *, bn: bool = False, residual: bool = True):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width) if bn else nn.Identity()
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        out = self.bn(self.linear(x))
        return F.relu(x + out if self.residual else out)

    def extra_repr(self) -> str:
        """Show whether the skip connection is on."""
        return f"residual={self.residual}"


class ResidualConv(nn.Module):
    """A ResNet basic block: two 3x3 convolutions, optional BatchNorm, optional skip.

    ``relu(x + bn2(conv2(relu(bn1(conv1(x))))))``; without ``residual`` the ``x +`` is
    dropped, so both variants have exactly the same parameters.

    Args:
        channels: Input and output channels.
        bn: Use BatchNorm after each convolution.
        residual: Add the skip connection.
    """

    def __init__(self, channels: int, *, bn: bool = False, residual: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(channels) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=not bn)
        self.bn2 = nn.BatchNorm2d(channels) if bn else nn.Identity()
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(x + out if self.residual else out)

    def extra_repr(self) -> str:
        """Show whether the skip connection is on."""
        return f"residual={self.residual}"


def _init_module(build: Callable[[], nn.Module], seed: int | None) -> nn.Module:
    """Build a module with its initial weights drawn from ``seed`` (global RNG untouched)."""
    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def mlp(
    widths: Sequence[int] = (64, 32, 10),
    *,
    bn: bool = False,
    residual: bool = False,
    depth: int | None = None,
    seed: int | None = 0,
) -> nn.Module:
    """A ReLU multilayer perceptron.

    ``widths`` lists the input size, the hidden widths and the number of classes. The
    default ``(64, 32, 10)`` fits :func:`~landscape_widget.datasets.digits` (2410 parameters).

    Args:
        widths: ``(inputs, hidden_1, ..., hidden_k, outputs)``, at least two entries.
        bn: Put a BatchNorm after every hidden linear layer.
        residual: Wrap every hidden layer whose input and output widths agree in a skip
            connection (:class:`ResidualLinear`). The first hidden layer changes the width,
            so it never has one.
        depth: If given, the number of hidden layers: ``widths`` must then be
            ``(inputs, hidden, outputs)`` and the hidden layer is repeated ``depth`` times,
            e.g. ``mlp((64, 32, 10), depth=12, residual=True)``.
        seed: Seed of the initial weights (``None``: the global torch RNG).

    Returns:
        An ``nn.Sequential``.

    Raises:
        ValueError: If ``widths`` has fewer than two entries or one below 1, or ``depth`` is given
            with ``widths`` not of length 3 or is not an int >= 1.

    Example:
        >>> sum(p.numel() for p in mlp().parameters())
        2410
        >>> len(mlp((64, 16, 10), depth=6, residual=True))
        8
    """
    widths = [int(w) for w in widths]
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"widths must hold at least (inputs, outputs), all >= 1; got {widths}.")
    if depth is not None:
        if len(widths) != 3:
            raise ValueError(
                f"with depth=, widths must be (inputs, hidden, outputs); got {tuple(widths)}."
            )
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}.")
        widths = [widths[0]] + [widths[1]] * depth + [widths[2]]

    def build() -> nn.Module:
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-2], widths[1:-1], strict=True):
            if residual and a == b:
                layers.append(ResidualLinear(b, bn=bn, residual=True))
                continue
            layers.append(nn.Linear(a, b))
            if bn:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU())
        layers.append(nn.Linear(widths[-2], widths[-1]))
        return nn.Sequential(*layers)

    return _init_module(build, seed)


def cnn(
    in_channels: int = 1,
    num_classes: int = 10,
    *,
    bn: bool = False,
    residual: bool = False,
    width: int = 16,
    seed: int | None = 0,
) -> nn.Module:
    """A small convolutional network for 8x8 digits or 28x28 MNIST-like images.

    Stem ``conv3x3(in, w)`` (+BN) + ReLU, one basic block (:class:`ResidualConv`, skip
    connection only with ``residual=True``), a stride-2 ``conv3x3(w, 2w)`` (+BN) + ReLU,
    global average pooling and a linear classifier. Any input size of at least 2x2 works.

    Args:
        in_channels: Channels of the input images.
        num_classes: Number of outputs.
        bn: Use BatchNorm after every convolution (then the convolutions have no bias).
        residual: Add the skip connection of the basic block.
        width: Channels ``w`` of the stem (the last convolution has ``2w``).
        seed: Seed of the initial weights (``None``: the global torch RNG).

    Returns:
        An ``nn.Sequential``.

    Raises:
        ValueError: If ``in_channels``, ``num_classes`` or ``width`` is not an int >= 1.

    Example:
        >>> net = cnn(bn=True, residual=True)
        >>> tuple(net(torch.zeros(2, 1, 8, 8)).shape), tuple(net(torch.zeros(2, 1, 28, 28)).shape)
        ((2, 10), (2, 10))
        >>> # 3x3 convolutions without bias, 2 BatchNorm parameters per channel, w = 16
        >>> sum(p.numel() for p in net.parameters()) == (
        ...     (9 * 1 * 16 + 2 * 16) + 2 * (9 * 16 * 16 + 2 * 16) + (9 * 16 * 32 + 2 * 32)
        ...     + (32 * 10 + 10))
        True
    """
    checks = ((in_channels, "in_channels"), (num_classes, "num_classes"), (width, "width"))
    for value, name in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}.")

    def norm(c: int) -> nn.Module:
        return nn.BatchNorm2d(c) if bn else nn.Identity()

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=not bn),
            norm(width),
            nn.ReLU(),
            ResidualConv(width, bn=bn, residual=residual),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=not bn),
            norm(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, num_classes),
        )

    return _init_module(build, seed)



def trained_mlp(
    seed: int = 0,
    steps: int = 300,
    *,
    return_test: bool = False,
    widths: Sequence[int] = (64, 32, 10),
    bn: bool = False,
    residual: bool = False,
    depth: int | None = None,
    lr: float = 1e-2,
    batch_size: int = 128,
    optimizer: str = "adam",
):
    """An MLP 64-32-10 trained on the digits training split (about a second on a CPU).

    Adam, learning rate 1e-2, 300 steps of batch 128, weights and batch order seeded by
    ``seed``. This reaches a training loss of about 0.04 and an accuracy above 99 %.
    The model is returned in eval mode.

    Args:
        seed: Seed of the initial weights and of the batch order.
        steps: Number of optimiser steps.
        return_test: Also return the 397 test images.
        widths: Passed to :func:`mlp` (must start with 64 and end with 10).
        bn: Passed to :func:`mlp`.
        residual: Passed to :func:`mlp`.
        depth: Passed to :func:`mlp`.
        lr: Learning rate.
        batch_size: Batch size.
        optimizer: ``"adam"`` or ``"sgd"``.

    Returns:
        ``(model, (X_train, y_train))``, or ``(model, (X_train, y_train), (X_test, y_test))``
        with ``return_test=True``.

    Example:
        >>> model, (X, y) = trained_mlp()
        >>> loss, acc = accuracy(model, (X, y))
        >>> loss < 0.1 and acc > 0.98
        True
    """
    train_data = datasets.digits("train")
    model = mlp(widths, bn=bn, residual=residual, depth=depth, seed=seed)
    train(model, train_data, steps=steps, lr=lr, batch_size=batch_size, optimizer=optimizer,
          seed=seed)
    model.eval()
    if return_test:
        return model, train_data, datasets.digits("test")
    return model, train_data


def trained_cnn(
    seed: int = 0,
    steps: int = 200,
    *,
    return_test: bool = False,
    bn: bool = True,
    residual: bool = True,
    width: int = 16,
    lr: float = 1e-2,
    batch_size: int = 128,
):
    """A small CNN (BatchNorm and a residual block by default) trained on 8x8 digits images.

    Adam, learning rate 1e-2, 200 steps of batch 128; a few seconds on a CPU (training
    accuracy 100 %, test accuracy about 99 %). The model is returned in eval mode, so its
    BatchNorm layers use their running statistics.

    Args:
        seed: Seed of the initial weights and of the batch order.
        steps: Number of optimiser steps.
        return_test: Also return the 397 test images.
        bn: Passed to :func:`cnn`.
        residual: Passed to :func:`cnn`.
        width: Passed to :func:`cnn`.
        lr: Learning rate.
        batch_size: Batch size.

    Returns:
        ``(model, (X_train, y_train))`` with images of shape ``(N, 1, 8, 8)``, or also
        ``(X_test, y_test)`` with ``return_test=True``.
    """
    train_data = datasets.digits_images("train")
    model = cnn(1, 10, bn=bn, residual=residual, width=width, seed=seed)
    train(model, train_data, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    model.eval()
    if return_test:
        return model, train_data, datasets.digits_images("test")
    return model, train_data


def default_model() -> tuple[nn.Module, Data]:
    """The model of ``make demo`` and the quickstart: :func:`trained_mlp` with its data.

    Returns:
        ``(model, (X_train, y_train))``.
    """
    return trained_mlp()
