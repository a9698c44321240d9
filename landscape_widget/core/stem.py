"""The linear stem: the first layer's output is linear in its weights.

For a model whose input flows through parameter-free operations into one ``Linear`` or
``Conv`` layer, that layer's output at ``theta + sum_j c_j d_j`` is

    stem(x; W + sum_j c_j D_j, b + sum_j c_j db_j) = stem(x; W, b) + sum_j c_j stem(x; D_j, db_j)

because convolution and matrix products are linear in ``(weight, bias)`` jointly. The
``1 + len(directions)`` terms are computed once for the whole data set; every grid point
then costs a weighted sum instead of the first layer. For an MLP on 64 features this
removes most of the FLOPs of a point.

The model is split with ``torch.fx``; models that cannot be traced, whose input is used
anywhere else, or whose first layer shares its weights simply do not get a stem.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.func import functional_call

from . import rewrite
from .fold import conv_bn, fold_batchnorm
from .fx_trace import quiet, release, symbolic_trace

LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class Stem:
    """A model split at its first linear layer.

    Attributes:
        name: Qualified name of the stem module (its parameters are ``name.weight``/``.bias``).
        prefix: Parameter-free part from the input to the stem's input.
        layer: The stem module itself.
        suffix: The rest of the model, taking the stem's output as its input.
        suffix_keys: Parameter and buffer names the suffix uses (keys as in the full model).
        constants: Whether the trace baked tensors computed from buffers into the suffix
            (``self.mask.float()``: torch.fx runs a method of a buffer at trace time and
            keeps its value as ``_tensor_constantN``); they stay the suffix's own.
        unfolded: The suffix without BatchNorm folded into its convolutions, while
            ``suffix`` is the folded one (core/fold.py); ``None`` otherwise.
    """

    name: str
    prefix: fx.GraphModule
    layer: nn.Module
    suffix: fx.GraphModule
    suffix_keys: frozenset[str]
    constants: bool = False
    unfolded: fx.GraphModule | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        """The stem's parameter names in the full model."""
        return tuple(f"{self.name}.{k}" for k, _ in self.layer.named_parameters())

    def release(self) -> None:
        """Free the prefix's and suffix's modules now (see :func:`~.fx_trace.release`)."""
        release(self.prefix)
        release(self.suffix)
        if self.unfolded is not None:
            release(self.unfolded)

    @property
    def folded(self) -> int:
        """How many BatchNorms the suffix runs folded into their convolutions."""
        return sum(n.op == "call_function" and n.target is conv_bn
                   for n in self.suffix.graph.nodes)

    def unfold(self) -> bool:
        """Run the suffix without its folded BatchNorms from now on.

        Returns:
            False if it had none folded (nothing changes).
        """
        if self.unfolded is None:
            return False
        folded, self.suffix, self.unfolded = self.suffix, self.unfolded, None
        release(folded)
        return True

    def output(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The stem layer applied to the prefix of ``x`` with the given weight and bias."""
        params = {"weight": weight}
        if getattr(self.layer, "bias", None) is not None:
            params["bias"] = bias if bias is not None else torch.zeros_like(self.layer.bias)
        return functional_call(self.layer, params, (self.prefix(x),))


def _free_of_state(mod: nn.Module) -> bool:
    return not any(True for _ in mod.parameters()) and not any(True for _ in mod.buffers())


def _plain_layer(mod: nn.Module) -> bool:
    """Whether the layer computes with its own ``weight`` and ``bias`` and nothing else.

    Legacy ``weight_norm`` computes ``weight`` in a pre-hook from ``weight_g``/``weight_v``.

    Returns:
        ``True`` if the layer's only parameters are ``weight`` (and ``bias``) and it has no forward
        hooks or pre-hooks, so its output is a fixed function of them.
    """
    names = {k for k, _ in mod.named_parameters()}
    # Its class's own forward, no hooks: a forward replaced on the instance need not be
    # linear in the weights (the safety net checks only the base point).
    return names in ({"weight"}, {"weight", "bias"}) and rewrite.stock(mod, type(mod))


def _only_node_arg(node: fx.Node, source: fx.Node) -> bool:
    """``node`` takes ``source`` exactly once and no other graph value."""
    found = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n))
    return found == [source]


def split_stem(module: nn.Module, class_major_head: bool = False,
               fold_pays=None) -> Stem | None:
    """Split ``module`` at its first linear layer.

    Args:
        module: The engine's private copy of the model.
        class_major_head: Passed to :func:`~landscape_widget.core.rewrite.optimise` for the
            suffix: whether the engine's own cross-entropy reads the model's output.
        fold_pays: ``fold_pays(conv, bn) -> bool``, which BatchNorms to fold into their
            convolutions (:func:`~.fold.fold_batchnorm`; default: every one that can be).

    Returns:
        The :class:`Stem`, or ``None`` if the split is not safe.
    """
    if not rewrite.stock(module, type(module)):
        # torch.fx traces the class's forward, not the call: the model's own hooks and an
        # instance's forward are not in the trace, and the safety net (theta, 8 samples)
        # missed a pre-hook clamping later samples' inputs.
        return None
    try:
        gm = symbolic_trace(module)
    except Exception:  # noqa: BLE001 - untraceable models just run without a stem
        return None
    try:
        return _split(module, gm, class_major_head, fold_pays)
    finally:
        release(gm)  # the prefix and suffix hold their own references to what they use


def _split(module: nn.Module, gm: fx.GraphModule, class_major_head: bool,
           fold_pays) -> Stem | None:
    """:func:`split_stem` on the model's trace ``gm``."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    node, chain, stem = placeholders[0], [], None
    while stem is None:
        if len(node.users) != 1:
            return None
        nxt = next(iter(node.users))
        if not _only_node_arg(nxt, node):
            return None
        if nxt.op == "call_module":
            sub = gm.get_submodule(nxt.target)
            if type(sub) in LINEAR_TYPES and not nxt.kwargs and _plain_layer(sub):
                stem = nxt
                break
            if not _free_of_state(sub):
                return None
        elif nxt.op not in ("call_function", "call_method"):
            return None
        chain.append(nxt)
        node = nxt
    layer = gm.get_submodule(stem.target)
    # The stem's weights must be used by the stem alone (no tying, no second call).
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == stem.target]
    owned = {id(p) for p in layer.parameters()}
    shared = sum(id(p) in owned for _, p in module.named_parameters(remove_duplicate=False))
    if len(calls) != 1 or shared != len(owned) or any(
        n.op == "get_attr" and str(n.target).startswith(f"{stem.target}.") for n in graph.nodes
    ):
        return None

    prefix_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in [placeholders[0], *chain]:
        env[n] = prefix_graph.node_copy(n, lambda a: env[a])
    prefix_graph.output(env[node])
    prefix = quiet(fx.GraphModule(gm, prefix_graph))

    suffix_graph = fx.Graph()
    env = {}
    dropped = {placeholders[0], *chain, stem}
    for n in graph.nodes:
        if n is stem:
            env[n] = suffix_graph.placeholder("stem_out")
        elif n not in dropped:
            env[n] = suffix_graph.node_copy(n, lambda a: env[a])
    suffix = quiet(fx.GraphModule(gm, suffix_graph))
    # Every pass gives the suffix a new stem output (StemTerms._stem_input), so a ReLU on it
    # may work in place; see core/rewrite.py.
    rewrite.optimise(suffix, fresh_inputs=("stem_out",), class_major_head=class_major_head)
    # After optimise: a ReLU it made in place reads a fresh conv_bn. On a copy of the graph
    # (sharing the modules): the folded sums round otherwise, and with a trained net's
    # BatchNorm statistics that alone can fail the safety net (_prepare_stem), which then
    # keeps the stem with the suffix as traced.
    folded = quiet(fx.GraphModule(suffix, copy.deepcopy(suffix.graph)))
    if not fold_batchnorm(folded, fold_pays):
        release(folded)
        folded = None
    used = {k for k, _ in suffix.named_parameters()} | {k for k, _ in suffix.named_buffers()}
    own = {k for k, _ in module.named_parameters(remove_duplicate=False)} | {
        k for k, _ in module.named_buffers(remove_duplicate=False)}
    # Names the model does not have are the trace's constants: the suffix keeps its own
    # (asking the point's tensors for them was a KeyError, and the stem was refused).
    return Stem(str(stem.target), prefix, layer, suffix if folded is None else folded,
                frozenset(used & own), constants=bool(used - own),
                unfolded=None if folded is None else suffix)
