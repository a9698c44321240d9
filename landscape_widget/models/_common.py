"""Helpers shared by the model zoo: argument checks, seeded construction, layer factories."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def check_int(value, name: str, low: int = 1) -> int:
    """``value`` if it is an int ``>= low``, else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
    return value


def check_dims(dims) -> int:
    """``dims`` if it is 1 (signals such as MNIST-1D) or 2 (images)."""
    if dims not in (1, 2) or isinstance(dims, bool):
        raise ValueError(f"dims must be 1 (signals, e.g. MNIST-1D) or 2 (images), got {dims!r}.")
    return int(dims)


def layers(dims: int) -> tuple[type, type, Callable[[int], nn.Module]]:
    """``(Conv, BatchNorm, adaptive_avg_pool)`` classes for 1-D or 2-D inputs."""
    if dims == 1:
        return nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d
    return nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d


def seeded(build: Callable[[], nn.Module], seed: int | None) -> nn.Module:
    """Build a module with its initial weights drawn from ``seed`` (global RNG untouched)."""
    if seed is None:
        return build()
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int or None, got {seed!r}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tracing(x) -> bool:
    """Whether ``x`` is a ``torch.fx`` proxy.

    Input checks are skipped while tracing: a proxy has no concrete shape, and the
    permutation tools trace the zoo's models.

    Returns:
        ``True`` if ``x`` is a ``torch.fx.Proxy`` (the model is being traced), else ``False``.
    """
    import torch.fx

    return isinstance(x, torch.fx.Proxy)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (buffers such as BatchNorm running statistics excluded).

    Returns:
        The sum of ``numel()`` over ``model.parameters()``.

    Example:
        >>> count_parameters(nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in model.parameters())
