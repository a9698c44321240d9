"""Sample-progressive grids: the whole grid on growing data subsets, then on all data.

A picture of a ResNet over 50,000 images should not wait for 50,000 forward passes per
point. :class:`ProgressiveStream` runs the grid first on a fixed random subset of the data
(``samples=`` of :func:`~landscape_widget.iter_tiles`, with standard errors), then on a
larger one, and last on all data, as one stream of tiles: a viewer draws the coarse-in-data
picture at once and each later stage overwrites it, ending with the exact full-data values.
The widget's worker uses it for large data sets (see :func:`progressive_sizes`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .grid import Tile
from .subset import SubsetError, data_size
from .tuning import Plan

PROGRESSIVE_MIN_SAMPLES = 4_096  # data sets at least this large get subset stages first
PROGRESSIVE_STAGES = (256, 2_048, 16_384)  # subset sizes, growing 8x ...
PROGRESSIVE_FRACTION = 4  # ... each used while at most 1/4 of the data: all subset passes
# together then cost at most ~30 % of the exact pass (256 + 2,048 of 10,000: 23 %).
FIRST_TILE_POINTS = 4  # points per tile of the first stage: the first picture comes early


def progressive_sizes(population: int, stages=None, threshold: int | None = None
                      ) -> list[int | None]:
    """The sample counts of the stages for a data set of ``population`` samples.

    ``None`` is the exact stage on all data (always last). A subset stage is used while it
    holds at most ``1 / PROGRESSIVE_FRACTION`` of the data. ``stages`` and ``threshold``
    default to :data:`PROGRESSIVE_STAGES` and :data:`PROGRESSIVE_MIN_SAMPLES`.

    Returns:
        The subset sizes in order, then ``None`` (the exact stage).

    Example:
        >>> progressive_sizes(50_000)
        [256, 2048, None]
        >>> progressive_sizes(10_000)
        [256, 2048, None]
        >>> progressive_sizes(5_000)
        [256, None]
        >>> progressive_sizes(4_000)
        [None]
    """
    stages = PROGRESSIVE_STAGES if stages is None else stages
    threshold = PROGRESSIVE_MIN_SAMPLES if threshold is None else threshold
    if population < threshold:
        return [None]
    return [n for n in stages if n * PROGRESSIVE_FRACTION <= population] + [None]


def stage_label(samples: int, population: int, se: np.ndarray | None) -> str:
    """The status text of a subset stage, e.g. ``"subset 1,000 of 50,000 samples (±0.012)"``.

    The ± is the median standard error of the points computed so far.

    Returns:
        The label.
    """
    text = f"subset {samples:,} of {population:,} samples"
    if se is not None and np.isfinite(se).any():
        text += f" (±{float(np.nanmedian(se)):.2g})"
    return text


def preview_plan(ev) -> Plan:
    """The first stage's plan, chosen without timing anything.

    One point per pass over as many samples as 8x the engine's memory budget holds (the
    whole 256-sample subset for a CIFAR ResNet-18), channels_last for image batches. On a
    2-core CPU (ResNet-18, 256 samples) this was 2-3x faster per point than the budget's
    batch in the default layout, the engine's untimed fallback.

    Returns:
        A one-point loop :class:`~.tuning.Plan`.
    """
    image = ev.x.dim() == 4 and ev.x.is_floating_point()
    return Plan("loop", 1, ev._batch_for(1, 8 * ev.budget),
                "channels_last" if image else "contiguous", False)


@dataclass
class StageTile(Tile):
    """A :class:`Tile` of a progressive stream.

    ``done`` and ``total`` count over all stages. ``stage`` is the status text of a subset
    stage (``""`` for the exact one); ``samples`` its subset size (``None``: all data).
    """

    stage: str = ""
    samples: int | None = None


class ProgressiveStream:
    """A :class:`~landscape_widget.core.landscape.TileStream` over stages of growing subsets.

    Args:
        make_stream: ``make_stream(samples=n, **options)`` returns the ``TileStream`` of
            one stage (``iter_tiles(..., samples=n)``; ``None``: all data). Called for the
            first stage at once (so bad input raises here), for later stages when they
            start. The first stage is a preview: it gets ``tile_points=FIRST_TILE_POINTS``
            and :func:`preview_plan`, chosen without timing (timing the engine's candidate
            plans would cost more than the preview itself); later stages plan as usual.
        sizes: The stages' sample counts, from :func:`progressive_sizes`.
        population: The data's number of samples.

    Attributes mirror the current stage's stream (``axes``, ``shape``, ``spec``,
    ``evaluator``, ``arrays``), so a viewer joining mid-way sees the current stage's values;
    ``evaluated`` and ``reused`` count the exact stage only; :meth:`result` is the current
    stage's grid (a subset result, with ``loss_se``, until the exact stage has started).
    """

    def __init__(self, make_stream: Callable, sizes: list[int | None], population: int):
        self._make = make_stream
        self.sizes = list(sizes)
        self.population = population
        self.stage = 0
        self.stream = make_stream(samples=self.sizes[0], tile_points=FIRST_TILE_POINTS)
        # Timing the engine's candidate plans would cost more than the preview itself.
        self.stream.evaluator.plan = preview_plan(self.stream.evaluator)
        self.axes, self.shape = self.stream.axes, self.stream.shape

    def __getattr__(self, name):  # spec, evaluator, arrays, evaluated, reused: the stage's
        if name == "stream":
            raise AttributeError(name)
        return getattr(self.stream, name)

    @property
    def total(self) -> int:
        """Points over all stages (the grid's points times the number of stages)."""
        return self.stream.total * len(self.sizes)

    def __iter__(self) -> Iterator[StageTile]:
        points = self.stream.total
        for stage, samples in enumerate(self.sizes):
            if stage != self.stage:
                self.stream = self._make(samples=samples)
                self.stage = stage
            before, last = stage * points, 0
            for tile in self.stream:
                last = tile.done
                label = ("" if samples is None else
                         stage_label(samples, self.population,
                                     self.stream.arrays.get("loss_se")))
                fields = {f.name: getattr(tile, f.name) for f in dataclasses.fields(Tile)}
                fields.update(done=before + tile.done, total=self.total)
                yield StageTile(**fields, stage=label, samples=samples)
            if last < points:
                return  # cancelled within the stage: no later stage starts

    def result(self):
        """The grid of the current stage (see the class docstring)."""
        return self.stream.result()


def progressive_stream(make_stream: Callable, data) -> ProgressiveStream | None:
    """A :class:`ProgressiveStream` for ``data``, or ``None`` where it brings nothing.

    ``None`` when the data set is below :data:`PROGRESSIVE_MIN_SAMPLES`, or cannot be subset
    (a data function, an iterable dataset), or the loss gives no per-sample values
    (:class:`~landscape_widget.core.subset.SubsetError`): the caller then computes the exact
    grid directly.

    Returns:
        The staged stream, or ``None``.
    """
    try:
        population = data_size(data)
    except (SubsetError, TypeError, ValueError):
        return None
    sizes = progressive_sizes(population)
    if len(sizes) == 1:
        return None
    try:
        return ProgressiveStream(make_stream, sizes, population)
    except SubsetError:
        return None
