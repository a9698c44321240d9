"""Grid files (surfaces, curves, curvature maps) in tomgoldstein/loss-landscape's HDF5 layout.

What its scripts read (``plot_surface.py``, ``plot_2D.py``, ``plot_1D.py``, ``h52vtp.py``,
``plot_hessian_eigen.py``): ``xcoordinates`` (and ``ycoordinates``), float64; the value
arrays ``train_loss``, ``train_acc`` (percent), ``test_loss``, ``test_acc``, ``min_eig``,
``max_eig``; and ``dir_file``, the name of the directions file. ``plot_surface.py`` creates
the arrays with shape ``(len(x), len(y))`` but fills them through
``meshgrid(x, y).ravel()``, so their *memory* order is ``rows = y`` whatever the declared
shape: the value at ``(x[i], y[j])`` is flat element ``j * len(x) + i``. We read any shape
with that flat order and write ``(len(y), len(x))``, the shape whose rows are really y (the
one ``plot_2D.py``'s ``contour(meshgrid(x, y), Z)`` accepts on a non-square grid).

loss-landscape pre-fills unfinished results with -1 (``min_eig`` with +1): in its files
those values read as NaN, "not computed". Our own files write NaN (or ``missing=``, e.g. -1
so that ``plot_surface.py`` computes those points) and say so in an attribute. Everything
in a file that we do not interpret is read into ``extra`` and written back, so a
load-and-save keeps it. Saving never replaces an existing file unless ``overwrite=True``,
and replaces it atomically (a new file is written beside it, then renamed over it).
Nothing here unpickles: HDF5 datasets and JSON attributes only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .h5files import as_array, atomic_h5, open_read

FORMAT_VERSION = 1
OURS = "landscape_widget/"  # prefix of our attributes
DIRECTIONS_GROUP = "landscape_widget_directions"
METRICS_GROUP = "landscape_widget_metrics"  # the user's metrics (metrics={name: fn})
NOT_COMPUTED = -1.0  # loss-landscape's pre-fill of train/test loss and accuracy
# Our field name -> loss-landscape dataset; accuracy is stored in percent as there.
KEYS = {"loss": "train_loss", "accuracy": "train_acc", "test_loss": "test_loss",
        "test_accuracy": "test_acc", "lambda_min": "min_eig", "lambda_max": "max_eig",
        # Standard error of train_loss on a data subset (samples=N): an extra dataset,
        # which loss-landscape's scripts do not read (and so do not mind).
        "loss_se": "train_loss_se"}
PERCENT = ("accuracy", "test_accuracy")
# (loss, accuracy) pairs whose accuracy dataset plot_1D.py reads along with the loss: an
# all-"not computed" accuracy is written where only the loss was computed.
STAND_INS = (("loss", "accuracy"), ("test_loss", "test_accuracy"))
COORDS = ("xcoordinates", "ycoordinates")


@dataclass(frozen=True)
class _RelativeLink:
    """An external link given relative to its file, with its target resolved from there.

    Written back relative to the file it is written into, so that a file saved into
    another folder still reaches the same target (its own words, copied, pointed nowhere).
    """

    target: str  # the linked file's absolute path
    path: str  # the object's path inside it


def _external(link, node):
    """``link`` as :func:`_write_node` writes it back: a relative one as :class:`_RelativeLink`."""
    if os.path.isabs(link.filename):
        return link
    here = os.path.dirname(os.path.abspath(node.file.filename))
    return _RelativeLink(os.path.normpath(os.path.join(here, link.filename)), link.path)


def _read_node(node, skip=()) -> dict:
    """An HDF5 group's members, but those named in ``skip``, as :func:`_write_node` writes them.

    Returns:
        ``{name: (value, attrs)}``: ``value`` is the dataset's data (a ``str`` for a scalar
        string), a group's members read the same way, or a soft or external link as the
        link (a dangling external one made the whole file unreadable); ``attrs`` is a dict.
    """
    import h5py

    out = {}
    for name in node:
        if name in skip:
            continue
        link = node.get(name, getlink=True)
        if isinstance(link, h5py.SoftLink):
            out[name] = (link, {})
            continue
        if isinstance(link, h5py.ExternalLink):
            out[name] = (_external(link, node), {})
            continue
        obj = node[name]
        attrs = dict(obj.attrs)
        if isinstance(obj, h5py.Group):
            value = _read_node(obj)
        elif h5py.check_string_dtype(obj.dtype) and obj.shape == ():
            value = obj.asstr()[()]  # str, written back as the same variable-length string
        else:
            value = obj[()]
        out[name] = (value, attrs)
    return out


def _put(group, key: str, data) -> None:
    """Write ``data`` as member ``key`` of ``group``, whatever characters ``key`` holds.

    HDF5 reads ``/`` in a name as a path (``"acc/top2"`` became a nested group) and ``"."``
    as the group itself: such a key gets an escaped name. Every member keeps its key in an
    attribute, which the reader prefers.
    """
    name = key
    if "/" in key or key in ("", "."):
        name = key.replace("%", "%25").replace("/", "%2F").replace(".", "%2E") or "%"
    while name in group:  # a key that reads like an escaped one written before it
        name += "_"
    group.create_dataset(name, data=data).attrs[OURS + "name"] = key


def _get_all(group) -> dict:
    """The datasets :func:`_put` wrote in ``group``, by key.

    Returns:
        ``{key: array}``: each member's key attribute, or its name in files written before
        the attribute (which wrote the key as the name).
    """
    return {ds.attrs.get(OURS + "name", name): np.asarray(ds[()]) for name, ds in group.items()}


def _write_node(group, items: dict) -> None:
    import h5py

    for name, (value, attrs) in items.items():
        if name in group:
            continue  # we wrote it anew
        if isinstance(value, (h5py.SoftLink, h5py.ExternalLink)):
            group[name] = value  # the link, as it was
            continue
        if isinstance(value, _RelativeLink):  # relative again, from where it is written
            here = os.path.dirname(os.path.abspath(group.file.filename))
            group[name] = h5py.ExternalLink(os.path.relpath(value.target, here), value.path)
            continue
        if isinstance(value, dict):
            obj = group.create_group(name)
            _write_node(obj, value)
        else:
            obj = group.create_dataset(name, data=value)
        obj.attrs.update(attrs)


def write_grid(path: str | Path, x: np.ndarray, y: np.ndarray | None, arrays: dict, *,
               spec: dict, directions, extra: dict, overwrite: bool,
               missing: float = float("nan"), user_metrics: dict | None = None) -> None:
    """Write a grid file (see the module docstring).

    Args:
        path: The file.
        x: The x coordinates.
        y: The y coordinates (None for a curve).
        arrays: ``{field: array or None}`` with fields from :data:`KEYS`; ``(ny, nx)`` or ``(nx,)``.
        spec: Our metadata (JSON).
        directions: Direction dicts to keep in the file, or None.
        extra: What :func:`read_grid` found and did not interpret: written back as it was.
        overwrite: Replace an existing file.
        missing: Value written where an array is NaN (loss-landscape's scripts treat -1 as
            "not computed"; NaN is left out of its plots).
        user_metrics: ``{name: array}`` of the user's metrics, written as float64 datasets
            of the group ``landscape_widget_metrics`` (NaN kept).

    Raises:
        FileExistsError: If ``path`` exists and ``overwrite`` is false.
        TypeError: If ``missing`` is not a number (a bool counts as none), or ``overwrite``
            is not a bool.
        ValueError: If an array's shape does not match the coordinates.
    """
    shape = (np.asarray(x).size,) if y is None else (np.asarray(y).size, np.asarray(x).size)
    if not isinstance(missing, (int, float)) or isinstance(missing, bool):
        raise TypeError(f"missing must be a number (NaN or -1), got {missing!r}.")
    with atomic_h5(path, overwrite) as f:
        f["xcoordinates"] = np.asarray(x, dtype=np.float64)
        if y is not None:
            f["ycoordinates"] = np.asarray(y, dtype=np.float64)
        for name, arr in arrays.items():
            if arr is None:
                continue
            arr = np.array(arr, dtype=np.float64)
            if arr.shape != shape:
                raise ValueError(f"{name} has shape {arr.shape}, the grid is {shape}.")
            if name in PERCENT:
                arr = arr * 100.0
            arr[np.isnan(arr)] = missing
            f[KEYS[name]] = arr
            f[KEYS[name]].attrs[OURS + "missing"] = missing
        kept = extra.get("datasets", {})
        for loss, acc in STAND_INS:
            # plot_1D.py (and plot_surface.py resuming a file) read train_acc with train_loss,
            # and test_acc whenever there is a test_loss: a loss-only grid gets accuracies
            # that say "not computed" everywhere.
            needed = "loss" in arrays if loss == "loss" else arrays.get(loss) is not None
            if needed and arrays.get(acc) is None and KEYS[acc] not in kept:
                f[KEYS[acc]] = np.full(shape, missing)
                f[KEYS[acc]].attrs[OURS + "not_computed"] = True
                f[KEYS[acc]].attrs[OURS + "missing"] = missing
        f.attrs[OURS + "format"] = FORMAT_VERSION
        f.attrs[OURS + "spec"] = json.dumps(spec, default=str)
        f.attrs[OURS + "acc_units"] = "percent"
        if directions:
            g = f.create_group(DIRECTIONS_GROUP)
            for i, d in enumerate(directions):
                gi = g.create_group(str(i))
                for k, v in d.items():
                    _put(gi, k, as_array(v))
        if user_metrics:
            g = f.create_group(METRICS_GROUP)
            for name, arr in user_metrics.items():
                _put(g, name, np.asarray(arr, dtype=np.float64).reshape(shape))
        _write_node(f, extra.get("datasets", {}))
        for key, attrs in extra.get("dataset_attrs", {}).items():  # the user's, on ours
            for k, v in attrs.items():
                if key in f and k not in f[key].attrs:
                    f[key].attrs[k] = v
        for k, v in extra.get("attrs", {}).items():
            if k not in f.attrs:
                f.attrs[k] = v


def _stand_in(ds) -> bool:
    """Whether ``ds`` is our all-"not computed" accuracy stand-in, still unfilled.

    Returns:
        False once any point holds a value: ``plot_surface.py`` finishing one of our files
        (``missing=-1``) fills the accuracy of the points it computes, and those were read
        as "not computed" and lost on the next save.
    """
    if not ds.attrs.get(OURS + "not_computed", False):
        return False
    v = np.asarray(ds[()], dtype=np.float64)
    fill = ds.attrs.get(OURS + "missing", NOT_COMPUTED)
    return bool(np.all(np.isnan(v)) or np.all(v == fill))


def read_grid(path: str | Path, fields: tuple[str, ...]) -> dict:
    """Read a grid file written by :func:`write_grid` or by loss-landscape.

    Returns:
        ``{"x", "y" (None for a curve), field: array or None for each of fields, "spec",
        "directions", "extra", "user_metrics"}``; arrays are float64, ``(ny, nx)`` or
        ``(nx,)``, NaN where not computed, accuracy as a fraction.

    Raises:
        FileNotFoundError: If there is no such file.
        ValueError: If the file has no ``xcoordinates`` or an array of the wrong size, or is
            not an HDF5 file.
    """
    path = Path(path)
    with open_read(path, "a surface, curve or curvature file") as f:
        if "xcoordinates" not in f:
            hint = ("it is a directions file: read it with lw.load_directions(path, model)"
                    if "xdirection" in f else "pass the surface file (plot_surface.py's "
                    "*.h5_[...].h5, or what Surface.save wrote)")
            raise ValueError(f"{path} has no 'xcoordinates', so it is not a loss-landscape or "
                             f"landscape_widget grid file; {hint}.")
        ours = OURS + "format" in f.attrs
        x = np.asarray(f["xcoordinates"][()], dtype=np.float64).reshape(-1)
        y = (np.asarray(f["ycoordinates"][()], dtype=np.float64).reshape(-1)
             if "ycoordinates" in f else None)
        shape = (x.size,) if y is None else (y.size, x.size)
        out = {"x": x, "y": y}
        for name in fields:
            key = KEYS[name]
            ds = f.get(key)
            if ds is None or _stand_in(ds):
                out[name] = None
                continue
            arr = np.asarray(ds[()], dtype=np.float64)
            if arr.size != int(np.prod(shape)):
                raise ValueError(f"{path}: '{key}' has {arr.size} values for a grid of "
                                 f"{' x '.join(map(str, shape[::-1]))} points.")
            arr = arr.reshape(shape)  # flat order is rows = y in both tools' files
            fill = ds.attrs.get(OURS + "missing", NOT_COMPUTED if ds.attrs.get(
                OURS + "not_computed") else None) if ours else (
                None if key in ("min_eig", "max_eig") else NOT_COMPUTED)
            if fill is not None and not np.isnan(fill):
                arr[arr == fill] = np.nan
            out[name] = arr / 100.0 if name in PERCENT else arr
        if not ours and out.get("lambda_min") is not None and out.get("lambda_max") is not None:
            # plot_hessian_eigen.py pre-fills min_eig with +1 and max_eig with -1: a point
            # is unfinished where both still hold them.
            pending = (out["lambda_min"] == 1.0) & (out["lambda_max"] == -1.0)
            out["lambda_min"][pending] = out["lambda_max"][pending] = np.nan
        spec = json.loads(f.attrs[OURS + "spec"]) if ours else {
            "source": "loss-landscape", "file": str(path)}
        directions = None
        if DIRECTIONS_GROUP in f:
            g = f[DIRECTIONS_GROUP]
            directions = [{k: torch.from_numpy(v) for k, v in _get_all(g[str(i)]).items()}
                          for i in range(len(g))]
        user_metrics = ({k: v.astype(np.float64).reshape(shape)
                         for k, v in _get_all(f[METRICS_GROUP]).items()}
                        if METRICS_GROUP in f else {})
        known = set(COORDS) | {KEYS[n] for n in fields} | {DIRECTIONS_GROUP, METRICS_GROUP}
        extra = {
            "datasets": _read_node(f, skip=known),
            "attrs": {k: v for k, v in f.attrs.items() if not k.startswith(OURS)},
            # attributes a user put on the datasets we read (a note on train_loss): kept
            "dataset_attrs": {k: {a: v for a, v in f[k].attrs.items() if not a.startswith(OURS)}
                              for k in known if k in f and len(f[k].attrs)},
        }
    out.update(spec=spec, directions=directions, extra=extra, user_metrics=user_metrics)
    return out
