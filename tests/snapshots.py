"""Snapshots of a model's full state, to check that public calls leave it untouched."""

from __future__ import annotations

import torch
from torch import nn


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()


def snapshot(model: nn.Module) -> dict:
    """Everything a public call must leave untouched, copied.

    ``state_dict`` bytes, dtypes and devices; ``requires_grad`` and ``.grad`` of each
    parameter; the identity of each parameter object; every module's ``training`` flag,
    BatchNorm ``track_running_stats`` and the number of hooks.
    """
    return {
        "state": {k: (_bytes(v), v.dtype, v.device, tuple(v.shape))
                  for k, v in model.state_dict(keep_vars=True).items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "grad": {k: None if p.grad is None else _bytes(p.grad)
                 for k, p in model.named_parameters()},
        "ids": {k: id(p) for k, p in model.named_parameters()},
        "training": [(name, m.training) for name, m in model.named_modules()],
        "track": [(name, getattr(m, "track_running_stats", None))
                  for name, m in model.named_modules()],
        "hooks": [(name, len(m._forward_hooks), len(m._forward_pre_hooks))
                  for name, m in model.named_modules()],
    }


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for k, (b, dtype, device, shape) in before["state"].items():
        a, a_dtype, a_device, a_shape = after["state"][k]
        assert (a_dtype, a_device, a_shape) == (dtype, device, shape), k
        assert torch.equal(a, b), f"state_dict[{k!r}] changed"
    for k, g in before["grad"].items():
        a = after["grad"][k]
        assert (a is None) == (g is None) and (g is None or torch.equal(a, g)), f"{k}.grad"
    for key in ("requires_grad", "ids", "training", "track", "hooks"):
        assert after[key] == before[key], key
