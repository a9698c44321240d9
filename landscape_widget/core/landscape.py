"""Public entry points: :func:`iter_tiles`, :func:`compute_surface`, :func:`compute_curve`."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
from torch import nn

from .compute import grid_job
from .data import is_data_fn
from .errors import NoCountedTargets
from .evaluate import METRICS, LossFn
from .params import Params
from .subset import SubsetError, check_samples, no_counted_targets, resolve_seed, take_subset
from .surface import Curve, Surface
from .tile_stream import TileStream, check_foreign_reuse, run_stream


def iter_tiles(
    model: nn.Module,
    data,
    *,
    directions: Sequence[Params] | Params | None = None,
    x=(-1, 1, 51),
    y=(-1, 1, 51),
    loss_fn: LossFn | None = None,
    metrics: Sequence[str] = METRICS,
    bn: str = "eval",
    bn_batch_size: int | None = None,
    device=None,
    seed: int | None = 0,
    reuse: Surface | Curve | None = None,
    tile_points: int | None = None,
    cancel: threading.Event | None = None,
    keep_directions: bool = True,
    evaluator_options: dict | None = None,
    executor=None,
    output_fn=None,
    samples: int | None = None,
    sample_seed: int | None = None,
    precision: str | None = None,
    compile: bool | str | None = None,
) -> TileStream:
    """Set up a surface (or, with ``y=None``, a curve) to be computed tile by tile.

    Validation happens here, before any tile: bad input raises at once.

    Args:
        model: The model; never modified.
        data: ``(inputs, targets)`` tensors, a ``Dataset``, a ``DataLoader``, or a
            zero-argument function returning one (called once).
        directions: ``(d1, d2)`` for a surface, ``d`` (or ``[d]``) for a curve; ``None``
            draws filter-normalised random directions from ``seed``.
        x: ``(start, stop, num)`` of the first coordinate (along ``d1``).
        y: ``(start, stop, num)`` of the second coordinate, or ``None`` for a curve.
        loss_fn: ``loss_fn(outputs, targets)``, mean over the batch (over its counted
            targets); cross-entropy by default. ``outputs`` are the model's, as returned (a
            tuple or a dict too). A loss that sums is refused.
        metrics: ``"loss"``, ``"accuracy"``, or ``{name: fn}`` with your own per-sample
            metrics (see :class:`~landscape_widget.Evaluator`). By default the loss, and
            accuracy where it means something (``spec["metrics_dropped"]`` says why not).
        bn: ``"eval"`` (running statistics) or ``"batch"`` (batch statistics).
        bn_batch_size: With ``bn="batch"``, BatchNorm uses the statistics of consecutive
            batches of this many samples in data order (default 128, see
            :func:`~landscape_widget.core.state.bn_batch_size_for`); recorded as
            ``spec["bn_batch_size"]``. The values do not depend on the engine's plan.
        device: Where to compute (the model's device by default).
        seed: Seed of the random directions when ``directions`` is None.
        reuse: An earlier result of the same model, directions, data and loss: points whose
            coordinates coincide are copied, not recomputed (raising the resolution from
            ``n`` to ``2n - 1`` recomputes nothing old).
        tile_points: Fixed number of points per tile (default: adaptive, ~0.3 s per tile).
        cancel: A ``threading.Event``; once set, iteration stops: on this process at the
            next batch of the tile in progress (dropped), once the first tile has chosen
            the plan (within it, after it); on an executor, after the current tiles.
        keep_directions: Keep the directions (on the CPU) in the result.
        evaluator_options: Extra keywords for the engine (``strategy``, ``memory_budget``,
            ``batch_size``, ``precision``, ``compile``, ``lanes``; see
            :class:`~landscape_widget.core.evaluate.Evaluator`). A model whose vmap path
            fails falls back to the loop by itself; ``spec["plan"]["vmap_error"]`` says why.
        executor: A ``dask.distributed.Client`` or any ``concurrent.futures.Executor``:
            tiles are computed by its workers and yielded as they finish (see
            ``core/distributed.py``). ``data`` may then be a ``data_fn``, a picklable
            zero-argument function that returns the data on each worker; ``device`` is the
            workers' device (default: their GPU if any). The result's
            ``spec["executor"]`` counts tiles, workers and ``lost_tiles`` (recomputed after
            a worker died).
        output_fn: ``output_fn(outputs)`` returning the logits (for accuracy and the default
            loss) when the model's outputs are not a Tensor, a dict with ``"logits"`` or an
            object with ``.logits``; e.g. ``lambda out: out[0]``.
        samples: Evaluate every point on the same random subset of this many samples
            (drawn without replacement from ``sample_seed``) instead of all data, and give
            each point's standard error (``loss_se`` of the result; see
            ``core/subset_se.py``). ``None`` (default): all data, exact. ``data`` must then be
            tensors, a map-style ``Dataset`` or a ``DataLoader`` over one, and ``loss_fn``
            one whose ``reduction='none'`` gives per-sample losses. Recorded as
            ``spec["samples"] = {"n", "of", "seed"}``. With ``executor``, tensors, a
            ``Dataset`` or a ``DataLoader`` are subset here and only the drawn samples are
            sent; a ``data_fn`` is called on the workers, which each draw the same subset
            (checked, see ``core/distributed.py``).
        sample_seed: Seed of the subset (default 0); only with ``samples``.
        precision: ``"fp32"`` (default, exact), ``"tf32"``, ``"bf16"`` or ``"fp16"`` (CUDA);
            ``spec["precision"]`` records the one computed (``"fp32"`` where it has no
            effect: tf32 on a CPU, bf16 on a float64 model) with ``spec["precision_error"]``,
            the largest |loss - fp32 loss| measured on 3 points of the grid (core/precision.py).
        compile: ``True``, ``False`` or ``"auto"`` (default): evaluate through
            ``torch.compile`` (core/compiled.py); ``"auto"`` only on CUDA, for large, slow
            grids.

    Returns:
        A :class:`TileStream`.

    Raises:
        TypeError: If ``precision`` or ``compile`` is given both as an argument and in
            ``evaluator_options``; if ``samples`` or ``sample_seed`` is not an int, or
            ``sample_seed`` is given without ``samples``; or, from :func:`grid_job`, if the
            model, an axis, the directions or an option has the wrong type.
        SubsetError: (a ``ValueError``) if ``samples`` is given for data or a loss that
            cannot be subset, the drawn subset has no counted target (all
            ``ignore_index``), or a ``DataLoader`` gives other than one sample per
            drawn dataset item, naming the fix.
        NoCountedTargets: (a ``ValueError``) If every target of the data (without
            ``samples``) equals the loss's ``ignore_index``.
        ValueError: From :func:`grid_job`: the grid is above ``MAX_GRID_POINTS`` points, an
            axis is invalid, or ``reuse`` was computed otherwise (``ReuseMismatch``).
        ReuseMismatch: (a ``ValueError``) If ``reuse`` is a loss-landscape file whose values
            this model, data and directions do not reproduce (:func:`check_foreign_reuse`).
    """
    for name, value in (("precision", precision), ("compile", compile)):
        if value is not None:  # also accepted among evaluator_options
            if name in (evaluator_options or {}):
                raise TypeError(f"{name} was given twice (also in evaluator_options).")
            evaluator_options = dict(evaluator_options or {}, **{name: value})
    population = None
    sample_seed = resolve_seed(samples, sample_seed)
    if samples is not None:
        if executor is not None and is_data_fn(data):
            # The workers load the data and draw the subset there (core/_remote.py _subset).
            samples = check_samples(samples)
            evaluator_options = {**(evaluator_options or {}), "subset": (samples, sample_seed)}
        else:  # drawn here: an executor then ships only the drawn samples
            data, population = take_subset(data, samples, sample_seed)
            samples = int(samples)
            evaluator_options = {**(evaluator_options or {}), "population": population}
    try:
        job = grid_job(model, data, axes=[x] if y is None else [y, x], directions=directions,
                       loss_fn=loss_fn, metrics=metrics, bn=bn, bn_batch_size=bn_batch_size,
                       device=device, seed=seed, reuse=reuse,
                       keep_directions=keep_directions, evaluator_options=evaluator_options,
                       executor=executor, output_fn=output_fn)
    except NoCountedTargets as err:
        if samples is None:
            raise
        subset_error = no_counted_targets(samples, sample_seed, population, err)
        raise subset_error from err
    if samples is not None and population is None:  # drawn on an executor's workers
        population = getattr(job.runner, "population", None)
    if samples is not None and job.spec["n_samples"] != samples:
        # A DataLoader whose collate_fn makes several samples of one dataset item (chunked
        # or pre-batched data, crops): the draw is of items, the standard error's terms are
        # of samples, and its finite-population correction went negative (loss_se NaN).
        of = f" of the data's {population:,} items" if population else " items"
        raise SubsetError(
            f"samples={samples} drew {samples:,}{of}, but the batches of those items hold "
            f"{job.spec['n_samples']:,} samples (the DataLoader's collate_fn does not give "
            "one sample per dataset item), so the "
            "standard error, which needs the samples drawn one by one, cannot be computed. "
            "Pass the samples themselves: (inputs, targets) tensors, e.g. x, y = "
            "map(torch.cat, zip(*loader)), or a Dataset of single samples; or leave "
            "samples=None.")
    job.spec["samples"] = (None if samples is None else
                           {"n": samples, "of": population, "seed": sample_seed})
    if reuse is not None and reuse.spec.get("source") == "loss-landscape":
        check_foreign_reuse(job)
    return TileStream(job, tile_points, cancel)


def compute_surface(
    model: nn.Module,
    data,
    *,
    directions: Sequence[Params] | None = None,
    x="auto",
    y="auto",
    loss_fn: LossFn | None = None,
    metrics: Sequence[str] = METRICS,
    bn: str = "eval",
    device=None,
    progress: bool = True,
    seed: int | None = 0,
    reuse: Surface | None = None,
    test_data=None,
    **options,
) -> Surface:
    """The loss surface ``L(theta + a * d1 + b * d2)`` on a grid, with a progress bar.

    Args:
        model: The model; never modified.
        data: ``(inputs, targets)`` tensors, a ``Dataset``, a ``DataLoader``, or a
            zero-argument function returning one (with ``executor``, called on the workers).
        directions: ``(d1, d2)``; by default two filter-normalised random directions (bias
            and BatchNorm entries zero) drawn from ``seed``.
        x: ``(start, stop, num)`` for ``a``, as in ``numpy.linspace``. ``"auto"``:
            ``(-1, 1, 51)``, or for PCA directions of a trajectory
            (:meth:`~landscape_widget.Trajectory.pca_directions`) a range covering the path.
        y: ``(start, stop, num)`` for ``b`` (``"auto"`` likewise).
        loss_fn: Mean loss of a batch, ``loss_fn(outputs, targets)``; cross-entropy by default.
        metrics: ``"loss"``, ``"accuracy"`` or ``{name: fn}`` (see :func:`iter_tiles`).
        bn: ``"eval"`` or ``"batch"``; with ``"batch"``, ``bn_batch_size=`` (an option passed
            to :func:`iter_tiles`) sets the samples per BatchNorm batch (default 128).
        device: Where to compute (the model's device by default).
        progress: Show a tqdm progress bar.
        seed: Seed for the default random directions.
        reuse: A previous :class:`Surface` whose coinciding points are reused (also one
            read from a loss-landscape file, whose unfinished points are then computed).
        test_data: Data for a second pass over the same grid: ``test_loss`` and
            ``test_accuracy`` (loss-landscape's ``test_*`` keys), always exact on all of
            it (``samples=`` subsets the training data only).
        **options: Passed to :func:`iter_tiles` (``output_fn``, ``tile_points``, ``cancel``,
            ``keep_directions``, ``evaluator_options``, ``executor``: a Dask client or
            ``concurrent.futures`` executor whose workers compute the tiles; ``samples=N``
            and ``sample_seed``: every point on one fixed random subset of ``N`` samples,
            with each point's standard error in ``Surface.loss_se``).

    Returns:
        A :class:`Surface` with ``.x`` (nx,), ``.y`` (ny,), ``.loss`` and ``.accuracy``
        (ny, nx). Non-finite losses are NaN (with one warning).

    Raises:
        ValueError: If ``y`` is None (a 1D range: use ``compute_curve``); and the errors of
            :func:`iter_tiles` for invalid input (``TypeError``, ``ValueError``,
            ``SubsetError``, ``ReuseMismatch``).

    Example:
        >>> import torch
        >>> torch.manual_seed(0) and None
        >>> m = torch.nn.Linear(4, 3)
        >>> data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
        >>> s = compute_surface(m, data, x=(-1, 1, 5), y=(-1, 1, 3), progress=False)
        >>> s.loss.shape
        (3, 5)
    """
    if y is None:
        raise ValueError("compute_surface needs a y range; use compute_curve for 1D.")
    covering = getattr(directions, "covering_range", None)
    if isinstance(x, str) and x == "auto":
        x = covering(0) if covering else (-1, 1, 51)
    if isinstance(y, str) and y == "auto":
        y = covering(1) if covering else (-1, 1, 51)
    kw = dict(x=x, y=y, loss_fn=loss_fn, metrics=metrics, bn=bn, device=device, seed=seed,
              **options)
    stream = iter_tiles(model, data, directions=directions, reuse=reuse, **kw)
    surface = run_stream(stream, progress, "surface")
    if test_data is not None:
        _test_pass(surface, model, test_data, directions, reuse, progress, kw)
    labels = getattr(directions, "axis_labels", None)
    if labels:
        surface.spec["axis_labels"] = list(labels[:2])
    _carry_over(surface, reuse)
    return surface


def compute_curve(
    model: nn.Module,
    data,
    *,
    direction: Params | None = None,
    x=(-1, 1, 51),
    loss_fn: LossFn | None = None,
    metrics: Sequence[str] = METRICS,
    bn: str = "eval",
    device=None,
    progress: bool = True,
    seed: int | None = 0,
    reuse: Curve | None = None,
    test_data=None,
    **options,
) -> Curve:
    """The loss ``L(theta + a * d)`` along one direction.

    Args:
        model: The model; never modified.
        data: ``(inputs, targets)`` tensors, a ``Dataset``, a ``DataLoader``, or a
            zero-argument function returning one (with ``executor``, called on the workers).
        direction: A direction dict (e.g. :func:`random_direction` or
            :func:`interpolation_direction`); by default a filter-normalised random one.
        x: ``(start, stop, num)``, as in ``numpy.linspace``.
        loss_fn: Mean loss of a batch; cross-entropy by default.
        metrics: ``"loss"``, ``"accuracy"`` or ``{name: fn}`` (see :func:`iter_tiles`).
        bn: ``"eval"`` or ``"batch"``; with ``"batch"``, ``bn_batch_size=`` (an option passed
            to :func:`iter_tiles`) sets the samples per BatchNorm batch (default 128).
        device: Where to compute.
        progress: Show a tqdm progress bar.
        seed: Seed for the default random direction.
        reuse: A previous :class:`Curve` whose coinciding points are reused.
        test_data: Data for a second pass: ``test_loss`` and ``test_accuracy``, exact on
            all of it (``samples=`` subsets the training data only).
        **options: Passed to :func:`iter_tiles` (``executor`` included; ``samples=N``: a
            subset curve with standard errors in ``Curve.loss_se``).

    Returns:
        A :class:`Curve` with ``.x``, ``.loss`` and ``.accuracy``.
    """
    kw = dict(x=x, y=None, loss_fn=loss_fn, metrics=metrics, bn=bn, device=device, seed=seed,
              **options)
    directions = None if direction is None else [direction]
    curve = run_stream(iter_tiles(model, data, directions=directions, reuse=reuse, **kw), progress,
                 "curve")
    if test_data is not None:
        _test_pass(curve, model, test_data, directions, reuse, progress, kw)
    _carry_over(curve, reuse)
    return curve


def _carry_over(result, reuse) -> None:
    """Keep what ``reuse`` holds beyond this run's values, when both have the same grid.

    Finishing a file (``reuse=Surface.load(path)``, then ``save(path, overwrite=True)``)
    must not drop what the file held: its accuracy when this run computes the loss only,
    its test values when no ``test_data`` was passed (loss-landscape's ``test_loss`` /
    ``test_acc``), and what we do not interpret
    (``dir_file``, ``min_eig``, the user's own datasets and attributes). On another grid
    those arrays would not fit, and nothing is carried.
    """
    if reuse is None or not _same_axis(result.x, reuse.x) or not _same_axis(
            getattr(result, "y", None), getattr(reuse, "y", None)):
        return
    if result.accuracy is None and reuse.accuracy is not None:
        result.accuracy = reuse.accuracy
    if result.test_loss is None and result.test_accuracy is None and (
            reuse.test_loss is not None or reuse.test_accuracy is not None):
        result.test_loss, result.test_accuracy = reuse.test_loss, reuse.test_accuracy
        if "test" in reuse.spec:
            result.spec["test"] = reuse.spec["test"]
    if not result.extra and reuse.extra:
        result.extra = reuse.extra


def _same_axis(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return np.shape(a) == np.shape(b) and bool(np.all(np.asarray(a) == np.asarray(b)))


def _test_pass(result, model, test_data, directions, reuse, progress, kw) -> None:
    """Evaluate ``test_data`` on ``result``'s grid and directions, into its ``test_*`` fields.

    The same engine runs a second grid; its spec (data fingerprint, sample count) is kept
    under ``spec["test"]`` so that a later ``reuse=`` reuses test values only for the same
    test data. ``samples=`` subsets the training data only: the test pass is exact on all
    of ``test_data`` (a subset test loss would be read as the test loss, without its error).
    """
    kw = {k: v for k, v in kw.items() if k not in ("samples", "sample_seed")}
    if directions is None and result.directions is not None:
        directions = result.directions  # the random directions the first pass drew
    old = None
    metrics = (kw["metrics"],) if isinstance(kw["metrics"], str) else tuple(kw["metrics"])
    have = {"loss": getattr(reuse, "test_loss", None),
            "accuracy": getattr(reuse, "test_accuracy", None)}
    if reuse is not None and all(have.get(m) is not None for m in metrics):
        old_spec = dict(reuse.spec)
        old_spec.update(reuse.spec.get("test") or {})
        old = (Curve(reuse.x, have["loss"], have["accuracy"], old_spec)
               if isinstance(result, Curve) else
               Surface(reuse.x, reuse.y, have["loss"], have["accuracy"], old_spec))
    stream = iter_tiles(model, test_data, directions=directions, reuse=old, **kw)
    test = run_stream(stream, progress, "test")
    result.test_loss, result.test_accuracy = test.loss, test.accuracy
    # With the test pass's own measured precision_error (the result's is the training pass's).
    result.spec["test"] = {k: test.spec[k] for k in ("data", "n_samples", "evaluated",
                                                      "reused", "samples", "precision_error")}
