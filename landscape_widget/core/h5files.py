"""Opening and writing HDF5 files safely: clear errors, and nothing of the user's destroyed.

Reads open read-only, with errors that say what a path is when it is not an HDF5 file.
Writes go to a new file beside the target, renamed over it once complete; a folder, a
read-only file, or a file another program is writing is refused, a symbolic link is
written through and a replaced file keeps its mode.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import torch


def as_array(t: torch.Tensor) -> np.ndarray:
    """``t`` as a numpy array HDF5 stores: sparse made dense, bfloat16 / float8 as float32.

    Returns:
        The array. bfloat16 made ``save`` fail after the whole computation; float32 holds it
        exactly, and readers cast back to the model's dtype.
    """
    t = t.detach().cpu()
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_floating_point() and (t.dtype == torch.bfloat16 or t.element_size() == 1):
        t = t.float()
    return t.numpy()


def check_target(path: str | Path, overwrite: bool) -> Path:
    """``path`` as a ``Path``, refusing an existing file unless ``overwrite``.

    Returns:
        ``path`` as a ``Path`` (not resolved).

    Raises:
        FileExistsError: If the file exists and ``overwrite`` is false.
        FileNotFoundError: If the folder it would go in does not exist.
        PermissionError: If the file exists and is read-only (no write bit, or none for
            this user): its owner protected it, and replacing it would take that away; or
            if its folder is not writable (the new file is written there first).
        TypeError: If ``overwrite`` is not a bool.
        ValueError: If ``path`` is a directory.
    """
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}.")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a file; pass the path of a file "
                         f"(e.g. {path / 'landscape.h5'}).")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder {path.parent} does not exist; create it first "
                                "(os.makedirs) or choose another path.")
    # No write bit, or none for this user (another user's 0644 file in a folder we may
    # write): the rename would replace a file its owner protected from us.
    if path.exists() and overwrite and (not path.stat().st_mode & 0o222
                                        or not os.access(path, os.W_OK)):
        raise PermissionError(f"{path} is read-only (for you); make it writable (chmod u+w, "
                              "as its owner) to replace it, or choose another path.")
    if not path.is_symlink():  # a link is written through: atomic_h5 checks its target's
        check_folder(path.parent)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it (what the file "
                              "holds that this object does not know is kept if it was loaded "
                              "from it), or choose another path.")
    return path


def check_folder(folder: Path) -> None:
    """Refuse a folder this user cannot write: the new file is written there, then renamed.

    Raises:
        PermissionError: Naming the folder (h5py named only our temporary file).
    """
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"the folder {folder} is not writable (for you): the file is "
                              "written beside its target, then renamed over it. Make the "
                              "folder writable or choose another path.")


def open_read(path: str | Path, what: str):
    """``h5py.File(path, "r")``, with errors that say what is wrong; ``what`` names the file.

    Returns:
        The open file (read-only: nothing is written to a file that is read).

    Raises:
        FileNotFoundError: If there is no such file.
        ValueError: If ``path`` is a directory or not an HDF5 file (h5py said only "file
            signature not found", or "Is a directory" with its internals).
        BlockingIOError: If another program has the file open for writing (HDF5's lock).
    """
    import h5py

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass the path of {what} (an .h5 file).")
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path} is not an HDF5 file; pass {what} as loss-landscape or "
                         "landscape_widget writes it (an .h5 file).")
    try:
        return h5py.File(path, "r")
    except BlockingIOError as e:  # HDF5's file lock: a writer has it open
        raise BlockingIOError(e.errno, (
            f"{path} is open for writing in another program (loss-landscape's "
            "plot_surface.py holds its surface file open until it finishes), so HDF5 will "
            "not read it; read it once that program has closed it.")) from e


def _refuse_if_being_written(path: Path) -> None:
    """Refuse to rename over a file a writer holds (its next writes would go to the old one).

    Raises:
        BlockingIOError: If the file is locked by a writer.
    """
    import h5py

    if not path.is_file() or not h5py.is_hdf5(path):
        return
    try:
        h5py.File(path, "r").close()
    except BlockingIOError as e:
        raise BlockingIOError(e.errno, (
            f"{path} is open for writing in another program (loss-landscape's "
            "plot_surface.py holds its surface file open until it finishes); replacing it "
            "now would lose what that program writes next. Save once it has closed the "
            "file, or to another path.")) from e


def _keep_owner(tmp: Path, st: os.stat_result) -> None:
    """Give the new file the replaced one's owner and group, where we may (root may).

    A root process saving over a user's file otherwise left it root's: its user could no
    longer write it.
    """
    try:
        os.chown(tmp, st.st_uid, st.st_gid)
    except OSError:  # not ours to give (not root): keep the group at least, if ours
        try:
            os.chown(tmp, -1, st.st_gid)
        except OSError:
            pass


class atomic_h5:
    """``with atomic_h5(path, overwrite) as f:`` writes a new HDF5 file in place of ``path``.

    The file is written beside ``path`` and renamed over it only once complete, so a failed
    write leaves the old file as it was. A symbolic link is written through (its target is
    replaced, the link kept), and a replaced file keeps its permission bits.
    """

    def __init__(self, path: str | Path, overwrite: bool):
        self.path = check_target(path, overwrite)
        if self.path.is_symlink():  # os.replace would put a plain file in the link's place
            self.path = self.path.resolve()
            check_folder(self.path.parent)
        self.tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")

    def __enter__(self):
        import h5py

        self.file = h5py.File(self.tmp, "w")
        return self.file

    def __exit__(self, kind, value, tb):
        self.file.close()
        if kind is None:
            try:
                _refuse_if_being_written(self.path)
                if self.path.exists():
                    st = self.path.stat()
                    if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                        _keep_owner(self.tmp, st)
                    os.chmod(self.tmp, st.st_mode & 0o7777)
                os.replace(self.tmp, self.path)
            except BaseException:
                self.tmp.unlink(missing_ok=True)  # leave no half-named file behind
                raise
        else:
            self.tmp.unlink(missing_ok=True)
        return False
