"""Compiled evaluation: the forward pass through ``torch.compile``, weights as inputs.

The compiled function is ``forward(params, inputs) = functional_call(module, params,
(inputs,))``: the parameters are arguments, not attributes, so one compilation serves every
point of the grid (and every batch of the same shape; an odd last batch compiles once more).

``compile=True`` compiles the chosen loop plan (vmap plans run eagerly: the tuner then times
loops only). ``compile="auto"`` (the default) compiles on CUDA devices only (on a CPU the
eager oneDNN kernels leave little to gain for minutes of compiling on a few cores), and
there only when the grid's predicted time,
from the plain loop's measured time, is at least :data:`AUTO_FACTOR` times the expected
compile time and the grid has :data:`AUTO_MIN_POINTS` points or more: small interactive grids
never compile. After compiling, the compiled pass is timed; it is kept only if faster (with
``"auto"``). A failure falls back to the eager plan, and ``spec["plan"]["compile_note"]``
says why.
"""

from __future__ import annotations

import math
import time
import types
import warnings

import numpy as np
import torch
from torch.func import functional_call

from .errors import Cancelled
from .fx_trace import FX_LOCK
from .plans import Plan, _describe_error, _is_oom

AUTO_FACTOR = 20.0
AUTO_MIN_POINTS = 400
# Measured compile seconds per model structure (the plan cache's key), for "auto".
_COMPILE_SECONDS: dict[tuple, float] = {}


def check_compile(compile) -> bool | str:
    """``compile`` if valid.

    Returns:
        ``"auto"``, or ``compile`` as a Python bool.

    Example:
        >>> check_compile(np.True_), check_compile("auto")
        (True, 'auto')
        >>> check_compile(1)
        Traceback (most recent call last):
        ...
        ValueError: compile=1 is not supported; choose True, False or 'auto'.

    Raises:
        ValueError: Unless it is a bool (numpy's too) or "auto".
    """
    if isinstance(compile, str) and compile == "auto":
        return compile
    if isinstance(compile, (bool, np.bool_)):  # not 1 or 0, which `in (True, False)` took
        return bool(compile)
    raise ValueError(f"compile={compile!r} is not supported; choose True, False or 'auto'.")


class CompiledForward:
    """``torch.compile`` of the forward for :class:`~landscape_widget.core.evaluate.Evaluator`.

    A mixin: it uses the evaluator's ``module``, ``stem``, ``compile``, ``expected_points``
    and its timing (``_time_pass``).
    """

    _compiled_fn = None

    def _compile_guess(self, key: tuple) -> float:
        """Expected compile seconds: measured before for this structure, else a guess."""
        if key in _COMPILE_SECONDS:
            return _COMPILE_SECONDS[key]
        leaves = sum(1 for m in self.module.modules() if not list(m.children()))
        return 10.0 + 0.3 * leaves

    def _compiled_forward(self, plan: Plan):
        if self._compiled_fn is None:
            target = self.stem.suffix if plan.stem else self.module

            def forward(params, inputs):
                return functional_call(target, params, (inputs,))

            # A code object of its own: dynamo keeps compiled graphs per code object and,
            # past config.recompile_limit (8) of them, runs it eagerly without a word.
            # Shared by every evaluator, the 9th compiled model or precision of a session
            # ran eagerly while its plan said compiled (and kept the others' graphs alive).
            forward = types.FunctionType(forward.__code__.replace(), forward.__globals__,
                                         forward.__name__, None, forward.__closure__)
            # fallback_random: the forward's random draws (a VAE's sampling) as eager torch
            # draws them from the seeded generator (core/rng.py); inductor's own generator
            # gave the compiled points other noise than the plan trials' eager ones.
            self._compiled_fn = torch.compile(forward, dynamic=False,
                                              options={"fallback_random": True})
        return self._compiled_fn

    def _setup_compile(self, plan: Plan, c, key: tuple) -> None:
        """Compile ``plan``'s forward if asked (or worth it with "auto"); time it; note why."""
        if self.compile is False:
            plan.compiled, plan.compile_note = False, "compile=False"
            return
        if plan.strategy != "loop":
            plan.compiled = False
            plan.compile_note = "not compiled: vmap plans run eagerly"
            return
        if self.compile == "auto" and not plan.compiled and self.device.type != "cuda":
            plan.compile_note = ("not compiled (compile='auto' compiles on CUDA only: on a CPU "
                                 "the eager oneDNN kernels leave little to gain for minutes of "
                                 "compiling; pass compile=True to try)")
            return
        if self.compile == "auto" and not plan.compiled:
            predicted = plan.seconds_per_point * self.expected_points
            guess = self._compile_guess(key)
            if self.expected_points < AUTO_MIN_POINTS or predicted < AUTO_FACTOR * guess:
                plan.compile_note = (
                    f"not compiled (compile='auto'): {self.expected_points} points, predicted "
                    f"{predicted:.3g} s eager vs ~{guess:.3g} s to compile")
                return
        # A cached plan compiled before carries its compiled time: no eager time to compare
        # (the note called the earlier compiled s/point "eager").
        eager = math.nan if plan.compiled else plan.seconds_per_point
        plan.compiled = True
        t0 = time.perf_counter()
        try:
            with FX_LOCK:  # dynamo traces too; one trace at a time (see core.fx_trace)
                spp = self._time_pass(plan, c)
        except Exception as err:
            if _is_oom(err) or isinstance(err, Cancelled):  # not the compiler's failure
                raise
            self._compile_failed(plan, err)
            return
        seconds = time.perf_counter() - t0
        _COMPILE_SECONDS[key] = seconds
        if self.compile == "auto" and spp >= eager:
            plan.compiled = False
            plan.compile_note = (f"compiled ({seconds:.3g} s) but slower: {spp:.3g} s/point vs "
                                 f"{eager:.3g} eager; eager kept")
            return
        plan.seconds_per_point = spp
        plan.compile_note = (f"compiled in {seconds:.3g} s: {spp:.3g} s/point vs {eager:.3g} "
                             "eager" if math.isfinite(eager) else f"compiled in {seconds:.3g} s")

    def _compile_failed(self, plan: Plan, err: BaseException) -> None:
        """Back to the eager forward after ``err``; warn if the user asked for compile=True."""
        plan.compiled = False
        self._compiled_fn = None
        plan.compile_note = f"compile failed, evaluated eagerly: {_describe_error(err)}"
        if self.compile is True:
            warnings.warn(f"torch.compile failed ({_describe_error(err)}); the points are "
                          "evaluated eagerly (spec['plan']['compile_note']).", RuntimeWarning,
                          stacklevel=4)
