"""Parameter space of a model: names, shapes, detached copies and direction checks.

Parameters travel as ``dict[str, Tensor]`` keyed exactly like ``model.named_parameters()``.
Nothing in this module writes into the user's module.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import types
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .errors import IsolationError
from .model_kinds import check_module, prefix_hint, warn_sign_moves

Params = dict[str, Tensor]


def parameters_of(model: nn.Module) -> Params:
    """Detached references to the model's parameters, keyed like ``named_parameters()``.

    Tied parameters appear once, under their first name (as ``named_parameters()`` does);
    ``torch.func.functional_call`` ties the other names to it.

    Args:
        model: Any ``nn.Module``.

    Returns:
        ``{name: tensor}``; the tensors share storage with the model, so callers must not
        write into them.
    """
    check_module(model)
    return {name: p.detach() for name, p in model.named_parameters()}


def float_buffers_of(model: nn.Module) -> Params:
    """Detached references to the model's floating-point buffers (e.g. BN running stats)."""
    return {
        name: b.detach()
        for name, b in model.named_buffers()
        if b is not None and torch.is_floating_point(b)
    }


def buffers_of(model: nn.Module) -> Params:
    """Detached references to all of the model's buffers (float and integer)."""
    return {name: b.detach() for name, b in model.named_buffers() if b is not None}


def weights_dtype(params: Params) -> torch.dtype | None:
    """The floating dtype that holds most of the weights' elements, the model's dtype.

    The first parameter's dtype is not it: a float64 temperature registered before float32
    layers made the engine cast the inputs to float64, and the first layer failed.

    Returns:
        That dtype, or ``None`` if no entry of ``params`` is floating-point.

    Example:
        >>> weights_dtype({"t": torch.ones((), dtype=torch.float64), "w": torch.ones(3, 2)})
        torch.float32
    """
    elements: dict[torch.dtype, int] = {}
    for v in params.values():
        if v.is_floating_point():
            elements[v.dtype] = elements.get(v.dtype, 0) + v.numel()
    return max(elements, key=elements.__getitem__) if elements else None


def model_device(model: nn.Module) -> torch.device:
    """The single device holding the model's parameters and buffers.

    Returns:
        The device of every parameter and buffer of ``model``.

    Raises:
        ValueError: If the model spans several devices, has no tensors at all, or has
            tensors on the ``meta`` device (shapes without values).
        TypeError: If ``model`` is not an ``nn.Module``.
    """
    check_module(model)
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if not devices:
        raise ValueError(
            "The model has no parameters: a loss landscape needs at least one parameter tensor."
        )
    if any(d.type == "meta" for d in devices):
        raise ValueError(
            "The model's tensors are on the meta device: shapes without values (a model built "
            "under torch.device('meta') or accelerate's init_empty_weights). Load its weights "
            "first, e.g. model.to_empty(device='cpu') then model.load_state_dict(state)."
        )
    if len(devices) > 1:
        raise ValueError(
            f"The model's tensors live on several devices ({sorted(map(str, devices))}); "
            "move the whole model to one device with model.to(device) first."
        )
    return devices.pop()


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")


def _copy_hook(fn, memo: dict):
    """``fn`` with its closure copied through ``memo`` (the user's objects become the copy's).

    ``deepcopy`` treats functions as atoms, so a hook closing over a dict or over the module
    itself would still write to the user's objects. A closure that cannot be copied keeps
    the original function.

    Returns:
        A new function sharing ``fn``'s code and globals with deep copies of its closure cells, or
        ``fn`` itself when it is not a Python function, has no closure, or a cell cannot be copied.
    """
    if not isinstance(fn, types.FunctionType) or not fn.__closure__:
        return fn
    try:
        cells = tuple(types.CellType(copy.deepcopy(c.cell_contents, memo)) for c in fn.__closure__)
    except Exception:  # noqa: BLE001 - an empty cell or an uncopyable object: keep it
        return fn
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, cells)
    new.__kwdefaults__ = copy.copy(fn.__kwdefaults__)
    return new


def _module_by_module(model: nn.Module, memo: dict) -> nn.Module:
    """A deep copy built from each module's ``__dict__``.

    It gets past classes that refuse ``deepcopy`` or pickling as a whole (a ``__deepcopy__``
    or ``__getstate__`` that raises) while their parts can be copied.

    Returns:
        The copy of ``model`` (``memo`` then maps each original object's id to its copy).
    """
    for m in model.modules():
        memo[id(m)] = type(m).__new__(type(m))  # references between modules map to these
    for m in model.modules():
        memo[id(m)].__dict__.update(copy.deepcopy(vars(m), memo))
    return memo[id(model)]


def _uncopyable(model: nn.Module, memo: dict) -> str:
    """Where ``deepcopy`` of ``model`` fails: ``"path (type): error"``."""
    for name, m in model.named_modules():
        for key, value in vars(m).items():
            if key in ("_parameters", "_buffers", "_modules"):
                continue
            try:
                copy.deepcopy(value, dict(memo))
            except Exception as err:  # noqa: BLE001 - we only look for the culprit
                path = f"{name}.{key}" if name else key
                return f"model.{path} ({type(value).__name__}): {type(err).__name__}: {err}"
    return "an unknown part of the model"


@contextlib.contextmanager
def plain_modes(device: torch.device) -> Iterator[None]:
    """The caller's thread-local torch modes that would change what is computed, turned off.

    Under the user's ``torch.inference_mode()`` the tensors made here are inference tensors
    (no version counter, never saved for backward: the engine's set-up and every
    Hessian-vector product fail); under the user's ``torch.autocast`` the forward passes
    would compute in bf16/fp16 while the result says fp32. The package's own autocast
    (``precision=``) is entered inside this.
    """
    with torch.inference_mode(False), torch.autocast(device.type, enabled=False):
        yield


def outside_inference_mode(fn):
    """``fn``, run with the caller's ``torch.inference_mode()`` switched off.

    Under the caller's inference mode every tensor made inside is an inference tensor, and
    grad mode is off: a training step finds no gradient ("element 0 of tensors does not
    require grad"), and the engine's in-place checks misread the tensors (a plane through
    three models said the forward wrote into a parameter). Leaving inference mode turns
    grad mode on, as torch defines it; the caller's other modes stay.

    Returns:
        The wrapped function (unchanged when called outside inference mode).

    Example:
        >>> @outside_inference_mode
        ... def made():
        ...     return torch.ones(1).is_inference()
        >>> with torch.inference_mode():
        ...     made()
        False
    """
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return run


def evaluation_copy(model: nn.Module) -> nn.Module:
    """A private copy of ``model`` that nothing in its ``forward`` can use to reach the user's.

    Parameters, buffers (persistent or not), attributes, hooks (and the objects their
    closures hold) and ``training`` flags are the copy's own, so the copy's flags can be set
    from a worker thread and its ``forward`` may write to anything (a buffer counter, QAT
    observers, ``self.features = h``, legacy ``weight_norm``'s ``weight``) without the
    user's module seeing it. Tensors held as plain attributes are copied detached (legacy
    ``weight_norm`` keeps a non-leaf ``weight`` that ``deepcopy`` refuses). Costs one copy
    of the model's tensors.

    Returns:
        A new module with the same class, tensors (as independent copies), attributes and hooks as
        ``model``, sharing no mutable object with it (a parametrized module's class is
        subclassed so its tensors ignore ``parametrize.cached()``).

    Raises:
        IsolationError: If the model cannot be deep-copied (an open file, a lock, a C
            handle held by a submodule): naming the attribute and the fix, before anything
            runs on it.
    """
    check_module(model)
    memo: dict[int, object] = {}
    for m in model.modules():
        for value in list(vars(m).values()):
            if isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
                with torch.inference_mode(False):
                    memo[id(value)] = value.detach().clone()
    work = dict(memo)  # after the copy: each of the user's objects -> the copy's
    try:
        with torch.no_grad(), torch.inference_mode(False):  # normal tensors, whatever the mode
            out = copy.deepcopy(model, work)
    except Exception:  # noqa: BLE001 - a class may refuse deepcopy as a whole: copy its parts
        work = dict(memo)
        try:
            with torch.no_grad(), torch.inference_mode(False):
                out = _module_by_module(model, work)
        except Exception as err:  # noqa: BLE001 - any failure gets the same clear refusal
            raise IsolationError(
                f"The model cannot be copied: copy.deepcopy fails at "
                f"{_uncopyable(model, work)}. landscape_widget evaluates points on a private "
                "copy so that nothing forward does can change your model, and never on the "
                "model itself. Fix: make that attribute deep-copyable (give its class a "
                "__deepcopy__) or keep it outside the module (pass it to forward, or hold it "
                "in a closure or a global)."
            ) from err
    copy_hooks(out, work)
    _uncached_parametrizations(out)
    return out


def copy_hooks(module: nn.Module, memo: dict) -> None:
    """Give the hooks of ``module`` (a deep copy) closures copied through ``memo``.

    ``deepcopy`` keeps hook functions as they are, so their closures would still hold the
    original's objects (a dict the forward reads features from, the module itself).

    Args:
        module: The copy, whose hooks are replaced in place.
        memo: The ``deepcopy`` memo that made it (each original object's id -> its copy).
    """
    for m in module.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(m, attr, None)
            if hooks:
                for key in list(hooks):
                    hooks[key] = _copy_hook(hooks[key], memo)


def _uncached_parametrizations(module: nn.Module) -> None:
    """Make ``module``'s parametrized tensors ignore ``torch.nn.utils.parametrize.cached()``.

    Under that context (the user's, any thread) a parametrized weight is computed once and
    kept in a global cache keyed by the id of the module it was registered on, which a copy
    shares: every point would get the weight of the first one evaluated (a flat landscape),
    and the user's own forward could get a moved point's weight. Each parametrized module of
    the private copy gets a subclass whose properties always compute from the tensors that
    ``functional_call`` put in.
    """
    for m in module.modules():
        names = getattr(m, "parametrizations", None)
        if not isinstance(names, nn.ModuleDict) or not names:
            continue
        cls = type(m)
        props = {name: property(lambda self, n=name: self.parametrizations[n](),
                                lambda self, v, n=name: self.parametrizations[n].right_inverse(v))
                 for name in names}
        # Same name and module as torch's class: messages and torch.fx's leaf test see no
        # difference.
        m.__class__ = type(cls.__name__, (cls,), {**props, "__module__": cls.__module__})


def check_direction(model: nn.Module, direction: Params, name: str = "direction") -> None:
    """Validate that a direction dict fits the model.

    A direction must give a tensor for every parameter (keys as in ``named_parameters()``)
    and may add floating-point buffers (BatchNorm running statistics, as produced by
    :func:`~landscape_widget.interpolation_direction`).

    Raises:
        TypeError: If it is not a dict of tensors.
        ValueError: If keys are missing or unknown, or a shape does not match.
    """
    if not isinstance(direction, dict):
        raise TypeError(
            f"{name} must be a dict[str, Tensor] keyed like model.named_parameters(), "
            f"got {type(direction).__name__}; build one with lw.random_direction(model)."
        )
    params = parameters_of(model)
    buffers = float_buffers_of(model)
    missing = [k for k in params if k not in direction]
    unknown = [k for k in direction if k not in params and k not in buffers]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unknown:
            parts.append(f"unknown keys {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        raise ValueError(
            f"{name} does not match the model: {'; '.join(parts)}. A direction needs one tensor "
            "per entry of model.named_parameters(); make it with lw.random_direction(model) "
            "for this very model." + prefix_hint(missing, unknown)
        )
    for k, d in direction.items():
        if not isinstance(d, Tensor):
            raise TypeError(f"{name}[{k!r}] must be a Tensor, got {type(d).__name__}.")
        ref = params[k] if k in params else buffers[k]
        if d.shape != ref.shape:
            raise ValueError(
                f"{name}[{k!r}] has shape {tuple(d.shape)} but the model's tensor has shape "
                f"{tuple(ref.shape)}; the direction was made for another model."
            )
        if not torch.is_floating_point(d):
            raise TypeError(f"{name}[{k!r}] must be a floating-point tensor, got {d.dtype}.")
        # The sum is finite when every entry is (one read, no mask written); only a
        # non-finite sum (a NaN, an inf, or an overflow of huge entries) needs the full check.
        if not bool(torch.isfinite(d.sum())) and not bool(torch.isfinite(d).all()):
            raise ValueError(f"{name}[{k!r}] contains NaN or inf; directions must be finite.")
    warn_sign_moves(model, direction, name)  # a user's direction moving orthogonal's signs


def module_structure(model: nn.Module) -> list[tuple[str, str, str]]:
    """``(name, class, settings)`` of every submodule.

    What decides the function besides the tensors: a ReLU where another model has a Tanh,
    a stride, an eps.

    Returns:
        One ``(qualified name, module.Class, extra_repr())`` triple per submodule in
        ``named_modules()`` order, the root first (name ``""``).
    """
    return [(name, f"{type(m).__module__}.{type(m).__qualname__}", m.extra_repr())
            for name, m in model.named_modules()]


def check_same_structure(a: nn.Module, b: nn.Module, name_a: str, name_b: str) -> None:
    """Raise unless ``a`` and ``b`` are built of the same modules with the same settings.

    Points between two models are evaluated with one of them as the template, so models
    whose tensors match but whose layers differ would give the other's values silently.

    Raises:
        ValueError: Naming the first submodule that differs.
    """
    sa, sb = module_structure(a), module_structure(b)
    for x, y in zip(sa, sb, strict=False):
        if x != y:
            where = repr(x[0]) if x[0] else "the top-level module"
            raise ValueError(
                f"{name_a} and {name_b} differ at {where}: {x[1].rsplit('.', 1)[-1]}"
                f"({x[2]}) against {y[1].rsplit('.', 1)[-1]}({y[2]}); they must be the same "
                "architecture with the same layer settings."
            )
    if len(sa) != len(sb):
        raise ValueError(f"{name_a} and {name_b} have {len(sa)} and {len(sb)} submodules; "
                         "they must be the same architecture.")


def check_same_placement(models: list[nn.Module], names: list[str]) -> None:
    """Raise unless the models' floating-point tensors share one dtype and one device.

    Points between models are combined into one template's tensors: a float64 model
    beside float32 ones would be rounded, a model on another device moved, silently.

    Raises:
        ValueError: If a model's floating-point tensors are on other devices or of other dtypes than
            those of ``models[0]`` (named with ``names``).
    """
    for what in ("device", "dtype"):
        kinds = [{str(getattr(t, what)) for t in list(m.parameters()) + list(m.buffers())
                  if t.is_floating_point()} for m in models]
        for name, kind in zip(names[1:], kinds[1:], strict=True):
            if kind != kinds[0]:
                raise ValueError(f"{names[0]} and {name} have different {what}s "
                                 f"({sorted(kinds[0])} and {sorted(kind)}); convert them with "
                                 ".to(...) first.")
