"""CIFAR-style ResNets of depth ``6n + 2`` with and without shortcuts (He et al. 2016).

The architecture of He et al.'s CIFAR-10 experiments, which Li et al. 2018 use for the
skip-connection figures (ResNet-20/56/110 and their "noshort" twins, PAPERS.md (a)):

- a 3x3 stem convolution to ``16k`` channels, BatchNorm, ReLU;
- three stages of ``n`` basic blocks with ``16k``, ``32k`` and ``64k`` channels, the first
  block of stages 2 and 3 halving the resolution (stride 2);
- global average pooling and one linear classifier.

A basic block is ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``. The shortcut is
He et al.'s parameter-free "option A": the identity, or, where a block halves the
resolution and doubles the channels, ``x`` subsampled by 2 and zero-padded with the new
channels. So with and without shortcuts a network has exactly the same parameters, and on
CIFAR-10 ResNet-20/56/110 have 269,722 / 853,018 / 1,727,962 of them. (loss-landscape's
``ResNet_cifar`` uses 1x1-convolution shortcuts instead, "option B", which adds a few
thousand parameters and makes the two variants differ in size.)

``width=k`` multiplies every channel count by ``k`` (the stem too), as loss-landscape's
``WResNet_cifar`` does for the Wide-ResNet figures. ``dims=1`` builds the same network from
``Conv1d`` layers for signals such as MNIST-1D (input ``(N, C, L)``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_dims, check_int, layers, seeded, tracing


class ShortcutA(nn.Module):
    """He et al.'s parameter-free shortcut: subsample by ``stride``, zero-pad the channels.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output (``>= in_channels``); the new ones are zeros.
        stride: Spatial subsampling factor.
        dims: Spatial dimensions of the input (1 or 2).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, dims: int = 2):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option-A shortcuts cannot drop channels ({in_channels} -> "
                             f"{out_channels}).")
        self.extra = out_channels - in_channels
        self.stride = stride
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        """Subsample the trailing (spatial) dimensions and append zero channels."""
        if self.stride > 1:
            index = (slice(None), slice(None)) + (slice(None, None, self.stride),) * self.dims
            x = x[index]
        if self.extra:
            # F.pad pads from the last dimension backwards: spatial dims get (0, 0), then the
            # channel dimension gets `extra` zeros at its end.
            x = F.pad(x, (0, 0) * self.dims + (0, self.extra))
        return x

    def extra_repr(self) -> str:
        """Show the subsampling and the padding."""
        return f"stride={self.stride}, extra_channels={self.extra}"


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm, plus an option-A shortcut when ``shortcut``.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first convolution (and of the shortcut's subsampling).
        shortcut: Add the skip connection (``False`` gives loss-landscape's "noshort" block).
        dims: 1 or 2 (``Conv1d`` or ``Conv2d``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *,
                 shortcut: bool = True, dims: int = 2):
        super().__init__()
        conv, bn, _ = layers(dims)
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn(out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = bn(out_channels)
        self.shortcut = ShortcutA(in_channels, out_channels, stride, dims) if shortcut else None

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    """A CIFAR-style ResNet (see the module docstring); build one with :func:`resnet`.

    Args:
        depth: ``6n + 2`` (8, 14, 20, 32, 44, 56, 110, ...).
        shortcut: Skip connections on (``False``: the plain "noshort" network).
        width: Channel multiplier ``k`` (16k, 32k, 64k channels).
        in_channels: Channels of the input (3 for CIFAR-10, 1 for digits or MNIST-1D).
        num_classes: Outputs of the classifier.
        dims: 2 for images ``(N, C, H, W)``, 1 for signals ``(N, C, L)``.
        base: Channels of the first stage at ``width=1`` (16 in He et al.; smaller values
            give quick CPU versions of the same architecture).
    """

    def __init__(self, depth: int = 20, *, shortcut: bool = True, width: int = 1,
                 in_channels: int = 3, num_classes: int = 10, dims: int = 2, base: int = 16):
        super().__init__()
        check_int(depth, "depth", 8)
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 (8, 14, 20, 32, 44, 56, 110, ...), got "
                             f"{depth}; e.g. depth={depth - (depth - 2) % 6}.")
        check_int(width, "width")
        check_int(in_channels, "in_channels")
        check_int(num_classes, "num_classes")
        check_int(base, "base")
        dims = check_dims(dims)
        self.depth, self.shortcut, self.width, self.dims = depth, bool(shortcut), width, dims
        self.base = base
        n = (depth - 2) // 6
        c1 = base * width
        conv, bn, pool = layers(dims)
        self.conv1 = conv(in_channels, c1, 3, padding=1, bias=False)
        self.bn1 = bn(c1)
        stages = []
        channels = c1
        for i, out in enumerate((c1, 2 * c1, 4 * c1)):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(channels, out, stride, shortcut=shortcut, dims=dims))
                channels = out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = pool(1)
        self.linear = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """Logits of a batch ``(N, C, H, W)`` (or ``(N, C, L)`` with ``dims=1``)."""
        if not tracing(x) and x.dim() != self.dims + 2:
            raise ValueError(f"ResNet(dims={self.dims}) expects inputs of {self.dims + 2} "
                             f"dimensions (N, C, ...), got shape {tuple(x.shape)}"
                             + ("; add a channel axis with x.unsqueeze(1)."
                                if x.dim() == self.dims + 1 else "."))
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(self.pool(out).flatten(1))

    def extra_repr(self) -> str:
        """Show depth, shortcut and width."""
        return (f"depth={self.depth}, shortcut={self.shortcut}, width={self.width}, "
                f"base={self.base}")


def resnet(depth: int = 20, *, shortcut: bool = True, width: int = 1, in_channels: int = 3,
           num_classes: int = 10, dims: int = 2, base: int = 16, seed: int | None = 0
           ) -> ResNet:
    """A CIFAR-style ResNet of depth ``6n + 2``, with or without shortcuts, of width ``k``.

    Parameter counts (CIFAR-10: ``in_channels=3, num_classes=10``, any ``shortcut``):
    ResNet-20 269,722; ResNet-56 853,018; ResNet-110 1,727,962. The count grows by about
    ``k**2`` with ``width=k``.

    Args:
        depth: ``6n + 2``.
        shortcut: Skip connections on or off (same parameters either way).
        width: Channel multiplier ``k`` (Wide-ResNet style, stem included).
        in_channels: Input channels (1 for digits images or MNIST-1D).
        num_classes: Number of outputs.
        dims: 2 (images) or 1 (signals, ``Conv1d``; e.g. MNIST-1D as ``(N, 1, 40)``).
        base: First-stage channels at ``width=1`` (16 as He et al.; e.g. 4 for a quick
            CPU version: stages of ``base*k``, ``2*base*k``, ``4*base*k`` channels).
        seed: Seed of the initial weights (``None``: the global torch RNG); the global RNG
            is left as it was either way when a seed is given.

    Returns:
        A :class:`ResNet`, in training mode.

    Raises:
        ValueError: If ``depth`` is not ``6n + 2`` or an argument is out of range.

    Example:
        >>> from landscape_widget.models import count_parameters
        >>> count_parameters(resnet(20)), count_parameters(resnet(20, shortcut=False))
        (269722, 269722)
        >>> import torch
        >>> resnet(8, in_channels=1)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    return seeded(lambda: ResNet(depth, shortcut=shortcut, width=width, in_channels=in_channels,
                                 num_classes=num_classes, dims=dims, base=base), seed)
