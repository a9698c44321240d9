"""Eval-mode BatchNorm folded into the convolution before it, in the engine's own graphs.

A convolution followed by an eval-mode ``BatchNorm`` is one affine map of the input:
``bn(conv(x, W, c)) = conv(x, W * s, (c - mean) * s + beta)`` with
``s = gamma / sqrt(var + eps)`` per output channel. Computed that way, every point's pass
skips BatchNorm's read and write of each activation and pays one multiply over the
convolution's weights instead. The weights are read from the point's parameters inside the
graph (``get_attr`` nodes, which ``functional_call`` and ``vmap`` swap), so moved
convolution weights, moved BatchNorm scales and tied weights all stay exact.

It pays where a pass's activations outweigh the weights (:func:`fold_pays`): on a 2-core
CPU (torch 2.14.1, 2026-12-05), where each point's weights are new tensors oneDNN reorders
anyway, it is within noise on ResNet-18/50; a GPU's separate BatchNorm kernels over large
batches are what it is for (unmeasured).

Only what is provably the same map is folded (:func:`fold_batchnorm`): a stock ``Conv1d``/
``2d``/``3d`` with zero padding whose output nothing but a stock eval-mode BatchNorm of
the same channel count reads, that BatchNorm using its running statistics, neither module
hooked, all their tensors float32 or all float64. The values equal the unfolded ones up
to float rounding (sums in another order).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from .rewrite import stock

FOLD_MIN_RATIO = 2.0
"""A pair is folded when its BatchNorm's outputs on a pass are this many times the
convolution's weights (see :func:`fold_pays`); break-even measured near 1."""

BATCHNORM_OF = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
"""The convolutions folded, each with the BatchNorm of its dimensions."""
CONVS = (F.conv1d, F.conv2d, F.conv3d)  # by the kernel's dimensions


def conv_bn(x: Tensor, weight: Tensor, bias: Tensor | None, scale: Tensor | None,
            shift: Tensor | None, mean: Tensor, var: Tensor, eps: float, dims: int,
            stride, padding, dilation, groups: int) -> Tensor:
    """``batch_norm(conv(x, weight, bias), mean, var, scale, shift, eps)``, folded.

    Args:
        x: The convolution's input.
        weight: ``(C_out, C_in / groups, *kernel)``.
        bias: ``(C_out,)`` or ``None``.
        scale: BatchNorm's ``weight`` (``gamma``), or ``None`` (not affine).
        shift: BatchNorm's ``bias`` (``beta``), or ``None``.
        mean: The running mean.
        var: The running variance.
        eps: BatchNorm's ``eps``.
        dims: 1, 2 or 3 (which convolution).
        stride: As the convolution's.
        padding: As the convolution's (zero padding).
        dilation: As the convolution's.
        groups: As the convolution's.

    Returns:
        The BatchNorm's output, in the layout the convolution gives ``weight``'s.

    Example:
        >>> conv, bn = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3).eval()
        >>> bn.running_mean.uniform_(-1, 1); bn.running_var.uniform_(0.5, 2)
        ... # doctest: +ELLIPSIS
        tensor(...)
        >>> x = torch.randn(4, 2, 5, 5)
        >>> out = conv_bn(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
        ...               bn.running_var, bn.eps, 2, 1, 0, 1, 1)
        >>> torch.allclose(out, bn(conv(x)), atol=1e-6)
        True
    """
    s = torch.rsqrt(var + eps)
    if scale is not None:
        s = s * scale
    w = weight * s.reshape((-1,) + (1,) * (weight.dim() - 1))
    b = (-mean if bias is None else bias - mean) * s
    if shift is not None:
        b = b + shift
    return CONVS[dims - 1](x, w, b.to(w.dtype), stride, padding, dilation, groups)


def _norm_after(gm: fx.GraphModule, conv_node: fx.Node, cls: type) -> fx.Node | None:
    """The BatchNorm node that alone reads ``conv_node``'s output, if it can be folded."""
    if len(conv_node.users) != 1:
        return None
    node = next(iter(conv_node.users))
    if node.op != "call_module" or node.args != (conv_node,) or node.kwargs:
        return None
    bn = gm.get_submodule(node.target)
    if not stock(bn, BATCHNORM_OF[cls]):
        return None
    conv = gm.get_submodule(conv_node.target)
    # Eval mode with running statistics is a fixed affine map; in training mode, or
    # without running statistics, BatchNorm normalises by the batch's own.
    if bn.training or bn.running_mean is None or bn.running_var is None or (
            bn.num_features != conv.out_channels) or not _one_dtype(conv, bn):
        return None
    return node


def _one_dtype(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether the pair's tensors all have one dtype, float32 or float64.

    A half or bfloat16 convolution before a float32 BatchNorm (which torch runs in mixed
    precision) gave a float32 folded weight that the convolution refused ("Input type
    (c10::Half) and bias type (float) should be the same"): the whole computation failed.
    In bfloat16 or half throughout, ``W * s`` rounded to 8 or 11 bits moved the split
    model's outputs past the stem's safety net (``rtol=1e-4``), which then dropped the
    stem; BatchNorm itself computes in float32 there.

    Returns:
        True if the fold computes in the same dtype as the two modules do.
    """
    tensors = [t for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                           bn.running_var) if t is not None]
    return len({t.dtype for t in tensors}) == 1 and tensors[0].dtype in (
        torch.float32, torch.float64)


def fold_pays(batch: int, bn_outputs: int | None, conv: nn.Module) -> bool:
    """Whether folding saves memory traffic on a pass of ``batch`` samples.

    BatchNorm reads and writes each of its outputs; the fold reads and writes each weight
    of the convolution (for every pass: the weights are the point's). Measured per pass
    on a 2-core CPU (2026-12-05, fresh weights each pass as the engine's points have),
    folding every pair: ResNet-50 over 32 x 3 x 64 x 64 (1.2 outputs a weight overall)
    139 ms against 140 unfolded; ResNet-18 over 128 x 3 x 32 x 32 (0.6) 55 against 53.
    Per pair the ratio runs from 0.25 (ResNet-50's last block) to over 100 (its first).

    Args:
        batch: Samples per pass.
        bn_outputs: The BatchNorm's output elements per sample (None: unknown).
        conv: The convolution.

    Returns:
        True if the pass's BatchNorm outputs are at least :data:`FOLD_MIN_RATIO` times
        the convolution's weights.

    Example:
        >>> conv = nn.Conv2d(64, 64, 3)  # 36,864 weights
        >>> fold_pays(32, 64 * 16 * 16, conv), fold_pays(32, 64 * 2 * 2, conv)
        (True, False)
    """
    return bool(bn_outputs) and batch * bn_outputs >= FOLD_MIN_RATIO * conv.weight.numel()


def fold_batchnorm(gm: fx.GraphModule, pays=None) -> int:
    """Replace each foldable convolution + BatchNorm pair of ``gm`` by one :func:`conv_bn`.

    Args:
        gm: A graph module the engine traced itself (never the user's module); its
            BatchNorm modules' training flags are final.
        pays: ``pays(conv, bn) -> bool``: whether to fold a foldable pair (default: all);
            see :func:`fold_pays`.

    Returns:
        How many pairs were folded (``gm`` is recompiled if any was).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()).eval()
        >>> net[1].running_var.fill_(4.0); gm = fx.symbolic_trace(net)
        ... # doctest: +ELLIPSIS
        tensor(...)
        >>> x = torch.randn(2, 1, 5, 5)
        >>> fold_batchnorm(gm)
        1
        >>> torch.allclose(gm(x), net(x), atol=1e-6)
        True
    """
    def attr(owner: str, name: str, present: bool) -> fx.Node | None:
        return gm.graph.get_attr(f"{owner}.{name}") if present else None

    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        conv = gm.get_submodule(node.target)
        cls = type(conv)
        if cls not in BATCHNORM_OF or not stock(conv, cls) or conv.padding_mode != "zeros" or (
                isinstance(conv.padding, str)):
            continue
        norm = _norm_after(gm, node, cls)
        if norm is None:
            continue
        bn = gm.get_submodule(norm.target)
        if pays is not None and not pays(conv, bn):
            continue
        graph = gm.graph
        with graph.inserting_before(norm):
            args = (node.args[0], attr(node.target, "weight", True),
                    attr(node.target, "bias", conv.bias is not None),
                    attr(norm.target, "weight", bn.weight is not None),
                    attr(norm.target, "bias", bn.bias is not None),
                    attr(norm.target, "running_mean", True),
                    attr(norm.target, "running_var", True),
                    float(bn.eps), len(conv.kernel_size), tuple(conv.stride),
                    tuple(conv.padding), tuple(conv.dilation), int(conv.groups))
            fused = graph.call_function(conv_bn, args)
        norm.replace_all_uses_with(fused)
        graph.erase_node(norm)
        graph.erase_node(node)
        folded += 1
    if folded:
        gm.graph.lint()
        gm.recompile()
    return folded


FOLD_RTOL = 1e-4
"""Largest difference, relative to the largest output, between a suffix with BatchNorm
folded and the whole model (the stem's safety net)."""


def split_matches(out_split: Tensor, out_full: Tensor, folded: bool = False) -> bool:
    """Whether the split model's outputs are the whole model's (the stem's safety net).

    The suffix as traced runs the model's own operations: its outputs must match entry by
    entry. A folded one rounds otherwise, as far from the model as the model's own float32
    forward is from float64 (a torchvision ResNet-50 with its BatchNorms' statistics from
    the data: 5.1e-5 and 5.6e-5 of the largest logit), which entry by entry failed (an
    output near 0 keeps no relative precision): it is judged against the outputs' scale.

    Returns:
        True if they match.

    Example:
        >>> full = torch.tensor([1e4, 1.0, 0.0])
        >>> split = full + torch.tensor([0.0, 5e-3, 0.0])
        >>> split_matches(split, full), split_matches(split, full, folded=True)
        (False, True)
    """
    # Another dtype: the forward's own autocast, lost by the trace (allclose raised).
    if out_split.shape != out_full.shape or out_split.dtype != out_full.dtype:
        return False
    if torch.allclose(out_split, out_full, rtol=1e-4, atol=1e-5):
        return True
    if not folded or not (out_split.isfinite().all() and out_full.isfinite().all()):
        return False
    scale = float(out_full.abs().max())
    return float((out_split - out_full).abs().max()) <= FOLD_RTOL * scale

