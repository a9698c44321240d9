"""Small offline data sets for tutorials, tests and benchmarks.

Nothing here downloads anything:

- :func:`digits` and :func:`digits_images` read scikit-learn's copy of the UCI
  handwritten digits (1797 images of 8x8 pixels, shipped inside scikit-learn).
- :func:`mnist1d` *generates* MNIST-1D locally with the ``mnist1d`` package
  (``pip install mnist1d``); it never calls that package's downloading loader.
- :func:`synthetic_classification` draws Gaussian class clusters from a seed.

Every function is deterministic for a given seed and leaves the global random number
generators of Python, NumPy and torch as they were.

Example:
    >>> X, y = digits("train")
    >>> tuple(X.shape), X.dtype, y.dtype
    ((1400, 64), torch.float32, torch.int64)
"""

from __future__ import annotations

import random
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

SPLITS = ("train", "test", "all")
DIGITS_SAMPLES = 1797
"""Number of images in scikit-learn's digits data set."""


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not supported; choose one of {list(SPLITS)}.")


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


@lru_cache(maxsize=8)
def _digits_split(seed: int, test_size: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    _, y = _digits_arrays()
    idx = np.arange(y.size)
    train_idx, test_idx = train_test_split(
        idx, test_size=test_size, random_state=seed, shuffle=True, stratify=y
    )
    return np.sort(train_idx), np.sort(test_idx)


def digits(split: str = "train", seed: int = 0, test_size: int = 397) -> tuple[Tensor, Tensor]:
    """scikit-learn's handwritten digits as flat vectors, split into train and test.

    The split is stratified by class and fixed by ``seed``; with the defaults it has
    1400 training and 397 test images. Pixel values (0..16) are divided by 16.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"`` (all 1797 images, in the file's order).
        seed: Seed of the train/test split.
        test_size: Number of test images (1 to 1796).

    Returns:
        ``(X, y)``: ``X`` is a float32 tensor of shape ``(N, 64)`` in [0, 1], ``y`` an int64
        tensor of shape ``(N,)`` with labels 0..9. Fresh tensors on every call.

    Raises:
        ValueError: If ``split`` or ``test_size`` is invalid.
        TypeError: If ``test_size`` is not an int.

    Example:
        >>> X, y = digits("test")
        >>> tuple(X.shape), int(y.max())
        ((397, 64), 9)
        >>> from sklearn.datasets import load_digits  # the same pixels and labels, in order
        >>> X, y = digits("all")
        >>> bunch = load_digits()
        >>> torch.equal(X * 16, torch.tensor(bunch.data, dtype=torch.float32)), torch.equal(
        ...     y, torch.tensor(bunch.target))
        (True, True)
    """
    _check_split(split)
    if isinstance(test_size, bool) or not isinstance(test_size, int):
        raise TypeError(f"test_size must be an int, got {type(test_size).__name__}.")
    if not 10 <= test_size <= DIGITS_SAMPLES - 10:
        raise ValueError(
            f"test_size={test_size} is outside [10, {DIGITS_SAMPLES - 10}]; the digits data set "
            f"has {DIGITS_SAMPLES} images (the default 397 leaves 1400 for training)."
        )
    x, y = _digits_arrays()
    if split != "all":
        train_idx, test_idx = _digits_split(int(seed), test_size)
        idx = train_idx if split == "train" else test_idx
        x, y = x[idx], y[idx]
    return torch.tensor(x), torch.tensor(y)


def digits_images(
    split: str = "train", seed: int = 0, test_size: int = 397
) -> tuple[Tensor, Tensor]:
    """Like :func:`digits`, shaped ``(N, 1, 8, 8)`` for convolutional networks.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``.
        seed: Seed of the train/test split.
        test_size: Number of test images.

    Returns:
        ``(X, y)`` with ``X`` float32 of shape ``(N, 1, 8, 8)`` and ``y`` int64 of shape ``(N,)``.

    Example:
        >>> X, y = digits_images("train")
        >>> tuple(X.shape), torch.equal(X.reshape(-1, 64), digits("train")[0])
        ((1400, 1, 8, 8), True)
    """
    x, y = digits(split, seed=seed, test_size=test_size)
    return x.reshape(-1, 1, 8, 8), y


@lru_cache(maxsize=4)
def _mnist1d_arrays(seed: int, num_samples: int, train_split: float) -> dict:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise ImportError(
            "lw.datasets.mnist1d() needs the 'mnist1d' package, which generates the data "
            "locally: pip install mnist1d (or pip install 'landscape_widget[mnist1d]')."
        ) from err
    args = get_dataset_args()
    args.num_samples = num_samples
    args.train_split = train_split
    args.seed = seed
    # make_dataset only generates (get_dataset is the function that may download); it
    # seeds and draws from the global Python and NumPy generators, so keep them as they were.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    out = {
        "x": np.asarray(data["x"], dtype=np.float32),
        "y": np.asarray(data["y"], dtype=np.int64),
        "x_test": np.asarray(data["x_test"], dtype=np.float32),
        "y_test": np.asarray(data["y_test"], dtype=np.int64),
    }
    for v in out.values():
        v.flags.writeable = False
    return out


def mnist1d(
    split: str = "train",
    seed: int = 0,
    num_samples: int = 5000,
    train_split: float = 0.8,
) -> tuple[Tensor, Tensor]:
    """MNIST-1D (Greydanus, 2020): 1D signals of length 40 in 10 classes, generated locally.

    The samples are made by ``mnist1d.data.make_dataset`` on this machine; nothing is
    downloaded. ``seed=42`` with the other defaults gives the data set of the
    ``mnist1d`` package's defaults. Results are cached per argument set.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"`` (train followed by test).
        seed: Seed of the generator.
        num_samples: Total number of samples (train + test), a multiple of 10 (per class).
        train_split: Fraction of the samples that form the training split.

    Returns:
        ``(X, y)``: ``X`` float32 of shape ``(N, 40)`` (standardised), ``y`` int64 ``(N,)``.

    Raises:
        ImportError: If the ``mnist1d`` package is not installed.
        ValueError: If an argument is out of range.

    Example:
        >>> X, y = mnist1d("train", num_samples=100)
        >>> tuple(X.shape), y.dtype
        ((80, 40), torch.int64)
        >>> X, y = mnist1d("all", num_samples=100)  # 10 per class, standardised over all
        >>> torch.bincount(y).tolist()
        [10, 10, 10, 10, 10, 10, 10, 10, 10, 10]
        >>> abs(round(float(X.double().mean()), 4)), round(float(X.double().std(correction=0)), 4)
        (0.0, 1.0)
    """
    _check_split(split)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 20:
        raise ValueError(f"num_samples must be an int >= 20, got {num_samples!r}.")
    if not 0.0 < float(train_split) < 1.0:
        raise ValueError(f"train_split must lie in (0, 1), got {train_split!r}.")
    data = _mnist1d_arrays(int(seed), num_samples, float(train_split))
    if split == "train":
        x, y = data["x"], data["y"]
    elif split == "test":
        x, y = data["x_test"], data["y_test"]
    else:
        x = np.concatenate([data["x"], data["x_test"]])
        y = np.concatenate([data["y"], data["y_test"]])
    return torch.tensor(x), torch.tensor(y)


def synthetic_classification(
    n: int = 1000,
    features: int = 20,
    classes: int = 3,
    seed: int = 0,
    *,
    separation: float = 2.0,
) -> tuple[Tensor, Tensor]:
    """Gaussian clusters, one per class: a small classification problem of any size.

    Class centres are drawn from ``N(0, separation**2 / (2 * features) * I)``, so two
    centres lie about ``separation`` apart in units of the within-class standard
    deviation; each sample is its class centre plus ``N(0, I)`` noise. Labels are balanced
    (``i % classes``, then shuffled).

    Args:
        n: Number of samples.
        features: Input dimension.
        classes: Number of classes (>= 2).
        seed: Seed of a private generator (the global RNG is untouched).
        separation: Distance between class centres relative to the noise.

    Returns:
        ``(X, y)``: float32 ``(n, features)`` and int64 ``(n,)``.

    Raises:
        ValueError: If ``n`` or ``features`` is not an int >= 1, or ``classes`` not an int >= 2.

    Example:
        >>> X, y = synthetic_classification(100, features=5, classes=4, seed=1)
        >>> tuple(X.shape), torch.bincount(y).tolist()  # balanced: i % classes
        ((100, 5), [25, 25, 25, 25])
    """
    for value, name, low in ((n, "n", 1), (features, "features", 1), (classes, "classes", 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
    gen = torch.Generator().manual_seed(int(seed))
    centres = torch.randn(classes, features, generator=gen)
    centres *= float(separation) / float(np.sqrt(2.0 * features))
    y = torch.arange(n) % classes
    y = y[torch.randperm(n, generator=gen)]
    x = centres[y] + torch.randn(n, features, generator=gen)
    return x.float(), y.long()


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
"""Per-channel mean and standard deviation of the CIFAR-10 training images (in [0, 1])."""


def cifar10(
    root,
    split: str = "train",
    *,
    normalize: bool = True,
    limit: int | None = None,
) -> tuple[Tensor, Tensor]:
    """CIFAR-10 read from disk with ``torchvision.datasets.CIFAR10(root, download=False)``.

    Nothing is downloaded: if the files are not under ``root`` the error says how to get
    them. The images are returned as one tensor (50,000 training images take 600 MB as
    float32; ``limit`` keeps the first ``limit``).

    Args:
        root: The folder that holds ``cifar-10-batches-py`` (as torchvision lays it out).
        split: ``"train"`` (50,000 images) or ``"test"`` (10,000).
        normalize: Subtract :data:`CIFAR10_MEAN` and divide by :data:`CIFAR10_STD` per
            channel, as loss-landscape's training does; else values lie in [0, 1].
        limit: Keep only the first ``limit`` images.

    Returns:
        ``(X, y)``: float32 ``(N, 3, 32, 32)`` and int64 ``(N,)``.

    Raises:
        FileNotFoundError: If CIFAR-10 is not under ``root`` (the message names the fix).
        ValueError: If ``split`` or ``limit`` is invalid.

    Example:
        >>> cifar10("/nonexistent")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: CIFAR-10 was not found under '/nonexistent' ...
    """
    from pathlib import Path

    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is not supported for CIFAR-10; choose 'train' or "
                         "'test'.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or an int >= 1, got {limit!r}.")
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=split == "train", download=False)
    except RuntimeError as err:
        folder = Path(root).expanduser() / "cifar-10-batches-py"
        raise FileNotFoundError(
            f"CIFAR-10 was not found under {str(root)!r} (or its files fail torchvision's "
            f"checksums; expected {str(folder)!r}, as "
            "torchvision lays it out). This library never downloads data; fetch it once "
            f"yourself, e.g. torchvision.datasets.CIFAR10({str(root)!r}, download=True), or "
            "unpack cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
            "there. For an offline stand-in use lw.datasets.digits_images()."
        ) from err
    data = np.asarray(ds.data)  # (N, 32, 32, 3) uint8
    targets = np.asarray(ds.targets, dtype=np.int64)
    if limit is not None:
        data, targets = data[:limit], targets[:limit]
    x = torch.from_numpy(data).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    if normalize:
        mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x, torch.from_numpy(targets.copy())


__all__ = [
    "cifar10",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "digits",
    "digits_images",
    "mnist1d",
    "synthetic_classification",
    "SPLITS",
    "DIGITS_SAMPLES",
]
