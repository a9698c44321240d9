"""Evaluation on a fixed random subset of the data, with the standard error of the mean loss.

``compute_surface(..., samples=n)`` evaluates every grid point on the *same* ``n`` samples,
drawn once without replacement from the ``N`` samples of the data (seeded; kept in data
order), so the subset surface is as smooth as the exact one and differs from it by one
common sampling error per point. Each point also gets the standard error of its mean loss.

The per-sample losses and the standard error (``loss_se``) are in
:mod:`~landscape_widget.core.subset_se`.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
)

from .data import as_tensors, is_data_fn

SUBSET_SEED = 0  # default seed of the subset (``sample_seed=``)


class SubsetError(ValueError):
    """The data or the loss does not allow a sample subset; the message names the fix."""


def data_size(data) -> int:
    """Number of samples of ``data`` without reading it (tensors, a Dataset, a DataLoader).

    Returns:
        The number of samples.

    Raises:
        SubsetError: For a data function or an iterable dataset, which cannot be subset.
    """
    if is_data_fn(data):
        raise SubsetError(
            "samples= cannot take a subset of a data function (data_fn): its samples are "
            "only known once it is called. Call it yourself and pass what it returns "
            "((inputs, targets) tensors, a map-style Dataset or a DataLoader over one), or "
            "return a subset from the function and leave samples=None.")
    if isinstance(data, DataLoader):
        data = _loader_dataset(data)
    if isinstance(data, IterableDataset):
        raise SubsetError(
            "samples= cannot take a subset of an iterable dataset (it has no indices). Pass "
            "a map-style Dataset (with __getitem__ and __len__), (inputs, targets) tensors, "
            "or draw the subset yourself and leave samples=None.")
    if isinstance(data, Dataset):
        try:
            return len(data)  # type: ignore[arg-type]
        except TypeError as err:
            raise SubsetError("samples= needs a Dataset with a length (__len__).") from err
    # Tensors as the exact pass takes them: inputs and targets of different lengths (or
    # several input tensors) are refused with its error, not subset by the inputs' length
    # (x[idx], y[idx] dropped y's extra samples without a word, or raised an IndexError).
    return int(as_tensors(data)[0].shape[0])


def _loader_dataset(loader: DataLoader) -> Dataset:
    if isinstance(loader.dataset, IterableDataset):
        raise SubsetError(
            "samples= cannot take a subset of a DataLoader over an iterable dataset (it has "
            "no indices). Pass a DataLoader over a map-style Dataset, (inputs, targets) "
            "tensors, or draw the subset yourself and leave samples=None.")
    if loader.batch_size is None:
        raise SubsetError("samples= needs a DataLoader that batches its samples "
                          "(batch_size=None yields ready-made batches, which cannot be subset).")
    # The population is what the loader visits (its sampler), not its whole dataset: a
    # SubsetRandomSampler over a train split must not let the subset draw validation samples.
    sampler = loader.sampler
    dataset = None
    if isinstance(sampler, SequentialSampler) or (
            isinstance(sampler, RandomSampler) and not sampler.replacement
            and sampler.num_samples == len(sampler.data_source)):  # type: ignore[arg-type]
        # Both visit indices 0 .. len(their data_source) - 1 of the loader's dataset, all
        # of it only if it has that length (SequentialSampler(range(k)) reads the first k:
        # the subset was drawn from all, samples the exact pass never read).
        visited = len(sampler.data_source)  # type: ignore[arg-type]
        try:
            whole = len(loader.dataset) == visited  # type: ignore[arg-type]
        except TypeError:  # a map-style dataset without __len__: the sampler's are its
            whole = False
        dataset = loader.dataset if whole else Subset(loader.dataset, range(visited))
    elif isinstance(sampler, SubsetRandomSampler):
        dataset = Subset(loader.dataset, sorted(int(i) for i in sampler.indices))
    if dataset is not None and loader.drop_last and len(dataset) % loader.batch_size:
        # The exact pass reads the loader, which drops its last partial batch: the subset
        # must be drawn from the samples it keeps (it was drawn from all, so samples=N of
        # all N gave a standard error of 0 and other values than the exact surface).
        if not isinstance(sampler, SequentialSampler):
            raise SubsetError(
                "samples= cannot tell which samples this DataLoader visits: it shuffles "
                "and drops its last partial batch (drop_last=True), a different one each "
                "pass. Pass drop_last=False, or the Dataset, or leave samples=None.")
        kept = len(dataset) // loader.batch_size * loader.batch_size
        dataset = Subset(dataset, range(kept))
    if dataset is not None:
        return dataset
    raise SubsetError(
        f"samples= cannot tell which samples this DataLoader visits: its sampler is a "
        f"{type(sampler).__name__} (with replacement, weighted or custom). Pass the samples "
        "to draw from as a Dataset (e.g. torch.utils.data.Subset) or (inputs, targets) "
        "tensors, or leave samples=None.")


def subset_indices(population: int, n: int, seed: int = SUBSET_SEED) -> Tensor:
    """``n`` distinct indices of ``range(population)``, drawn from ``seed``, in increasing order.

    The same ``(population, n, seed)`` always gives the same indices, on any machine, and the
    caller's random state is not used.

    Returns:
        A sorted ``(n,)`` int64 tensor of indices.

    Example:
        >>> subset_indices(10, 4, seed=0).tolist() == subset_indices(10, 4, seed=0).tolist()
        True
        >>> len(set(subset_indices(10, 10).tolist()))
        10
    """
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(population, generator=g)[:n].sort().values


def check_samples(samples, population: int | None = None) -> int:
    """``samples`` as an int in ``[2, population]`` (any integer type, e.g. ``np.int64``).

    Args:
        samples: The size of the subset asked for.
        population: The number of samples of the data (``None``: not known here, e.g. a
            ``data_fn`` that an executor's workers call; then only the lower bound).

    Returns:
        ``samples`` as a Python int, checked.

    Raises:
        TypeError: If it is not an integer (``bool`` is refused).
        ValueError: If it is below 2 or above the number of samples of the data.

    Example:
        >>> import numpy as np
        >>> check_samples(np.int64(10), 40)
        10
    """
    if isinstance(samples, bool) or not isinstance(samples, numbers.Integral):
        raise TypeError(f"samples must be an int (the size of the subset) or None, "
                        f"got {samples!r}.")
    samples = int(samples)
    if samples < 2:
        raise ValueError(f"samples={samples}: a standard error needs at least 2 samples.")
    if population is not None and samples > population:
        raise ValueError(f"samples={samples} exceeds the {population} samples of the data; "
                         "pass at most that many, or samples=None for all.")
    return samples


def check_seed(seed) -> int:
    """``sample_seed`` as a Python int (any integer type; what ``torch.Generator`` takes).

    Returns:
        The seed.

    Raises:
        TypeError: If it is not an integer (a string, a float, a bool).
        ValueError: If it is outside ``[-2**63, 2**64)``, the range of a torch seed.

    Example:
        >>> check_seed(3)
        3
        >>> check_seed("x")
        Traceback (most recent call last):
        ...
        TypeError: sample_seed must be an int (the seed of the subset's draw), got 'x'.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"sample_seed must be an int (the seed of the subset's draw), "
                        f"got {seed!r}.")
    seed = int(seed)
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"sample_seed={seed} is outside the range of a torch seed "
                         "[-2**63, 2**64); pass a smaller int.")
    return seed


def no_counted_targets(samples: int, seed: int, population: int | None, err) -> SubsetError:
    """The error for a drawn subset whose targets are all ``ignore_index``: it names the draw.

    Args:
        samples: The subset's size.
        seed: Its seed (``sample_seed``).
        population: The number of samples it was drawn from (``None``: unknown here).
        err: The engine's :class:`~landscape_widget.core.errors.NoCountedTargets`.

    Returns:
        The :class:`SubsetError` to raise (from ``err``).
    """
    of = f" of the data's {population:,}" if population else ""
    ignore = getattr(err, "ignore_index", None)
    what = "ignore_index" if ignore is None else f"ignore_index={ignore}"
    if getattr(err, "zero_weight", False):  # the others are of classes weighted 0
        what += " or is of a class whose weight is 0 in the loss's weight="
    return SubsetError(
        f"samples=: the subset of {samples:,} samples{of} drawn with sample_seed={seed} has "
        f"no counted target: every drawn target equals {what}, so its loss is a mean over "
        "nothing. Raise samples= (more drawn targets) or change sample_seed= (another draw); "
        "if the data itself has no counted target, pass data with some.")


def resolve_seed(samples, sample_seed) -> int | None:
    """The seed of a ``samples=`` draw: ``sample_seed`` checked, or the default.

    Returns:
        ``None`` without ``samples``; else the checked seed (:data:`SUBSET_SEED` if none).

    Raises:
        TypeError: If ``sample_seed`` is given without ``samples`` (it would have no
            effect), or is not an int (:func:`check_seed`).

    Example:
        >>> resolve_seed(None, None), resolve_seed(100, None), resolve_seed(100, 3)
        (None, 0, 3)
    """
    if samples is None:
        if sample_seed is not None:
            raise TypeError(
                f"sample_seed={sample_seed!r} has no effect without samples=: every point is "
                "computed exactly on all data. Pass samples=N as well (a random subset of N "
                "samples drawn from that seed), or drop sample_seed.")
        return None
    return check_seed(SUBSET_SEED if sample_seed is None else sample_seed)


def take_subset(data, samples: int, seed: int = SUBSET_SEED):
    """The subset of ``samples`` samples of ``data`` that :func:`subset_indices` picks.

    Args:
        data: ``(inputs, targets)`` tensors or arrays, a map-style ``Dataset``, or a
            ``DataLoader`` over one (its collate function is kept; the subset is drawn from
            the samples its sampler visits, in index order: all of its dataset for a
            sequential or shuffling loader, the indices of a ``SubsetRandomSampler``).
        samples: Size of the subset.
        seed: Seed of the draw.

    Returns:
        ``(subset_data, population)``: data of the same kind holding the subset, and the
        number of samples it was drawn from.

    Raises:
        SubsetError: If ``data`` cannot be subset (a data function, an iterable dataset,
            a loader whose sampler draws with replacement, by weight or its own way).
        ValueError: If ``samples`` is not in ``[2, population]``.
    """
    population = data_size(data)
    n = check_samples(samples, population)
    idx = subset_indices(population, n, check_seed(seed))
    if isinstance(data, DataLoader):
        return DataLoader(Subset(_loader_dataset(data), idx.tolist()),
                          batch_size=data.batch_size, shuffle=False,
                          collate_fn=data.collate_fn), population
    if isinstance(data, Dataset):
        return Subset(data, idx.tolist()), population
    x, y = as_tensors(data)
    return (x[idx], y[idx]), population
