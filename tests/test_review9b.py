"""Review 9b: the user-facing surface of the performance features (samples=, precision=,
compile=, evaluator_options=) in the headless API and in files.

Each test names the defect it guards against. loss-landscape's own scripts are not
imported: their reading steps (commit 64ef4d5) are re-done here with h5py.
"""

from __future__ import annotations

import h5py
import numpy as np
from cases import mlp, mlp_data
from oracle import naive_eval

import landscape_widget as lw


def plot_1d_reads(path) -> dict:
    """What loss-landscape's ``plot_1D.plot_1d_loss_err`` reads from a curve file, read as
    it reads it (``f['test_acc']`` whenever there is a ``test_loss``)."""
    with h5py.File(path, "r") as f:
        out = {"x": f["xcoordinates"][:]}
        assert "train_loss" in f.keys(), "'train_loss' does not exist"
        out["train_loss"], out["train_acc"] = f["train_loss"][:], f["train_acc"][:]
        if "test_loss" in f.keys():
            out["test_loss"], out["test_acc"] = f["test_loss"][:], f["test_acc"][:]
    return out


def test_a_loss_only_curve_with_test_data_is_read_by_plot_1d(tmp_path):
    # A curve of metrics=("loss",) with test_data= was saved with test_loss but no test_acc:
    # plot_1D.py reads test_acc whenever test_loss is there and stopped with a KeyError.
    model = mlp(seed=3).eval()
    x, y = mlp_data()
    xt, yt = x[:20] * 1.5, y[:20].flip(0)
    d = lw.random_direction(model, seed=1)
    c = lw.compute_curve(model, (x, y), direction=d, x=(-1, 1, 5), test_data=(xt, yt),
                         metrics=("loss",), progress=False)
    c.save(tmp_path / "c.h5")
    read = plot_1d_reads(tmp_path / "c.h5")
    coords = np.linspace(-1, 1, 5)[:, None]
    np.testing.assert_allclose(read["test_loss"], naive_eval(model, xt, yt, [d], coords)[0],
                               rtol=1e-5)
    assert np.isnan(read["test_acc"]).all()  # "not computed", as train_acc
    back = lw.Curve.load(tmp_path / "c.h5")
    assert back.test_accuracy is None and back.accuracy is None
    np.testing.assert_array_equal(back.test_loss, c.test_loss)
    back.save(tmp_path / "again.h5")  # a load-and-save keeps the layout
    with h5py.File(tmp_path / "again.h5", "r") as f:
        assert sorted(k for k in f if not k.startswith("landscape_widget")) == [
            "test_acc", "test_loss", "train_acc", "train_loss", "xcoordinates"]
