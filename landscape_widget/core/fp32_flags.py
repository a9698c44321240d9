"""Torch's process-wide float32 flags, set for a computation and put back exactly afterwards.

Torch keeps two APIs over one set of flags. The new one is a value per (backend, op) node:
``torch.backends.cuda.matmul``, ``torch.backends.cudnn.conv`` / ``.rnn``,
``torch.backends.mkldnn.matmul`` / ``.conv`` / ``.rnn`` ``.fp32_precision`` ("ieee",
"tf32", "bf16" or "none" = inherit from the backend's "all" node, then from the generic
``torch.backends.fp32_precision``); its getters return the inherited value. The legacy one
keeps two hidden values of its own: cuDNN's ``allow_tf32`` and the matmul precision
("highest" / "high" / "medium"). Its readers (``torch.backends.cudnn.allow_tf32``,
``torch.backends.cuda.matmul.allow_tf32``, ``torch.get_float32_matmul_precision()``)
raise RuntimeError when the hidden values disagree with the nodes (ATen's
``Context::allowTF32CuDNN``, ``allowTF32CuBLAS``, ``float32MatmulPrecision``):

- cuDNN: conv is TF32 == rnn is TF32 == the hidden ``allow_tf32``;
- cuBLAS: cuda.matmul is TF32 == (the hidden matmul precision != "highest");
- matmul precision: not (cuda.matmul TF32 and "highest"); mkldnn.matmul BF16 needs
  "medium"; mkldnn.matmul TF32 needs "high".

Writing only the nodes (as this project once did) breaks these rules, so user code reading
the legacy flags in another thread while the widget computes (Lightning's Trainer reads
``get_float32_matmul_precision()``) would crash. :func:`apply` writes a whole consistent
:class:`Flags` state: the legacy setters first (``cudnn.allow_tf32 = b`` also writes conv
and rnn; ``cuda.matmul.allow_tf32 = b`` / ``set_float32_matmul_precision`` also write the
matmul nodes), then the nodes' own values; between consistent states the readers stay
consistent after every step (tests/test_fp32_flags.py reads them from another thread).
The user's state is read with the getters; only where a node reads what it could inherit,
or the user's legacy values already disagree, is a node moved for a moment to tell.

Example:
    >>> user = read()
    >>> inside = target(user, {"cuda": "ieee"})
    >>> apply(inside, user)
    >>> (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.allow_tf32,
    ...  torch.get_float32_matmul_precision())
    ('ieee', False, 'highest')
    >>> apply(user, inside)
    >>> read() == user
    True
"""

from __future__ import annotations

import dataclasses

import torch

OPS = ("matmul", "conv", "rnn")
BACKENDS = ("cuda", "mkldnn")
NODES = tuple((b, op) for b in BACKENDS for op in OPS)


# torch.backends' own objects wrap these two (torch._dynamo calls them too); they are used
# directly because ``torch.backends.mkldnn.fp32_precision = v`` writes the generic node.
def _get(backend: str, op: str) -> str:
    return torch._C._get_fp32_precision_getter(backend, op)


def _set(backend: str, op: str, value: str) -> None:
    torch._C._set_fp32_precision_setter(backend, op, value)


@dataclasses.dataclass(frozen=True)
class Flags:
    """Every float32 flag this module writes.

    Attributes:
        nodes: The own (not inherited) value of each node in :data:`NODES`.
        cudnn_tf32: The legacy hidden ``torch.backends.cudnn.allow_tf32``.
        matmul: The legacy hidden ``torch.get_float32_matmul_precision()``.
    """

    nodes: tuple[tuple[tuple[str, str], str], ...]
    cudnn_tf32: bool
    matmul: str

    def node(self, backend: str, op: str) -> str:
        """The own value of one node."""
        return dict(self.nodes)[(backend, op)]


def own_value(backend: str, op: str) -> str:
    """The value set on a node itself (torch's getter returns the inherited one).

    Only when the node reads the same as its parent does the parent move for a moment to
    tell. (A fresh process's cudnn conv/rnn internal default reads as its value, "tf32".)

    Returns:
        "none" when the node inherits, else its value.
    """
    value = _get(backend, op)
    if value == "none" or backend == "generic":  # the generic node inherits nothing
        return value
    parent = ("generic", "all") if op == "all" else (backend, "all")
    if value != _get(*parent):
        return value
    parent_value = own_value(*parent)
    _set(*parent, "tf32" if value == "ieee" else "ieee")
    try:
        follows = _get(backend, op) != value
    finally:
        _set(*parent, parent_value)
    return "none" if follows else value


def _probe(nodes: dict[tuple[str, str], str], reader):
    """``reader()`` with ``nodes`` set for a moment (to read a hidden legacy value)."""
    saved = {key: own_value(*key) for key in nodes}
    try:
        for key, value in nodes.items():
            _set(*key, value)
        return reader()
    finally:
        for key, value in saved.items():
            _set(*key, value)


def _read_cudnn_tf32() -> bool:
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # the user's flags are mixed already: conv = rnn = tf32 reads it
        pass

    def reader():
        try:
            return bool(torch.backends.cudnn.allow_tf32)
        except RuntimeError:
            return False

    return _probe({("cuda", "conv"): "tf32", ("cuda", "rnn"): "tf32"}, reader)


def _read_matmul() -> str:
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:  # mixed already: with both matmul nodes "ieee" it always reads
        return _probe({("cuda", "matmul"): "ieee", ("mkldnn", "matmul"): "ieee"},
                      torch.get_float32_matmul_precision)


def read() -> Flags:
    """The flags as they are now (the user's, when no computation runs)."""
    return Flags(nodes=tuple((key, own_value(*key)) for key in NODES),
                 cudnn_tf32=_read_cudnn_tf32(), matmul=_read_matmul())


def _resolved(nodes: dict, backend: str, op: str) -> str:
    """What torch reads for a node given the nodes' own values (the "all" nodes untouched)."""
    value = nodes[(backend, op)]
    if value == "none":
        value = _get(backend, "all")
    return "none" if backend == "cuda" and value == "bf16" else value


def target(user: Flags, active: dict[str, str]) -> Flags:
    """``user``'s flags with every op of each backend in ``active`` set to its value.

    Args:
        user: The flags to start from.
        active: Backend ("cuda" / "mkldnn") -> "ieee" or "tf32".

    Returns:
        A state every legacy reader reads without error: cuDNN's ``allow_tf32`` follows
        conv/rnn; the matmul precision is the one that says what the matmul nodes do
        ("medium" for mkldnn bf16, "high" for TF32, else "highest"). True fp32 on CUDA
        cannot be told to the legacy API while the CPU's matmuls are bf16/tf32 (it has one
        value for both), so then mkldnn.matmul computes in "ieee" too while it lasts.
    """
    if not active:
        return user
    nodes = dict(user.nodes)
    for backend, value in active.items():
        nodes.update({(backend, op): value for op in OPS})
    cudnn = user.cudnn_tf32
    if "cuda" in active:
        cudnn = active["cuda"] == "tf32"
    cuda_mm = _resolved(nodes, "cuda", "matmul") == "tf32"
    cpu_mm = _resolved(nodes, "mkldnn", "matmul")
    if not cuda_mm and cpu_mm in ("bf16", "tf32"):
        nodes[("mkldnn", "matmul")] = cpu_mm = "ieee"
    matmul = ("medium" if cpu_mm == "bf16" else "high" if cuda_mm or cpu_mm == "tf32"
              else "highest")
    return Flags(nodes=tuple((key, nodes[key]) for key in NODES), cudnn_tf32=cudnn,
                 matmul=matmul)


def apply(state: Flags, current: Flags) -> None:
    """Write ``state`` over ``current`` (the state written last, or read): only what differs.

    A node is written only when its value changes (or a legacy setter wrote it), because a
    fresh process's cuDNN conv/rnn hold an internal default ("tf32" that yields to a generic
    or cudnn-wide value) that no setter can bring back: a CPU or TF32 computation leaves
    it. True fp32 on CUDA cannot: the legacy ``cudnn.allow_tf32`` must read False, and its
    only setter writes conv and rnn; afterwards they hold an explicit "tf32", as after
    ``torch.backends.cudnn.flags()`` or ``cudnn.allow_tf32 = True`` (same values read).
    """
    written = set()
    if state.cudnn_tf32 != current.cudnn_tf32:
        # = torch.backends.cudnn.allow_tf32 (conv and rnn follow), which refuses to be set
        # after torch.backends.disable_global_flags()
        torch._C._set_cudnn_allow_tf32(state.cudnn_tf32)
        written |= {("cuda", "conv"), ("cuda", "rnn")}
    if state.matmul != current.matmul:
        written.add(("cuda", "matmul"))
        if state.matmul == "medium":
            torch.set_float32_matmul_precision("medium")
            written.add(("mkldnn", "matmul"))
        else:  # the CUDA setter leaves mkldnn.matmul (the CPU's) alone
            torch.backends.cuda.matmul.allow_tf32 = state.matmul == "high"
    for key, value in state.nodes:
        if key in written or value != current.node(*key):
            _set(*key, value)
