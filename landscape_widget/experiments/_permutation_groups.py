"""Permutation groups of a model's units, read from its ``torch.fx`` graph by union-find.

The analysis behind :func:`~landscape_widget.permutation_direction` (see its module):
every Linear/Conv layer's outputs start a group; elementwise sums and products merge the
groups of their operands; a layer called twice or a weight tied between layers merges the
groups it touches; the model's inputs and outputs belong to the fixed group
:data:`FIXED`; an operation no permutation can follow pins its inputs to :data:`FIXED`.
The result is a :class:`Plan`: which tensors each group permutes, along which axis.

Where the units lie is tracked too (:class:`_Units`): a convolution's channels are dim 1 of
a tensor of known rank, a Linear layer's outputs the last dim of a tensor of unknown rank
(dim 1 only for 2-D inputs). So a flatten of Linear outputs over a sequence interleaves the
units, a Linear layer over a conv output's length does not read its channels, and a mean
over the last dim averages the units: each is followed or pinned accordingly, never guessed.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.fx_trace import symbolic_trace
from ._fx_nodes import added_trailing_dims, describe, dims_of, flattens, name_of, node_args

MIXING = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
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
}
# Elementwise in two tensors: both operands must carry the same permutation.
_ELEMENTWISE = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
                operator.isub, operator.imul, torch.add, torch.sub, torch.mul, torch.div}
_PER_UNIT_METHODS = {"relu", "relu_", "tanh", "sigmoid", "contiguous", "float", "clone"}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_PER_UNIT_PREFIX = ("relu", "leaky_relu", "elu", "gelu", "silu")  # in-place variants: relu_
_REDUCTIONS = {"mean", "sum", "amax", "amin"}  # over spatial dims only (global pooling)
_SIZES = {"size", "dim"}  # tensor metadata: plain numbers, carry no units
HELP = ("permutation_direction permutes the units of Linear/Conv1d-3d layers (ungrouped or "
         "depthwise) through BatchNorm, elementwise activations, dropout, pooling, flatten, "
         "spatial means and residual additions; other operations keep their inputs in place")
FIXED = 0  # the group of the model's inputs and outputs: never permuted
_SCALAR = "scalar"  # state of a node that is a number (x.size(0)), not a tensor with units


class _Units:
    """Which permutation group a tensor's units belong to, and where they lie in it.

    ``axis`` is ``"first"`` (dim 1 of a tensor of known ``rank`` > 2: a convolution's
    channels), ``"last"`` (the last dim of a tensor of unknown rank: a Linear layer's
    outputs, which are dim 1 only for a 2-D input) or ``"both"`` (a 2-D tensor). After a
    flatten, ``flat`` says how each unit's ``k`` features lie: ``"blocks"`` (unit-major,
    ``c * k + j``: a channel's ``H x W`` positions) or ``"interleaved"`` (unit-minor,
    ``j * C + c``: a Linear layer's outputs at every position of a sequence); ``k`` is
    learnt from the next layer.
    """

    def __init__(self, group: int, axis: str = "last", rank: int | None = None,
                 flat: str | None = None):
        self.group = group
        self.axis = axis
        self.rank = 2 if axis == "both" else rank
        self.flat = flat

    def flattened(self) -> _Units:
        if self.flat:
            return self
        return _Units(self.group, "both", 2, "interleaved" if self.axis == "last" else "blocks")

    def same_place(self, other: _Units) -> bool:
        """Whether an elementwise op of the two tensors lines up their units."""
        if self.flat != other.flat:
            return False
        if self.axis == other.axis:
            return self.axis != "first" or self.rank == other.rank
        return {self.axis, other.axis} == {"last", "both"}


class _Groups:
    """Union-find over permutation groups; group :data:`FIXED` is the identity."""

    def __init__(self):
        self.parent = [FIXED]

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:  # the smaller id wins, so FIXED absorbs whatever joins it
            self.parent[max(a, b)] = min(a, b)


def trace(model: nn.Module):
    try:
        return symbolic_trace(model)  # one trace at a time (see core.fx_trace.FX_LOCK)
    except Exception as err:  # noqa: BLE001 - fx raises many types; all mean "cannot follow"
        raise ValueError(f"permutation_direction could not trace the model with torch.fx "
                         f"({type(err).__name__}: {err}); {HELP}.") from err


class Plan:
    """What the graph says: groups, and which tensors each group permutes along which axis."""

    def __init__(self, model: nn.Module, traced):
        self.modules = dict(traced.named_modules())
        self.groups = _Groups()
        self.size: dict[int, int] = {}  # group of a layer's outputs -> its number of units
        # tensor key -> (group of its dim 0, how a unit's entries lie after a flatten)
        self.rows: dict[str, tuple[int, str | None]] = {}
        self.cols: dict[str, _Units] = {}  # weight key -> units of its dim 1 (inputs)
        self.out: dict[str, int] = {}  # weight key -> group of the layer's outputs
        # A tied tensor appears in named_parameters() once: its first name is its key.
        self.key = {}
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t is not None:
                self.key.setdefault(id(t), name)
        self.model = model
        self.pins: list[str] = []  # the operations that pinned their inputs, for errors
        self.pinned_keys: set[str] = set()  # tensors read where they cannot be permuted
        self.layers: set[str] = set()  # the weights of every Linear/Conv layer, pinned or not

    def _key(self, module: nn.Module, attr: str) -> str | None:
        t = getattr(module, attr, None)
        return None if t is None else self.key[id(t)]

    def row(self, key: str | None, group: int, flat: str | None = None) -> None:
        if key is None:
            return
        if key in self.rows:  # a shared module or a tied tensor: one permutation for all uses
            self.groups.union(self.rows[key][0], group)
            if self.rows[key][1] != flat:
                self.groups.union(group, FIXED)
        else:
            self.rows[key] = (group, flat)

    def mixing(self, node, m: nn.Module, units: _Units) -> _Units:
        w = self._key(m, "weight")
        self.layers.add(w)
        groups = getattr(m, "groups", 1)
        conv = not isinstance(m, nn.Linear)
        depthwise = groups == m.weight.shape[0] == getattr(m, "in_channels", 0) > 1
        out = (_Units(0, "first", m.weight.dim()) if conv  # (N, C, *spatial)
               else _Units(0, "both" if units.axis == "both" else "last"))
        if groups != 1 and not depthwise or depthwise and units.axis != "first":
            self.pinned_keys.update(self._keys_under(node.target))
            return self.pin(node, [units], f"a convolution in {groups} groups", always=True)
        if units.axis == ("last" if conv else "first"):
            # A conv mixes dim 1, a Linear layer the last dim: here not the units' dim.
            units = self.pin(node, [units], "mixes another dim than its input's units")
        if w not in self.out:
            self.out[w] = self.groups.new()
            self.size[self.out[w]] = m.weight.shape[0]
        group = self.out[w]
        if depthwise:  # output channel i sees input channel i alone: one permutation for both
            self.groups.union(group, units.group)
        elif w in self.cols:
            if self.cols[w].flat != units.flat:  # called on flattened and unflattened inputs
                self.groups.union(self.cols[w].group, FIXED)
                self.groups.union(units.group, FIXED)
            self.groups.union(self.cols[w].group, units.group)
        else:
            self.cols[w] = units
        self.row(w, group)
        # QAT: a per-channel weight fake-quantiser keeps a scale and statistics per output
        # unit, which must move with the unit's weights (else the check saw another
        # function). Integer zero points cannot be moved; symmetric ones are all 0.
        fq = getattr(m, "weight_fake_quant", None)
        if isinstance(fq, nn.Module) and getattr(fq, "ch_axis", None) == 0:
            for b in fq.buffers():
                if b.is_floating_point() and b.dim() == 1 and b.numel() == m.weight.shape[0] > 1:
                    self.row(self.key.get(id(b)), group)
        self.row(self._key(m, "bias"), group)
        out.group = group
        return out

    def per_unit_tensors(self, m: nn.Module, units: _Units) -> None:
        """BatchNorm's scale, shift and statistics, PReLU's slopes: one entry per unit.

        They act on dim 1. After a Linear layer (``axis="last"``) that is the units' dim
        for the usual 2-D input; a BatchNorm1d over the time steps of a ``(N, T, C)``
        tensor with ``T == C`` would be mistaken for one over the units. After a flatten a
        BatchNorm1d has an entry per feature: the entries move in blocks.
        """
        names = ("weight", "bias", "running_mean", "running_var")
        if isinstance(m, nn.PReLU):
            names = ("weight",) if m.num_parameters > 1 else ()
        for k in (self._key(m, n) for n in names):
            self.row(k, units.group, units.flat)

    def pin(self, node, units: list[_Units], why: str, always: bool = False) -> _Units:
        """An operation no permutation can follow: its inputs and output stay unpermuted.

        Sound for any deterministic operation: if nothing that flows into it moved, it
        computes what it computed before, and whatever reads its output sees the old values.

        Returns:
            The units of the operation's output: the fixed (never permuted) group.
        """
        moved = [u for u in units if self.groups.find(u.group) != FIXED]
        for u in units:
            self.groups.union(u.group, FIXED)
        if (moved or always) and len(self.pins) < 50:  # say why, unless nothing changed
            self.pins.append(f"{describe(node, self.modules)} ({why})")
        return _Units(FIXED)

    def follow(self, graph) -> None:
        """Pass over the graph: give every tensor its units, merge what must move together."""
        state: dict = {}
        for node in graph.nodes:
            inputs = node_args(node)
            tensors = [a for a in inputs if state.get(a) is not _SCALAR]
            units_in = [state[a] for a in tensors]
            if node.op == "placeholder":
                state[node] = _Units(FIXED)  # its rank is unknown: a Linear's is "last"
                continue
            if node.op == "output":
                for u in units_in:  # the model's outputs stay where they are
                    self.groups.union(u.group, FIXED)
                break
            if node.op == "get_attr":  # a tensor read directly: it never moves
                self.pinned_keys.update(self._keys_under(node.target))
                state[node] = _Units(FIXED)
                continue
            name = name_of(node)
            if (node.target is getattr and node.args[1:2] in (("shape",), ("ndim",))
                    or name in _SIZES or (inputs and not tensors)):
                state[node] = _SCALAR  # x.shape, x.size(0), arithmetic on them: no units
                continue
            if not tensors:
                state[node] = self.pin(node, [], "makes a tensor from nothing")
                continue
            units = units_in[0]
            if node.target in _ELEMENTWISE or name in _ELEMENTWISE_METHODS:
                if len(units_in) > 2 or not units.same_place(units_in[-1]):
                    state[node] = self.pin(node, units_in, "combines tensors of other shapes")
                    continue
                for u in units_in[1:]:  # a residual addition: both sides move alike
                    self.groups.union(units.group, u.group)
                state[node] = units if units.axis != "last" else units_in[-1]
                continue
            if len(tensors) > 1:
                cat = node.target in (torch.cat, torch.stack) or name in ("cat", "concat",
                                                                          "stack")
                state[node] = self.pin(node, units_in, "concatenates tensors" if cat
                                       else "combines several tensors")
                continue
            if node.op == "call_module":
                state[node] = self._module(node, units)
                continue
            flat = flattens(node)
            added = added_trailing_dims(node)
            if flat is not None:
                state[node] = (units.flattened() if flat else
                               self.pin(node, units_in, "reshapes across units"))
            elif name in _REDUCTIONS or node.target in (torch.mean, torch.sum, torch.amax):
                state[node] = self._reduce(node, units)
            elif added is not None:  # g[:, :, None, None]: dims 0 and 1 stay
                state[node] = (_Units(units.group, "first", units.rank + added)
                               if units.axis != "last" and not units.flat
                               else self.pin(node, units_in, "indexes a tensor"))
            elif (node.target in _PER_UNIT_FUNCTIONS or name in _PER_UNIT_METHODS
                  or name.rstrip("_") in _PER_UNIT_PREFIX):
                state[node] = units
            else:
                state[node] = self.pin(node, units_in, f"calls {name!r}")
        # A tensor that is read directly or by a pinned module, and also by a layer that
        # would be permuted (tied weights), must not move either.
        for key in self.pinned_keys:
            if key in self.rows:
                self.groups.union(self.rows[key][0], FIXED)
            if key in self.cols:
                self.groups.union(self.cols[key].group, FIXED)

    def _reduce(self, node, units: _Units) -> _Units:
        """A mean or sum over spatial dims keeps each channel on its own; others pin."""
        dims = dims_of(node)
        if units.axis != "first" or dims is None:
            return self.pin(node, [units], f"reduces over dims {dims}")
        dims = {d % units.rank for d in dims}
        if dims & {0, 1}:
            return self.pin(node, [units], f"reduces over dims {sorted(dims)}")
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        rank = units.rank if keep else units.rank - len(dims)
        return _Units(units.group, "both" if rank == 2 else "first", rank)

    def _keys_under(self, target: str) -> set[str]:
        obj = self.model
        for part in target.split("."):
            obj = getattr(obj, part)
        tensors = [obj] if isinstance(obj, Tensor) else (
            list(obj.parameters()) + list(obj.buffers()) if isinstance(obj, nn.Module) else [])
        return {self.key[id(t)] for t in tensors if id(t) in self.key}

    def _module(self, node, units: _Units) -> _Units:
        m = self.modules[node.target]
        computed = [n for n in ("weight", "bias") if isinstance(getattr(m, n, None), Tensor)
                    and id(getattr(m, n)) not in self.key]
        if computed:
            # Computed by a parametrization (weight_norm, orthogonal, ...): what permuting
            # its rows moves in its sources depends on it (orthogonal: no such move). Pinned.
            self.layers.update([f"{node.target}.weight"] if isinstance(m, MIXING) else [])
            self.pinned_keys.update(self._keys_under(node.target))
            return self.pin(node, [units], f"its {' and '.join(computed)} computed by a "
                            "parametrization", always=True)
        if isinstance(m, MIXING):
            return self.mixing(node, m, units)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, nn.PReLU):
            self.per_unit_tensors(m, units)
            return units
        if isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                return self.pin(node, [units], f"flattens dims {m.start_dim}..{m.end_dim}")
            return units.flattened()
        if isinstance(m, _PER_UNIT_MODULES):
            return units
        self.pinned_keys.update(self._keys_under(node.target))
        return self.pin(node, [units], "mixes units")


