"""Issue 16 (3): loading a file runs no code from it unless the user opts in."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
import torch
from cases import mlp, mlp_data

import landscape_widget as lw


class Payload:
    """Unpickling this creates ``marker``: the stand-in for arbitrary code in a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def fresh(start=100):
    seeds = iter(range(start, 10_000))
    return lambda: mlp(seed=next(seeds))


@pytest.fixture
def fit_file(tmp_path):
    x, y = mlp_data()
    fit = lw.fit_pattern(fresh(), (x, y), lw.checkerboard(2), steps=1, seed=0,
                         batch_size=16, progress=False)
    fit.save(tmp_path / "fit.pt")
    return fit, tmp_path / "fit.pt"


def test_pattern_fit_file_with_a_malicious_architecture(fit_file, tmp_path):
    fit, path = fit_file
    marker = tmp_path / "ran"
    blob = torch.load(path, weights_only=True)
    blob["architecture"] = pickle.dumps(Payload(marker))
    evil = tmp_path / "evil.pt"
    torch.save(blob, evil)
    with pytest.raises(ValueError, match="model_fn"):
        lw.PatternFit.load(evil)
    assert not marker.exists()
    back = lw.PatternFit.load(evil, model_fn=lambda: mlp(seed=0))  # the blob stays unread
    assert not marker.exists()
    assert torch.equal(back.weights["w1"], fit.weights["w1"])
    # the opt-in does unpickle (which is how the test knows the payload is live)
    with pytest.raises(Exception):  # noqa: B017 - the payload returns a file, not a module
        lw.PatternFit.load(evil, trusted=True)
    assert marker.exists()


def test_pattern_fit_trusted_round_trip(fit_file):
    fit, path = fit_file
    back = lw.PatternFit.load(path, trusted=True)
    assert torch.equal(back.weights["w0"], fit.weights["w0"])
    with pytest.raises(TypeError, match="trusted"):
        lw.PatternFit.load(path, trusted="yes")


def test_a_pickle_with_code_at_top_level_is_refused(tmp_path):
    """torch.load(weights_only=True) in PatternFit.load and Trajectory.from_checkpoints."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": "landscape_widget.PatternFit", "x": Payload(marker)}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        lw.PatternFit.load(evil, model_fn=lambda: mlp(seed=0))
    with pytest.raises(pickle.UnpicklingError):
        lw.Trajectory.from_checkpoints([evil, evil, evil])
    assert not marker.exists()


def test_hdf5_files_are_read_as_data(tmp_path):
    """Pickled bytes in a dataset or an attribute stay bytes: nothing is unpickled."""
    marker = tmp_path / "ran"
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f["xcoordinates"], f["ycoordinates"] = np.arange(3.0), np.arange(2.0)
        f["train_loss"] = np.ones((2, 3))
        f["blob"] = np.void(pickle.dumps(Payload(marker)))
        f.attrs["blob"] = np.void(pickle.dumps(Payload(marker)))
    s = lw.Surface.load(path)
    s.save(path, overwrite=True)
    assert not marker.exists()
    with h5py.File(path) as f:
        assert f["blob"][()].tobytes() == pickle.dumps(Payload(marker))  # kept, as bytes


def test_pattern_fit_save_never_replaces_a_file_unasked(fit_file):
    fit, path = fit_file
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        fit.save(path)
    assert path.read_bytes() == before  # the user's file is as it was
    fit.step += 1  # something to tell the two saves apart
    fit.save(path, overwrite=True)
    assert lw.PatternFit.load(path, model_fn=lambda: mlp(seed=0)).step == fit.step
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
