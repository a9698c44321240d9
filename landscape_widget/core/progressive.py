"""Sample-progressive grids: the whole grid on growing data subsets, then on all data.

A picture of a ResNet over 50,000 images should not wait for 50,000 forward passes per
point. :class:`ProgressiveStream` runs the grid first on a fixed random subset of the data
(``samples=`` of :func:`~landscape_widget.iter_tiles`, with standard errors), then on a
larger one, and last on all data, as one stream of tiles: a viewer draws the coarse-in-data
picture at once and each later stage overwrites it, ending with the exact full-data values.
The widget's worker uses it for large data sets (see :func:`progressive_sizes`).

The widget's ``samples`` control (:data:`SAMPLE_MODES`, the one list of its values) picks
the stages: ``"auto"`` (subset stages first on large data, then exact), ``"exact"`` (all
data only) or a fixed subset (:data:`SUBSET_CHOICES`: that subset only, with its standard
errors; all data, exact, when the data holds no more samples); see :func:`sample_stages`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .compute import LocalRunner
from .data import is_data_fn
from .grid import Tile
from .plans import Plan
from .subset import SubsetError, data_size

if TYPE_CHECKING:
    from .landscape import TileStream

PROGRESSIVE_MIN_SAMPLES = 4_096  # data sets at least this large get subset stages first
PROGRESSIVE_STAGES = (256, 2_048, 16_384)  # subset sizes, growing 8x ...
PROGRESSIVE_FRACTION = 4  # ... each used while at most 1/4 of the data: all subset passes
# together then cost at most ~30 % of the exact pass (256 + 2,048 of 10,000: 23 %).
FIRST_TILE_POINTS = 4  # points per tile of the first stage: the first picture comes early
SUBSET_CHOICES = {"1k": 1_000, "5k": 5_000, "10k": 10_000}
"""The widget's fixed subset sizes: the ``samples`` control's values besides auto and exact."""
SAMPLE_MODES = ("auto", "exact", *SUBSET_CHOICES)
"""The values of the widget's ``samples`` control (``widget/spec.py``), default first."""


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


def sample_stages(mode: str, population: int | None) -> list[int | None]:
    """The stages of the widget's ``samples`` control ``mode`` for ``population`` samples.

    Args:
        mode: One of :data:`SAMPLE_MODES`.
        population: The data's number of samples (``None``: unknown here, a ``data_fn`` on
            an executor's workers; then a fixed subset is drawn there, auto is exact).

    Returns:
        Subset sizes then ``None`` (exact), as :func:`progressive_sizes`; a fixed subset
        gives just ``[n]``, or ``[None]`` when the data has at most ``n`` samples.

    Raises:
        ValueError: If ``mode`` is not one of :data:`SAMPLE_MODES`.

    Example:
        >>> sample_stages("auto", 50_000), sample_stages("exact", 50_000)
        ([256, 2048, None], [None])
        >>> sample_stages("10k", 50_000), sample_stages("10k", 8_000)
        ([10000], [None])
    """
    if mode not in SAMPLE_MODES:
        raise ValueError(f"samples={mode!r} is not one of {list(SAMPLE_MODES)}.")
    if mode == "exact" or (mode == "auto" and population is None):
        return [None]
    if mode == "auto":
        return progressive_sizes(population)
    n = SUBSET_CHOICES[mode]
    return [None] if population is not None and n >= population else [n]


def stage_label(samples: int, population: int | None, se: np.ndarray | None) -> str:
    """The status text of a subset stage, e.g. ``"subset 1,000 of 50,000 samples (±0.012)"``.

    The ± is the median standard error of the points computed so far.

    Returns:
        The label.
    """
    of = "" if population is None else f" of {population:,}"
    text = f"subset {samples:,}{of} samples"
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
        A one-point loop :class:`~.plans.Plan`.
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
        sizes: The stages' sample counts, from :func:`sample_stages`.
        population: The data's number of samples (``None``: read from the first stage's
            runner, whose executor's workers drew the subset).
        preview: Whether the first stage is a preview (when later stages follow); a
            single subset stage (the widget's fixed subset) is the answer and plans as
            usual.

    Attributes mirror the current stage's stream (``axes``, ``shape``, ``spec``,
    ``evaluator``, ``arrays``), so a viewer joining mid-way sees the current stage's values;
    ``evaluated`` and ``reused`` count the exact stage only; :meth:`result` is the current
    stage's grid (a subset result, with ``loss_se``, until the exact stage has started).
    """

    def __init__(self, make_stream: Callable, sizes: list[int | None], population: int | None,
                 preview: bool = True):
        self._make = make_stream
        self.sizes = list(sizes)
        self.stage = 0
        if preview:
            self.stream = make_stream(samples=self.sizes[0], tile_points=FIRST_TILE_POINTS)
            if isinstance(self.stream.evaluator, LocalRunner):  # an executor's workers time
                # Timing the engine's candidate plans would cost more than the preview.
                self.stream.evaluator.plan = preview_plan(self.stream.evaluator)
        else:
            self.stream = make_stream(samples=self.sizes[0])
        self.population = population or getattr(self.stream.evaluator, "population", None)
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


def progressive_stream(make_stream: Callable, data, mode: str = "auto",
                       remote: bool = False) -> ProgressiveStream | TileStream | None:
    """A :class:`ProgressiveStream` for ``data`` and the widget's ``samples`` ``mode``.

    ``None`` where the stages bring nothing: the caller then computes the exact grid
    directly. With ``"auto"`` that is when the data set is below
    :data:`PROGRESSIVE_MIN_SAMPLES`, or cannot be subset (a data function, an iterable
    dataset), or the loss gives no per-sample values
    (:class:`~landscape_widget.core.subset.SubsetError`); with ``"exact"`` always; with a
    fixed subset when the data holds no more samples than it. A fixed subset that cannot
    be drawn raises instead: the user asked for it, and the error names the fix.

    Args:
        make_stream: As for :class:`ProgressiveStream`.
        data: The grid's data.
        mode: One of :data:`SAMPLE_MODES`.
        remote: Whether an executor's workers compute the tiles (a ``data_fn`` is then
            subset by them, see ``core/_remote.py``).

    Returns:
        The staged stream, or ``None``; for a fixed subset of a ``data_fn`` on an
        executor whose workers report no more samples than the subset, the exact stream
        their probe was made on (see the comment in the code).

    Raises:
        SubsetError: For a fixed subset of data or with a loss that cannot be subset.
        TypeError: For a fixed subset of data of an unsupported form.
        ValueError: For a ``mode`` outside :data:`SAMPLE_MODES`, or a fixed subset of
            empty data.
    """
    fixed = mode in SUBSET_CHOICES
    if remote and fixed and is_data_fn(data):
        # Only the workers call data_fn, so its size is known from their probe: open the
        # exact stream first (no reuse: the caller's may be of the subset). Data that holds
        # no more samples than the subset is then computed exact on that stream, as for
        # local data, instead of a draw the workers would refuse; a larger one is subset
        # (each worker reuses the data it loaded for the probe).
        probe = make_stream(samples=None, reuse=None)
        population = int(probe.evaluator.n)
        if SUBSET_CHOICES[mode] >= population:
            return probe
    else:
        try:
            population = data_size(data)
        except (SubsetError, TypeError, ValueError):
            if fixed:
                raise
            return None
    sizes = sample_stages(mode, population)
    if sizes == [None]:
        return None
    try:
        return ProgressiveStream(make_stream, sizes, population, preview=len(sizes) > 1)
    except SubsetError:
        if fixed:
            raise
        return None
