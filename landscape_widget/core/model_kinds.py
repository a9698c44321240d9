"""Kinds of ``nn.Module`` the engine cannot evaluate, refused up front with their fix.

Every computation evaluates the model through ``torch.func.functional_call`` on a private
copy, with forward hooks on its layers at set-up. These kinds of module cannot take part:

- TorchScript modules (``torch.jit.script``, ``torch.jit.trace``, ``torch.jit.load``):
  torch refuses both ``functional_call`` ("The stateless API can't be used with Jitted
  modules") and forward hooks ("register_forward_hook is not supported on ScriptModules"),
  messages that name neither the module nor the fix.
- ``nn.DataParallel``: ``functional_call`` refuses it ("The stateless API can't be used
  with nn.DataParallel module"), which the set-up reported as a problem of the data.
- Complex parameters: a direction is a real tensor per parameter and the Hessian tools
  work in real arithmetic; torch's "value cannot be converted to type double without
  overflow" named neither.

Every computation calls ``model(x)`` with one tensor of inputs; a forward that needs
more (``forward(x1, x2)``, a keyword-only ``forward(*, input_ids)``) failed inside the
user's code with Python's "missing 1 required positional argument", which names no fix.

Some entries of a parameter are not coordinates at all: torch's ``orthogonal``
parametrization with its Householder map (the default for a non-square real weight) keeps
the signs of its reflections on the diagonal of ``original`` and reads them through
``.int()``, so that training never moves them. A random direction that moved them made the
loss jump at the model itself (``int(0.99) == 0`` zeroes a column of the weight): every
surface and curve had a spike at its centre. :func:`sign_entries` names them.

A forward decorated with ``@torch.no_grad()`` (or one that detaches its outputs) gives a
loss with no graph back to the parameters: the Hessian's ``jvp`` products were silently
zero (an eigenvalue of 0, a trace of 0) and mining failed with torch's "element 0 of
tensors does not require grad". :func:`check_differentiable` says so. A forward that runs
only a part without autograd is refused by :mod:`.reach`.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedTensorMixin


def check_model_kind(model: nn.Module, name: str = "model", hooks: bool = False) -> None:
    """Refuse TorchScript or DataParallel parts, complex parameters, uninitialised tensors.

    ``functional_call`` refuses only a scripted or DataParallel *model*; inside a plain
    model, a scripted part runs at other parameter values (its parameters are swapped like
    any other: the Hessian tools, mining and directions gave the eager model's values), and
    a DataParallel part without several devices calls its module. Only forward hooks,
    which the evaluator's set-up puts on the layers (``hooks``), refuse a scripted part.

    Args:
        model: The user's model (only read).
        name: How the model is called in the message (``"model"``, ``"model_a"``).
        hooks: Whether the caller puts forward hooks on the model's layers.

    Raises:
        TypeError: Naming the scripted or DataParallel submodule, the complex parameter or
            the uninitialised tensor, and the fix.

    Example:
        >>> check_model_kind(nn.Linear(2, 2))
        >>> check_model_kind(torch.jit.script(nn.Linear(2, 2)))
        Traceback (most recent call last):
        ...
        TypeError: model is a TorchScript module (RecursiveScriptModule, from torch.jit.script/trace/load): ...
    """  # noqa: E501 - a doctest's expected line
    for path, module in model.named_modules():
        where = name if not path else f"{name}.{path}"
        # A DataParallel part on one device or none (the CPU) just calls its module.
        if isinstance(module, nn.DataParallel) and (
                not path or len(getattr(module, "device_ids", None) or ()) > 1):
            fix = (f"Pass the module inside it, {where}.module" if not path else
                   f"Replace it by the module inside it ({where} = {where}.module)")
            raise TypeError(
                f"{where} is wrapped in nn.DataParallel, which torch cannot evaluate at other "
                "parameter values (torch.func.functional_call refuses it, and its replicas "
                f"would not see them). {fix}: the engine chooses its own batches and device."
            )
        if isinstance(module, torch.jit.ScriptModule) and (not path or hooks):
            fix = ("Pass the eager nn.Module instead" if not path else
                   f"Replace {where} by the eager nn.Module")
            raise TypeError(
                f"{where} is a TorchScript module ({type(module).__name__}, from "
                "torch.jit.script/trace/load): torch cannot evaluate it at other parameter "
                "values (torch.func.functional_call and forward hooks refuse TorchScript). "
                f"{fix}, the one you scripted or traced; for a "
                "model read with torch.jit.load, build its Python class and load the "
                "weights: eager.load_state_dict(scripted.state_dict())."
            )
    for key, t in [*model.named_parameters(), *model.named_buffers()]:
        if isinstance(t, UninitializedTensorMixin):
            raise TypeError(
                f"{name}'s tensor {key!r} is not initialised yet (a lazy layer such as "
                "nn.LazyLinear): its shape is known only once the model has run. Run the "
                f"model on one batch first ({name}(x[:1])), then pass it."
            )
    for key, p in model.named_parameters():
        if p.is_complex():
            raise TypeError(
                f"{name}'s parameter {key!r} is complex ({p.dtype}): directions and the "
                "Hessian are over real parameters. Hold it as a real parameter with a last "
                "dimension of 2 (nn.Parameter(torch.view_as_real(w))) and use "
                "torch.view_as_complex(self.<param>) in forward."
            )


def check_module(model, name: str = "model", hooks: bool = False) -> None:
    """Refuse anything but an ``nn.Module`` the engine can evaluate.

    ``hooks``: whether the caller puts forward hooks on its layers (:func:`check_model_kind`).

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``, or from :func:`check_model_kind`,
            naming the fix.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{name} must be a torch.nn.Module, got {type(model).__name__}; pass the network "
            "itself (e.g. the object you call as model(inputs))."
        )
    check_model_kind(model, name, hooks)


def check_runnable(model, name: str = "model", hooks: bool = False) -> None:
    """:func:`check_module`, and refuse a forward that cannot take one input tensor.

    The engine calls ``model(x)``; ``forward(x1, x2)`` or a keyword-only input cannot be
    called so. Skipped where a forward pre-hook may build the arguments, the class
    overrides ``__call__``, or the forward's signature cannot be read. ``hooks`` as in
    :func:`check_model_kind`.

    Raises:
        TypeError: From :func:`check_module`, or naming the forward's signature and the fix
            (a wrapper module whose ``forward(x)`` calls the model).

    Example:
        >>> class Two(nn.Module):
        ...     def forward(self, a, b):
        ...         return a + b
        >>> check_runnable(Two())
        Traceback (most recent call last):
        ...
        TypeError: model.forward(a, b) cannot be called with one input: ...
    """
    check_module(model, name, hooks)
    # A pre-hook (the model's own or a global one) may supply the other arguments, and a
    # class overriding __call__ calls forward its own way: the engine calls model(x).
    if (model._forward_pre_hooks or _global_pre_hooks()
            or type(model).__call__ is not nn.Module.__call__):
        return
    try:
        signature = _called_signature(model.forward)
        signature.bind(None)
    except ValueError:  # a forward whose signature Python cannot read: let it run
        return
    except TypeError:
        raise TypeError(
            f"{name}.forward{signature} cannot be called with one input: the engine calls "
            "model(x) with one tensor of inputs (the first element of your (inputs, "
            "targets) data). Wrap the model in an nn.Module whose forward(x) builds the "
            "arguments from x: for forward(a, b) stack them as x = torch.stack([a, b], 1) "
            "and call model(x[:, 0], x[:, 1]); for a keyword-only input call "
            "model(input_ids=x); for an attention mask derived from padding call "
            "model(x, attention_mask=(x != pad_id).long())."
        ) from None


def _called_signature(forward) -> inspect.Signature:
    """The signature ``model(x)`` meets: the decorator's own, unless it only passes through.

    ``inspect.signature`` follows ``functools.wraps`` to the decorated function, whose
    arguments a decorator may supply itself (``def w(self, x, shift=None)`` around
    ``forward(self, x, shift)``); a pass-through ``(*args, **kwargs)`` says nothing.

    Returns:
        The wrapper's signature, or the wrapped function's behind a pass-through.

    Raises:
        ValueError: If Python cannot read a signature.
    """
    own = inspect.signature(forward, follow_wrapped=False)
    passing = all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in own.parameters.values())
    return inspect.signature(forward) if passing else own


def _global_pre_hooks() -> bool:
    """Whether a global forward pre-hook (``register_module_forward_pre_hook``) is set."""
    return bool(getattr(torch.nn.modules.module, "_global_forward_pre_hooks", None))


def sign_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    """The entries of parameters that hold signs read through ``.int()``, not coordinates.

    torch's Householder ``orthogonal`` parametrization reads the diagonal of its
    ``original`` (last two dims) as the reflections' signs, ``X.diagonal().int()``: any
    move of ``1.0`` downwards truncates to ``0``. Random directions leave them at zero.

    Args:
        model: The user's model (only read).

    Returns:
        ``{parameter name: bool mask}`` (keys as ``model.named_parameters()``); empty for a
        model without such a parametrization.

    Example:
        >>> from torch.nn.utils.parametrizations import orthogonal
        >>> m = orthogonal(nn.Linear(4, 2))
        >>> {k: v.sum().item() for k, v in sign_entries(m).items()}
        {'parametrizations.weight.original': 2}
    """
    orthogonal = getattr(torch.nn.utils.parametrizations, "_Orthogonal", None)
    maps = getattr(torch.nn.utils.parametrizations, "_OrthMaps", None)
    if orthogonal is None or maps is None:  # torch moved them: nothing to mask
        return {}
    names = {id(p): k for k, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for module in model.modules():
        for chain in getattr(module, "parametrizations", {}).values():
            first, original = chain[0], getattr(chain, "original", None)
            if (isinstance(first, orthogonal) and first.orthogonal_map == maps.householder
                    and isinstance(original, torch.Tensor) and original.dim() >= 2
                    and id(original) in names):
                mask = torch.zeros(original.shape, dtype=torch.bool, device=original.device)
                mask.diagonal(dim1=-2, dim2=-1).fill_(True)
                out[names[id(original)]] = mask
    return out


def warn_sign_moves(model: nn.Module, direction: dict[str, Tensor], name: str) -> None:
    """Warn if a direction moves :func:`sign_entries` (the user's direction is kept as is).

    Example:
        >>> import warnings
        >>> from torch.nn.utils.parametrizations import orthogonal
        >>> m = orthogonal(nn.Linear(4, 2))
        >>> d = {k: torch.ones_like(p) for k, p in m.named_parameters()}
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     warn_sign_moves(m, d, "direction")
        >>> len(w), "2 entries" in str(w[0].message)
        (1, True)
    """
    for k, mask in sign_entries(model).items():
        d = direction.get(k)
        if d is None:
            continue
        moved = int(torch.count_nonzero(d.detach().to(mask.device)[mask]))
        if moved:
            warnings.warn(
                f"{name} moves {moved} entries of {k!r} that torch's orthogonal "
                "parametrization (Householder) reads as signs, through .int() of its "
                "diagonal: the loss jumps wherever they move (int(0.99) == 0 zeroes a column), "
                "so a surface or curve through the model has a spike at it. Zero them "
                f"({name}[{k!r}].diagonal(dim1=-2, dim2=-1).zero_()), as "
                "lw.random_directions does.", UserWarning, stacklevel=4)


def prefix_hint(missing: list[str], unknown: list[str]) -> str:
    """Say so when a direction's keys and the model's differ only by a wrapper's prefix.

    ``torch.compile`` names the parameters ``_orig_mod.<name>``, ``DataParallel`` and
    ``DistributedDataParallel`` ``module.<name>``: a direction made for the eager model
    (or saved from a wrapped one) then misses every key.

    Args:
        missing: The model's parameter names the direction lacks.
        unknown: The direction's names the model lacks.

    Returns:
        A sentence naming the prefix and the fix, or ``""``.

    Example:
        >>> prefix_hint(["_orig_mod.w"], ["w"])[:44]
        " Its keys and the model's differ by a prefix"
    """
    if not missing or not unknown:
        return ""
    names, first = set(unknown), missing[0]
    prefixes = [first[: -len(u)] for u in names if first.endswith("." + u)]  # model wrapped
    prefixes += [u[: -len(first)] for u in names if u.endswith("." + first)]  # direction
    for prefix in sorted(set(prefixes), key=len):
        wrapped = all(m.startswith(prefix) and m[len(prefix):] in names for m in missing)
        if wrapped or all(prefix + m in names for m in missing):
            return (f" Its keys and the model's differ by a prefix, {prefix!r} "
                    "(torch.compile adds '_orig_mod.', DataParallel and "
                    "DistributedDataParallel add 'module.'): make the direction for the "
                    "model you pass, or pass the same module to both (model._orig_mod or "
                    "model.module is the inner one).")
    return ""


def check_differentiable(loss: Tensor, params: dict[str, Tensor], what: str) -> None:
    """Refuse a loss with no graph back to ``params`` while autograd is on.

    Args:
        loss: The loss just computed from ``params``.
        params: The tensors it was computed from (some requiring grad).
        what: What needs the derivatives, for the message.

    Raises:
        ValueError: Naming the likely cause (no_grad / inference_mode on forward, a
            detached output) and the fix.

    Example:
        >>> w = torch.ones(2, requires_grad=True)
        >>> check_differentiable((w * 2).sum(), {"w": w}, "the Hessian")
        >>> check_differentiable((w.detach() * 2).sum(), {"w": w}, "the Hessian")
        Traceback (most recent call last):
        ...
        ValueError: The loss does not depend on the parameters through autograd, ...
    """
    if (loss.requires_grad or not torch.is_grad_enabled()
            or not any(p.requires_grad for p in params.values())):
        return
    error: ValueError = no_graph_error(what)  # typed: the docstring lint reads ValueError
    raise error


def no_graph_error(what: str) -> ValueError:
    """The error of :func:`check_differentiable`, for ``what`` needs the derivatives.

    Returns:
        A ``ValueError`` naming the likely causes and the fix.
    """
    return ValueError(
        "The loss does not depend on the parameters through autograd, so "
        f"{what} cannot be computed (it would be zero): the model's forward, or loss_fn, "
        "runs without it (a @torch.no_grad() or @torch.inference_mode() on forward, or "
        "outputs detached with .detach(), .data or .item()). Remove the decorator, or "
        "evaluate a wrapper nn.Module whose forward calls the undecorated computation."
    )
