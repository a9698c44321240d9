"""The convolutional networks of MPO's random-squares experiment (PAPERS.md (c) step 5).

Skorokhodov & Burtsev 2019 compare three forms of one network when they carve random
squares into its loss landscape: plain, with BatchNorm, and with skip connections. Six 3x3
convolutions (padding 1, no pooling) take the channels ``1 -> 8 -> 8 -> 32 -> 32 -> 64 ->
64``, each followed by (BatchNorm and) ReLU; in the skip form a convolution whose input and
output channels agree adds its input (``relu(x + conv(x))``). An adaptive average pool to
4x4 gives 1024 features, then ``Linear(1024, 128)``, ReLU, ``Linear(128, 10)``.

``width`` scales every channel count and the hidden layer (``width=0.25``: ``1 -> 2 -> 2 -> 8
-> 8 -> 16 -> 16``, hidden 32), so the same three forms fit a CPU's time budget (notebook 09).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_int, seeded

SQUARES_CHANNELS = (8, 8, 32, 32, 64, 64)
"""Output channels of the six convolutions."""
SQUARES_HIDDEN = 128
"""Width of the hidden linear layer."""
KINDS = ("plain", "bn", "skip")


def scaled_channels(width: float) -> tuple[int, ...]:
    """The six convolutions' output channels times ``width`` (rounded, at least 1).

    Returns:
        Six ints, ``max(1, round(c * width))`` for each ``c`` of :data:`SQUARES_CHANNELS`:
        the paper's widths for ``width=1``.

    Example:
        >>> scaled_channels(0.25)
        (2, 2, 8, 8, 16, 16)
    """
    return tuple(max(1, round(c * width)) for c in SQUARES_CHANNELS)


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

    def __init__(self, kind: str = "plain", *, in_channels: int = 1, num_classes: int = 10,
                 width: float = 1.0):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not supported; choose one of {list(KINDS)}.")
        check_int(in_channels, "in_channels")
        check_int(num_classes, "num_classes")
        if isinstance(width, bool) or not isinstance(width, int | float) or not width > 0:
            raise ValueError(f"width must be a positive number (1 = the paper's), got {width!r}.")
        self.kind, self.width = kind, float(width)
        convs, cin = [], in_channels
        for cout in scaled_channels(width):
            convs.append(SquaresConv(cin, cout, bn=kind == "bn", skip=kind == "skip"))
            cin = cout
        self.features = nn.Sequential(*convs)
        self.pool = nn.AdaptiveAvgPool2d(4)
        hidden = max(1, round(SQUARES_HIDDEN * width))
        self.head = nn.Sequential(nn.Linear(cin * 16, hidden), nn.ReLU(),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """Logits of images ``(N, C, H, W)``."""
        return self.head(self.pool(self.features(x)).flatten(1))

    def extra_repr(self) -> str:
        """Show the form."""
        return f"kind={self.kind!r}" + (f", width={self.width:g}" if self.width != 1 else "")


def squares_net(kind: str = "plain", *, in_channels: int = 1, num_classes: int = 10,
                width: float = 1.0, seed: int | None = 0) -> SquaresNet:
    """MPO's random-squares network in ``"plain"``, ``"bn"`` or ``"skip"`` form.

    The three forms have the same convolutions and head (``"bn"`` adds 2 parameters per
    channel); skip connections join the layers ``8 -> 8``, ``32 -> 32`` and ``64 -> 64``.

    Args:
        kind: ``"plain"``, ``"bn"`` or ``"skip"``.
        in_channels: Input channels (1 for FashionMNIST or digits images).
        num_classes: Number of outputs.
        width: Factor on every channel count and the hidden layer (1 = the paper's
            network; 0.25 is a CPU-sized version with the same three forms).
        seed: Seed of the initial weights; pass ``None`` inside a ``model_fn`` for
            :func:`~landscape_widget.fit_pattern`, which seeds the three draws itself.

    Returns:
        A :class:`SquaresNet`.

    Raises:
        ValueError: If ``kind`` is unknown, ``width`` is not positive or a count is not an
            int >= 1.

    Example:
        >>> from landscape_widget.models import count_parameters
        >>> [count_parameters(squares_net(k)) for k in KINDS]
        [200162, 200578, 200162]
        >>> [count_parameters(squares_net(k, width=0.25)) for k in KINDS]
        [12836, 12940, 12836]
    """
    return seeded(lambda: SquaresNet(kind, in_channels=in_channels, num_classes=num_classes,
                                     width=width), seed)
