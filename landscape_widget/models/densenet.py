"""A small DenseNet-BC, as loss-landscape's ``densenet_cifar`` (Huang et al. 2017).

A 3x3 stem convolution to ``2g`` channels (``g`` the growth rate), then dense blocks of
bottleneck layers ``conv3x3(relu(bn(conv1x1(relu(bn(x))))))`` whose ``g`` new channels are
concatenated to their input, with a transition (BN, ReLU, 1x1 convolution halving the
channels, 2x2 average pool) between blocks; a final BN + ReLU, global average pooling and a
linear classifier. loss-landscape's ``densenet_cifar`` is ``blocks=(6, 12, 24, 16)`` with
``g = 12``: 1,000,618 parameters on CIFAR-10. Global average pooling replaces its fixed
4x4 pool, which is the same on 32x32 inputs and lets smaller inputs (8x8 digits) through.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_dims, check_int, layers, seeded, tracing


class Bottleneck(nn.Module):
    """BN-ReLU-conv1x1(4g)-BN-ReLU-conv3x3(g), output concatenated with the input."""

    def __init__(self, in_channels: int, growth: int, dims: int):
        super().__init__()
        conv, bn, _ = layers(dims)
        self.bn1 = bn(in_channels)
        self.conv1 = conv(in_channels, 4 * growth, 1, bias=False)
        self.bn2 = bn(4 * growth)
        self.conv2 = conv(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Append ``growth`` new channels."""
        out = self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 to ``out_channels``, then a 2x average pool."""

    def __init__(self, in_channels: int, out_channels: int, dims: int):
        super().__init__()
        conv, bn, _ = layers(dims)
        self.bn = bn(in_channels)
        self.conv = conv(in_channels, out_channels, 1, bias=False)
        pool = nn.AvgPool1d if dims == 1 else nn.AvgPool2d
        self.pool = pool(2, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        """Reduce channels and resolution."""
        return self.pool(self.conv(F.relu(self.bn(x))))


class DenseNet(nn.Module):
    """A DenseNet-BC for small images (see the module docstring); see :func:`densenet`."""

    def __init__(self, blocks=(6, 12, 24, 16), *, growth_rate: int = 12, reduction: float = 0.5,
                 in_channels: int = 3, num_classes: int = 10, dims: int = 2):
        super().__init__()
        blocks = tuple(blocks)
        if not blocks:
            raise ValueError("blocks must list at least one dense block's layer count.")
        for b in blocks:
            check_int(b, "every entry of blocks")
        check_int(growth_rate, "growth_rate")
        check_int(in_channels, "in_channels")
        check_int(num_classes, "num_classes")
        if not 0.0 < float(reduction) <= 1.0:
            raise ValueError(f"reduction must lie in (0, 1], got {reduction!r}.")
        dims = check_dims(dims)
        conv, bn, pool = layers(dims)
        self.dims = dims
        channels = 2 * growth_rate
        self.conv1 = conv(in_channels, channels, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for i, count in enumerate(blocks):
            dense = []
            for _ in range(count):
                dense.append(Bottleneck(channels, growth_rate, dims))
                channels += growth_rate
            stages.append(nn.Sequential(*dense))
            if i < len(blocks) - 1:
                out = int(math.floor(channels * reduction))
                stages.append(Transition(channels, out, dims))
                channels = out
        self.features = nn.Sequential(*stages)
        self.bn = bn(channels)
        self.pool = pool(1)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of a batch."""
        if not tracing(x) and x.dim() != self.dims + 2:
            raise ValueError(f"DenseNet(dims={self.dims}) expects inputs (N, C, ...) of "
                             f"{self.dims + 2} dimensions, got shape {tuple(x.shape)}.")
        out = self.features(self.conv1(x))
        return self.linear(self.pool(F.relu(self.bn(out))).flatten(1))


def densenet(blocks=(6, 12, 24, 16), *, growth_rate: int = 12, reduction: float = 0.5,
             in_channels: int = 3, num_classes: int = 10, dims: int = 2,
             seed: int | None = 0) -> DenseNet:
    """A DenseNet-BC; the defaults are loss-landscape's ``densenet_cifar`` (1,000,618 params).

    Args:
        blocks: Bottleneck layers per dense block (transitions sit between blocks).
        growth_rate: Channels each bottleneck adds.
        reduction: Channel fraction a transition keeps.
        in_channels: Input channels.
        num_classes: Number of outputs.
        dims: 2 (images) or 1 (signals).
        seed: Seed of the initial weights (``None``: the global torch RNG).

    Returns:
        A :class:`DenseNet` in training mode.

    Example:
        >>> from landscape_widget.models import count_parameters
        >>> count_parameters(densenet())
        1000618
        >>> import torch
        >>> densenet((2, 2), growth_rate=4, in_channels=1)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    return seeded(lambda: DenseNet(blocks, growth_rate=growth_rate, reduction=reduction,
                                   in_channels=in_channels, num_classes=num_classes, dims=dims),
                  seed)
