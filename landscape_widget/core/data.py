"""Turn the user's data into two tensors that stay on the evaluation device."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .plans import free_memory

DATA_RAM_SHARE = 0.4
"""Largest share of the available RAM a Dataset or DataLoader may fill when collected.

The engine holds all samples at once (and concatenating the batches briefly needs twice
their size): beyond this share collecting would take the machine's memory and the kernel
with it (an ImageNet validation loader at 224 px is about 30 GB), so it stops with the fix
(``samples=``) first."""


def _as_pair(batch, where: str) -> tuple[Tensor, Tensor]:
    if isinstance(batch, dict):
        raise TypeError(
            f"{where} yields dicts; pass (inputs, targets) tensors, or a Dataset/DataLoader "
            "whose items are (input, target) pairs."
        )
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"{where} must yield (inputs, targets) pairs, got {type(batch).__name__}"
            f"{' of length ' + str(len(batch)) if isinstance(batch, (tuple, list)) else ''}."
        )
    x, y = batch
    return _tensor(x, "inputs", where), _tensor(y, "targets", where)


def _describe(value) -> str:
    """``value``'s form in words, for errors: a dict's keys, a sequence's element types."""
    if isinstance(value, dict):
        return f"a dict with keys {list(value)[:5]}"
    kinds = sorted({type(v).__name__ for v in value})
    return f"a {type(value).__name__} of {len(value)} {'/'.join(kinds)}"


def _dict_hint(data) -> str:
    """How to pass ``data`` if it is a HuggingFace-style batch, for the error's message.

    Returns:
        For a dict, or a sequence of per-example dicts, a sentence naming its form and the
        ``(inputs, targets)`` fix; else ``""``.

    Example:
        >>> print(_dict_hint({"input_ids": 1, "labels": 2})[:47])
         Here: a dict with keys ['input_ids', 'labels']
    """
    if isinstance(data, dict):
        form = _describe(data)
    elif isinstance(data, (list, tuple)) and data and all(isinstance(v, dict) for v in data):
        form = f"a {type(data).__name__} of {len(data)} dicts with keys {list(data[0])[:5]}"
    else:
        return ""
    return (f" Here: {form}, a HuggingFace-style batch. Pass (inputs, targets) tensors "
            "instead, e.g. (batch['input_ids'], batch['labels']) (per-example dicts: "
            "torch.stack each field first); a model argument other than the inputs (an "
            "attention mask) comes from a wrapper nn.Module whose forward(x) calls "
            "model(x, attention_mask=(x != pad_id).long()).")


def _tensor(value, what: str, where: str) -> Tensor:
    """``value`` as one tensor; ``what`` ("inputs"/"targets") and ``where`` name it in errors.

    Returns:
        ``value`` itself if a tensor, else ``torch.as_tensor(value)``.

    Raises:
        TypeError: If ``value`` is not one tensor or array-like (a dict of inputs, a tuple
            of several input tensors): the engine slices one tensor along dim 0.
    """
    if isinstance(value, Tensor):
        return value
    # A dict, or a sequence holding tensors/dicts, is a model's several inputs:
    # torch.as_tensor raises "Could not infer dtype of dict" or "only one element tensors
    # can be converted to Python scalars", which names neither the problem nor the fix.
    # (A list of 0-d tensors, class indices one by one, is fine: torch.as_tensor takes it.)
    several = isinstance(value, dict) or (isinstance(value, (tuple, list)) and any(
        isinstance(v, dict) or (isinstance(v, Tensor) and v.dim() > 0) for v in value))
    if not several:
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"the {what} of {where} ({type(value).__name__}) cannot be made one tensor "
                f"({err}); pass them as a tensor or array with the samples along dim 0."
            ) from err
    raise TypeError(
        f"the {what} of {where} are {_describe(value)}, not one tensor; the engine slices "
        f"one {what} tensor along dim 0 (the samples). Per-sample tensors: torch.stack "
        "them. A model of several inputs: pass one tensor and a wrapper that builds them "
        "from it, e.g. for model(a, b) stack them as x = torch.stack([a, b], 1) and "
        "evaluate an nn.Module whose forward(x) returns model(x[:, 0], x[:, 1])."
    )


def _collect(loader: DataLoader, where: str) -> tuple[Tensor, Tensor]:
    """All batches of ``loader`` concatenated; ``where`` names the user's object in errors.

    Returns:
        ``(inputs, targets)``: the batches' inputs and targets, each concatenated.

    Raises:
        ValueError: If the samples would fill more than :data:`DATA_RAM_SHARE` of the
            available RAM (predicted after the first batch for a loader of known length,
            else found while reading), naming ``samples=`` and ``Subset`` as the fix;
            or if the loader yields unbatched samples or nothing.
    """
    xs, ys = [], []
    limit = DATA_RAM_SHARE * free_memory(torch.device("cpu"))
    try:  # the samples the loader visits, if it knows (not an iterable dataset's)
        expected = len(loader.sampler) if loader.batch_size is not None else None
    except (TypeError, NotImplementedError):  # a sampler whose __len__ says it has none:
        expected = None  # found while reading (it stopped the collection before it began)
    total = 0
    for batch in loader:
        x, y = _as_pair(batch, where)
        total += x.numel() * x.element_size() + y.numel() * y.element_size()
        if not xs and expected and x.dim() and x.shape[0]:
            _check_size(total / x.shape[0] * expected, expected, limit, where)
        elif total > limit:
            _check_size(total, None, limit, where)
        if loader.batch_size is None and y.dim() == 0:
            # torch.cat stopped with "zero-dimensional tensor ... cannot be concatenated".
            raise ValueError(f"{where} has batch_size=None: it yields its dataset's samples "
                             "one by one, unbatched. Give it a batch_size (e.g. 256), or pass "
                             "the Dataset itself.")
        xs.append(x)
        ys.append(y)
    if not xs:
        raise ValueError(f"{where[0].upper()}{where[1:]} yielded no batches; pass data with at "
                         "least one sample.")
    return torch.cat(xs), torch.cat(ys)


def _check_size(size: float, samples: int | None, limit: float, where: str) -> None:
    """Refuse data of ``size`` bytes past ``limit`` (see :data:`DATA_RAM_SHARE`).

    Raises:
        ValueError: If ``size > limit``, with the sizes and the fix.
    """
    if size > limit:
        count = f"{samples:,} samples, " if samples else "so far, "
        raise ValueError(
            f"{where} holds too much to evaluate at once: its samples would take about "
            f"{size / 2**30:.1f} GiB in memory ({count}read as float tensors), more than "
            f"{DATA_RAM_SHARE:.0%} of the {limit / DATA_RAM_SHARE / 2**30:.1f} GiB of RAM "
            "available; the engine holds all samples at once. Pass samples=N to evaluate a "
            "random subset (e.g. samples=10000; it is drawn before anything is read, and each "
            "point gets its standard error), or a torch.utils.data.Subset of your dataset.")


def check_finite(x: Tensor, y: Tensor) -> None:
    """Refuse data with NaN or infinite values, naming where they are.

    Otherwise every grid point would come out NaN and look like a diverging model.

    Raises:
        ValueError: If the inputs or the targets hold a non-finite value.

    Example:
        >>> check_finite(torch.tensor([[0.0, float("nan")]]), torch.tensor([1]))
        Traceback (most recent call last):
        ...
        ValueError: the inputs hold 1 NaN/inf value(s), the first in sample 0; ...
    """
    for name, t in (("inputs", x), ("targets", y)):
        if not (torch.is_floating_point(t) or torch.is_complex(t)):
            continue
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            rows = bad.reshape(t.shape[0], -1).any(1)
            first = int(rows.nonzero()[0, 0])
            raise ValueError(
                f"the {name} hold {int(bad.sum())} NaN/inf value(s), the first in sample "
                f"{first}; every point of the landscape would be NaN. Clean the data first "
                f"(drop those samples, or torch.nan_to_num)."
            )


def is_data_fn(data) -> bool:
    """Whether ``data`` is a zero-argument callable that returns the data (a ``data_fn``).

    Datasets, loaders and modules (a model passed as data by mistake) never count as one.

    Returns:
        ``True`` if ``data`` is callable and not a ``Dataset``, ``DataLoader``, tensor,
        tuple, list or ``nn.Module``; then :func:`as_tensors` calls it to get the data.

    Example:
        >>> x, y = torch.zeros(2, 1), torch.zeros(2)
        >>> is_data_fn(lambda: (x, y)), is_data_fn((x, y)), is_data_fn(torch.nn.Linear(1, 1))
        (True, False, False)
    """
    kinds = (Dataset, DataLoader, Tensor, tuple, list, torch.nn.Module)
    return callable(data) and not isinstance(data, kinds)


def as_tensors(data, seed: int | None = None) -> tuple[Tensor, Tensor]:
    """Collect ``data`` into one ``(inputs, targets)`` pair of tensors.

    Args:
        data: An ``(inputs, targets)`` pair of tensors (or arrays), a map-style ``Dataset``
            of ``(input, target)`` items, or a ``DataLoader``. A loader is iterated once;
            random augmentation or shuffling is frozen at that pass, so every grid point is
            evaluated on exactly the same samples. A zero-argument callable returning one
            of these (a ``data_fn``) is called here, once per call; it lets the workers of
            an executor load the data themselves (see ``core/distributed.py``).
        seed: If given, the data is read under a private RNG seeded with it: a shuffling
            loader then gives the same order on every call, and the caller's RNG is not
            consumed. ``None`` reads with the global RNG.

    Returns:
        ``(inputs, targets)`` with the samples along dim 0 (not yet moved to a device).

    Raises:
        TypeError: If the data is of an unsupported form.
        ValueError: If it holds no samples, or inputs and targets disagree in length.
    """
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return as_tensors(data)
    if is_data_fn(data):
        loaded = data()
        if is_data_fn(loaded):
            raise TypeError("data_fn returned another callable; it must return the data itself.")
        return as_tensors(loaded)
    if isinstance(data, DataLoader):
        x, y = _collect(data, "the DataLoader")
    elif isinstance(data, Dataset):
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError as err:
            raise TypeError(
                "An iterable Dataset has no length; wrap it in a DataLoader instead."
            ) from err
        if n == 0:
            raise ValueError("The Dataset is empty; pass data with at least one sample.")
        x, y = _collect(DataLoader(data, batch_size=min(n, 4096), shuffle=False),
                        "the Dataset")
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = _as_pair(data, "data")
    else:
        raise TypeError(
            f"data must be an (inputs, targets) pair of tensors, a Dataset, a DataLoader or a "
            f"zero-argument function returning one; got {type(data).__name__}."
            + _dict_hint(data)
        )
    if x.is_inference() or y.is_inference():
        # Made under torch.inference_mode(): they could never be saved for backward (Hessian
        # products) nor have a version counter read. A normal copy.
        with torch.inference_mode(False):
            x, y = x.clone(), y.clone()
    if x.dim() == 0 or y.dim() == 0:
        raise ValueError("inputs and targets need a sample dimension (dim 0).")
    if x.shape[0] == 0:
        raise ValueError("data is empty (0 samples); pass at least one sample.")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"inputs have {x.shape[0]} samples but targets have {y.shape[0]}; "
            "they must match along dim 0."
        )
    return x, y


def sample_inputs(data, n: int = 64) -> Tensor:
    """The inputs of the first ``n`` samples of ``data`` (any form :func:`as_tensors` takes).

    Reads no more than it needs: a ``DataLoader`` gives its first batch, a ``Dataset`` its
    first ``n`` items; only a ``data_fn`` is called whole.

    Returns:
        The inputs of the first ``min(n, number of samples)`` samples, samples along dim 0
        (for a ``DataLoader``: of its first batch only, so fewer if that batch is smaller).

    Raises:
        ValueError: If a ``DataLoader`` yields no batches, or (through :func:`as_tensors`)
            the data holds no samples or its inputs and targets differ in length.
        TypeError: If the data is of an unsupported form or yields no ``(input, target)``
            pairs (see :func:`as_tensors`).

    Example:
        >>> x = torch.arange(20.0).reshape(10, 2)
        >>> torch.equal(sample_inputs((x, torch.zeros(10)), n=3), x[:3])
        True
    """
    if is_data_fn(data):
        return sample_inputs(data(), n)
    if isinstance(data, DataLoader):
        for batch in data:
            return _as_pair(batch, "the DataLoader")[0][:n]
        raise ValueError("The DataLoader yielded no batches; pass data with at least one sample.")
    if isinstance(data, Dataset):
        k = min(n, len(data))  # type: ignore[arg-type]
        return as_tensors(torch.utils.data.Subset(data, range(k)))[0]
    return as_tensors(data)[0][:n]
