"""Content hashes: of tensors, text and bytes, and of what the user computes with.

Every hash of the package is made here. :func:`fingerprint` (tensors) and
:func:`fingerprint_text` key the reuse of computed points (a model's ``state_dict``, the
directions, the data), :func:`fingerprint_bytes` keys the executor's per-worker caches,
:func:`state_hash` records the initial weights of an optimizer run (full SHA-256, as in
the run's record) and :func:`callable_fingerprint` tells loss functions and metrics apart.

``reuse=`` may only copy points computed with *the same* loss. A name says little (two
lambdas are both ``<lambda>``; ``CrossEntropyLoss()`` and
``CrossEntropyLoss(label_smoothing=0.3)`` share their class), so the callable fingerprint
hashes what decides the values:

- a module: its class, every submodule's public attributes (``reduction``,
  ``ignore_index``, ``label_smoothing``, ...), forward hooks, parameters and buffers,
  and, for a class defined outside installed packages, its ``forward``;
- a function defined outside installed packages: its byte code and constants, default
  arguments, the values its closure captured and the module-level globals it reads
  (recursively); a function of an installed package (``torch.nn.functional.cross_entropy``)
  by its qualified name;
- ``functools.partial``, bound methods, callable objects: what they wrap and hold.

When something cannot be hashed reliably (an object with neither state nor a stable
``repr``), the fingerprint is ``None`` and reuse is refused, with that said.

The formats hashed are part of saved results (a surface's ``spec`` holds its
fingerprints, compared by a later ``reuse=``): changing one makes old files unreusable.
Tensor fingerprints are XXH3-128 since 2026-12 (32 hex digits): BLAKE2b read 0.75 GB/s
on a 2-core CPU, a third of a second per ResNet-50 call for its weights and two
directions, XXH3 11 GB/s. The older 24-digit BLAKE2b ones of saved results are still
recognised (:func:`legacy_fingerprint`, compared by core/reuse.py).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import sys
import sysconfig
import types
import uuid
from collections.abc import Mapping

import numpy as np
import torch
import xxhash
from torch import nn

_LIBRARY_ROOTS = tuple(
    p for p in {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib",
                                                       "platlib")} if p
)
_MAX_DEPTH = 12


DIGEST_SIZE = 12
"""Bytes of a BLAKE2b fingerprint (24 hex digits: text, bytes, callables, and the tensor
fingerprints of results saved before 2026-12): ample to tell results apart."""


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of ``t`` (on the CPU, contiguous, viewed as ``uint8``), not copied.

    A buffer rather than ``bytes``: hashing a large model's tensors then reads them in
    place instead of copying each first (a third of the time of fingerprinting a ResNet-50).

    Returns:
        A ``uint8`` memoryview of the tensor's bytes (of a CPU copy for other devices or
        non-contiguous tensors), hashed exactly as its ``bytes`` would be.
    """
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """A short hash of tensor names, shapes, dtypes and bytes (used to decide reuse).

    XXH3-128 (not a cryptographic hash: it tells apart results, it does not guard against
    forgery). Older results hold :func:`legacy_fingerprint` s instead (compared by
    :func:`~.reuse.check_reusable`).

    Returns:
        32 hex digits, equal for equal names and contents wherever they are stored.

    Example:
        >>> a = {"w": torch.arange(4.0)}
        >>> fingerprint(a) == fingerprint({"w": torch.arange(4.0).clone()})
        True
        >>> fingerprint(a) == fingerprint({"w": torch.tensor([0.0, 1.0, 2.0, 3.5])})
        False
        >>> h = xxhash.xxh3_128()
        >>> h.update(b"w:(4,):torch.float32;")
        >>> h.update(np.arange(4, dtype=np.float32).tobytes())
        >>> fingerprint(a) == h.hexdigest()
        True
    """
    return _hash_tensors(xxhash.xxh3_128(), tensors)


def legacy_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """:func:`fingerprint` as results saved before 2026-12 hold it (BLAKE2b, 24 hex digits).

    Returns:
        24 hex digits.

    Example:
        >>> h = hashlib.blake2b(digest_size=12)
        >>> h.update(b"w:(4,):torch.float32;")
        >>> h.update(np.arange(4, dtype=np.float32).tobytes())
        >>> legacy_fingerprint({"w": torch.arange(4.0)}) == h.hexdigest()
        True
    """
    return _hash_tensors(hashlib.blake2b(digest_size=DIGEST_SIZE), tensors)


def _hash_tensors(h, tensors: Mapping[str, torch.Tensor]) -> str:
    """Feed names, shapes, dtypes and bytes of ``tensors`` (sorted by name) to ``h``.

    Entries that are not tensors (a module's extra state) are hashed by their contents.

    Returns:
        ``h.hexdigest()``.
    """
    for k in sorted(tensors):
        t = tensors[k]
        if not isinstance(t, torch.Tensor):
            _hash_object(h, k, t)
            continue
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        _feed_tensor(h, t)
    return h.hexdigest()


def _feed_tensor(h, t: torch.Tensor) -> None:
    """Feed the contents of ``t`` to ``h``: its bytes, or a sparse tensor's parts.

    A sparse tensor (a graph's adjacency as a buffer) is fed as its layout and its
    compressed parts, never in dense form (N^2 values for N nodes). Dense tensors feed
    their bytes alone, as before sparse tensors were supported (saved fingerprints stay).
    """
    if t.layout == torch.strided:
        h.update(_tensor_bytes(t))
        return
    h.update(f"{t.layout}:".encode())
    for part in sparse_parts(t):
        h.update(_tensor_bytes(part))


def sparse_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The dense tensors that hold a sparse tensor's contents, in a canonical form.

    COO tensors are coalesced first (duplicate indices summed, sorted), so equal sparse
    tensors give equal parts however they were built.

    Returns:
        Indices and values (COO), or compressed and plain indices and values (CSR, CSC,
        BSR, BSC).

    Raises:
        TypeError: For a layout other than strided, COO and the compressed ones.

    Example:
        >>> a = torch.sparse_coo_tensor([[1, 0, 1], [0, 1, 0]], [1.0, 2.0, 3.0], (2, 2))
        >>> [p.tolist() for p in sparse_parts(a)]
        [[[0, 1], [1, 0]], [2.0, 4.0]]
    """
    if t.layout == torch.sparse_coo:
        c = t.detach().coalesce()
        return [c.indices(), c.values()]
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        return [t.crow_indices(), t.col_indices(), t.values()]
    if t.layout in (torch.sparse_csc, torch.sparse_bsc):
        return [t.ccol_indices(), t.row_indices(), t.values()]
    raise TypeError(f"Tensors of layout {t.layout} cannot be fingerprinted; store them as "
                    "dense or sparse (COO, CSR, CSC) tensors.")


def _hash_object(h, name: str, obj) -> None:
    """Feed a state_dict entry that is not a tensor, by its contents (as callables' state).

    A module's extra state (``get_extra_state``) can be any object. One that cannot be
    hashed reliably feeds random bytes: the fingerprint then matches nothing, so
    ``reuse=`` refuses rather than copies. (Dicts of tensors only, those of every result
    saved so far, hash as before.)
    """
    h.update(f"{name}:object;".encode())
    try:
        _feed(h, obj, 0, set())
    except (_Unreliable, RecursionError):
        h.update(uuid.uuid4().bytes)


def fingerprint_bytes(blob: bytes) -> str:
    """A short hash of bytes (BLAKE2b, :data:`DIGEST_SIZE` bytes, as hex).

    Returns:
        24 hex digits.

    Example:
        >>> fingerprint_bytes(b"abc") == hashlib.blake2b(b"abc", digest_size=12).hexdigest()
        True
    """
    return hashlib.blake2b(blob, digest_size=DIGEST_SIZE).hexdigest()


def fingerprint_text(text: str) -> str:
    """A short hash of a string (of its UTF-8 bytes).

    Returns:
        24 hex digits.

    Example:
        >>> fingerprint_text("é") == fingerprint_bytes(bytes([0xC3, 0xA9]))
        True
    """
    return fingerprint_bytes(text.encode())


def state_hash(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes.

    Returns:
        64 hex digits.

    Example:
        >>> h = hashlib.sha256(b"b|torch.int64|(2,)")
        >>> h.update(np.array([1, 2], dtype=np.int64).tobytes())
        >>> state_hash({"b": torch.tensor([1, 2])}) == h.hexdigest()
        True
    """
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k]
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        _feed_tensor(h, t)
    return h.hexdigest()


class _Unreliable(Exception):
    """Raised inside the walk when an object cannot be fingerprinted."""


def callable_fingerprint(fn) -> str | None:
    """A short hash of what ``fn`` computes, or ``None`` if that cannot be told reliably.

    Returns:
        24 hex digits, or ``None``.

    Example:
        >>> a = callable_fingerprint(torch.nn.CrossEntropyLoss())
        >>> a == callable_fingerprint(torch.nn.CrossEntropyLoss())
        True
        >>> a == callable_fingerprint(torch.nn.CrossEntropyLoss(label_smoothing=0.3))
        False
    """
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    try:
        _feed(h, fn, 0, set())
    except (_Unreliable, RecursionError):
        return None
    return h.hexdigest()


def _is_library(obj) -> bool:
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    if module is None:
        return False
    path = getattr(module, "__file__", None)
    if path is None:  # built into the interpreter
        return True
    return "site-packages" in path or "dist-packages" in path or path.startswith(_LIBRARY_ROOTS)


def _name(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"


def _feed(h, obj, depth: int, seen: set) -> None:  # noqa: C901 - one case per kind of value
    if depth > _MAX_DEPTH:
        raise _Unreliable
    put = h.update
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, np.generic,
                                       torch.dtype, torch.device, enum.Enum, range, slice)):
        put(f"{type(obj).__name__}:{obj!r};".encode())
    elif isinstance(obj, torch.Tensor):
        put(f"tensor{tuple(obj.shape)}{obj.dtype};".encode())
        _feed_tensor(h, obj)
    elif isinstance(obj, np.ndarray):
        put(f"ndarray{obj.shape}{obj.dtype};".encode())
        put(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, (tuple, list)):
        put(f"{type(obj).__name__}[{len(obj)}];".encode())
        for v in obj:
            _feed(h, v, depth + 1, seen)
    elif isinstance(obj, (set, frozenset)):
        parts = sorted(callable_fingerprint(v) or "" for v in obj)
        if "" in parts:
            raise _Unreliable
        put(f"set{parts};".encode())
    elif isinstance(obj, dict):
        put(f"dict[{len(obj)}];".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k, depth + 1, seen)
            _feed(h, obj[k], depth + 1, seen)
    elif isinstance(obj, types.ModuleType):
        put(f"module:{obj.__name__};".encode())
    elif isinstance(obj, type):
        put(f"class:{_name(obj)};".encode())
    elif isinstance(obj, nn.Module):
        _feed_module(h, obj, depth, seen)
    elif isinstance(obj, functools.partial):
        put(b"partial;")
        for part in (obj.func, obj.args, obj.keywords):
            _feed(h, part, depth + 1, seen)
    elif isinstance(obj, types.MethodType):
        put(b"method;")
        _feed(h, obj.__func__, depth + 1, seen)
        _feed(h, obj.__self__, depth + 1, seen)
    elif isinstance(obj, types.FunctionType):
        _feed_function(h, obj, depth, seen)
    elif isinstance(obj, (types.BuiltinFunctionType, types.WrapperDescriptorType,
                          types.MethodWrapperType, types.MethodDescriptorType)):
        put(f"builtin:{_name(obj)};".encode())
        owner = getattr(obj, "__self__", None)
        if owner is not None and not isinstance(owner, types.ModuleType):
            _feed(h, owner, depth + 1, seen)
    elif isinstance(obj, types.CodeType):
        _feed_code(h, obj, depth, seen)
    elif hasattr(obj, "__dict__"):  # a callable object or plain instance: class and state
        if id(obj) in seen:
            put(b"cycle;")
            return
        seen.add(id(obj))
        put(f"object:{_name(type(obj))};".encode())
        if not _is_library(type(obj)) and callable(obj):
            _feed(h, type(obj).__call__, depth + 1, seen)
        _feed(h, {k: v for k, v in vars(obj).items()}, depth + 1, seen)
    else:
        text = repr(obj)
        if " at 0x" in text:
            raise _Unreliable
        put(f"repr:{type(obj).__name__}:{text};".encode())


def _feed_module(h, module: nn.Module, depth: int, seen: set) -> None:
    if id(module) in seen:
        h.update(b"cycle;")
        return
    seen.add(id(module))
    for name, m in module.named_modules(remove_duplicate=False):
        h.update(f"submodule:{name}:{_name(type(m))};".encode())
        if not _is_library(type(m)):
            _feed(h, type(m).forward, depth + 1, seen)
        public = {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}
        _feed(h, public, depth + 1, seen)
        # Forward hooks change what the module returns (a loss scaled by a hook); fed only
        # when there are some, so the fingerprints of saved results stay as they were.
        hooks = [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]
        if hooks:
            h.update(b"hooks;")
            _feed(h, hooks, depth + 1, seen)
    for name, t in module.named_parameters(remove_duplicate=False):
        h.update(f"param:{name};".encode())
        _feed(h, t, depth + 1, seen)
    for name, t in module.named_buffers(remove_duplicate=False):
        h.update(f"buffer:{name};".encode())
        _feed(h, t, depth + 1, seen)


def _feed_function(h, fn: types.FunctionType, depth: int, seen: set) -> None:
    h.update(f"function:{_name(fn)};".encode())
    if _is_library(fn) or id(fn) in seen:
        return  # an installed package's function: its name says what it computes
    seen.add(id(fn))
    _feed_code(h, fn.__code__, depth, seen)
    _feed(h, fn.__defaults__, depth + 1, seen)
    _feed(h, fn.__kwdefaults__, depth + 1, seen)
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(cell.cell_contents)
        except ValueError:  # an empty cell (a name assigned later)
            cells.append(None)
    _feed(h, cells, depth + 1, seen)
    used = {k: fn.__globals__[k] for k in sorted(_global_names(fn.__code__))
            if k in fn.__globals__}
    _feed(h, used, depth + 1, seen)


def _feed_code(h, code: types.CodeType, depth: int, seen: set) -> None:
    h.update(b"code;")
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars)).encode())
    for c in code.co_consts:
        _feed(h, c, depth + 1, seen)


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_names(c)
    return names
