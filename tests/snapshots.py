"""Snapshots of a model's full state, to check that public calls leave it untouched.

Not only ``state_dict``: every tensor a module holds (non-persistent buffers, plain tensor
attributes such as legacy ``weight_norm``'s ``weight``), every other attribute in each
module's ``__dict__`` (values, nested containers, objects by identity and contents), the
forward hooks and the state of hook objects and closures, each module's class (a
parametrization swaps it), ``training`` flags and ``track_running_stats``.
"""

from __future__ import annotations

import enum

import torch
from torch import nn

_STRUCTURAL = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
          "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
          "_forward_hooks_always_called")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes; a sparse tensor's as the bytes of its layout's name, its
    (uncoalesced, as stored) indices and its values."""
    if t.is_quantized:  # int8 data and its scale (viewing them as bytes crashes torch)
        return torch.cat([_bytes(t.int_repr()), _bytes(t.dequantize())])
    if t.layout == torch.sparse_coo:
        parts = [t._indices(), t._values()]
    elif t.layout != torch.strided:
        parts = [t.to_dense()]
    else:
        return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()
    name = torch.tensor(list(str(t.layout).encode()), dtype=torch.uint8)
    return torch.cat([name] + [_bytes(p) for p in parts])


def _freeze(value, depth: int = 0):
    """A comparable copy of ``value``: tensors by class, dtype, shape and bytes, containers
    element by element, functions by identity and closure contents, other objects by
    identity and their ``__dict__``."""
    if depth > 6:
        return ("deep", id(value))
    if isinstance(value, torch.Tensor):
        # type() catches a leaked functorch BatchedTensor wrapper, which has no bytes.
        return ("T", type(value).__name__, value.dtype, tuple(value.shape), str(value.device),
                value.requires_grad, bytes(_bytes(value).numpy()))
    if isinstance(value, nn.Module):
        return ("M", id(value))
    if isinstance(value, (str, bytes, int, float, bool, complex, type(None))):
        return value
    if isinstance(value, (type, enum.Enum, torch.dtype, torch.device)):
        return ("C", id(value))  # classes and constants: by identity
    if isinstance(value, dict):
        return ("D", type(value).__name__,
                tuple((repr(k), _freeze(v, depth + 1)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return ("L", type(value).__name__, tuple(_freeze(v, depth + 1) for v in items))
    if callable(value) and hasattr(value, "__code__"):
        cells = tuple(_freeze(c.cell_contents, depth + 1) for c in value.__closure__ or ()
                      if _filled(c))
        return ("F", id(value), cells)
    state = getattr(value, "__dict__", None)
    return ("O", type(value).__name__, id(value),
            None if state is None else _freeze(dict(state), depth + 1))


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def snapshot(model: nn.Module) -> dict:
    """Everything a public call must leave untouched, copied.

    ``state_dict`` bytes, dtypes and devices; all buffers (non-persistent ones included);
    ``requires_grad`` and ``.grad`` of each parameter; the identity of each parameter
    object; every module's class, ``training`` flag, BatchNorm ``track_running_stats``,
    other attributes and hooks (with their state).
    """
    return {
        # Extra state (get_extra_state: any object) is compared by its contents.
        "state": {k: (_bytes(v), v.dtype, v.device, tuple(v.shape))
                  if isinstance(v, torch.Tensor) else (_freeze(v), "extra", None, None)
                  for k, v in model.state_dict(keep_vars=True).items()},
        "buffers": {k: _freeze(b) for k, b in model.named_buffers(remove_duplicate=False)},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "grad": {k: None if p.grad is None else _bytes(p.grad)
                 for k, p in model.named_parameters()},
        "ids": {k: id(p) for k, p in model.named_parameters()},
        "classes": [(name, type(m)) for name, m in model.named_modules()],
        "training": [(name, m.training) for name, m in model.named_modules()],
        "track": [(name, getattr(m, "track_running_stats", None))
                  for name, m in model.named_modules()],
        "hooks": [(name, len(m._forward_hooks), len(m._forward_pre_hooks))
                  for name, m in model.named_modules()],
        "hook_state": [(name, attr, _freeze(dict(getattr(m, attr, {}))))
                       for name, m in model.named_modules() for attr in _HOOKS],
        "attributes": [(name, k, _freeze(v)) for name, m in model.named_modules()
                       for k, v in sorted(vars(m).items())
                       if k not in _STRUCTURAL and k not in _HOOKS],
        "attribute_names": [(name, sorted(vars(m))) for name, m in model.named_modules()],
    }


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for k, (b, dtype, device, shape) in before["state"].items():
        a, a_dtype, a_device, a_shape = after["state"][k]
        assert (a_dtype, a_device, a_shape) == (dtype, device, shape), k
        same = torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b
        assert same, f"state_dict[{k!r}] changed"
    for k, g in before["grad"].items():
        a = after["grad"][k]
        assert (a is None) == (g is None) and (g is None or torch.equal(a, g)), f"{k}.grad"
    for key in ("buffers", "requires_grad", "ids", "classes", "training", "track", "hooks",
                "hook_state", "attribute_names"):
        assert after[key] == before[key], key
    for (name, k, b), (_, _, a) in zip(before["attributes"], after["attributes"], strict=True):
        assert a == b, f"attribute {name + '.' if name else ''}{k} changed"
