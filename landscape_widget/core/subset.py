"""Evaluation on a fixed random subset of the data, with the standard error of the mean loss.

``compute_surface(..., samples=n)`` evaluates every grid point on the *same* ``n`` samples,
drawn once without replacement from the ``N`` samples of the data (seeded; kept in data
order), so the subset surface is as smooth as the exact one and differs from it by one
common sampling error per point. Each point also gets the standard error of its mean loss.

The loss of a point is a ratio ``R = sum_i a_i / sum_i b_i`` over samples ``i``:

- ``a_i`` is sample ``i``'s loss from ``loss_fn`` with ``reduction='none'`` (the sum over its
  counted targets for class-index targets, whose loss torch weighs by counted targets and
  class weights; the mean over its entries otherwise),
- ``b_i`` its weight: the number (or class weight) of its counted targets, else 1.

For a plain classification or regression loss ``b_i = 1`` and ``R`` is the mean of the
``a_i``. The standard error reported (``loss_se``) is the usual one of a ratio estimator
under simple random sampling without replacement (Cochran, *Sampling Techniques*, 1977,
eq. 6.9 with the sample variance)::

    se(R) = sqrt( sum_i (a_i - R b_i)^2 / (n - 1) / n ) / mean_i(b_i) * sqrt((N - n) / (N - 1))

which for ``b_i = 1`` is exactly ``std(a, ddof=1) / sqrt(n) * sqrt((N - n) / (N - 1))``: the
sample standard deviation of the per-sample losses over ``sqrt(n)``, times the
finite-population correction, so it is 0 when ``n = N``. The engine accumulates
``sum a``, ``sum a^2``, ``sum a b`` and ``sum b^2`` per point in float64 (see
``core/evaluate.py``); :func:`ratio_se` turns them into ``se``.

Per-sample losses come from the user's loss with ``reduction='none'``: the default
cross-entropy, a torch loss module (``nn.CrossEntropyLoss()``, ``nn.MSELoss()``, ...), a
``torch.nn.functional`` loss or a ``functools.partial`` of one. A loss that cannot give them
(a lambda, a loss reducing in its own way) is refused with the fix (:class:`SubsetError`),
rather than given a standard error from a few per-batch means, which would itself be too
noisy to be honest. With ``bn="batch"`` the per-sample losses also depend on the other
samples of their BatchNorm batch; the standard error ignores that dependence.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import numbers

import torch
from torch import Tensor, nn
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
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return int(torch.as_tensor(data[0]).shape[0])
    return int(as_tensors(data)[0].shape[0])  # its own error for anything else


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
            and sampler.num_samples == len(loader.dataset)):  # type: ignore[arg-type]
        dataset = loader.dataset
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
    x, y = (torch.as_tensor(t) for t in data)
    return (x[idx], y[idx]), population


# --- per-sample losses --------------------------------------------------------------------

def _takes_reduction(fn) -> bool:
    try:
        return "reduction" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class RowSums:
    """A ``reduction='none'`` loss summed over each sample's entries.

    The per-sample form of ``reduction='batchmean'`` (``KLDivLoss``'s, the sum over all
    entries divided by the batch size: the mean over samples of these row sums).
    """

    def __init__(self, unreduced):
        self.unreduced = unreduced

    def __call__(self, out, y: Tensor) -> Tensor:
        """Each sample's sum over its entries, ``(B,)``."""
        values = self.unreduced(out, y)
        return values.reshape(values.shape[0], -1).sum(-1)


MEANS = ("mean", "batchmean")
"""The reductions that are means over samples (of entries, of per-sample sums)."""


def unreduced_loss(loss_fn):
    """``loss_fn`` with ``reduction='none'`` (a new object), or ``None`` if it has no such form.

    A loss module is copied (the user's module keeps its reduction); a function or
    ``functools.partial`` gets the keyword. ``reduction='batchmean'`` (``KLDivLoss``,
    ``F.kl_div``) gives each sample's sum over its entries (:class:`RowSums`).

    Returns:
        The per-sample loss, or ``None``.

    Example:
        >>> out, y = torch.randn(4, 3).log_softmax(-1), torch.rand(4, 3).softmax(-1)
        >>> loss = nn.KLDivLoss(reduction="batchmean")
        >>> torch.allclose(unreduced_loss(loss)(out, y).mean(), loss(out, y))
        True
    """
    if isinstance(loss_fn, nn.Module):
        reduction = getattr(loss_fn, "reduction", None)
        if reduction not in MEANS:
            return None
        twin = copy.copy(loss_fn)  # a shallow copy: its own __dict__, the user's untouched
        twin.reduction = "none"
        return RowSums(twin) if reduction == "batchmean" else twin
    if isinstance(loss_fn, functools.partial):
        reduction = loss_fn.keywords.get("reduction", "mean")
        if reduction not in MEANS:
            return None
        inner = loss_fn.func
        while isinstance(inner, functools.partial):
            inner = inner.func
        if not _takes_reduction(inner):
            return None
        twin = functools.partial(loss_fn, reduction="none")
        return RowSums(twin) if reduction == "batchmean" else twin
    # Any function with a reduction= keyword (torch.nn.functional's, or the user's own, as
    # a partial of it already was): check_unreduced verifies its per-sample values.
    if callable(loss_fn) and not isinstance(loss_fn, type) and _takes_reduction(loss_fn):
        return functools.partial(loss_fn, reduction="none")
    return None


def per_sample_terms(values: Tensor, y: Tensor, task, lead: int = 0) -> tuple[Tensor, Tensor]:
    """``(a, b)`` of the module docstring from a ``reduction='none'`` loss.

    Args:
        values: The unreduced loss, ``(*lead, B, ...)``.
        y: The batch's targets ``(B, ...)``.
        task: The :class:`~landscape_widget.core.metrics.Task` (ignored targets, weights).
        lead: Leading point dimensions of ``values`` (K points at once).

    Returns:
        ``a`` of shape ``(*lead, B)`` and ``b`` of shape ``(B,)``, float64.
    """
    b_count = y.shape[0]
    v = values.reshape(*values.shape[:lead], b_count, -1).to(torch.float64)
    if task.ignore is None or task.per_sample:
        return v.mean(-1), torch.ones(b_count, dtype=torch.float64, device=y.device)
    mask = task.counted(y).reshape(b_count, -1)
    if task.class_weight is not None:
        w = task.class_weight.to(y.device, torch.float64)[y.clamp_min(0)].reshape(b_count, -1)
        weight = (w * mask).sum(-1)
    else:
        weight = mask.sum(-1).to(torch.float64)
    return v.sum(-1), weight


def se_sums(values: Tensor, y: Tensor, task, lead: int = 0) -> Tensor:
    """``(sum a^2, sum a b, sum b^2)`` of one batch, ``(*lead, 3)`` float64."""
    a, b = per_sample_terms(values, y, task, lead)
    return torch.stack([(a * a).sum(-1), (a * b).sum(-1), (b * b).sum().expand(a.shape[:-1])],
                       -1)


def ratio_se(sum_a: Tensor, sum_a2: Tensor, sum_ab: Tensor, sum_b: float | Tensor,
             sum_b2: Tensor, n: int, population: int) -> Tensor:
    """The standard error of ``R = sum a / sum b`` (module docstring), from the sums.

    Returns:
        The standard error (a 0-d tensor, or one per point).

    Example:
        >>> a = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
        >>> se = ratio_se(a.sum(), (a * a).sum(), a.sum(), 3.0, torch.tensor(3.0), 3, 100)
        >>> round(float(se), 12) == round(float(a.std() / 3 ** 0.5 * (97 / 99) ** 0.5), 12)
        True
    """
    r = sum_a / sum_b
    ss = (sum_a2 - 2 * r * sum_ab + r * r * sum_b2).clamp_min(0)
    fpc = (population - n) / (population - 1) if population > 1 else 0.0
    return torch.sqrt(ss / ((n - 1) * n) * fpc) / (sum_b / n)


def check_unreduced(loss_fn, unreduced, out, y: Tensor, task, default: bool) -> None:
    """Check on the first samples that the per-sample losses average to the loss's value.

    Raises:
        SubsetError: If ``unreduced`` is ``None`` or does not agree, with the fix.
    """
    fix = ("pass a loss whose reduction='none' gives each sample's loss (an nn.*Loss "
           "module, a torch.nn.functional loss, a function of yours with a reduction= "
           "keyword, or a functools.partial of one, with reduction='mean', or 'batchmean' "
           "for KL divergence), or compute the exact values (samples=None)")
    if not isinstance(out, Tensor):
        fix += ("; for outputs other than a Tensor, the default loss with output_fn= "
                "(cross-entropy on the logits it picks) gives them too")
    if unreduced is None:
        raise SubsetError(f"samples= needs each sample's loss for the standard error, and "
                          f"this loss_fn cannot give them; {fix}.")
    with torch.no_grad():
        want = float(loss_fn(out, y))
        try:
            values = unreduced(out, y)
        except Exception as err:  # noqa: BLE001 - the user's function, any error
            raise SubsetError(f"samples=: loss_fn(outputs, targets, reduction='none') "
                              f"failed ({type(err).__name__}: {err}); {fix}.") from err
        if not isinstance(values, Tensor) or values.dim() == 0 or values.shape[0] != y.shape[0]:
            raise SubsetError(f"samples=: loss_fn with reduction='none' returned "
                              f"{getattr(values, 'shape', type(values).__name__)}, not one "
                              f"value per sample; {fix}.")
        a, b = per_sample_terms(values, y, task)
        got = float(a.sum() / b.sum())
    if math.isfinite(want) and abs(got - want) > 1e-4 * max(abs(want), 1e-6):
        what = "the default loss" if default else "loss_fn"
        raise SubsetError(f"samples=: the per-sample losses of {what} average to {got:.6g} "
                          f"on the first samples, but its mean is {want:.6g}; {fix}.")
