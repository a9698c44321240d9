"""Kinds of ``nn.Module`` the engine cannot evaluate, refused up front with their fix.

Every computation evaluates the model through ``torch.func.functional_call`` on a private
copy, with forward hooks on its layers at set-up. Two kinds of module cannot take part:

- TorchScript modules (``torch.jit.script``, ``torch.jit.trace``, ``torch.jit.load``):
  torch refuses both ``functional_call`` ("The stateless API can't be used with Jitted
  modules") and forward hooks ("register_forward_hook is not supported on ScriptModules"),
  messages that name neither the module nor the fix.
- Complex parameters: a direction is a real tensor per parameter and the Hessian tools
  work in real arithmetic; torch's "value cannot be converted to type double without
  overflow" named neither.
"""

from __future__ import annotations

import torch
from torch import nn


def check_model_kind(model: nn.Module, name: str = "model") -> None:
    """Refuse a model holding a TorchScript module or a complex parameter.

    Args:
        model: The user's model (only read).
        name: How the model is called in the message (``"model"``, ``"model_a"``).

    Raises:
        TypeError: Naming the scripted submodule or the complex parameter and the fix.

    Example:
        >>> check_model_kind(nn.Linear(2, 2))
        >>> check_model_kind(torch.jit.script(nn.Linear(2, 2)))
        Traceback (most recent call last):
        ...
        TypeError: model is a TorchScript module (RecursiveScriptModule, from torch.jit.script/trace/load): ...
    """  # noqa: E501 - a doctest's expected line
    for path, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            where = name if not path else f"{name}.{path}"
            raise TypeError(
                f"{where} is a TorchScript module ({type(module).__name__}, from "
                "torch.jit.script/trace/load): torch cannot evaluate it at other parameter "
                "values (torch.func.functional_call and forward hooks refuse TorchScript). "
                "Pass the eager nn.Module instead, the one you scripted or traced; for a "
                "model read with torch.jit.load, build its Python class and load the "
                "weights: eager.load_state_dict(scripted.state_dict())."
            )
    for key, p in model.named_parameters():
        if p.is_complex():
            raise TypeError(
                f"{name}'s parameter {key!r} is complex ({p.dtype}): directions and the "
                "Hessian are over real parameters. Hold it as a real parameter with a last "
                "dimension of 2 (nn.Parameter(torch.view_as_real(w))) and use "
                "torch.view_as_complex(self.<param>) in forward."
            )


def check_module(model, name: str = "model") -> None:
    """Refuse anything but an ``nn.Module`` the engine can evaluate.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``, or holds a TorchScript module or a
            complex parameter (see ``model_kinds``), naming the fix.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{name} must be a torch.nn.Module, got {type(model).__name__}; pass the network "
            "itself (e.g. the object you call as model(inputs))."
        )
    check_model_kind(model, name)
