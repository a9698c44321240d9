"""The convolutional networks of MPO's random-squares experiment (PAPERS.md (c) step 5).

Skorokhodov & Burtsev 2019 compare three forms of one network when they carve random
squares into its loss landscape: plain, with BatchNorm, and with skip connections. Six 3x3
convolutions (padding 1, no pooling) take the channels ``1 -> 8 -> 8 -> 32 -> 32 -> 64 ->
64``, each followed by (BatchNorm and) ReLU; in the skip form a convolution whose input and
output channels agree adds its input (``relu(x + conv(x))``). An adaptive average pool to
4x4 gives 1024 features, then ``Linear(1024, 128)``, ReLU, ``Linear(128, 10)``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_int, seeded

SQUARES_CHANNELS = (8, 8, 32, 32, 64, 64)
"""Output channels of the six convolutions."""
KINDS = ("plain", "bn", "skip")


class SquaresConv(nn.Module):
    """``relu([x +] bn(conv3x3(x)))``: the skip is added only when ``skip`` and the widths agree."""

    def __init__(self, cin: int, cout: int, *, bn: bool, skip: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout) if bn else None
        self.skip = bool(skip and cin == cout)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layer."""
        out = self.conv(x)
        if self.bn is not None:
            out = self.bn(out)
        return F.relu(x + out if self.skip else out)


class SquaresNet(nn.Module):
    """MPO's random-squares network; build one with :func:`squares_net`."""

    def __init__(self, kind: str = "plain", *, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not supported; choose one of {list(KINDS)}.")
        check_int(in_channels, "in_channels")
        check_int(num_classes, "num_classes")
        self.kind = kind
        convs, cin = [], in_channels
        for cout in SQUARES_CHANNELS:
            convs.append(SquaresConv(cin, cout, bn=kind == "bn", skip=kind == "skip"))
            cin = cout
        self.features = nn.Sequential(*convs)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Sequential(nn.Linear(cin * 16, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """Logits of images ``(N, C, H, W)``."""
        return self.head(self.pool(self.features(x)).flatten(1))

    def extra_repr(self) -> str:
        """Show the form."""
        return f"kind={self.kind!r}"


def squares_net(kind: str = "plain", *, in_channels: int = 1, num_classes: int = 10,
                seed: int | None = 0) -> SquaresNet:
    """MPO's random-squares network in ``"plain"``, ``"bn"`` or ``"skip"`` form.

    The three forms have the same convolutions and head (``"bn"`` adds 2 parameters per
    channel); skip connections join the layers ``8 -> 8``, ``32 -> 32`` and ``64 -> 64``.

    Args:
        kind: ``"plain"``, ``"bn"`` or ``"skip"``.
        in_channels: Input channels (1 for FashionMNIST or digits images).
        num_classes: Number of outputs.
        seed: Seed of the initial weights; pass ``None`` inside a ``model_fn`` for
            :func:`~landscape_widget.fit_pattern`, which seeds the three draws itself.

    Returns:
        A :class:`SquaresNet`.

    Example:
        >>> from landscape_widget.models import count_parameters
        >>> [count_parameters(squares_net(k)) for k in KINDS]
        [200162, 200578, 200162]
    """
    return seeded(lambda: SquaresNet(kind, in_channels=in_channels, num_classes=num_classes),
                  seed)
