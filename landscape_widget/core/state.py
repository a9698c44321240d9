"""The evaluator's own state: buffers put back after every pass, and the BatchNorm batch.

A forward pass may write to buffers (a call counter, QAT observers, what a hook stores).
The evaluator runs on a private copy of the model
(:func:`~landscape_widget.core.params.evaluation_copy`), so nothing reaches the user's
module; :class:`BufferState` also puts the copy's buffers back after every pass, so that
every point starts from the user's state whatever the order of the points.
"""

from __future__ import annotations

import collections
import types

import numpy as np
import torch
from torch import Tensor, nn

from .params import buffers_of, parameters_of

# The module attributes put back after every pass (see BufferState._state_versions): plain
# values by identity, containers by their contents (shallow).
PLAIN_ATTRIBUTES = (bool, int, float, str, type(None), Tensor)
CONTAINERS = (list, dict, set, collections.deque)
# nn.Module's own entries of __dict__ (hook dicts, _modules, ...): the engine's to manage.
_MODULE_KEYS = frozenset(vars(nn.Module()))


def plain_attributes(module: torch.nn.Module | None) -> list[tuple[dict, frozenset, list]]:
    """What :func:`restore_attributes` puts back after a pass, per module of ``module``.

    Each module's ``__dict__`` with its keys now and its entries ``(name, value,
    contents)``: attributes of a :data:`PLAIN_ATTRIBUTES` type (``contents`` None), and
    containers of an exact :data:`CONTAINERS` type with a shallow copy of their contents
    (a forward appending its features to ``self.seen`` grew the engine's copy by one
    activation per pass: 441 of them for a 21 x 21 grid; and a forward reading such a
    list saw the passes before).

    The keys recorded say which attributes a pass added (``if hasattr(self, "prev"): out
    = out + self.prev`` then ``self.prev = ...``; a hook's ``module.features = out``):
    :func:`restore_attributes` removes them. Left there, every pass saw the one before it
    (the values depended on the order of the points), a vmap pass left a dead batched
    tensor that broke the next pass, and the linear stem's trace a torch.fx Proxy.

    Returns:
        One record per module of ``module`` and its submodules (none for ``None``), and
        one ``(None, frozenset(), [(cell, value, contents)])`` per module whose hooks close
        over containers.
    """
    if module is None:
        return []
    records = []
    for m in module.modules():
        attrs = vars(m)
        entries = [(k, v, None) for k, v in attrs.items() if isinstance(v, PLAIN_ATTRIBUTES)]
        entries += [(k, v, _contents(v)) for k, v in attrs.items()
                    if type(v) in CONTAINERS and k not in _MODULE_KEYS]
        records.append((attrs, frozenset(attrs), entries))
        # Containers in the closures of its hooks (the copy's own: params.copy_hooks): a
        # hook appending the layer's output to a list it closes over.
        cells = [(c, c.cell_contents, _contents(c.cell_contents))
                 for hooks in (m._forward_pre_hooks, m._forward_hooks)
                 for fn in hooks.values() for c in _closure(fn)
                 if type(c.cell_contents) in CONTAINERS]
        if cells:
            records.append((None, frozenset(), cells))
    return records


def _closure(fn) -> tuple:
    """The filled closure cells of a Python function (none for anything else)."""
    cells = getattr(fn, "__closure__", None) if isinstance(fn, types.FunctionType) else None
    out = []
    for c in cells or ():
        try:
            c.cell_contents  # noqa: B018 - raises ValueError for an empty cell
        except ValueError:
            continue
        out.append(c)
    return tuple(out)


def _contents(value):
    """A shallow copy of a container's contents (a dict's items as a list)."""
    return list(value.items()) if type(value) is dict else list(value)


def restore_attributes(records: list[tuple[dict, frozenset, list]]) -> None:
    """Put back what a pass changed in the modules of :func:`plain_attributes`.

    Attributes that are another object now get their object back; containers their
    contents; public attributes the pass added (``self.last = h``, a lazy
    ``if not hasattr(self, "scale")``) are deleted, so the next pass sees the module as
    the first did. (Private ones, ``_name``, are left: torch's own machinery may add them.)

    Example:
        >>> net = nn.Linear(1, 1); net.seen, net.calls = [], 0
        >>> records = plain_attributes(net)
        >>> net.seen.append(1); net.calls += 1; net.last = 2
        >>> restore_attributes(records)
        >>> net.seen, net.calls, hasattr(net, "last")
        ([], 0, False)
    """
    for attrs, keys, entries in records:
        for k, v, contents in entries:
            if attrs is None:  # k is a hook's closure cell
                if k.cell_contents is not v:
                    k.cell_contents = v
            elif attrs.get(k) is not v:
                attrs[k] = v
            if contents is not None and _changed(v, contents):
                v.clear()
                if type(v) in (dict, set):
                    v.update(contents)
                else:  # a list or a deque
                    v.extend(contents)
        if attrs is not None and len(attrs) != len(keys):
            for k in [k for k in attrs if k not in keys and not k.startswith("_")]:
                del attrs[k]


def _changed(value, contents: list) -> bool:
    """Whether a container holds other objects than ``contents`` (compared by identity)."""
    now = _contents(value)
    if len(now) != len(contents):
        return True
    if type(value) is dict:
        return any(k is not k0 or v is not v0 for (k, v), (k0, v0) in zip(now, contents,
                                                                            strict=True))
    if type(value) is set:
        return value != set(contents)
    return any(a is not b for a, b in zip(now, contents, strict=True))


BN_BATCH_SIZE = 128
"""Default samples per BatchNorm batch with ``bn="batch"`` (see :func:`bn_batch_size_for`)."""


def bn_batch_size_for(bn: str, bn_batch_size: int | None) -> int | None:
    """The samples per BatchNorm batch of a computation: ``None`` unless ``bn="batch"``.

    With ``bn="batch"`` BatchNorm layers normalise with the statistics of consecutive
    batches of this many samples, in data order (the last batch holds the rest), exactly
    like a ``DataLoader(batch_size=bn_batch_size, shuffle=False)`` loop over the data with
    train-mode BatchNorm. The values then depend on this number and on the data order, but
    never on the engine's plan, device or executor. The default, :data:`BN_BATCH_SIZE` =
    128, is the batch size most image classifiers are trained with, so the statistics are
    as noisy as those the network saw in training, and the memory of one pass does not grow
    with the data set. Data sorted by class (as ``ImageFolder`` yields it) gives batches of
    one class: shuffle it once, or pass the size of the whole data set.

    Returns:
        ``None`` for ``bn="eval"`` (or any other mode); for ``bn="batch"`` the given size as an int,
        or :data:`BN_BATCH_SIZE` when it is ``None``.

    Raises:
        ValueError: If ``bn_batch_size`` is not a positive int, or is given with
            ``bn="eval"``.

    Example:
        >>> bn_batch_size_for("batch", None), bn_batch_size_for("batch", 32)
        (128, 32)
        >>> bn_batch_size_for("eval", None) is None
        True
    """
    if bn_batch_size is not None and (
        isinstance(bn_batch_size, bool) or not isinstance(bn_batch_size, (int, np.integer))
        or bn_batch_size < 1
    ):
        raise ValueError(f"bn_batch_size must be an int >= 1, got {bn_batch_size!r}.")
    if bn != "batch":
        if bn_batch_size is not None:
            raise ValueError(
                f"bn_batch_size={bn_batch_size} only applies to bn='batch' (BatchNorm with "
                "batch statistics); bn='eval' uses the running statistics. Pass bn='batch' "
                "or drop bn_batch_size."
            )
        return None
    return int(bn_batch_size) if bn_batch_size is not None else BN_BATCH_SIZE


class BufferState:
    """Buffer restoration for :class:`~landscape_widget.core.evaluate.Evaluator` (a mixin).

    It uses the evaluator's ``module`` (the private copy) and ``base`` (its tensors).
    """

    def _state_versions(self) -> None:
        """Gather the buffers into one flat tensor per dtype, beside a pristine copy.

        ``base`` then holds views into the flat tensors, so putting every buffer back
        after a pass is one copy per dtype, whatever the forward wrote and however (QAT's
        fused observers write in place without bumping version counters).
        """
        groups: dict[tuple, list[str]] = {}
        # Sparse buffers (a graph's adjacency) cannot be flattened: each keeps a pristine
        # copy, put back when a pass changed it in place (its version counter moved).
        self._sparse: dict[str, tuple[Tensor, int]] = {}
        for k in buffers_of(self.module):
            if self.base[k].layout != torch.strided:
                self._sparse[k] = (self.base[k].clone(), self.base[k]._version)
                continue
            groups.setdefault((self.base[k].dtype, self.base[k].device), []).append(k)
        self._flats: list[tuple[Tensor, Tensor]] = []
        # Where each buffer lies in the flats (lanes give each thread its own flats, see
        # core/lanes.py): name -> (flat index, offset, shape).
        self._buffer_slots: dict[str, tuple[int, int, torch.Size]] = {}
        for keys in groups.values():
            flat = torch.cat([self.base[k].reshape(-1) for k in keys])
            pos = 0
            for k in keys:
                size, shape = self.base[k].numel(), self.base[k].shape
                self.base[k] = flat[pos : pos + size].view(shape)
                self._buffer_slots[k] = (len(self._flats), pos, shape)
                pos += size
            self._flats.append((flat, flat.clone()))
        params = parameters_of(self.module)
        self._versions = {k: self.base[k]._version for k in params}
        # Generators the copy's modules hold (noise drawn with generator=self.g) are state
        # a pass changes too: put back like the buffers. Left to advance, every point drew
        # other noise and a repeated call gave other values (0.06 apart on a 3x3 grid).
        self._generators = held_generators(self.module)
        # Plain attributes a forward reassigns (self.calls += 1, self.state = ...) too: a
        # counter the forward used gave every point another value (0.26 apart on a 3x3
        # grid) and a repeated call others. Numbers, strings, None and tensors, by identity
        # (a container changed in place, or an attribute a pass adds, is not put back).
        self._attributes = plain_attributes(self.module)

    def _reset_state(self) -> None:
        """Put back every buffer, generator and plain attribute (see :meth:`_state_versions`).

        Buffers: a counter, QAT observers, what a hook wrote. Every pass then starts from the
        user's state, whatever the order of the points.

        Raises:
            RuntimeError: If the forward wrote into a parameter in place (its value at
                the point would then be undefined).
        """
        with torch.no_grad():
            for flat, pristine in self._flats:
                flat.copy_(pristine)
            for k, (pristine, version) in self._sparse.items():
                if self.base[k]._version != version:
                    self.base[k] = pristine.clone()
                    self._sparse[k] = (pristine, self.base[k]._version)
            for g, state in self._generators:
                g.set_state(state)
            restore_attributes(self._attributes)
        self._check_parameters()

    def _check_parameters(self) -> None:
        """Raise if a pass wrote into a parameter in place.

        Raises:
            RuntimeError: If the forward wrote into a parameter in place (its value at
                the point would then be undefined).
        """
        for k, version in self._versions.items():
            if self.base[k]._version != version:
                raise RuntimeError(
                    f"The model's forward writes into its parameter {k!r} in place, so "
                    "its loss at a point is not defined by the point; move that update "
                    "out of forward (e.g. into the training step)."
                )

    # The probes and evaluate() run between _enter and _exit (in a finally block).
    _enter = _reset_state
    _exit = _reset_state


def check_running_stats(model: torch.nn.Module, bn: str) -> None:
    """Refuse ``bn="eval"`` for a model whose BatchNorm layers keep no running statistics.

    Such a layer (``track_running_stats=False``) normalises with the statistics of each
    batch in eval mode too, so with ``bn="eval"`` its loss would depend on how the engine
    happens to batch the data (its tuned plan, the device's memory, an out-of-memory
    fallback), which nothing fixes or records. ``bn="batch"`` fixes those batches.

    Raises:
        ValueError: If ``bn`` is ``"eval"`` and a BatchNorm layer has no running statistics,
            naming the layers and ``bn="batch"``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.BatchNorm1d(3, track_running_stats=False))
        >>> check_running_stats(net, "batch")
        >>> check_running_stats(net, "eval")
        Traceback (most recent call last):
        ...
        ValueError: BatchNorm layer(s) ['0'] keep no running statistics ...
    """
    if bn != "eval":
        return
    untracked = [name or "(the model)" for name, m in model.named_modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                 and m.running_mean is None and m.running_var is None]
    if untracked:
        raise ValueError(
            f"BatchNorm layer(s) {untracked[:3]}{' ...' if len(untracked) > 3 else ''} keep "
            "no running statistics (track_running_stats=False): in eval mode they normalise "
            "with each batch's own statistics, so with bn='eval' the loss would depend on how "
            "the engine batches the data. Pass bn='batch' and bn_batch_size=B: the value of "
            "an eval-mode loop over DataLoader(data, batch_size=B) batches in data order (B = "
            "the number of samples for one forward pass on all data).")


def check_no_renorm(model: torch.nn.Module) -> None:
    """Refuse embeddings with ``max_norm``: their forward rescales their weight in place.

    ``nn.Embedding(max_norm=...)`` renormalises the rows it looks up, writing into its
    weight, so the loss at a point is not a function of the point: surfaces refuse such a
    forward when they see the write; Hessian products and gradient directions would
    silently differentiate another function.

    Raises:
        ValueError: Naming the layer and the fix.

    Example:
        >>> check_no_renorm(torch.nn.Embedding(5, 2))
        >>> check_no_renorm(torch.nn.Sequential(torch.nn.Embedding(5, 2, max_norm=1.0)))
        Traceback (most recent call last):
        ...
        ValueError: Embedding '0' has max_norm=1.0: ...
    """
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Embedding | torch.nn.EmbeddingBag) and m.max_norm is not None:
            raise ValueError(
                f"{type(m).__name__} {name or '(the model)'!r} has max_norm={m.max_norm}: its "
                "forward rescales rows of its weight in place, so the loss at a point is not a "
                "function of the point and has no Hessian or gradient direction. Build it "
                "without max_norm (renormalise the weight in the training step instead).")


def held_generators(module: nn.Module) -> list[tuple[torch.Generator, Tensor]]:
    """The generators ``module``'s submodules hold as attributes, each with its state now.

    Noise drawn with ``generator=self.g`` is state a forward changes: callers put these
    states back after every forward.

    Returns:
        ``(generator, state)`` pairs, in module order.

    Example:
        >>> m = nn.Linear(1, 1); m.g = torch.Generator().manual_seed(3)
        >>> [(g is m.g, torch.equal(s, m.g.get_state())) for g, s in held_generators(m)]
        [(True, True)]
    """
    return [(g, g.get_state()) for m in module.modules() for g in vars(m).values()
            if isinstance(g, torch.Generator)]


def set_flags(module: nn.Module, bn: str) -> None:
    """Eval mode everywhere; with ``bn="batch"`` BatchNorm uses batch statistics."""
    module.eval()
    if bn == "batch":
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                # Without tracking, F.batch_norm gets no running buffers: batch statistics
                # and no in-place update (which vmap could not batch anyway).
                m.track_running_stats = False
