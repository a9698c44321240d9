"""Directions in parameter space: random (normalised) and interpolation.

A direction is a ``dict[str, Tensor]`` keyed like ``model.named_parameters()`` (plus, for
interpolation with ``buffers=True``, the floating-point buffers). The rules follow
tomgoldstein/loss-landscape ``net_plotter.py`` (PAPERS.md (a) steps 1-2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .model_kinds import sign_entries
from .params import (
    Params,
    check_direction,
    check_module,
    check_same_structure,
    float_buffers_of,
    parameters_of,
)

NORMS = ("filter", "layer", "weight", None)
IGNORES = ("biasbn", None)
FILTER_EPS = 1e-10


def _check_choice(value, allowed: tuple, what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what}={value!r} is not supported; choose one of {list(allowed)}.")


def normalize_direction(
    d: Tensor, theta: Tensor, *, norm: str | None, ignore: str | None
) -> Tensor:
    """Normalise one direction tensor ``d`` against the weights ``theta``.

    Tensors with ``dim() <= 1`` (biases, BatchNorm scales and shifts) become zero with
    ``ignore="biasbn"`` and a copy of ``theta`` otherwise, as in loss-landscape. Larger
    tensors follow ``norm``:

    - ``"filter"``: every slice ``j`` along dim 0 (a conv filter, a row of a Linear
      weight) is scaled to ``d_j * ||theta_j|| / (||d_j|| + 1e-10)``.
    - ``"layer"``: the whole tensor is scaled to ``d * ||theta|| / ||d||``.
    - ``"weight"``: ``d * theta`` elementwise.
    - ``None``: unchanged.

    Args:
        d: Direction tensor (not modified).
        theta: The weights it is normalised against (same shape).
        norm: One of ``"filter"``, ``"layer"``, ``"weight"``, ``None``.
        ignore: ``"biasbn"`` or ``None``.

    Returns:
        A new tensor.

    Example:
        >>> theta = torch.ones(2, 3)
        >>> d = normalize_direction(torch.randn(2, 3), theta, norm="filter", ignore="biasbn")
        >>> [round(float(r.norm()), 4) for r in d]
        [1.7321, 1.7321]
    """
    _check_choice(norm, NORMS, "norm")
    _check_choice(ignore, IGNORES, "ignore")
    if d.dim() <= 1:
        return torch.zeros_like(d) if ignore == "biasbn" else theta.detach().clone()
    if norm == "filter":
        flat_d = d.reshape(d.shape[0], -1)
        flat_t = theta.detach().reshape(theta.shape[0], -1)
        scale = flat_t.norm(dim=1, keepdim=True) / (flat_d.norm(dim=1, keepdim=True) + FILTER_EPS)
        return (flat_d * scale).reshape(d.shape)
    if norm == "layer":
        return d * (theta.detach().norm() / d.norm())
    if norm == "weight":
        return d * theta.detach()
    return d.clone()


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}.")
        gen.manual_seed(seed)
    return gen


def random_direction(
    model: nn.Module,
    *,
    norm: str | None = "filter",
    ignore: str | None = "biasbn",
    seed: int | None = None,
) -> Params:
    """A random Gaussian direction, normalised per PAPERS.md (a) step 2.

    Entries are drawn from N(0, 1) on the CPU with a private generator (the global RNG is
    left alone), in ``named_parameters()`` order, so a seed gives the same direction on
    every device. The result has each parameter's device and dtype.

    Args:
        model: The model whose parameters define the space (not modified).
        norm: ``"filter"`` (default), ``"layer"``, ``"weight"`` or ``None``.
        ignore: ``"biasbn"`` (default: zero for tensors of dim <= 1) or ``None``.
        seed: Integer seed for reproducibility; ``None`` draws fresh entropy.

    Returns:
        ``dict[str, Tensor]`` keyed like ``model.named_parameters()``.

    Example:
        >>> m = nn.Linear(3, 2)
        >>> d = random_direction(m, seed=0)
        >>> sorted(d), float(d["bias"].abs().sum())
        (['bias', 'weight'], 0.0)
        >>> # filter normalisation: each output unit's row has the norm of the model's row
        >>> torch.allclose(d["weight"].norm(dim=1), m.weight.detach().norm(dim=1))
        True
    """
    return random_directions(model, 1, norm=norm, ignore=ignore, seed=seed)[0]


def random_directions(
    model: nn.Module,
    count: int,
    *,
    norm: str | None = "filter",
    ignore: str | None = "biasbn",
    seed: int | None = None,
) -> list[Params]:
    """``count`` independent random directions drawn one after another from one seed.

    The first equals ``random_direction(model, seed=seed)``. As in loss-landscape, the
    directions are not orthogonalised (in high dimension they are nearly orthogonal).

    Returns:
        ``count`` direction dicts (parameter name -> tensor shaped, typed and placed like the
        parameter), each normalised per ``norm`` with the ``ignore``d entries zeroed, and
        the sign entries of Householder ``orthogonal`` parametrizations
        (:func:`~.model_kinds.sign_entries`) zero.

    Raises:
        ValueError: If ``norm`` or ``ignore`` is not one of the supported choices, or the
            directions would be zero on every parameter (see :func:`_check_moves`).
    """
    _check_choice(norm, NORMS, "norm")
    _check_choice(ignore, IGNORES, "ignore")
    gen = _generator(seed)
    params = parameters_of(model)
    signs = sign_entries(model)  # read through .int(): moving them makes the loss jump
    out = []
    for _ in range(count):
        d: Params = {}
        for name, theta in params.items():
            raw = torch.randn(theta.shape, generator=gen, dtype=torch.float32)
            raw = raw.to(device=theta.device, dtype=theta.dtype)
            if name in signs:  # before normalising: each filter keeps the weights' norm
                raw = raw.masked_fill(signs[name], 0)
            d[name] = normalize_direction(raw, theta, norm=norm, ignore=ignore)
        out.append(d)
    if out and params:
        _check_moves(model, params, out[0], norm, ignore)
    return out


def _check_moves(model: nn.Module, params: Params, d: Params, norm, ignore) -> None:
    """Refuse a direction that is zero on every parameter: its landscape is a flat plane.

    That happens with ``ignore="biasbn"`` on a model without parameters of dim > 1 (a
    dynamically quantized model keeps its Linear weights as packed int8 data, not
    parameters), and with a ``norm`` scaled by ``theta`` where those are all zero (a
    zero-initialised model).

    Raises:
        ValueError: Naming the cause and the fix.
    """
    if any(v.is_meta for v in d.values()) or any(bool(v.any()) for v in d.values()):
        return  # meta tensors (weights never loaded) are refused later, with their fix
    quantized = sorted({type(m).__module__ + "." + type(m).__name__ for m in model.modules()
                        if type(m).__module__.startswith("torch.ao.nn.quantized")})
    note = (f" Its quantized layers ({', '.join(quantized[:2])}) hold their weights as "
            "packed int8 data, not parameters, so no direction moves them: compute the "
            "landscape of the float model (before quantization)." if quantized else "")
    if ignore == "biasbn" and not any(v.dim() > 1 for v in params.values()):
        raise ValueError(
            "the random directions are zero: ignore='biasbn' leaves out 1-D tensors and this "
            "model has no parameters of dim > 1, so every point would be the model itself (a "
            "flat landscape). Pass ignore=None to move the 1-D parameters." + note)
    raise ValueError(
        f"the random directions are zero: norm={norm!r} scales them to the model's weights, "
        "which are all zero (a zero-initialised model?), so every point would be the model "
        "itself (a flat landscape). Pass norm=None for unscaled Gaussian directions." + note)


def interpolation_direction(
    model_a: nn.Module, model_b: nn.Module, *, buffers: bool = True
) -> Params:
    """The direction ``theta_b - theta_a`` from ``model_a`` to ``model_b``.

    With ``buffers=True`` floating-point buffers (BatchNorm running statistics) are
    included, so evaluating ``model_a`` at ``alpha = 1`` reproduces ``model_b`` exactly
    (loss-landscape's ``--dir_type states``). Integer buffers such as
    ``num_batches_tracked`` do not affect evaluation and are left out.

    Args:
        model_a: The start model (alpha = 0).
        model_b: The end model (alpha = 1), of the same architecture.
        buffers: Also interpolate floating-point buffers.

    Returns:
        A direction dict (``model_b``'s value minus ``model_a``'s, in ``model_a``'s dtype and
        device) over the parameters, plus the floating-point buffers if ``buffers``.

    Raises:
        ValueError: If the two models do not have the same parameter names and shapes,
            or differ in their layers or layer settings (model_a's layers compute every
            point, so model_b's values would be silently wrong at alpha = 1).
    """
    check_module(model_a, "model_a")
    check_module(model_b, "model_b")
    check_same_structure(model_a, model_b, "model_a", "model_b")
    pa, pb = parameters_of(model_a), parameters_of(model_b)
    if buffers:
        pa.update(float_buffers_of(model_a))
        pb.update(float_buffers_of(model_b))
    if pa.keys() != pb.keys():
        only_a = sorted(set(pa) - set(pb))[:5]
        only_b = sorted(set(pb) - set(pa))[:5]
        raise ValueError(
            "model_a and model_b have different parameters "
            f"(only in a: {only_a}, only in b: {only_b}); interpolation needs two models "
            "of the same architecture."
        )
    out: Params = {}
    for k, a in pa.items():
        b = pb[k]
        if a.shape != b.shape:
            raise ValueError(
                f"{k!r} has shape {tuple(a.shape)} in model_a but {tuple(b.shape)} in model_b."
            )
        out[k] = b.to(device=a.device, dtype=a.dtype) - a
    check_direction(model_a, out)
    return out


def barycentric_keys(base: Params, points: Sequence[Params]) -> list[str]:
    """Entries the points of a barycentric subspace replace (``Evaluator(barycentric=True)``).

    Args:
        base: The model's parameters and buffers; the entries the points give are set to
            zero in place (a point's sum of weighted vertices starts from 0).
        points: The vertices, full or partial parameter dicts.

    Returns:
        The names of the entries any point gives, in ``base``'s order.

    Raises:
        ValueError: If fewer than two points are given, or a point lacks an entry another
            point gives.
    """
    if len(points) < 2:
        raise ValueError("barycentric=True needs at least two points (the vertices).")
    keys = [k for k in base if any(k in p for p in points)]
    for i, p in enumerate(points):
        missing = [k for k in keys if k not in p]
        if missing:
            raise ValueError(
                f"point {i} lacks {missing[:3]}, which another point gives; every vertex "
                "needs the same entries (take them all from state dicts of one architecture)."
            )
    for k in keys:
        base[k] = torch.zeros_like(base[k])
    return keys
