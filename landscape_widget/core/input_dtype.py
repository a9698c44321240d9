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
                a dtype mismatch); and whatever :meth:`_check_outputs` raises.
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
        raise first
