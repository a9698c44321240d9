"""Faster, equivalent forms of common layers in the engine's own traced graphs.

The engine runs the part of a model after the linear stem (core/stem.py) as a
``torch.fx`` graph it traced itself from its private copy of the model. Every point runs it
again, so two slow spots of eager PyTorch on a CPU are worth rewriting there:

- ``nn.ReLU`` / ``F.relu`` whose input is a fresh tensor nobody else reads becomes
  ``torch.relu_``: no new activation tensor is written (3x less time than the
  out-of-place ReLU on a 1024 x 8 x 28 x 28 activation on a 2-core CPU).
- ``nn.AvgPool2d`` with ``kernel_size == stride``, no padding and no ``ceil_mode`` becomes
  :func:`avg_pool2d`: sums of strided views, 2-4x faster than torch's CPU kernel on NCHW
  and NHWC activations.

- With ``class_major_head=True`` (the engine's own cross-entropy reads the output), a final
  ``nn.Linear`` with at most :data:`HEAD_MAX_CLASSES` outputs becomes :func:`head_linear`:
  ``(W @ x^T)^T``, the same logits stored class-major. Under vmap that batched product is
  2.6x faster for 64 points x 1024 samples x 32 -> 10 features, and the class-major
  storage makes the loss's reductions fast (core/batched_ce.py, ``batched_cross_entropy``);
  torch's own ``log_softmax`` and ``argmax`` would be 4x slower on it, hence the flag.

All give the same values up to float rounding (sums in another order). Modules
with hooks are left as they are (a hook may change what the layer computes), and so is
everything the rewrite cannot prove safe: a ReLU's input must come from an operation that
always returns a new tensor and have no other user.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

# Operations whose result is always a new tensor (never a view of an input, a parameter or a
# buffer): an in-place ReLU on it changes nothing anyone else can read.
FRESH_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d,
    nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.AvgPool2d, nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
)
# The classes' own forwards, taken at import: a forward replaced on the class later (a
# library patching nn.ReLU.forward) is not the one the rewrite stands for.
_FORWARDS = {cls: cls.forward for cls in (*FRESH_MODULES, nn.ReLU)}
FRESH_FUNCTIONS = (
    operator.add, operator.mul, operator.sub, torch.add, torch.mul, torch.sub,
    F.conv1d, F.conv2d, F.conv3d, F.linear, F.batch_norm, F.layer_norm, F.avg_pool2d,
    torch.cat,
)


is_batched = torch._C._functorch.is_batchedtensor

# A classifier head with at most this many outputs is computed class-major (head_linear):
# the batched product of a short output dim, and reductions over a short contiguous last
# dim, are the slow shapes of torch's CPU kernels; measured gains stop near 32 classes.
HEAD_MAX_CLASSES = 32


def head_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)`` for a 2D ``x``, computed as ``(weight @ x^T)^T``.

    The result is a transposed view of a ``(out, N)`` tensor (class-major storage).

    Args:
        x: ``(N, in)`` inputs (other shapes go to ``F.linear``).
        weight: ``(out, in)``.
        bias: ``(out,)`` or ``None``.

    Returns:
        The ``(N, out)`` outputs.

    Example:
        >>> x, w, b = torch.randn(5, 3), torch.randn(2, 3), torch.randn(2)
        >>> out = head_linear(x, w, b)
        >>> torch.allclose(out, F.linear(x, w, b)), out.stride()
        (True, (1, 5))
    """
    if x.dim() != 2:
        return F.linear(x, weight, bias)
    out = torch.matmul(weight, x.mT)
    if bias is not None:
        b = bias.unsqueeze(-1)
        # In place on the fresh product, unless vmap batches the bias but not the product.
        out = out + b if is_batched(b) and not is_batched(out) else out.add_(b)
    return out.mT


def avg_pool2d(x: Tensor, k: int) -> Tensor:
    """``F.avg_pool2d(x, k)`` (stride ``k``, no padding) as sums of strided views.

    Falls back to ``F.avg_pool2d`` for anything but a dense 4D NCHW or NHWC tensor, and
    inside ``torch.vmap``.

    Args:
        x: A ``(N, C, H, W)`` tensor.
        k: Kernel size and stride.

    Returns:
        The ``(N, C, H // k, W // k)`` means of the ``k`` x ``k`` blocks, in ``x``'s memory
        format.

    Example:
        >>> x = torch.arange(32.0).reshape(1, 2, 4, 4)
        >>> torch.equal(avg_pool2d(x, 2), F.avg_pool2d(x, 2))
        True
        >>> cl = x.contiguous(memory_format=torch.channels_last)
        >>> torch.equal(avg_pool2d(cl, 2), F.avg_pool2d(x, 2))
        True
    """
    if (x.dim() != 4 or is_batched(x)
            or not x.is_floating_point()):
        return F.avg_pool2d(x, k)
    n, c, h, w = x.shape
    if h // k == 0 or w // k == 0:
        return F.avg_pool2d(x, k)
    if x.is_contiguous():  # NCHW: N*C single-channel (H, W) images
        return _block_means(x.reshape(n * c, h, w), k).reshape(n, c, h // k, w // k)
    if x.is_contiguous(memory_format=torch.channels_last):
        return _block_means(x.permute(0, 2, 3, 1), k).permute(0, 3, 1, 2)
    return F.avg_pool2d(x, k)


def _block_means(s: Tensor, k: int) -> Tensor:
    """Means of the ``k`` x ``k`` blocks of a dense ``(N, H, W)`` or ``(N, H, W, C)`` tensor.

    Returns:
        A new dense ``(N, H // k, W // k)`` or ``(N, H // k, W // k, C)`` tensor (floor mode:
        trailing rows and columns that fill no block are dropped).
    """
    n, h, w, *c = s.shape
    ho, wo = h // k, w // k
    rows = s[:, : ho * k].reshape(n, ho, k, w, *c)
    acc = rows[:, :, 0].clone() if k == 1 else rows[:, :, 0] + rows[:, :, 1]
    for i in range(2, k):
        acc += rows[:, :, i]
    cols = acc[:, :, : wo * k].reshape(n, ho, wo, k, *c)
    out = cols[:, :, :, 0] if k == 1 else cols[:, :, :, 0] + cols[:, :, :, 1]
    for i in range(2, k):
        out += cols[:, :, :, i]
    return out.div_(k * k)


def stock(mod: nn.Module, cls: type) -> bool:
    """Whether ``mod`` computes exactly what ``cls`` does.

    Returns:
        True for an instance of exactly ``cls`` running the class's own ``forward`` (not one
        set on the instance, as monkeypatching or accelerate's hooks do, nor one patched on
        the class) with no forward hooks, its own or global (a hook may change what the
        layer returns).
    """
    return (type(mod) is cls and "forward" not in vars(mod)
            and type(mod).forward is _FORWARDS.get(cls, cls.forward)
            and not mod._forward_hooks and not mod._forward_pre_hooks
            and not torch_module._global_forward_hooks
            and not torch_module._global_forward_pre_hooks)


def _square_pool(mod: nn.Module) -> int | None:
    """The kernel size of an ``nn.AvgPool2d`` that :func:`avg_pool2d` computes, else None."""
    if not stock(mod, nn.AvgPool2d):
        return None
    k, s, p = mod.kernel_size, mod.stride, mod.padding
    k = k if isinstance(k, int) else (k[0] if len(set(k)) == 1 else None)
    s = s if isinstance(s, int) else (s[0] if len(set(s)) == 1 else None)
    p = p if isinstance(p, int) else (0 if set(p) == {0} else 1)
    if k is None or s != k or p != 0 or mod.ceil_mode or mod.divisor_override is not None:
        return None
    return k


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return stock(gm.get_submodule(node.target), nn.ReLU) and len(node.args) == 1
    if node.op == "call_function" and node.target in (F.relu, torch.relu):
        return len(node.args) == 1 and not node.kwargs.get("inplace", False)
    return False


def _fresh(gm: fx.GraphModule, node: fx.Node, fresh_inputs: set[str]) -> bool:
    """Whether ``node``'s value is a new tensor (see :data:`FRESH_MODULES`)."""
    if node.op == "placeholder":
        return node.target in fresh_inputs
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return type(mod) in FRESH_MODULES and stock(mod, type(mod))
    return node.op == "call_function" and (node.target in FRESH_FUNCTIONS
                                           or node.target is avg_pool2d)


def _class_major_head(gm: fx.GraphModule) -> bool:
    """Make a final small ``nn.Linear`` (the model's output) a :func:`head_linear` call."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    node = out.args[0]
    if not (isinstance(node, fx.Node) and node.op == "call_module" and len(node.users) == 1
            and len(node.args) == 1 and not node.kwargs):
        return False
    mod = gm.get_submodule(node.target)
    if not stock(mod, nn.Linear) or mod.out_features > HEAD_MAX_CLASSES:
        return False
    if mod.weight.dtype not in (torch.float32, torch.float64):
        # A bf16/fp16 head's (W @ x^T)^T rounds otherwise than F.linear by more than the
        # stem's safety net allows: every such model lost its stem (review 11a).
        return False
    with gm.graph.inserting_before(node):
        weight = gm.graph.get_attr(f"{node.target}.weight")
        bias = gm.graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
    node.op, node.target, node.args = "call_function", head_linear, (node.args[0], weight, bias)
    return True


def optimise(gm: fx.GraphModule, fresh_inputs: tuple[str, ...] = (),
             class_major_head: bool = False) -> int:
    """Rewrite ``gm`` in place (see the module docstring); the number of nodes rewritten.

    Args:
        gm: A graph module the engine traced itself (never the user's module).
        fresh_inputs: Placeholders whose value the caller creates anew for every call, so an
            in-place ReLU may overwrite them.
        class_major_head: Whether a final small ``nn.Linear`` may return class-major logits
            (only where the engine's own loss reads them).

    Returns:
        How many nodes were replaced.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2))
        >>> gm = fx.symbolic_trace(net)
        >>> x = torch.randn(2, 1, 4, 4)
        >>> before = gm(x)
        >>> optimise(gm)
        2
        >>> torch.allclose(gm(x), before, atol=1e-6)
        True
    """
    changed = 0
    fresh = set(fresh_inputs)
    for node in list(gm.graph.nodes):
        if _is_relu(gm, node):
            src = node.args[0]
            if isinstance(src, fx.Node) and len(src.users) == 1 and _fresh(gm, src, fresh):
                node.op, node.target, node.kwargs = "call_function", torch.relu_, {}
                changed += 1
        elif node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
            k = _square_pool(gm.get_submodule(node.target))
            if k is not None:
                node.op, node.target, node.args = "call_function", avg_pool2d, (node.args[0], k)
                changed += 1
    if class_major_head:
        changed += _class_major_head(gm)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed
