"""A small model zoo for loss-landscape experiments (Li et al. 2018's architectures).

- :func:`resnet`: CIFAR-style ResNets of depth ``6n + 2`` with and without shortcuts and a
  width factor ``k`` (ResNet-20/56/110: 269,722 / 853,018 / 1,727,962 parameters on
  CIFAR-10, shortcuts or not);
- :func:`vgg9`: loss-landscape's VGG-9 (2,789,706 parameters on CIFAR-10);
- :func:`densenet`: a DenseNet-BC, by default loss-landscape's ``densenet_cifar``
  (1,000,618 parameters);
- :func:`squares_net`: MPO's random-squares network in plain, BN and skip form.

All take ``in_channels`` and ``num_classes`` so they run on the offline data
(:func:`~landscape_widget.datasets.digits_images`, 1x8x8), and ``resnet``, ``vgg9`` and
``densenet`` take ``dims=1`` for signals such as MNIST-1D (``(N, 1, 40)``). Real CIFAR-10 is
read from disk by :func:`~landscape_widget.datasets.cifar10`. Every builder takes ``seed``
(the initial weights; the global RNG is left as it was).

Example:
    >>> from landscape_widget import models
    >>> [models.count_parameters(models.resnet(d)) for d in (20, 56, 110)]
    [269722, 853018, 1727962]
"""

from ._common import count_parameters
from .densenet import DenseNet, densenet
from .resnet import BasicBlock, ResNet, ShortcutA, resnet
from .squares import SquaresNet, squares_net
from .vgg import VGG, VGG9_LAYERS, vgg9

__all__ = [
    "resnet",
    "ResNet",
    "BasicBlock",
    "ShortcutA",
    "vgg9",
    "VGG",
    "VGG9_LAYERS",
    "densenet",
    "DenseNet",
    "squares_net",
    "SquaresNet",
    "count_parameters",
]
