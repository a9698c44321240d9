"""Permutation symmetry: the w-basin direction ``d = pi(theta) - theta`` (PAPERS.md (d) step 2).

Permuting the hidden units of a layer (rows of its weight and bias, the matching columns of
the next layer's weight, and the unit's BatchNorm entries) gives another point of
parameter space that computes exactly the same function. The segment from ``theta`` to
``pi(theta)`` therefore has the same loss at both ends and, in between, usually a barrier:
a two-minima "w-basin" curve with the model at one minimum.

The model's dataflow is read with ``torch.fx`` and its channels are sorted into
*permutation groups* by union-find, as weight-matching methods (Git Re-Basin's permutation
specs) do: every weight layer's outputs start a group; tensors that are added or
multiplied elementwise (a residual connection, a squeeze-and-excitation gate) must be
permuted alike, so their groups merge; a module called twice or a weight tied between
modules merges the groups it touches. Groups that reach the model's input or output stay
fixed, every other group gets one random permutation. So chains, ResNets (torchvision's
included, with their downsampling shortcuts), shared layers and tied weights all work.
An operation no permutation can follow (a concatenation, a grouped convolution, a layer
norm, a softmax over units, anything unknown) *pins* its inputs: they stay unpermuted,
which is sound for any deterministic operation, and the rest of the model still moves.
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
}
# Elementwise in two tensors: both operands must carry the same permutation.
_ELEMENTWISE = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
                operator.isub, operator.imul, torch.add, torch.sub, torch.mul, torch.div}
_PER_UNIT_METHODS = {"relu", "relu_", "tanh", "sigmoid", "contiguous", "float", "clone"}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_PER_UNIT_PREFIX = ("relu", "leaky_relu", "elu", "gelu", "silu")  # in-place variants: relu_
_REDUCTIONS = {"mean", "sum", "amax", "amin"}  # over spatial dims only (global pooling)
_SIZES = {"size", "dim"}  # tensor metadata: plain numbers, carry no units
_HELP = ("permutation_direction permutes the units of Linear/Conv1d-3d layers (ungrouped or "
         "depthwise) through BatchNorm, elementwise activations, dropout, pooling, flatten, "
         "spatial means and residual additions; other operations keep their inputs in place")
_FIXED = 0  # the group of the model's inputs and outputs: never permuted
_SCALAR = "scalar"  # state of a node that is a number (x.size(0)), not a tensor with units


class _Units:
    """The units a tensor carries along dim 1: permutation group ``group``.

    After a flatten (``flat``), each unit is a block of ``k`` consecutive features (a
    channel's ``H x W`` positions in row-major order); ``k`` is learnt from the next layer.
    """

    def __init__(self, group: int, flat: bool = False):
        self.group = group
        self.flat = flat


class _Groups:
    """Union-find over permutation groups; group :data:`_FIXED` is the identity."""

    def __init__(self):
        self.parent = [_FIXED]

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
        if a != b:  # the smaller id wins, so _FIXED absorbs whatever joins it
            self.parent[max(a, b)] = min(a, b)


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
    except Exception as err:  # noqa: BLE001 - fx raises many types; all mean "cannot follow"
        raise ValueError(f"permutation_direction could not trace the model with torch.fx "
                         f"({type(err).__name__}: {err}); {_HELP}.") from err


def _describe(node, modules: dict) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(modules[node.target]).__name__})"
    if node.op == "placeholder":
        return f"the input {node.name!r}"
    return f"operation {node.name!r}"


def _name_of(node) -> str:
    if isinstance(node.target, str):
        return node.target
    return getattr(node.target, "__name__", str(node.target))


def _flattens(node) -> bool | None:
    """Whether a flatten/view/reshape keeps units along dim 1 (``None``: not such a call)."""
    name = _name_of(node)
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


def _adds_trailing_dims(node) -> bool:
    """``g[:, :, None, None]`` or ``g.unsqueeze(-1)``: dims 0 and 1 stay (a gate's shape)."""
    name = _name_of(node)
    if node.target is operator.getitem and isinstance(node.args[1], tuple):
        index = node.args[1]
        full = slice(None, None, None)
        return (len(index) >= 2 and index[0] == full and index[1] == full
                and all(i is None or i == full for i in index[2:]))
    if name == "unsqueeze" or node.target is torch.unsqueeze:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        return isinstance(dim, int) and (dim >= 2 or dim == -1)
    return False


class _Plan:
    """What the graph says: groups, and which tensors each group permutes along which axis."""

    def __init__(self, model: nn.Module, traced):
        self.modules = dict(traced.named_modules())
        self.groups = _Groups()
        self.size: dict[int, int] = {}  # group of a layer's outputs -> its number of units
        self.rows: dict[str, int] = {}  # tensor key -> group of its dim 0 (units)
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

    def row(self, key: str | None, group: int) -> None:
        if key is None:
            return
        if key in self.rows:  # a shared module or a tied tensor: one permutation for all uses
            self.groups.union(self.rows[key], group)
        else:
            self.rows[key] = group

    def mixing(self, node, m: nn.Module, units: _Units) -> _Units:
        w = self._key(m, "weight")
        self.layers.add(w)
        groups = getattr(m, "groups", 1)
        depthwise = groups == m.weight.shape[0] == getattr(m, "in_channels", 0) > 1
        if groups != 1 and not depthwise or depthwise and units.flat:
            self.pinned_keys.update(self._keys_under(node.target))
            return self.pin(node, [units], f"a convolution in {groups} groups")
        if w not in self.out:
            self.out[w] = self.groups.new()
            self.size[self.out[w]] = m.weight.shape[0]
        group = self.out[w]
        if depthwise:  # output channel i sees input channel i alone: one permutation for both
            self.groups.union(group, units.group)
        elif w in self.cols:
            if self.cols[w].flat != units.flat:  # called on flattened and unflattened inputs
                self.groups.union(self.cols[w].group, _FIXED)
                self.groups.union(units.group, _FIXED)
            self.groups.union(self.cols[w].group, units.group)
        else:
            self.cols[w] = units
        self.row(w, group)
        self.row(self._key(m, "bias"), group)
        return _Units(group)

    def per_unit_tensors(self, m: nn.Module, units: _Units) -> None:
        """BatchNorm's scale, shift and statistics, PReLU's slopes: one entry per unit.

        After a flatten a BatchNorm1d has an entry per feature: the entries move in blocks.
        """
        names = ("weight", "bias", "running_mean", "running_var")
        if isinstance(m, nn.PReLU):
            names = ("weight",) if m.num_parameters > 1 else ()
        for k in (self._key(m, n) for n in names):
            self.row(k, units.group)

    def pin(self, node, units: list[_Units], why: str) -> _Units:
        """An operation no permutation can follow: its inputs and output stay unpermuted.

        Sound for any deterministic operation: if nothing that flows into it moved, it
        computes what it computed before, and whatever reads its output sees the old values.
        """
        for u in units:
            self.groups.union(u.group, _FIXED)
        if len(self.pins) < 50:
            self.pins.append(f"{_describe(node, self.modules)} ({why})")
        return _Units(_FIXED)

    def follow(self, graph) -> None:
        """Pass over the graph: give every tensor its units, merge what must move together."""
        state: dict = {}
        for node in graph.nodes:
            inputs = _node_args(node)
            tensors = [a for a in inputs if state.get(a) is not _SCALAR]
            units_in = [state[a] for a in tensors]
            if node.op == "placeholder":
                state[node] = _Units(_FIXED)
                continue
            if node.op == "output":
                for u in units_in:  # the model's outputs stay where they are
                    self.groups.union(u.group, _FIXED)
                break
            if node.op == "get_attr":  # a tensor read directly: it never moves
                self.pinned_keys.update(self._keys_under(node.target))
                state[node] = _Units(_FIXED)
                continue
            name = _name_of(node)
            if (node.target is getattr and node.args[1:2] in (("shape",), ("ndim",))
                    or name in _SIZES or (inputs and not tensors)):
                state[node] = _SCALAR  # x.shape, x.size(0), arithmetic on them: no units
                continue
            if not tensors:
                state[node] = self.pin(node, [], "makes a tensor from nothing")
                continue
            units = units_in[0]
            if node.target in _ELEMENTWISE or name in _ELEMENTWISE_METHODS:
                if len(units_in) > 2 or len({u.flat for u in units_in}) > 1:
                    state[node] = self.pin(node, units_in, "combines tensors of other shapes")
                    continue
                for u in units_in[1:]:  # a residual addition: both sides move alike
                    self.groups.union(units.group, u.group)
                state[node] = units
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
            flat = _flattens(node)
            if flat is not None:
                state[node] = (_Units(units.group, True) if flat else
                               self.pin(node, units_in, "reshapes across units"))
            elif name in _REDUCTIONS or node.target in (torch.mean, torch.sum, torch.amax):
                dims = _dims_of(node)
                if dims is None or any(d in (0, 1) for d in dims) or units.flat:
                    state[node] = self.pin(node, units_in, f"reduces over dims {dims}")
                else:  # a spatial mean: each channel on its own
                    state[node] = units
            elif (node.target in _PER_UNIT_FUNCTIONS or name in _PER_UNIT_METHODS
                  or name.rstrip("_") in _PER_UNIT_PREFIX or _adds_trailing_dims(node)):
                state[node] = units
            else:
                state[node] = self.pin(node, units_in, f"calls {name!r}")
        # A tensor that is read directly or by a pinned module, and also by a layer that
        # would be permuted (tied weights), must not move either.
        for key in self.pinned_keys:
            if key in self.rows:
                self.groups.union(self.rows[key], _FIXED)
            if key in self.cols:
                self.groups.union(self.cols[key].group, _FIXED)

    def _keys_under(self, target: str) -> set[str]:
        obj = self.model
        for part in target.split("."):
            obj = getattr(obj, part)
        tensors = [obj] if isinstance(obj, Tensor) else (
            list(obj.parameters()) + list(obj.buffers()) if isinstance(obj, nn.Module) else [])
        return {self.key[id(t)] for t in tensors if id(t) in self.key}

    def _module(self, node, units: _Units) -> _Units:
        m = self.modules[node.target]
        if isinstance(m, _MIXING):
            return self.mixing(node, m, units)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, nn.PReLU):
            self.per_unit_tensors(m, units)
            return units
        if isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                return self.pin(node, [units], f"flattens dims {m.start_dim}..{m.end_dim}")
            return _Units(units.group, True)
        if isinstance(m, _PER_UNIT_MODULES):
            return units
        self.pinned_keys.update(self._keys_under(node.target))
        return self.pin(node, [units], "mixes units")


def _permute(t: Tensor, perm: Tensor, dim: int, where: str) -> Tensor:
    size, c = t.shape[dim], perm.numel()
    if size != c:
        if size % c:
            raise ValueError(f"{where} has {size} units where {c} were expected; {_HELP}.")
        k = size // c  # a flattened channel: a block of k features
        perm = (perm[:, None] * k + torch.arange(k)).reshape(-1)
    return t.index_select(dim, perm.to(t.device))


def permutation_direction(model: nn.Module, *, seed: int = 0, buffers: bool = True) -> Params:
    """The w-basin direction ``d = pi(theta) - theta`` for a random hidden-unit permutation.

    Every group of hidden units that can be permuted (see the module docstring: a layer's
    outputs, merged with whatever is added to them) gets its own random derangement (every
    unit moves); the model's inputs and outputs stay fixed. Biases and BatchNorm scale,
    shift and running statistics move with their units, so ``theta + 1 * d`` computes the
    same function as ``theta`` on every input (to float rounding), and both ends of
    ``lw.compute_curve(model, data, direction=d, x=(-0.5, 1.5, 41))`` have the same loss.
    In a ResNet the channels of each stage's residual stream form one group, the inner
    channels of each block another.

    BatchNorm: with ``buffers=True`` (default) ``d`` also holds every floating-point buffer
    (zero where nothing moves), as :func:`~landscape_widget.interpolation_direction` does,
    so the engine moves the running statistics along with the weights; without them the
    endpoint would normalise permuted channels with unpermuted statistics and be a
    different function. Interpolated running variances stay positive on ``0 <= alpha <= 1``;
    far outside it they may turn negative, giving NaN losses there.

    Args:
        model: The model (not modified), traceable by ``torch.fx``. Units are permuted
            through Linear/Conv1d-3d layers (ungrouped or depthwise), BatchNorm, PReLU,
            elementwise activations, dropout, pooling, flatten/``view(n, -1)``, spatial
            means, residual additions and elementwise products, shared layers and tied
            weights; any other operation keeps its inputs unpermuted.
        seed: Seed of the permutations (a private generator; the global RNG is untouched).
        buffers: Include the floating-point buffers (see above).

    Returns:
        ``dict[str, Tensor]`` keyed like ``model.named_parameters()`` (plus float buffers),
        each tensor on its parameter's device and dtype.

    Raises:
        ValueError: If ``torch.fx`` cannot trace the model (data-dependent control flow),
            if it has fewer than two weight layers, or if no hidden unit can move (every
            group reaches the input or output, has a single unit, or feeds an operation that
            mixes units; the message names such operations).

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
    plan = _Plan(model, traced)
    plan.follow(traced.graph)
    if len(plan.layers) < 2:
        raise ValueError(f"the model has {len(plan.layers)} Linear/Conv layer(s): a permutation "
                         "needs at least one hidden layer between two weight layers.")

    groups = plan.groups
    perms: dict[int, Tensor] = {}
    gen = torch.Generator().manual_seed(seed)
    for g in sorted(plan.size):  # in graph order: the same seed gives the same permutation
        root = groups.find(g)
        if root == _FIXED or root in perms:
            continue
        sizes = {plan.size[h] for h in plan.size if groups.find(h) == root}
        if len(sizes) > 1:
            raise ValueError(f"layers with {sorted(sizes)} output units are added or "
                             f"multiplied together; {_HELP}.")
        (n,) = sizes
        if n > 1:
            perms[root] = _derangement(n, gen)
    if not perms:
        pins = "; ".join(plan.pins[:3]) + (" ..." if len(plan.pins) > 3 else "")
        raise ValueError("no hidden unit can be permuted: every layer's outputs reach the "
                         "model's input or output (through residual connections, shared "
                         "layers or tied weights), are a single unit, or feed an operation "
                         "that mixes units" + (f" ({pins})" if pins else "") + f"; {_HELP}.")

    params = parameters_of(model)
    bufs = float_buffers_of(model)
    new = {k: v.clone() for k, v in {**params, **bufs}.items()}
    for key, g in plan.rows.items():
        perm = perms.get(groups.find(g))
        if perm is not None:
            new[key] = _permute(new[key], perm, 0, f"tensor {key!r}")
    for key, units in plan.cols.items():
        perm = perms.get(groups.find(units.group))
        if perm is not None:
            new[key] = _permute(new[key], perm, 1, f"the inputs of {key!r}")
    keys = list(params) + (list(bufs) if buffers else [])
    d = {k: new[k] - ({**params, **bufs})[k] for k in keys}
    check_direction(model, d)
    return d
