"""Permutation symmetry: the w-basin direction ``d = pi(theta) - theta`` (PAPERS.md (d) step 2).

Permuting the hidden units of a layer (rows of its weight and bias, the matching columns of
the next layer's weight, and the unit's BatchNorm entries) gives another point of
parameter space that computes exactly the same function. The segment from ``theta`` to
``pi(theta)`` therefore has the same loss at both ends and, in between, usually a barrier:
a two-minima "w-basin" curve with the model at one minimum.

The model's dataflow is read with ``torch.fx``, so any feed-forward chain works whatever its
module nesting (``nn.Sequential`` or a custom ``forward``), and anything the permutation
cannot follow (a skip connection, a concatenation, a grouped convolution, a layer norm) is
refused with an error naming the node.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.params import Params, check_direction, check_module, float_buffers_of, parameters_of

_MIXING = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PER_UNIT_MODULES = (
    # Act on each unit (feature or channel) separately, so they commute with a permutation.
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish,
    nn.Hardsigmoid, nn.LogSigmoid, nn.Tanhshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_PER_UNIT_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.softplus, F.hardtanh, F.hardswish,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    operator.mul, operator.truediv, operator.add, operator.sub, torch.mul, torch.add,
}
_PER_UNIT_METHODS = {"relu", "tanh", "sigmoid", "contiguous", "mul", "add", "sub", "div",
                     "float", "clone"}
_PER_UNIT_PREFIX = ("relu", "leaky_relu", "elu", "gelu", "silu")  # in-place variants: relu_
_REDUCTIONS = {"mean", "sum", "amax", "amin"}  # over spatial dims only (global pooling)
_HELP = ("permutation_direction supports feed-forward chains of Linear/Conv1d-3d layers, "
         "BatchNorm, elementwise activations, dropout, pooling and flatten")


class _Units:
    """The permutation carried by a tensor: ``perm`` of its ``C`` units along dim 1.

    After a flatten, each unit is a block of ``k`` consecutive features (a channel's
    ``H x W`` positions in row-major order); ``k`` is learnt from the next layer's width.
    """

    def __init__(self, perm: Tensor, flat: bool = False):
        self.perm = perm
        self.flat = flat

    def index(self, size: int, where: str) -> Tensor:
        c = self.perm.numel()
        if not self.flat:
            if size != c:
                raise ValueError(f"{where} expects {size} features but its input has {c} units.")
            return self.perm
        if size % c:
            raise ValueError(f"{where} has {size} input features, not a multiple of the {c} "
                             "channels flattened into it.")
        k = size // c
        return (self.perm[:, None] * k + torch.arange(k)).reshape(-1)


def _derangement(n: int, gen: torch.Generator) -> Tensor:
    """A uniform random permutation of ``n`` items that moves every item (``n >= 2``).

    Every unit moves, so ``d`` is non-zero on every hidden row; about ``1/e`` of the draws
    qualify, so the expected number of draws is under 3.
    """
    while True:
        p = torch.randperm(n, generator=gen)
        if not bool((p == torch.arange(n)).any()):
            return p


def _node_args(node) -> list:
    from torch.fx import Node

    found = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, Node):
            found.append(a)
        elif isinstance(a, (tuple, list)):
            found.extend(x for x in a if isinstance(x, Node))
    return found


def _dims_of(node) -> tuple[int, ...] | None:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if dim is None:
        return None
    return tuple(dim) if isinstance(dim, (tuple, list)) else (int(dim),)


def _trace(model: nn.Module):
    import torch.fx

    try:
        return torch.fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001 - fx raises many types; all mean "not a chain"
        raise ValueError(f"permutation_direction could not trace the model with torch.fx "
                         f"({type(err).__name__}: {err}); {_HELP}.") from err


def _describe(node, modules: dict) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(modules[node.target]).__name__})"
    if node.op == "placeholder":
        return f"the input {node.name!r}"
    return f"operation {node.name!r}"


def _check_chain(graph, modules: dict) -> None:
    """Every tensor must feed exactly one operation: a fork means a skip connection."""
    for node in graph.nodes:
        if node.op == "output":
            continue
        users = list(node.users)
        if len(users) > 1:
            names = ", ".join(_describe(u, modules) for u in users)
            raise ValueError(f"the output of {_describe(node, modules)} feeds {len(users)} "
                             f"operations ({names}): the model has a skip/residual connection or a "
                             f"branch, which a permutation of hidden units cannot follow; "
                             f"{_HELP}.")


def permutation_direction(model: nn.Module, *, seed: int = 0, buffers: bool = True) -> Params:
    """The w-basin direction ``d = pi(theta) - theta`` for a random hidden-unit permutation.

    Every hidden layer (the outputs of each Linear/Conv layer except the last) gets its own
    random derangement (every unit moves); inputs and outputs stay fixed. Biases and
    BatchNorm scale, shift and running statistics move with their units, so
    ``theta + 1 * d`` computes the same function as ``theta`` on every input (to float
    rounding), and both ends of ``lw.compute_curve(model, data, direction=d,
    x=(-0.5, 1.5, 41))`` have the same loss.

    BatchNorm: with ``buffers=True`` (default) ``d`` also holds every floating-point buffer
    (zero where nothing moves), as :func:`~landscape_widget.interpolation_direction` does,
    so the engine moves the running statistics along with the weights; without them the
    endpoint would normalise permuted channels with unpermuted statistics and be a
    different function. Interpolated running variances stay positive on ``0 <= alpha <= 1``;
    far outside it they may turn negative, giving NaN losses there.

    Args:
        model: A feed-forward chain (not modified): Linear/Conv1d-3d layers (ungrouped),
            BatchNorm, elementwise activations, dropout, pooling, flatten, spatial means.
        seed: Seed of the permutations (a private generator; the global RNG is untouched).
        buffers: Include the floating-point buffers (see above).

    Returns:
        ``dict[str, Tensor]`` keyed like ``model.named_parameters()`` (plus float buffers),
        each tensor on its parameter's device and dtype.

    Raises:
        ValueError: If the model has a skip connection, a branch, a shared layer, an
            unsupported layer, or fewer than two weight layers (nothing hidden to permute),
            or if every hidden layer has a single unit.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
        >>> d = permutation_direction(net, seed=0)
        >>> x = torch.randn(3, 4)
        >>> end = {k: p + d[k] for k, p in net.named_parameters()}
        >>> torch.allclose(torch.func.functional_call(net, end, (x,)), net(x), atol=1e-6)
        True
    """
    check_module(model)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
    if isinstance(model, _MIXING):
        raise ValueError(f"the model is a single {type(model).__name__} layer: a permutation "
                         "needs at least one hidden layer between two weight layers.")
    traced = _trace(model)
    graph = traced.graph
    modules = dict(traced.named_modules())
    _check_chain(graph, modules)
    mixing = [n for n in graph.nodes if n.op == "call_module" and isinstance(
        modules[n.target], _MIXING)]
    targets = [n.target for n in graph.nodes if n.op == "call_module"]
    shared = sorted({t for t in targets if targets.count(t) > 1})
    if shared:
        raise ValueError(f"module(s) {shared} are called more than once (shared weights); "
                         "their units cannot be permuted consistently.")
    if len(mixing) < 2:
        raise ValueError(f"the model has {len(mixing)} Linear/Conv layer(s): a permutation "
                         "needs at least one hidden layer between two weight layers.")

    params = parameters_of(model)
    bufs = float_buffers_of(model)
    new = {k: v.clone() for k, v in {**params, **bufs}.items()}
    gen = torch.Generator().manual_seed(seed)
    state: dict = {}
    moved = 0
    for node in graph.nodes:
        inputs = _node_args(node)
        units = state.get(inputs[0]) if inputs else None
        where = _describe(node, modules)
        if node.op == "placeholder":
            state[node] = None
            continue
        if node.op == "output":
            break
        if node.op == "get_attr":
            raise ValueError(f"{where} reads the tensor {node.target!r} directly; "
                             f"{_HELP} (layers as modules).")
        if len(inputs) > 1:
            raise ValueError(f"{where} ({node.target}) combines several tensors "
                             f"(a skip connection or concatenation?); {_HELP}.")
        if node.op == "call_module":
            m = modules[node.target]
            prefix = f"{node.target}." if node.target else ""
            where = f"module {node.target!r} ({type(m).__name__})"
            if isinstance(m, _MIXING):
                if getattr(m, "groups", 1) != 1:
                    raise ValueError(f"{where} is a grouped convolution; {_HELP}.")
                w = prefix + "weight"
                if units is not None:
                    idx = units.index(new[w].shape[1], where).to(new[w].device)
                    new[w] = new[w][:, idx]
                if node is mixing[-1]:
                    state[node] = None
                    continue
                n_out = new[w].shape[0]
                perm = _derangement(n_out, gen) if n_out > 1 else torch.zeros(1, dtype=torch.long)
                moved += n_out > 1
                new[w] = new[w][perm.to(new[w].device)]
                if prefix + "bias" in new:
                    new[prefix + "bias"] = new[prefix + "bias"][perm.to(new[w].device)]
                state[node] = _Units(perm)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                if units is not None:
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        key = prefix + name
                        if key in new:
                            idx = units.index(new[key].shape[0], where).to(new[key].device)
                            new[key] = new[key][idx]
                state[node] = units
            elif isinstance(m, nn.Flatten):
                if m.start_dim != 1 or m.end_dim != -1:
                    raise ValueError(f"{where} flattens dims {m.start_dim}..{m.end_dim}; only "
                                     "Flatten(start_dim=1) keeps the units along dim 1.")
                state[node] = None if units is None else _Units(units.perm, True)
            elif isinstance(m, nn.PReLU) and m.num_parameters > 1:
                raise ValueError(f"{where} has a slope per channel; {_HELP}.")
            elif isinstance(m, _PER_UNIT_MODULES):
                state[node] = units
            else:
                raise ValueError(f"{where} is not supported; {_HELP}.")
            continue
        name = node.target if isinstance(node.target, str) else getattr(
            node.target, "__name__", str(node.target))
        if node.target in (torch.flatten,) or name == "flatten":
            start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
            end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
            if start != 1 or end != -1:
                raise ValueError(f"{where} flattens dims {start}..{end}; only flatten(x, 1) "
                                 "keeps the units along dim 1.")
            state[node] = None if units is None else _Units(units.perm, True)
        elif name in _REDUCTIONS or node.target in (torch.mean, torch.sum, torch.amax):
            dims = _dims_of(node)
            if dims is None or any(d in (0, 1) for d in dims) or (units is not None
                                                                   and units.flat):
                raise ValueError(f"{where} reduces over dims {dims}; only reductions over "
                                 "spatial dims (2 and up, e.g. x.mean((2, 3))) are supported.")
            state[node] = units
        elif (node.target in _PER_UNIT_FUNCTIONS or name in _PER_UNIT_METHODS
              or name.rstrip("_") in _PER_UNIT_PREFIX):
            state[node] = units
        else:
            raise ValueError(f"{where} calls {name!r}, which is not supported; {_HELP}.")
    if not moved:
        raise ValueError("every hidden layer has a single unit: there is nothing to permute.")
    keys = list(params) + (list(bufs) if buffers else [])
    d = {k: new[k] - ({**params, **bufs})[k] for k in keys}
    check_direction(model, d)
    return d
