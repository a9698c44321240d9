"""What a ``torch.fx`` node says, for the permutation groups of :mod:`._permutation_groups`.

Plain readers of one node: the nodes it reads (at any depth of its arguments), the dims it
reduces over, its name and how to name it in a message, and whether it is a flatten that
keeps units along dim 1 or a broadcast that appends size-1 dims after them. They hold no
state and decide nothing: what a permutation can follow is decided in
:mod:`._permutation_groups` (its tables of per-unit and elementwise operations).
"""

from __future__ import annotations

import operator

import torch


def node_args(node) -> list:
    """The nodes ``node`` reads, at any depth of its arguments.

    A model returning a dict (``{"logits": ..., "hidden": h}``) has its outputs inside one;
    read only one level deep, ``h`` was taken for a hidden tensor and permuted, and the
    model's output changed.

    Returns:
        The argument nodes, in the order of the arguments.
    """
    from torch.fx.node import map_arg

    found: list = []
    map_arg((node.args, node.kwargs), found.append)
    return found


def dims_of(node) -> tuple[int, ...] | None:
    """The ``dim`` argument of a reduction as a tuple (``None``: all dims)."""
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if dim is None:
        return None
    return tuple(dim) if isinstance(dim, (tuple, list)) else (int(dim),)


def describe(node, modules: dict) -> str:
    """How a message names the node: a module with its class, an input or an operation."""
    if node.op == "call_module":
        return f"module {node.target!r} ({type(modules[node.target]).__name__})"
    if node.op == "placeholder":
        return f"the input {node.name!r}"
    return f"operation {node.name!r}"


def name_of(node) -> str:
    """The node's target as a name (a module path, a method name or a function's name)."""
    if isinstance(node.target, str):
        return node.target
    return getattr(node.target, "__name__", str(node.target))


def flattens(node) -> bool | None:
    """Whether a flatten/view/reshape keeps units along dim 1 (``None``: not such a call)."""
    name = name_of(node)
    if node.target is torch.flatten or name == "flatten":
        start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
        end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
        return start == 1 and end == -1
    if node.op == "call_method" and name in ("view", "reshape"):
        shape = node.args[1:]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return len(shape) == 2 and shape[1] == -1  # x.view(x.size(0), -1)
    return None


def added_trailing_dims(node) -> int | None:
    """How many dims ``g[:, :, None, None]`` or ``g.unsqueeze(-1)`` add after dims 0 and 1.

    ``None`` if the node is no such call (slicing, indexing, an unsqueeze in front).

    Returns:
        The number of trailing size-1 dims the node appends after the batch and unit dims, or
        ``None`` if the node is not such a broadcast (so units cannot be followed through it).
    """
    name = name_of(node)
    if node.target is operator.getitem and isinstance(node.args[1], tuple):
        index = node.args[1]
        full = slice(None, None, None)
        if (len(index) >= 2 and index[0] == full and index[1] == full
                and all(i is None or i == full for i in index[2:])):
            return sum(i is None for i in index[2:])
        return None
    if name == "unsqueeze" or node.target is torch.unsqueeze:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        return 1 if isinstance(dim, int) and (dim >= 2 or dim == -1) else None
    return None
