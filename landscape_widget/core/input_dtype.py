"""The dtype the model takes its inputs in, found by the set-up's probe.

:class:`InputDtype` is a mixin of :class:`~landscape_widget.core.evaluate.Evaluator`: the
data are cast to the weights' dtype, and a forward failing on a dtype mismatch is tried with
the data's own dtype, then with the model's other floating dtypes.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

_DTYPE_ERROR = re.compile(r"dtype|scalar type|Input type \(")
"""torch's words for a dtype mismatch between inputs and weights ("mat1 and mat2 must have
the same dtype", "Input type (double) and bias type (float) should be the same",
"expected scalar type Double but found Float")."""


class InputDtype:
    """``self.x`` in the dtype the model takes (a mixin of the Evaluator).

    Uses the evaluator's ``dtype``, ``base``, ``device`` and its probe (``_check_outputs``).
    """

    def _check_outputs_cast(self, x: Tensor) -> None:
        """``self.x``: the data in the dtype the model takes; then :meth:`_check_outputs`.

        Floating inputs are cast to the weights' dtype (:func:`~.params.weights_dtype`:
        float64 numpy data for a float32 model). A forward that then fails on a dtype
        mismatch (a float64 input layer before float32 ones: 9d's regression of that rule)
        is tried with the data's own dtype, then with the model's other floating dtypes.

        Raises:
            RuntimeError: The first try's error, if every dtype fails (or the error is not
                a dtype mismatch), naming the inputs the forward failed on
                (:func:`forward_error`); and whatever :meth:`_check_outputs` raises.
        """
        dtypes = [x.dtype]
        if torch.is_floating_point(x) and self.dtype.is_floating_point:
            others = [v.dtype for v in self.base.values() if v.is_floating_point()]
            dtypes = list(dict.fromkeys([self.dtype, x.dtype, *others]))
        first = None
        for dtype in dtypes:
            self.x, self._probed = x.to(self.device, dtype), None
            try:
                self._check_outputs()
                return
            except RuntimeError as err:
                first = first or err
                if not _DTYPE_ERROR.search(str(err)):
                    break
        wrapped = forward_error(first)
        if wrapped is first:
            raise first
        raise wrapped from first


def forward_error(err: RuntimeError) -> RuntimeError:
    """``err`` of the model's forward on the set-up's first samples, saying so.

    torch's words name the layer, not the data: "Output size is too small" for images
    smaller than the model takes (torchvision's AlexNet at 32 px).

    Args:
        err: What the forward raised; the probe marks it with ``forward_inputs`` (shape,
            dtype). Other errors, torch's own subclasses (out of memory) included, are
            returned as they are.

    Returns:
        A new ``RuntimeError`` naming the inputs and what to check, with torch's words.

    Example:
        >>> err = RuntimeError("Output size is too small")
        >>> err.forward_inputs = ((8, 3, 32, 32), torch.float32)
        >>> print(forward_error(err))  # doctest: +NORMALIZE_WHITESPACE
        The model's forward failed on the first 8 samples of the data (inputs of shape
        (8, 3, 32, 32), torch.float32): Output size is too small. Check that the data are
        what the model takes: the input size (an image model needs a minimum height and
        width), the number of channels or features, and the device.
    """
    marked = getattr(err, "forward_inputs", None)
    if marked is None or type(err) is not RuntimeError:
        return err
    shape, dtype = marked
    words = str(err).rstrip().rstrip(".")
    return RuntimeError(
        f"The model's forward failed on the first {shape[0] if shape else 1} samples of the "
        f"data (inputs of shape {shape}, {dtype}): {words}. Check that the data are what "
        "the model takes: the input size (an image model needs a minimum height and "
        "width), the number of channels or features, and the device.")
