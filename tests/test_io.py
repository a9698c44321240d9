"""Acceptance 7: HDF5 files with loss-landscape's key names, and plotly figures."""

from __future__ import annotations

import h5py
import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from cases import mlp, mlp_data

import landscape_widget as lw


@pytest.fixture(scope="module")
def surface():
    model = mlp().eval()
    return lw.compute_surface(model, mlp_data(), x=(-1, 1, 7), y=(-0.5, 0.5, 5), seed=2,
                              progress=False)


@pytest.fixture(scope="module")
def curve():
    model = mlp().eval()
    return lw.compute_curve(model, mlp_data(), direction=lw.random_direction(model, seed=1),
                            x=(-1, 1, 9), progress=False)


def test_surface_file_uses_loss_landscape_keys(surface, tmp_path):
    path = tmp_path / "surface.h5"
    surface.save(path)
    with h5py.File(path, "r") as f:
        for key in ("xcoordinates", "ycoordinates", "train_loss", "train_acc"):
            assert key in f, key
        x, y = f["xcoordinates"][:], f["ycoordinates"][:]
        loss, acc = f["train_loss"][:], f["train_acc"][:]
    np.testing.assert_array_equal(x, np.linspace(-1, 1, 7))
    np.testing.assert_array_equal(y, np.linspace(-0.5, 0.5, 5))
    assert loss.shape == (5, 7) and acc.shape == (5, 7)  # (ny, nx): rows = y
    np.testing.assert_array_equal(loss, surface.loss)
    np.testing.assert_allclose(acc, 100 * surface.accuracy, rtol=1e-12)  # percent
    assert acc.max() > 1.0
    # What loss-landscape's plot_2D.py does: contour(X, Y, Z) with X, Y = meshgrid(x, y).
    xx, yy = np.meshgrid(x, y)
    assert xx.shape == loss.shape
    assert xx[2, 6] == x[6] and yy[2, 6] == y[2]


def test_surface_round_trip(surface, tmp_path):
    path = tmp_path / "surface.h5"
    surface.save(path)
    back = lw.Surface.load(path)
    np.testing.assert_array_equal(back.x, surface.x)
    np.testing.assert_array_equal(back.y, surface.y)
    np.testing.assert_array_equal(back.loss, surface.loss)
    np.testing.assert_allclose(back.accuracy, surface.accuracy, rtol=1e-12, atol=1e-15)
    assert back.spec["seed"] == 2 and back.spec["model"] == surface.spec["model"]
    assert back.spec["x"] == [-1, 1, 7] and back.spec["y"] == [-0.5, 0.5, 5]
    assert len(back.directions) == 2
    for got, want in zip(back.directions, surface.directions, strict=True):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_surface_with_nan_and_loss_only(tmp_path):
    loss = np.arange(35, dtype=np.float64).reshape(5, 7)
    loss[1, 3] = np.nan
    s = lw.Surface(np.linspace(0, 1, 7), np.linspace(0, 2, 5), loss, None, {"note": "x"})
    s.save(tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5", "r") as f:
        # loss-landscape's scripts read train_acc beside train_loss: one saying "not computed"
        assert np.isnan(f["train_acc"][:]).all() and f["train_acc"].shape == (5, 7)
    back = lw.Surface.load(tmp_path / "s.h5")
    np.testing.assert_array_equal(back.loss, loss)  # NaN stays NaN, in place
    assert back.accuracy is None and back.spec == {"note": "x"} and back.directions is None


def test_reads_a_file_written_by_loss_landscape(tmp_path):
    """A file with only loss-landscape's datasets (accuracy in percent, no metadata)."""
    path = tmp_path / "ll.h5"
    x, y = np.linspace(-1, 1, 4), np.linspace(-1, 1, 3)
    with h5py.File(path, "w") as f:
        f["xcoordinates"], f["ycoordinates"] = x, y
        f["train_loss"] = np.full((3, 4), 0.5)
        f["train_acc"] = np.full((3, 4), 87.5)
    s = lw.Surface.load(path)
    assert s.loss.shape == (3, 4)
    np.testing.assert_allclose(s.accuracy, 0.875)


def test_curve_round_trip(curve, tmp_path):
    path = tmp_path / "curve.h5"
    curve.save(path)
    with h5py.File(path, "r") as f:
        assert "ycoordinates" not in f
        np.testing.assert_array_equal(f["xcoordinates"][:], curve.x)
        np.testing.assert_array_equal(f["train_loss"][:], curve.loss)
        np.testing.assert_allclose(f["train_acc"][:], 100 * curve.accuracy, rtol=1e-12)
    back = lw.Curve.load(path)
    np.testing.assert_array_equal(back.x, curve.x)
    np.testing.assert_array_equal(back.loss, curve.loss)
    np.testing.assert_allclose(back.accuracy, curve.accuracy, rtol=1e-12, atol=1e-15)
    assert back.spec["x"] == [-1, 1, 9]
    assert all(torch.equal(back.directions[0][k], curve.directions[0][k])
               for k in curve.directions[0])


def test_loading_the_wrong_kind_says_which_to_use(surface, curve, tmp_path):
    surface.save(tmp_path / "s.h5")
    curve.save(tmp_path / "c.h5")
    with pytest.raises(ValueError, match="Surface.load"):
        lw.Curve.load(tmp_path / "s.h5")
    with pytest.raises(ValueError, match="Curve.load"):
        lw.Surface.load(tmp_path / "c.h5")


@pytest.mark.parametrize(("kind", "trace"), [("contour", go.Contour), ("heatmap", go.Heatmap),
                                             ("surface", go.Surface)])
@pytest.mark.parametrize("metric", ["loss", "accuracy"])
def test_surface_to_plotly(surface, kind, trace, metric):
    fig = surface.to_plotly(kind, metric=metric)
    assert isinstance(fig, go.Figure)
    main = fig.data[0]
    assert isinstance(main, trace)
    z = np.asarray(main.z, dtype=float)
    assert z.shape == (5, 7)
    np.testing.assert_array_equal(z, surface.values(metric))
    assert len(main.x) == 7 and len(main.y) == 5


def test_surface_to_plotly_log(surface):
    z = np.asarray(surface.to_plotly("heatmap", log=True).data[0].z, dtype=float)
    np.testing.assert_allclose(z, np.log10(surface.loss), rtol=1e-12)


def test_surface_to_plotly_bad_requests(surface):
    with pytest.raises(ValueError, match="contour"):
        surface.to_plotly("scatter3d")
    loss_only = lw.Surface(surface.x, surface.y, surface.loss, None)
    with pytest.raises(ValueError, match="metrics"):
        loss_only.to_plotly(metric="accuracy")


def test_curve_to_plotly(curve):
    fig = curve.to_plotly()
    assert isinstance(fig, go.Figure)
    ys = {tr.name: np.asarray(tr.y, dtype=float) for tr in fig.data}
    np.testing.assert_array_equal(ys["loss"], curve.loss)
    np.testing.assert_array_equal(ys["accuracy"], curve.accuracy)
    assert all(len(tr.x) == 9 for tr in fig.data)
