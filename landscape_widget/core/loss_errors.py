"""The message for a loss that fails on the first samples: what was passed, and the likely fix.

:func:`loss_error` reads torch's error text and the targets' dtype to name the most likely
mistake (targets of the wrong dtype, outputs that are not a tensor, class indices out of
range, shapes that do not match). The engine's set-up calls it when ``loss_fn`` raises on
the probe's samples (:mod:`.batch_stats`); the checks of a loss that runs are in
:mod:`.losses`.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

# Words of torch's shape errors ("size of tensor a (3) must match", "Expected input
# batch_size", "mat1 and mat2 shapes", "multi-target not supported", "dimension out of range").
_SHAPE_WORDS = r"size|shape|dimension|\bdims?\b|multi-target|batch_size|out of range"


def loss_error(err: Exception, outputs: str, y: Tensor, *, default: bool,
               tensor_out: bool) -> str:
    """The message for a loss that fails on the first samples, with the likely fix.

    Args:
        err: What the loss raised.
        outputs: The model's outputs, described with the data's size.
        y: All targets.
        default: Whether the loss is the default cross-entropy.
        tensor_out: Whether the model returns one Tensor.

    Returns:
        One line for the user: what the model returns and the targets' shape and dtype,
        the most likely fix as the error suggests it (integer or ``torch.long`` targets,
        float targets, bool targets, class indices within the outputs, ``output_fn=`` for
        the default loss, a tensor picked from the outputs for a torch loss, matching
        shapes; else where to look), and the type and first line of ``err``.

    Example:
        >>> y = torch.zeros(4, dtype=torch.long)
        >>> def hint(err):
        ...     text = loss_error(err, "(4, 3) float32", y, default=False, tensor_out=True)
        ...     return text.split("; ")[1].split(".")[0]
        >>> hint(ValueError("my loss needs a dict"))[:60]
        'nothing in the error points at the outputs or the targets: l'
        >>> hint(RuntimeError("The size of tensor a (3) must match the size of tensor b (4)"))
        'check that loss_fn(outputs, targets) takes these shapes'
    """
    text = str(err)
    if y.is_floating_point() and ("Long" in text or "class probabilities" in text
                                  or "Int" in text):
        hint = "the loss wants class indices: pass the targets as integers, y.long()"
    elif not y.is_floating_point() and y.dtype != torch.long and "Long" in text:
        hint = "class-index targets must be torch.long: pass y.long()"
    elif not y.is_floating_point() and any(w in text for w in ("Float", "Double", "float",
                                                                "Half", "cast")):
        hint = "the loss wants real-valued targets: pass y.float() (the outputs' dtype)"
    elif y.dtype == torch.bool:  # e.g. BCE's "Subtraction ... with two bool tensors"
        hint = ("the targets are bool: pass y.float() for a loss on probabilities or "
                "multi-label targets (BCEWithLogitsLoss), y.long() for class indices")
    elif not tensor_out and not default and re.search(r"must be Tensor, not", text):
        hint = ("loss_fn gets the model's outputs as returned, not a Tensor: pick the tensor "
                "in it, e.g. loss_fn=lambda out, y: F.cross_entropy(out['logits'], y) "
                "(or out[0], out.logits)")
    elif default and not tensor_out:
        hint = ("the default loss is cross-entropy on the logits; pass output_fn= to say "
                "where they are, or your own loss_fn(outputs, targets)")
    elif re.search(r"target -?\d+ is out of bounds", text, re.IGNORECASE):
        hint = ("a target is not a class index of the model's outputs: check the number of "
                "classes (targets must lie in [0, C) or equal ignore_index)")
    elif re.search(_SHAPE_WORDS, text, re.IGNORECASE):
        hint = "check that loss_fn(outputs, targets) takes these shapes"
    else:
        hint = ("nothing in the error points at the outputs or the targets: loss_fn "
                "itself raised it, see its traceback (the exception's cause)")
    targets = f"{tuple(y.shape)} {str(y.dtype).replace('torch.', '')}"
    first = text.splitlines()[0] if text else ""
    return (f"loss_fn(outputs, targets) failed on the first samples: the model returns "
            f"{outputs} and the targets are {targets}; {hint}. ({type(err).__name__}: {first})")
