"""The independent oracle: a naive float64 per-point loop.

It shares no code with the engine: no ``functional_call``, no vmap, no batching of points,
no reuse. For every point it loads ``theta + sum_j c_j d_j`` into a float64 deep copy of
the model with ``load_state_dict`` (the way loss-landscape's ``net_plotter.set_states``
does), switches to eval mode (BatchNorm in train mode for ``bn="batch"``) and takes the
mean loss over all data in one forward pass. An engine-vs-engine comparison (e.g. vmap
vs loop) would hide bugs the two share, such as a transposed grid or a wrong direction
key; this oracle does not.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _aliases(model: nn.Module) -> dict[str, str]:
    """Map every ``state_dict`` key to the key of the tensor it shares (tied weights)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    named = list(model.named_parameters(remove_duplicate=False))
    named += list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        first.setdefault(id(t), name)
        out[name] = first[id(t)]
    return out


def _state_like(model: nn.Module) -> OrderedDict:
    """An empty state dict that carries ``model.state_dict()``'s ``_metadata``.

    Modules that version their state (MNASNet's ``_load_from_state_dict`` reads the
    version from it) refuse a plain dict.
    """
    state: OrderedDict = OrderedDict()
    meta = getattr(model.state_dict(), "_metadata", None)
    if meta is not None:
        state._metadata = meta
    return state


def naive_eval(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    directions: list[dict[str, torch.Tensor]],
    coords,
    *,
    loss_fn=None,
    bn: str = "eval",
    bn_batch_size: int | None = None,
    dtype: torch.dtype = torch.float64,
    template: nn.Module | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy at ``theta + sum_j coords[i, j] * directions[j]`` for every row ``i``.

    Direction keys may name parameters or buffers (BatchNorm running statistics); a tied
    tensor moves under every name it has. With ``bn="batch"`` and ``bn_batch_size`` the
    data go through in consecutive batches of that size (a plain ``for`` over slices) and
    the loss is the sample-weighted mean of the batch losses; without it, one batch of all.
    ``dtype``: the computation's dtype (fake quantisation runs in float32 only).
    ``template``: a fresh model of the same architecture to load the points into, for
    models that refuse ``deepcopy``.

    Returns:
        ``(loss, accuracy)``, float64 arrays of length ``len(coords)``.
    """
    loss_fn = loss_fn or F.cross_entropy
    ref = (template if template is not None else copy.deepcopy(model)).to(dtype)
    base = {
        k: (v.detach().double() if torch.is_floating_point(v) else v.detach()).clone()
        for k, v in model.state_dict().items()
    }
    alias = _aliases(model)
    dirs = [{k: v.detach().double() for k, v in d.items()} for d in directions]
    xd = x.to(dtype) if torch.is_floating_point(x) else x
    step = bn_batch_size if bn == "batch" and bn_batch_size else len(xd)
    losses, accs = [], []
    for c in np.atleast_2d(np.asarray(coords, dtype=np.float64)):
        state = _state_like(model)
        for k, v in base.items():
            key = alias.get(k, k)
            w = v.clone()
            for cj, d in zip(c, dirs, strict=True):
                if key in d:
                    w = w + float(cj) * d[key]
            state[k] = w.to(dtype) if torch.is_floating_point(w) else w
        ref.load_state_dict(state)
        ref.eval()
        if bn == "batch":
            for m in ref.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
        loss = correct = 0.0
        with torch.no_grad():
            for s in range(0, len(xd), step):
                out = ref(xd[s : s + step].clone())  # a forward may write to its input
                loss += float(loss_fn(out, y[s : s + step])) * len(out)
                correct += float((out.argmax(-1) == y[s : s + step]).double().sum())
        losses.append(loss / len(xd))
        accs.append(correct / len(xd))
    return np.array(losses), np.array(accs)


def surface_coords(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """``(ny * nx, 2)`` coordinates ``(x[ix], y[iy])`` in row-major (rows = y) order."""
    return np.array([(a, b) for b in ys for a in xs])


def naive_surface(model, x, y, d1, d2, xs, ys, **kw) -> tuple[np.ndarray, np.ndarray]:
    """The oracle on a grid: ``(ny, nx)`` arrays with ``[iy, ix]`` at ``(xs[ix], ys[iy])``."""
    loss, acc = naive_eval(model, x, y, [d1, d2], surface_coords(xs, ys), **kw)
    shape = (len(ys), len(xs))
    return loss.reshape(shape), acc.reshape(shape)


def linspace(spec) -> np.ndarray:
    return np.linspace(float(spec[0]), float(spec[1]), int(spec[2]))


def naive_values(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 directions: list[dict[str, torch.Tensor]], coords, *, loss_fn,
                 metrics: dict) -> dict[str, np.ndarray]:
    """Like :func:`naive_eval` for any task: ``{"loss": ..., name: ...}`` at every row.

    ``metrics`` maps names to ``fn(outputs, targets) -> float`` computed on *all* data at
    once, in float64 (the outputs as the model returns them: a tuple or dict too). The loss
    is ``loss_fn`` on all data in one call: for a loss with ``ignore_index`` that is the
    mean over all counted targets, which the engine must reproduce from its batches.
    """
    ref = copy.deepcopy(model).double().eval()
    if isinstance(loss_fn, nn.Module):  # class weights in float64 too
        loss_fn = copy.deepcopy(loss_fn).double()
    base = {k: (v.detach().double() if torch.is_floating_point(v) else v.detach()).clone()
            for k, v in model.state_dict().items()}
    dirs = [{k: v.detach().double() for k, v in d.items()} for d in directions]
    xd = x.double() if torch.is_floating_point(x) else x
    yd = y.double() if torch.is_floating_point(y) else y
    out_values: dict[str, list[float]] = {"loss": [], **{k: [] for k in metrics}}
    for c in np.atleast_2d(np.asarray(coords, dtype=np.float64)):
        state = _state_like(model)
        for k, v in base.items():
            w = v.clone()
            for cj, d in zip(c, dirs, strict=True):
                if k in d:
                    w = w + float(cj) * d[k]
            state[k] = w
        ref.load_state_dict(state)
        with torch.no_grad():
            out = ref(xd)
            out_values["loss"].append(float(loss_fn(out, yd)))
            for k, fn in metrics.items():
                out_values[k].append(float(fn(out, yd)))
    return {k: np.array(v) for k, v in out_values.items()}
