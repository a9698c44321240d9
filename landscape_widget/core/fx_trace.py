"""The engine's own ``torch.fx`` traces: thread-safe tracing and freeing graph modules.

Used by the linear stem (core/stem.py), the compiled plans (core/compiled.py) and the
permutation groups of the experiments; kept apart from the stem so that each stays short.
"""

from __future__ import annotations

import threading

import torch.fx as fx
from torch import Tensor, nn

# torch.fx's tracer patches nn.Module.__call__ and __getattr__ process-wide while it runs, so
# without care a trace in one thread (the widget's worker splitting a stem) turns every module
# call in every other thread (the user's own forward pass in the notebook) into a tracing step
# that fails with "module is not installed as a submodule". _ThreadTracer hands calls from other
# threads straight to the real module, and FX_LOCK keeps two traces from overlapping (each
# trace's patch is stacked on the other's, so they must not interleave).
FX_LOCK = threading.Lock()


class _ThreadTracer(fx.Tracer):
    """A tracer that records only the calls made by the thread that runs the trace."""

    def trace(self, root, concrete_args=None):  # noqa: D102 - see fx.Tracer.trace
        self._owner = threading.get_ident()
        return super().trace(root, concrete_args)

    def call_module(self, m, forward, args, kwargs):  # noqa: D102
        if threading.get_ident() != self._owner:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):  # noqa: D102
        if threading.get_ident() != self._owner:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def symbolic_trace(module: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` that leaves other threads' module calls alone.

    Only one trace runs at a time (:data:`FX_LOCK`); calls of any module from another thread
    while it runs go to the real module, untraced.

    Args:
        module: The module to trace.

    Returns:
        The traced graph module (``module``'s class name, as ``fx.symbolic_trace`` names it).

    Raises:
        Exception: Whatever ``torch.fx`` raises for a module it cannot trace.
    """
    with FX_LOCK:
        tracer = _ThreadTracer()
        graph = tracer.trace(module)
    try:
        return fx.GraphModule(tracer.root, graph, type(module).__name__)
    finally:
        # The tracer ends in a reference cycle (fx's patcher): without this it would keep
        # the traced module, the engine's whole copy of the model, until Python's cyclic
        # collector runs.
        tracer.root = tracer.graph = None
        tracer.tensor_attrs, tracer.submodule_paths = {}, None


def release(gm: fx.GraphModule) -> None:
    """Drop what a graph module holds: its submodules, parameters, buffers and constants.

    A ``GraphModule`` is a reference cycle (its graph points back to it), so it outlives its
    last user until Python's cyclic collector runs, and with it every module it holds: for
    the engine's private copy of a ResNet-50, 100 MB (on a GPU, device memory) per finished
    call, piling up over repeated calls. The module is unusable afterwards.
    """
    gm._modules.clear()
    gm._parameters.clear()
    gm._buffers.clear()
    for name in [k for k, v in vars(gm).items() if isinstance(v, Tensor)]:
        delattr(gm, name)


def quiet(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm``, whose errors raise without torch.fx printing their traceback to stderr.

    The engine catches its trials' errors (a vmap pass the suffix cannot run: the loop
    then computes it); the printed traceback sat above a correct surface. Each graph
    module has a class of its own, and a recompile keeps this.

    Returns:
        ``gm`` itself.
    """
    type(gm)._wrapped_call = staticmethod(nn.Module.__call__)
    return gm
