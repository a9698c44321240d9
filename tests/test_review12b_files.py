"""Review 12b (files): what our reads and writes do to a user's files and folders.

A folder, a text file, a read-only file, a symbolic link, a file another program holds open
(HDF5's lock, as loss-landscape's plot_surface.py holds its surface file while it computes),
links and attributes inside a file: each read or write either works and keeps what the user
had, or says what is wrong and what to do, leaving the file as it was.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from cases import tied_mlp
from test_review12b import _small_surface, _state, write_list

import landscape_widget as lw


def test_writes_refuse_folders_and_read_only_files_and_keep_links_and_modes(tmp_path):
    model, dirs, s = _small_surface()
    # a folder: it was renamed over with overwrite=True (IsADirectoryError naming a
    # '.x.h5.<hex>.tmp' file), and that temporary file was left in the user's folder
    folder = tmp_path / "runs.h5"
    folder.mkdir()
    for write in (lambda: s.save(folder, overwrite=True),
                  lambda: lw.save_directions(folder, dirs, model, overwrite=True),
                  lambda: s.save(folder)):
        with pytest.raises(ValueError, match="is a directory"):
            write()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.h5"]
    assert not any(folder.iterdir())
    # a read-only file was replaced (and came back writable) with overwrite=True
    ro = tmp_path / "ro.h5"
    s.save(ro)
    ro.chmod(0o444)
    was = _state(ro)
    for write in (lambda: s.save(ro, overwrite=True),
                  lambda: lw.save_directions(ro, dirs, model, overwrite=True)):
        with pytest.raises(PermissionError, match="read-only.*chmod"):
            write()
    assert _state(ro) == was
    # a symbolic link was replaced by a plain file, its target left as it was
    target, link = tmp_path / "target.h5", tmp_path / "link.h5"
    with h5py.File(target, "w") as f:
        f["xcoordinates"] = np.zeros(1)
    target.chmod(0o640)
    link.symlink_to(target)
    s.save(link, overwrite=True)
    assert link.is_symlink() and link.resolve() == target.resolve()
    with h5py.File(target, "r") as f:
        np.testing.assert_array_equal(f["train_loss"][()], s.loss)
    assert target.stat().st_mode & 0o777 == 0o640  # a replaced file keeps its mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.h5", "ro.h5", "runs.h5",
                                                          "target.h5"]
    with pytest.raises(FileNotFoundError, match="does not exist; create it"):
        s.save(tmp_path / "no_such_folder" / "s.h5")


def test_reading_a_folder_a_text_file_or_a_broken_directions_file_says_what_is_wrong(tmp_path):
    model = tied_mlp().eval()
    params = [p.detach() for p in model.parameters()]
    folder = tmp_path / "dirs.h5"
    folder.mkdir()
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    gap, flat, shape = tmp_path / "gap.h5", tmp_path / "flat.h5", tmp_path / "shape.h5"
    with h5py.File(gap, "w") as f:  # dataset '1' missing: h5py's KeyError named no file
        write_list(f, "xdirection", params)
        del f["xdirection"]["1"]
    with h5py.File(flat, "w") as f:  # 'xdirection' a dataset: "Field names only allowed..."
        f["xdirection"] = np.zeros(3)
    with h5py.File(shape, "w") as f:
        write_list(f, "xdirection", [np.zeros(p.shape[:-1] + (p.shape[-1] + 1,))
                                     if i == 3 else p for i, p in enumerate(params)])
    files = [folder, text, gap, flat, shape]
    was = [_state(p) for p in files]
    for path, why in ((folder, "is a directory"), (text, "is not an HDF5 file"),
                      (gap, r"lacks \['1'\]"), (flat, "it is not a group"),
                      (shape, r"tensor 3 is \(3, 9\) in the file.*pass the model")):
        with pytest.raises(ValueError, match=why):
            lw.load_directions(path, model)
    for path, why in ((folder, "is a directory"), (text, "is not an HDF5 file")):
        with pytest.raises(ValueError, match=why):
            lw.Surface.load(path)
    assert [_state(p) for p in files] == was


def test_a_surface_file_and_a_directions_file_passed_the_wrong_way_round(tmp_path):
    model, dirs, s = _small_surface()
    s.save(tmp_path / "surf.h5")
    lw.save_directions(tmp_path / "dirs.h5", dirs, model)
    with pytest.raises(ValueError, match=r"not a directions file; .*lw.Surface.load\(path\)"):
        lw.load_directions(tmp_path / "surf.h5", model)
    with pytest.raises(ValueError, match=r"grid file; .*lw.load_directions\(path, model\)"):
        lw.Surface.load(tmp_path / "dirs.h5")
    assert lw.Surface.load(tmp_path / "surf.h5").directions is not None  # the hint holds


def test_a_file_another_program_is_writing_says_so(tmp_path, monkeypatch):
    """plot_surface.py keeps its surface file open ('r+') while it computes; reading it then
    failed with HDF5's 'unable to lock file, errno = 11' and nothing about why. Both sides
    run in fresh processes with HDF5's default (locking), whatever this one was started with."""

    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    _, _, s = _small_surface()
    path = tmp_path / "s.h5"
    s.save(path)
    hold = ("import h5py, sys; f = h5py.File(sys.argv[1], 'r+'); print('open', flush=True);"
            " sys.stdin.read()")
    read = ("import sys, landscape_widget as lw\ntry:\n    lw.Surface.load(sys.argv[1])\n"
            "except BlockingIOError as e:\n    print(e)")
    writer = subprocess.Popen([sys.executable, "-c", hold, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "open"
        got = subprocess.run([sys.executable, "-c", read, str(path)], capture_output=True,
                             text=True, check=True, cwd=Path(lw.__file__).parents[1]).stdout
    finally:
        writer.communicate("")
    assert "open for writing in another program" in got
    assert lw.Surface.load(path).loss.shape == s.loss.shape  # and once it is closed, it reads


def test_saving_over_a_file_another_program_is_writing_is_refused(tmp_path, monkeypatch):
    """Saving with overwrite=True renamed a new file over one plot_surface.py was still
    writing: it went on writing into the replaced file, and its next points were lost."""

    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    _, _, s = _small_surface()
    path = tmp_path / "s.h5"
    s.save(path)
    inode = path.stat().st_ino
    hold = ("import h5py, sys; f = h5py.File(sys.argv[1], 'r+'); print('open', flush=True);"
            " sys.stdin.read()")
    save = ("import sys, landscape_widget as lw\ns = lw.Surface.load(sys.argv[2])\ntry:\n"
            "    s.save(sys.argv[1], overwrite=True)\nexcept BlockingIOError as e:\n"
            "    print(e)")
    copy_path = tmp_path / "copy.h5"
    s.save(copy_path)
    writer = subprocess.Popen([sys.executable, "-c", hold, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "open"
        got = subprocess.run([sys.executable, "-c", save, str(path), str(copy_path)],
                             capture_output=True, text=True, check=True,
                             cwd=Path(lw.__file__).parents[1]).stdout
    finally:
        writer.communicate("")
    assert "open for writing in another program" in got
    assert path.stat().st_ino == inode  # the writer's file is still the one at the path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.h5", "s.h5"]


def test_links_in_a_users_file_are_kept_as_links(tmp_path):
    """An external link whose file is gone made Surface.load fail ('NoneType' object has no
    attribute 'attrs'); a soft link came back as a copy of its target."""
    x, y = np.linspace(-1, 1, 3), np.linspace(0, 1, 2)
    path, out = tmp_path / "ll.h5", tmp_path / "out.h5"
    with h5py.File(path, "w") as f:
        f["xcoordinates"], f["ycoordinates"] = x, y
        f["train_loss"] = np.ones((3, 2))
        f["runs/seed"] = np.arange(3)
        f["latest"] = h5py.SoftLink("/runs/seed")
        f["runs/raw"] = h5py.ExternalLink("moved_away.h5", "/data")
    lw.Surface.load(path).save(out)
    with h5py.File(out, "r") as f:
        soft, ext = f.get("latest", getlink=True), f["runs"].get("raw", getlink=True)
        assert isinstance(soft, h5py.SoftLink) and soft.path == "/runs/seed"
        assert isinstance(ext, h5py.ExternalLink)
        assert (ext.filename, ext.path) == ("moved_away.h5", "/data")
        np.testing.assert_array_equal(f["latest"][()], np.arange(3))


def test_a_relative_external_link_still_reaches_its_file_from_another_folder(tmp_path):
    """A relative external link is read from its file's folder: saved into another folder
    it pointed nowhere (its words copied as they were)."""
    data, src, dst = tmp_path / "data", tmp_path / "src", tmp_path / "elsewhere" / "deep"
    for d in (data, src, dst):
        d.mkdir(parents=True)
    with h5py.File(data / "raw.h5", "w") as f:
        f["values"] = np.arange(4.0)
    path = src / "ll.h5"
    with h5py.File(path, "w") as f:
        f["xcoordinates"], f["ycoordinates"] = np.linspace(-1, 1, 3), np.linspace(0, 1, 2)
        f["train_loss"] = np.ones((3, 2))
        f["raw"] = h5py.ExternalLink("../data/raw.h5", "/values")
        f["absolute"] = h5py.ExternalLink(str(data / "raw.h5"), "/values")
    surf = lw.Surface.load(path)
    for out in (src / "same_folder.h5", dst / "out.h5"):
        surf.save(out)
        with h5py.File(out, "r") as f:
            rel, ab = f.get("raw", getlink=True), f.get("absolute", getlink=True)
            assert not Path(rel.filename).is_absolute()  # still relative: the two can move
            assert ab.filename == str(data / "raw.h5")
            assert (out.parent / rel.filename).resolve() == (data / "raw.h5").resolve()
            np.testing.assert_array_equal(f["raw"][()], np.arange(4.0))
            np.testing.assert_array_equal(f["absolute"][()], np.arange(4.0))


def test_a_users_attributes_on_the_grid_datasets_survive_load_and_save(tmp_path):
    """Attributes on the datasets we read (a note on train_loss, a label on xcoordinates)
    were dropped by Surface.load + save: only the file's own attributes were kept."""
    path, out = tmp_path / "ll.h5", tmp_path / "out.h5"
    with h5py.File(path, "w") as f:
        f["xcoordinates"], f["ycoordinates"] = np.linspace(-1, 1, 3), np.linspace(0, 1, 2)
        f["train_loss"] = np.ones((3, 2))
        f["train_loss"].attrs["note"] = "epoch 300, lr 0.1"
        f["xcoordinates"].attrs["label"] = "filter-normalised d1"
    lw.Surface.load(path).save(out)
    with h5py.File(out, "r") as f:
        assert f["train_loss"].attrs["note"] == "epoch 300, lr 0.1"
        assert f["xcoordinates"].attrs["label"] == "filter-normalised d1"
