"""VGG-9 as in loss-landscape's CIFAR-10 models (Li et al. 2018's batch-size figures).

Seven 3x3 convolutions ``64, 64, M, 128, 128, M, 256, 256, 256, M`` (each followed by
BatchNorm and ReLU; ``M`` is a 2x2 max-pool with ``ceil_mode``), then one hidden linear
layer from the flattened feature map to 256 units with BatchNorm and ReLU, and the linear
classifier: nine weight layers. On 32x32 CIFAR-10 images it has 2,789,706 parameters
(1,049,600 of them in the hidden linear layer, which reads the 256 x 4 x 4 map).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ._common import check_dims, check_int, layers, seeded, tracing

VGG9_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M")
"""Convolution widths and max-pools of VGG-9 (loss-landscape's ``cfg['VGG9']``)."""


class VGG(nn.Module):
    """A VGG network with a BatchNorm'd hidden linear layer; build one with :func:`vgg9`.

    Args:
        cfg: Convolution widths, ``"M"`` for a max-pool.
        in_channels: Input channels.
        num_classes: Number of outputs.
        input_size: Side (or length, with ``dims=1``) of the inputs; it fixes the size of
            the hidden linear layer, so other sizes are refused with a clear error.
        dims: 2 (images) or 1 (signals).
    """

    def __init__(self, cfg=VGG9_LAYERS, *, in_channels: int = 3, num_classes: int = 10,
                 input_size: int = 32, dims: int = 2):
        super().__init__()
        check_int(in_channels, "in_channels")
        check_int(num_classes, "num_classes")
        check_int(input_size, "input_size")
        dims = check_dims(dims)
        conv, bn, _ = layers(dims)
        pool = nn.MaxPool1d if dims == 1 else nn.MaxPool2d
        self.input_size, self.dims = input_size, dims
        feats: list[nn.Module] = []
        size, channels = input_size, in_channels
        for item in cfg:
            if item == "M":
                feats.append(pool(kernel_size=2, stride=2, ceil_mode=True))
                size = math.ceil(size / 2)
            else:
                feats += [conv(channels, item, 3, padding=1), bn(item), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*feats)
        hidden = channels
        flat = channels * size**dims
        self.fc = nn.Sequential(nn.Linear(flat, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of a batch of ``input_size``-sized inputs."""
        expected = (self.input_size,) * self.dims
        if not tracing(x) and (x.dim() != self.dims + 2 or tuple(x.shape[2:]) != expected):
            size = ", ".join(map(str, expected))
            raise ValueError(f"this VGG was built for inputs (N, C, {size}), got shape "
                             f"{tuple(x.shape)}; build it with input_size= set to your data's "
                             "size.")
        return self.classifier(self.fc(self.features(x).flatten(1)))


def vgg9(*, in_channels: int = 3, num_classes: int = 10, input_size: int = 32, dims: int = 2,
         seed: int | None = 0) -> VGG:
    """VGG-9 (see the module docstring): 2,789,706 parameters on CIFAR-10.

    Args:
        in_channels: Input channels (3 for CIFAR-10).
        num_classes: Number of outputs.
        input_size: Image side (32 for CIFAR-10, 8 for digits images; 40 for MNIST-1D
            with ``dims=1``).
        dims: 2 (images) or 1 (signals).
        seed: Seed of the initial weights (``None``: the global torch RNG).

    Returns:
        A :class:`VGG` in training mode.

    Example:
        >>> from landscape_widget.models import count_parameters
        >>> count_parameters(vgg9())
        2789706
        >>> import torch
        >>> vgg9(in_channels=1, input_size=40, dims=1)(torch.zeros(2, 1, 40)).shape
        torch.Size([2, 10])
    """
    return seeded(lambda: VGG(VGG9_LAYERS, in_channels=in_channels, num_classes=num_classes,
                              input_size=input_size, dims=dims), seed)
