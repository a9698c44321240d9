"""Directions and projection files in tomgoldstein/loss-landscape's layout.

A directions file holds groups ``xdirection`` (and ``ydirection`` for a plane) of datasets
``'0'`` ... ``'n-1'``: one per tensor of ``model.parameters()`` (its ``weights`` type) or of
``model.state_dict()`` (its ``states`` type, buffers included), in that order, as its
``net_plotter.load_directions`` reads them. PCA directions add ``explained_variance_ratio_``
(and ``explained_variance_``, ``singular_values_``), which ``plot_2D.py`` puts on the axes.
A projection file holds ``proj_xcoord`` and ``proj_ycoord``, one entry per checkpoint.

We also write each dataset's name as an attribute, so our own files are read back by name;
files without names are read by position and checked tensor by tensor against the model.
A tied tensor has one ``states`` entry per name; loss-landscape moves it by their sum, and so
do we.
Entries of non-persistent buffers (not in ``state_dict``) go to a group of their own, so the
xdirection group keeps exactly one dataset per ``state_dict`` entry, as ``set_states`` asserts.
``num_batches_tracked`` (an integer step count, no direction of the loss) is written as 0 and
dropped when read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .h5files import as_array, atomic_h5, open_read
from .h5io import OURS
from .params import Params, check_direction, check_module

GROUPS = ("xdirection", "ydirection")
DIR_TYPES = ("weights", "states")
BEYOND = "landscape_widget_beyond_state_dict"  # non-persistent buffers' entries, by group


def _as_list(directions) -> list[Params]:
    if isinstance(directions, dict):
        directions = [directions]
    if not isinstance(directions, (list, tuple)) or not 1 <= len(directions) <= 2:
        raise TypeError("directions must be a direction dict or a list of one or two of them "
                        f"(x and y); got {type(directions).__name__}.")
    return list(directions)


def _order(model: nn.Module, dir_type: str) -> list[tuple[str, torch.Tensor]]:
    if dir_type == "weights":
        return [(n, p.detach()) for n, p in model.named_parameters()]
    return [(n, v.detach()) for n, v in model.state_dict().items()]


def save_directions(path: str | Path, directions, model: nn.Module, *,
                    dir_type: str | None = None, overwrite: bool = False,
                    explained_variance_ratio=None, singular_values=None,
                    n_samples: int | None = None) -> str:
    """Write directions as loss-landscape's directions file (``net_plotter.load_directions``).

    Args:
        path: The file.
        directions: ``d`` or ``[d1]`` (a line) or ``[d1, d2]`` (a plane), direction dicts as
            made by :func:`~landscape_widget.random_direction`.
        model: The model the directions belong to (its tensor order is the file's order).
        dir_type: ``"weights"`` (one dataset per ``model.parameters()`` entry) or
            ``"states"`` (one per ``state_dict()`` entry; buffers the directions do not
            move are 0). Default: ``"states"`` if a direction moves buffers, else
            ``"weights"``.
        overwrite: Replace an existing file (default False).
        explained_variance_ratio: PCA ratios to store (``explained_variance_ratio_``).
        singular_values: PCA singular values (``singular_values_``; with ``n_samples``
            checkpoints also ``explained_variance_ = s**2 / (n_samples - 1)``).
        n_samples: Number of rows the PCA was fitted on.

    Returns:
        The ``dir_type`` written.

    Raises:
        ValueError: If a direction does not fit the model, or moves buffers with
            ``dir_type="weights"``.
        FileExistsError: If ``path`` exists and ``overwrite`` is false.
    """
    check_module(model)
    dirs = _as_list(directions)
    for i, d in enumerate(dirs):
        check_direction(model, d, name=f"directions[{i}]")
    params = dict(model.named_parameters())
    moves_buffers = any(k not in params for d in dirs for k in d)
    dir_type = dir_type or ("states" if moves_buffers else "weights")
    if dir_type not in DIR_TYPES:
        raise ValueError(f"dir_type must be 'weights' or 'states', got {dir_type!r}.")
    if dir_type == "weights" and moves_buffers:
        raise ValueError("these directions move BatchNorm buffers, which the 'weights' type "
                         "cannot hold; use dir_type='states'.")
    order = _order(model, dir_type)
    beyond = []
    if dir_type == "states":
        # Non-persistent buffers are not in state_dict, but a direction may move them
        # (interpolation_direction does): that part would be lost with no error unless
        # written. Not in xdirection/ydirection: loss-landscape's set_states asserts one
        # dataset per state_dict entry. Our reader finds them by name.
        listed = {n for n, _ in order}
        beyond = [(n, b.detach()) for n, b in model.named_buffers()
                  if n not in listed and any(n in d for d in dirs)]
    write_directions(path, dirs, order, dir_type, overwrite=overwrite, beyond=beyond,
                     explained_variance_ratio=explained_variance_ratio,
                     singular_values=singular_values, n_samples=n_samples)
    return dir_type


def write_directions(path, dirs: list[Params], order: list[tuple[str, torch.Tensor]],
                     dir_type: str, *, overwrite: bool, explained_variance_ratio=None,
                     singular_values=None, n_samples: int | None = None,
                     beyond: list[tuple[str, torch.Tensor]] = ()) -> None:
    """Write ``dirs`` with one dataset per ``(name, reference tensor)`` of ``order``.

    Entries a direction lacks are written as zeros of the reference's shape (float32 for
    integer references such as ``num_batches_tracked``). ``beyond`` (tensors outside
    loss-landscape's order: non-persistent buffers) go to group :data:`BEYOND`.
    """
    with atomic_h5(path, overwrite) as f:
        f.attrs[OURS + "dir_type"] = dir_type
        for group, d in zip(GROUPS, dirs, strict=False):
            g = f.create_group(group)
            if beyond:
                _write_entries(f.require_group(BEYOND).create_group(group), d, beyond)
            _write_entries(g, d, order)
            g.attrs[OURS + "keys"] = [k for k, _ in [*order, *beyond] if k in d]
        if explained_variance_ratio is not None:
            f["explained_variance_ratio_"] = np.asarray(explained_variance_ratio, np.float64)
        if singular_values is not None:
            s = np.asarray(singular_values, np.float64)
            f["singular_values_"] = s
            if n_samples is not None and n_samples > 1:
                f["explained_variance_"] = s ** 2 / (n_samples - 1)


def _write_entries(g, d: Params, order: list[tuple[str, torch.Tensor]]) -> None:
    for i, (name, ref) in enumerate(order):
        v = d.get(name)
        if v is None:  # a buffer this direction does not move, or an integer one
            v = torch.zeros(ref.shape, dtype=ref.dtype if ref.is_floating_point()
                            else torch.float32)
        ds = g.create_dataset(str(i), data=as_array(v))
        ds.attrs[OURS + "name"] = name


def _aliases(model: nn.Module) -> dict[str, str]:
    """Each ``state_dict`` key that shares its tensor with an earlier one -> that first key."""
    first: dict[int, str] = {}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        out[name] = first.setdefault(id(t), name)
    return {k: v for k, v in out.items() if k != v}


WRAPPERS = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile


def _bare(name: str) -> str:
    while name.startswith(WRAPPERS):
        name = name.split(".", 1)[1]
    return name


def _model_names(names: list[str], state: dict, path) -> dict[str, str]:
    """The model's name for each name stored in one of our files.

    Directions saved with a compiled (``_orig_mod.``) or DataParallel (``module.``) model
    are the same tensors as the plain model's, and the other way round.

    Returns:
        ``{stored name: the model's name}``.

    Raises:
        ValueError: If a stored name is not the model's under any of those wrappers.
    """
    if all(n in state for n in names):
        return {n: n for n in names}
    bare: dict[str, str] = {}
    for k in state:
        bare.setdefault(_bare(k), k)
    out = {n: bare.get(_bare(n)) for n in names}
    unknown = [n for n, k in out.items() if k is None]
    if unknown:
        raise ValueError(f"{path}: tensors {unknown[:3]} are not in this model (it has "
                         f"{list(state)[:3]}, ...): the file was saved for another model; "
                         "pass the model it was made for.")
    return out


def _by_position(values: list[np.ndarray], model: nn.Module, path) -> tuple[list[str], str]:
    for dir_type in DIR_TYPES:
        order = _order(model, dir_type)
        if len(order) == len(values) and all(
            tuple(v.shape) == tuple(ref.shape) for v, (_, ref) in zip(values, order, strict=True)
        ):
            return [n for n, _ in order], dir_type
    n_w, n_s = len(_order(model, "weights")), len(_order(model, "states"))
    first = ""
    for dir_type, call in (("weights", "parameters()"), ("states", "state_dict()")):
        order = _order(model, dir_type)
        if len(order) == len(values):  # the count fits: say where the shapes part
            i, (name, ref) = next((i, o) for i, (v, o) in enumerate(zip(values, order,
                                  strict=True)) if tuple(v.shape) != tuple(o[1].shape))
            first = (f" (as {call}: tensor {i} is {tuple(values[i].shape)} in the file, "
                     f"{name!r} {tuple(ref.shape)} in the model)")
            break
    raise ValueError(
        f"{path} holds {len(values)} tensors that fit neither this model's parameters() "
        f"({n_w} tensors) nor its state_dict() ({n_s}) in order and shape{first}: it was "
        "written for another model (or a differently built one); pass the model it was "
        "made for, built with the same layers and settings.")


def _checked_group(f, group: str, path):
    """``f[group]``, checked to hold datasets ``'0'`` ... ``'n-1'`` as ``write_list`` writes."""
    import h5py

    g = f[group]
    names = set(g) if isinstance(g, h5py.Group) else None
    want = {str(i) for i in range(len(names or ()))}
    if names is None or names != want or not all(isinstance(g[n], h5py.Dataset) for n in names):
        odd = "it is not a group" if names is None else (
            f"it lacks {sorted(want - names, key=int)[:3]} and has {sorted(names - want)[:3]}")
        raise ValueError(f"{path}: '{group}' must be a group of datasets '0', '1', ... (one per "
                         f"tensor, as loss-landscape's h5_util.write_list writes it), but {odd}: "
                         "the file is incomplete or not a directions file; write it again.")
    return g


def load_directions(path: str | Path, model: nn.Module) -> list[Params]:
    """Read a directions file (ours or loss-landscape's) as direction dicts for ``model``.

    Our files are mapped by the stored names; loss-landscape's by position, as its
    ``weights`` type (``model.parameters()`` order) or ``states`` type (``state_dict()``
    order), whichever matches every shape. Buffers: floating-point ones (BatchNorm running
    statistics) are kept when non-zero; ``num_batches_tracked`` is dropped.

    Args:
        path: The file.
        model: The model the directions are for (not modified).

    Returns:
        ``[d]`` or ``[d1, d2]``: CPU tensors in the dtype of the model's tensors.

    Raises:
        FileNotFoundError: If there is no such file.
        ValueError: If the file is not HDF5, holds no ``xdirection`` (or a malformed one) or
            does not fit the model.
    """
    check_module(model)
    path = Path(path)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    # Non-persistent buffers too: save_directions writes those the directions move.
    state.update({k: v.detach() for k, v in model.named_buffers() if k not in state})
    params = dict(model.named_parameters())
    float_buffers = {k for k, v in model.named_buffers() if v.is_floating_point()}
    alias = _aliases(model)
    out = []
    with open_read(path, "a directions file") as f:
        if "xdirection" not in f:
            hint = ("it is a surface or curve file: lw.Surface.load(path).directions (or "
                    "lw.Curve.load) holds the directions we kept in it"
                    if "xcoordinates" in f else "pass the directions file (net_plotter's "
                    "setup_direction or lw.save_directions writes it)")
            raise ValueError(f"{path} has no 'xdirection' group, so it is not a directions "
                             f"file; {hint}.")
        for group in GROUPS:
            if group not in f:
                break
            g = _checked_group(f, group, path)
            members = [g[str(i)] for i in range(len(g))]
            if BEYOND in f and group in f[BEYOND]:
                members += [f[BEYOND][group][str(i)] for i in range(len(f[BEYOND][group]))]
            values = [np.asarray(m[()]) for m in members]
            names = [m.attrs.get(OURS + "name") for m in members]
            if all(isinstance(n, str) for n in names):
                to_model = _model_names(names, state, path)
                keys = [to_model[k] for k in g.attrs.get(OURS + "keys", names)]
                names = [to_model[n] for n in names]
            else:
                names, _ = _by_position(values, model, path)
                # A tied tensor is in state_dict under each of its names. loss-landscape's
                # set_states adds every entry to a deepcopy of the state_dict, which keeps
                # the sharing: the tensor moves by the sum of its entries. Each entry is
                # credited to the tensor's first name (the one named_parameters() gives).
                names = [alias.get(n, n) for n in names]
                keys = [n for n, v in zip(names, values, strict=True)
                        if n in params or (n in float_buffers and np.any(v != 0))]
            d, acc = {}, {}
            for name, v in zip(names, values, strict=True):
                if name not in keys:
                    continue
                ref = state[name]
                if tuple(v.shape) != tuple(ref.shape):
                    raise ValueError(f"{path}: {group}/{name} has shape {tuple(v.shape)}, the "
                                     f"model's tensor {tuple(ref.shape)}.")
                if ref.is_floating_point():  # num_batches_tracked and other integers: no
                    v = torch.from_numpy(np.array(v))
                    acc[name] = v.double() + acc[name] if name in acc else v
            for name, v in acc.items():
                d[name] = v.to("cpu", state[name].dtype)
            missing = [n for n in params if n not in d]
            if missing:
                raise ValueError(f"{path}: {group} lacks parameters {missing[:3]}.")
            out.append(d)
    return out


def write_projection(path: str | Path, coords: np.ndarray, *, overwrite: bool = False) -> None:
    """Write ``coords`` ``(n, 2)`` as loss-landscape's projection file.

    Raises:
        ValueError: If ``coords`` is not ``(n, 2)``.
        FileExistsError: If ``path`` exists and ``overwrite`` is false.
    """
    xy = np.asarray(coords, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"coords must be (n, 2), got shape {xy.shape}.")
    with atomic_h5(path, overwrite) as f:
        f["proj_xcoord"] = xy[:, 0]
        f["proj_ycoord"] = xy[:, 1]


def read_projection(path: str | Path) -> np.ndarray:
    """The ``(n, 2)`` coordinates of a projection file (``proj_xcoord``, ``proj_ycoord``).

    Returns:
        float64 ``(n, 2)``: one row per checkpoint.

    Raises:
        FileNotFoundError: If there is no such file.
        ValueError: If ``path`` is a directory or not an HDF5 file.
    """
    with open_read(path, "a projection file") as f:
        return np.stack([np.asarray(f["proj_xcoord"][()], np.float64),
                         np.asarray(f["proj_ycoord"][()], np.float64)], axis=1)
