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
The user's state is read with the getters only, never by moving a flag for a moment (another
thread, say the user's GPU training, would see that): a node reading what it could inherit
counts as inheriting (:func:`own_value`), and hidden legacy values are deduced from what
the readers say (:func:`_read_matmul`, :func:`_read_cudnn_tf32`). A computation writes
only its backend's nodes that do not compute as asked already, plus the legacy values
that must change with them.

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
        cudnn_tf32: The legacy hidden ``torch.backends.cudnn.allow_tf32`` (None: not
            readable, as the user's conv and rnn disagree; then it is not written).
        matmul: The legacy hidden ``torch.get_float32_matmul_precision()``.
    """

    nodes: tuple[tuple[tuple[str, str], str], ...]
    cudnn_tf32: bool | None
    matmul: str

    def node(self, backend: str, op: str) -> str:
        """The own value of one node."""
        return dict(self.nodes)[(backend, op)]


def _parent(backend: str, op: str) -> tuple[str, str]:
    return ("generic", "all") if op == "all" else (backend, "all")


def own_value(backend: str, op: str) -> str:
    """The value set on a node itself, as far as reading alone can tell.

    Torch's getter returns the inherited value, and the only way to tell "set to the same
    value as its parent" from "inherits" is to move the parent, a process-wide write that
    another thread (a GPU computation of the user's, a legacy reader) would see. So a node
    reading the same as its parent counts as inheriting: the approximation is benign,
    because restoring "none" there reads the same value as before (only a later change of
    the parent would tell the two apart). (A fresh process's cudnn conv/rnn internal default
    reads as its value, "tf32".)

    Returns:
        "none" when the node inherits (or reads what it would inherit), else its value.
    """
    value = _get(backend, op)
    if value == "none" or backend == "generic":  # the generic node inherits nothing
        return value
    return "none" if value == _get(*_parent(backend, op)) else value


def _read_cudnn_tf32() -> bool | None:
    """The legacy hidden cuDNN ``allow_tf32``, read without writing anything.

    Its reader raises unless conv and rnn (TF32 or not) agree with it: when they agree with
    each other it is the opposite of theirs; when they disagree no reader sees it, and it
    is left alone (never probed by writing the nodes, see :func:`own_value`).

    Returns:
        The value, or None where no reader can tell it.
    """
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        pass
    conv, rnn = (_get("cuda", op) == "tf32" for op in ("conv", "rnn"))
    return (not conv) if conv == rnn else None


def _read_matmul() -> str:
    """The legacy hidden matmul precision, read without writing anything.

    Where the user's mixed flags make ``get_float32_matmul_precision()`` raise, the cuBLAS
    reader still tells whether it is "highest" (it raises exactly when cuda.matmul's TF32
    disagrees with "not highest"), and the reasons it can raise leave one value besides
    "highest": "high" when mkldnn.matmul is bf16 (it needs "medium"), else "medium" (its
    tf32 needs "high"); cuda.matmul TF32 alone raises only with "highest".

    Returns:
        "highest", "high" or "medium".
    """
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        pass
    cuda_tf32 = _get("cuda", "matmul") == "tf32"
    try:
        highest = torch.backends.cuda.matmul.allow_tf32 is False
    except RuntimeError:  # raises iff cuda_tf32 != (precision != "highest")
        highest = cuda_tf32
    if highest:
        return "highest"
    return "high" if _get("mkldnn", "matmul") == "bf16" else "medium"


def read() -> Flags:
    """The flags as they are now (the user's, when no computation runs); writes nothing."""
    return Flags(nodes=tuple((key, own_value(*key)) for key in NODES),
                 cudnn_tf32=_read_cudnn_tf32(), matmul=_read_matmul())


def adopt(flags: Flags, written: Flags) -> Flags:
    """``flags`` with whatever was set since ``written`` was written (by the user, meanwhile).

    A node changed when it no longer reads what its own value in ``written`` gives under
    the parents now in force (the package never writes the "all" or generic nodes, so a
    change there is the user's and simply stays); a legacy value changed when it reads
    differently (a cuDNN value no reader can tell is not taken as a change).

    Returns:
        ``flags`` with those nodes' own values (:func:`own_value`) and legacy values now.
    """
    nodes = dict(flags.nodes)
    mine = dict(written.nodes)
    changed = {key for key in NODES if _get(*key) != _resolved(mine, *key)}
    nodes.update({key: own_value(*key) for key in changed})
    cudnn, now = _read_cudnn_tf32(), _read_matmul()
    if cudnn is None or cudnn == written.cudnn_tf32:
        cudnn = flags.cudnn_tf32
    matmul = flags.matmul if now == written.matmul else now
    pair = {("cuda", "matmul"), ("mkldnn", "matmul")}
    in_force = {key: own_value(*key) for key in pair}
    if ((changed & pair or matmul != flags.matmul) and not _reads(nodes, matmul)
            and _reads(in_force, now)):
        # set_float32_matmul_precision(p) writes p's precision and both matmul nodes, some
        # maybe to the values the package wrote (then unseen above): where only the pair
        # as it is now reads, the user set it as a whole.
        nodes.update(in_force)
        matmul = now
    return Flags(nodes=tuple((key, nodes[key]) for key in NODES), cudnn_tf32=cudnn,
                 matmul=matmul)


def _resolved(nodes: dict, backend: str, op: str) -> str:
    """What torch reads for a node given the nodes' own values (the "all" nodes untouched)."""
    value = nodes[(backend, op)]
    if value == "none":
        value = _get(backend, "all")
    return "none" if backend == "cuda" and value == "bf16" else value


def _reads(nodes: dict, matmul: str) -> bool:
    """Whether both matmul legacy readers read with these nodes and matmul precision."""
    cuda_tf32 = _resolved(nodes, "cuda", "matmul") == "tf32"
    cpu = _resolved(nodes, "mkldnn", "matmul")
    return (cuda_tf32 == (matmul != "highest") and (cpu != "bf16" or matmul == "medium")
            and (cpu != "tf32" or matmul == "high"))


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
        for op in OPS:  # a node already reading the value is left as it is (no write)
            if _resolved(nodes, backend, op) != value:
                nodes[(backend, op)] = value
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
    if state.cudnn_tf32 is not None and state.cudnn_tf32 != current.cudnn_tf32:
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
