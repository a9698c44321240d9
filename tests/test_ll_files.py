"""Issue 16 (3): tomgoldstein/loss-landscape's files, both ways.

The files here are built the way its scripts build them (same keys, shapes, dtypes, fill
order, -1 pre-fill), as read from its ``plot_surface.py``, ``h5_util.py``,
``net_plotter.py``, ``projection.py`` and ``plot_hessian_eigen.py`` (commit 64ef4d5). Values
are checked against the float64 per-point oracle and closed forms.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import h5py
import numpy as np
import pytest
import torch
from cases import mlp, mlp_data
from oracle import naive_eval, naive_surface
from torch import nn

import landscape_widget as lw

NX, NY = 5, 3  # non-square on purpose


def ll_surface_file(path, x, y, values: dict, pending=()):
    """A surface file as plot_surface.py writes it: arrays (len(x), len(y)), -1 pre-fill,
    filled through meshgrid(x, y).ravel() (scheduler.get_unplotted_indices)."""
    xx, yy = np.meshgrid(x, y)
    with h5py.File(path, "w") as f:
        f["dir_file"] = "some_dir_file.h5"
        f["xcoordinates"], f["ycoordinates"] = x, y
        for key, fn in values.items():
            # plot_hessian_eigen.py pre-fills min_eig with +1, the rest is -1
            arr = (1.0 if key == "min_eig" else -1.0) * np.ones(shape=(len(x), len(y)))
            flat = fn(xx.ravel(), yy.ravel())
            for k in range(flat.size):
                if k not in pending:
                    arr.ravel()[k] = flat[k]
            f[key] = arr


def plane(x, y):
    return 1.0 + x + 10.0 * y  # tells rows from columns


# --- surfaces -------------------------------------------------------------------------------
def test_reads_loss_landscapes_nx_ny_layout_and_pre_fill(tmp_path):
    x, y = np.linspace(-1, 1, NX), np.linspace(0, 2, NY)
    path = tmp_path / "ll.h5"
    ll_surface_file(path, x, y, {"train_loss": plane, "train_acc": lambda a, b: 50 + 0 * a,
                                 "test_loss": lambda a, b: 2 * plane(a, b),
                                 "test_acc": lambda a, b: 25 + 0 * a}, pending={3, 11})
    with h5py.File(path) as f:
        assert f["train_loss"].shape == (NX, NY) and f["train_loss"].dtype == np.float64
    s = lw.Surface.load(path)
    assert s.loss.shape == (NY, NX)
    want = plane(*np.meshgrid(x, y))
    nan = np.zeros((NY, NX), bool)
    nan.ravel()[[3, 11]] = True  # flat index k = iy * nx + ix
    np.testing.assert_array_equal(np.isnan(s.loss), nan)
    np.testing.assert_array_equal(s.loss[~nan], want[~nan])
    np.testing.assert_array_equal(s.test_loss[~nan], 2 * want[~nan])
    np.testing.assert_allclose(s.accuracy[~nan], 0.5)
    np.testing.assert_allclose(s.test_accuracy[~nan], 0.25)
    assert np.isnan(s.accuracy[nan]).all() and np.isnan(s.test_accuracy[nan]).all()
    assert s.spec["source"] == "loss-landscape"


def test_save_keeps_what_it_does_not_write_and_never_overwrites_unasked(tmp_path):
    x, y = np.linspace(-1, 1, NX), np.linspace(0, 2, NY)
    path = tmp_path / "ll.h5"
    ll_surface_file(path, x, y, {"train_loss": plane, "train_acc": lambda a, b: 50 + 0 * a,
                                 "test_loss": plane, "test_acc": lambda a, b: 40 + 0 * a,
                                 "min_eig": lambda a, b: -a, "max_eig": lambda a, b: 3 + b})
    with h5py.File(path, "a") as f:
        f.attrs["note"] = "theirs"
        f.create_group("more")["stuff"] = np.arange(3)
    before = path.read_bytes()
    s = lw.Surface.load(path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        s.save(path)
    assert path.read_bytes() == before  # untouched
    s.save(path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ll.h5"]  # no temporary left
    with h5py.File(path) as f:
        assert f["dir_file"].asstr()[()] == "some_dir_file.h5"
        assert h5py.check_string_dtype(f["dir_file"].dtype) is not None
        assert f.attrs["note"] == "theirs"
        np.testing.assert_array_equal(f["more/stuff"][:], np.arange(3))
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert f[key].shape == (NY, NX) and f[key].dtype == np.float64  # rows = y
        np.testing.assert_array_equal(f["min_eig"][:].ravel(), -np.meshgrid(x, y)[0].ravel())
        np.testing.assert_array_equal(f["test_acc"][:], 40.0)
        # what plot_2D.py does: contour(X, Y, Z) with X, Y = meshgrid(x, y)
        xx, yy = np.meshgrid(f["xcoordinates"][:], f["ycoordinates"][:])
        np.testing.assert_array_equal(f["train_loss"][:], plane(xx, yy))
    again = lw.Surface.load(path)
    np.testing.assert_array_equal(again.test_loss, s.test_loss)


def test_missing_minus_one_round_trip_and_curve_without_accuracy(tmp_path):
    loss = np.arange(NX, dtype=float) + 1
    loss[2] = np.nan
    c = lw.Curve(np.linspace(-1, 1, NX), loss, None)
    c.save(tmp_path / "c.h5", missing=-1)
    with h5py.File(tmp_path / "c.h5") as f:
        assert f["train_loss"][2] == -1  # plot_surface.py computes points <= 0
        # plot_1D.py reads train_acc beside train_loss and plots 100 - train_acc
        assert f["train_acc"].shape == (NX,) and (f["train_acc"][:] == -1).all()
        assert "ycoordinates" not in f
    back = lw.Curve.load(tmp_path / "c.h5")
    np.testing.assert_array_equal(back.loss, loss)  # NaN again, in place
    assert back.accuracy is None
    with pytest.raises(ValueError, match="test_data"):
        back.values("test_loss")


def test_test_data_is_a_second_pass_checked_by_the_oracle():
    model = mlp(seed=3).eval()
    x, y = mlp_data()
    xt, yt = x[:20] * 1.5, y[:20].flip(0)
    d1, d2 = lw.random_directions(model, 2, seed=4)
    s = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-1, 1, 4), y=(-0.5, 0.5, 3),
                           test_data=(xt, yt), progress=False)
    xs, ys = np.linspace(-1, 1, 4), np.linspace(-0.5, 0.5, 3)
    loss, acc = naive_surface(model, x, y, d1, d2, xs, ys)
    tloss, tacc = naive_surface(model, xt, yt, d1, d2, xs, ys)
    np.testing.assert_allclose(s.loss, loss, rtol=1e-5)
    np.testing.assert_allclose(s.test_loss, tloss, rtol=1e-5)
    np.testing.assert_allclose(s.test_accuracy, tacc, atol=1e-12)
    assert not np.allclose(s.test_loss, s.loss)
    c = lw.compute_curve(model, (x, y), direction=d1, x=(-1, 1, 5), test_data=(xt, yt),
                         metrics=("loss",), progress=False)
    np.testing.assert_allclose(c.test_loss, naive_eval(model, xt, yt, [d1],
                                                       np.linspace(-1, 1, 5)[:, None])[0],
                               rtol=1e-5)
    assert c.test_accuracy is None
    # a finer grid reuses the test values too
    fine = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-1, 1, 7), y=(-0.5, 0.5, 5),
                              test_data=(xt, yt), reuse=s, progress=False)
    assert fine.spec["test"]["reused"] == 12
    np.testing.assert_array_equal(fine.test_loss[::2, ::2], s.test_loss)


def test_an_unfinished_loss_landscape_run_is_finished_by_reuse(tmp_path):
    model = mlp(seed=5).eval()
    x, y = mlp_data()
    d1, d2 = lw.random_directions(model, 2, seed=6)
    xs, ys = np.linspace(-1, 1, NX), np.linspace(-1, 1, NY)
    loss, acc = naive_surface(model, x, y, d1, d2, xs, ys)
    lookup = {(a, b): (loss[j, i], acc[j, i]) for j, b in enumerate(ys) for i, a in enumerate(xs)}
    path = tmp_path / "ll.h5"
    pending = {0, 4, 7, 14}
    ll_surface_file(path, xs, ys, {
        "train_loss": lambda a, b: np.array([lookup[p][0] for p in zip(a, b, strict=True)]),
        "train_acc": lambda a, b: np.array([100 * lookup[p][1] for p in zip(a, b, strict=True)]),
    }, pending=pending)
    part = lw.Surface.load(path)
    assert int(np.isnan(part.loss).sum()) == len(pending)
    done = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-1, 1, NX), y=(-1, 1, NY),
                              reuse=part, progress=False)
    assert done.spec["evaluated"] == len(pending) and done.spec["reused"] == NX * NY - 4
    np.testing.assert_allclose(done.loss, loss, rtol=1e-5)
    np.testing.assert_allclose(done.accuracy, acc, atol=1e-12)
    other = lw.random_directions(model, 2, seed=7)
    with pytest.raises(ValueError, match="another model, data, directions"):
        lw.compute_surface(model, (x, y), directions=other, x=(-1, 1, NX), y=(-1, 1, NY),
                           reuse=part, progress=False)


def test_an_unfinished_loss_landscape_curve(tmp_path):
    """1D: plot_surface.py without --y writes (len(x),) arrays, -1 where not computed."""
    model = mlp(seed=8).eval()
    x, y = mlp_data()
    d = lw.random_direction(model, seed=9)
    xs = np.linspace(-1, 1, 9)
    loss, acc = naive_eval(model, x, y, [d], xs[:, None])
    loss[[1, 6]] = acc[[1, 6]] = -1.0
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f["dir_file"] = "d.h5"
        f["xcoordinates"], f["train_loss"], f["train_acc"] = xs, loss, np.where(acc < 0, -1,
                                                                                 100 * acc)
    c = lw.Curve.load(tmp_path / "c.h5")
    assert np.isnan(c.loss[[1, 6]]).all() and np.isnan(c.accuracy[[1, 6]]).all()
    done = lw.compute_curve(model, (x, y), direction=d, x=(-1, 1, 9), reuse=c, progress=False)
    assert done.spec["evaluated"] == 2
    np.testing.assert_allclose(done.loss, naive_eval(model, x, y, [d], xs[:, None])[0],
                               rtol=1e-5)


# --- directions files ------------------------------------------------------------------------
def bn_mlp(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    m.train()
    m(torch.randn(16, 10))  # running statistics away from 0 / 1
    return m.eval()


def write_list(f, name, tensors):
    """h5_util.write_list: datasets '0'..'n-1', no attributes."""
    g = f.create_group(name)
    for i, t in enumerate(tensors):
        g.create_dataset(str(i), data=t.numpy())


def test_save_directions_layouts(tmp_path):
    model = bn_mlp()
    dirs = lw.random_directions(model, 2, seed=1)
    assert lw.save_directions(tmp_path / "w.h5", dirs, model) == "weights"
    params = list(model.parameters())
    with h5py.File(tmp_path / "w.h5") as f:
        assert set(f) == {"xdirection", "ydirection"}
        for g, d in zip(("xdirection", "ydirection"), dirs, strict=True):
            assert len(f[g]) == len(params)
            for i, (name, p) in enumerate(model.named_parameters()):
                ds = f[g][str(i)]
                assert ds.shape == p.shape and ds.dtype == np.float32
                np.testing.assert_array_equal(ds[()], d[name].numpy())
    lw.save_directions(tmp_path / "s.h5", dirs, model, dir_type="states")
    state = model.state_dict()
    with h5py.File(tmp_path / "s.h5") as f:
        assert len(f["xdirection"]) == len(state)
        for i, (name, v) in enumerate(state.items()):
            ds = f["xdirection"][str(i)]
            assert ds.shape == v.shape
            if name not in dirs[0]:  # buffers: not moved
                assert not np.any(ds[()])
        assert f["xdirection"][str(list(state).index("1.num_batches_tracked"))].shape == ()
    with pytest.raises(FileExistsError):
        lw.save_directions(tmp_path / "w.h5", dirs, model)
    one = lw.load_directions(tmp_path / "s.h5", model)
    assert len(one) == 2 and all(one[0][k].equal(dirs[0][k]) for k in dirs[0])
    assert set(one[0]) == set(dirs[0])  # zero buffers and num_batches_tracked not added


def test_directions_move_the_model_as_loss_landscape_applies_them(tmp_path):
    """set_weights: p + a * dx[i] + b * dy[i] over zip(model.parameters(), file order)."""
    model = mlp(seed=2).eval()
    x, y = mlp_data()
    dirs = lw.random_directions(model, 2, seed=3)
    lw.save_directions(tmp_path / "d.h5", dirs, model)
    with h5py.File(tmp_path / "d.h5") as f:
        dx = [torch.from_numpy(f["xdirection"][str(i)][()]) for i in range(len(f["xdirection"]))]
        dy = [torch.from_numpy(f["ydirection"][str(i)][()]) for i in range(len(f["ydirection"]))]
    moved = mlp(seed=2).eval().double()
    with torch.no_grad():
        for p, a, b in zip(moved.parameters(), dx, dy, strict=True):
            p.add_(0.7 * a.double() - 0.4 * b.double())
        want = float(nn.functional.cross_entropy(moved(x.double()), y))
    s = lw.compute_surface(model, (x, y), directions=dirs, x=(0.7, 0.7, 1), y=(-0.4, -0.4, 1),
                           progress=False)
    assert s.loss[0, 0] == pytest.approx(want, rel=1e-5)


def test_loads_loss_landscape_files_by_position(tmp_path):
    model = bn_mlp()
    params = [p.detach() for p in model.parameters()]
    state = model.state_dict()
    g = torch.Generator().manual_seed(0)
    dx = [torch.randn(p.shape, generator=g) for p in params]
    with h5py.File(tmp_path / "w.h5", "w") as f:
        write_list(f, "xdirection", dx)
    (d,) = lw.load_directions(tmp_path / "w.h5", model)
    for (name, _), t in zip(model.named_parameters(), dx, strict=True):
        assert d[name].equal(t)
    # states: a target direction between two checkpoints moves running stats and the count
    diff = {k: torch.full_like(v, 2) if v.is_floating_point() else torch.tensor(5)
            for k, v in state.items()}
    with h5py.File(tmp_path / "s.h5", "w") as f:
        write_list(f, "xdirection", list(diff.values()))
        write_list(f, "ydirection", [v * 0 for v in diff.values()])
    d1, d2 = lw.load_directions(tmp_path / "s.h5", model)
    assert "1.running_mean" in d1 and "1.running_var" in d1
    assert "1.num_batches_tracked" not in d1
    assert "1.running_mean" not in d2  # an all-zero buffer entry is no direction
    assert all(d1[k].dtype == torch.float32 for k in d1)
    # a file for another model
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        write_list(f, "xdirection", dx[::-1])
    with pytest.raises(ValueError, match="another model"):
        lw.load_directions(tmp_path / "bad.h5", model)


def test_our_files_are_read_by_name(tmp_path):
    model = bn_mlp()
    (d,) = [lw.random_direction(model, seed=2)]
    lw.save_directions(tmp_path / "d.h5", [d], model, dir_type="states")
    with h5py.File(tmp_path / "d.h5", "a") as f:  # swap two datasets (names travel along)
        g = f["xdirection"]
        g.move("0", "tmp")
        g.move("2", "0")
        g.move("tmp", "2")
    (back,) = lw.load_directions(tmp_path / "d.h5", model)
    assert all(back[k].equal(d[k]) for k in d)


# --- projection files -----------------------------------------------------------------------
def test_projection_and_pca_directions_files(tmp_path):
    torch.manual_seed(0)
    model = mlp(seed=1)
    x, y = mlp_data()
    traj = lw.Trajectory()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    traj.attach(opt, model, every=2)
    for _ in range(12):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    traj.detach()
    pca, evr = traj.pca_directions()
    xy = traj.save_projection(tmp_path / "proj.h5", tmp_path / "dir.h5", pca)
    with h5py.File(tmp_path / "proj.h5") as f:
        assert set(f) == {"proj_xcoord", "proj_ycoord"}
        assert f["proj_xcoord"].shape == (len(traj),) and f["proj_xcoord"].dtype == np.float64
        np.testing.assert_array_equal(np.stack([f["proj_xcoord"][:], f["proj_ycoord"][:]], 1), xy)
    with h5py.File(tmp_path / "dir.h5") as f:
        np.testing.assert_allclose(f["explained_variance_ratio_"][:], evr)
        # sklearn's explained_variance_: the variance (ddof 1) of the path's PCA coordinates
        np.testing.assert_allclose(f["explained_variance_"][:], xy.var(axis=0, ddof=1),
                                   rtol=1e-6)
        assert len(f["xdirection"]) == len(list(model.parameters()))
    back = lw.load_directions(tmp_path / "dir.h5", model)
    assert all(torch.equal(back[0][k], pca[0][k]) for k in pca[0])
    with pytest.raises(FileExistsError):
        traj.save_projection(tmp_path / "proj.h5", tmp_path / "other.h5", pca)
    assert not (tmp_path / "other.h5").exists()


# --- curvature maps --------------------------------------------------------------------------
def test_curvature_map_files(tmp_path):
    x, y = np.linspace(-1, 1, NX), np.linspace(0, 1, NY)
    path = tmp_path / "ll.h5"
    # plot_hessian_eigen.py: min_eig pre-filled with +1, max_eig with -1, (len(x), len(y))
    ll_surface_file(path, x, y, {"min_eig": lambda a, b: -0.1 * (1 + b + 0 * a),
                                 "max_eig": lambda a, b: 2.0 + a + b,
                                 "train_loss": plane}, pending={5})
    m = lw.CurvatureMap.load(path)
    assert m.lambda_min.shape == (NY, NX)
    assert np.isnan(m.lambda_min.ravel()[5]) and np.isnan(m.lambda_max.ravel()[5])
    xx, yy = np.meshgrid(x, y)
    ok = ~np.isnan(m.lambda_max)
    np.testing.assert_allclose(m.ratio[ok], (0.1 * (1 + yy) / (2 + xx + yy))[ok])
    m.save(tmp_path / "m.h5")
    with h5py.File(tmp_path / "m.h5") as f:
        # plot_2d_eig_ratio: abs(min_eig / max_eig) as a heatmap of rows = y
        ratio = np.abs(f["min_eig"][:] / f["max_eig"][:])
        np.testing.assert_allclose(ratio, m.ratio)
        np.testing.assert_array_equal(f["train_loss"][:].ravel()[:5], plane(xx, yy).ravel()[:5])
    with pytest.raises(FileExistsError):
        m.save(tmp_path / "m.h5")


# --- ParaView -------------------------------------------------------------------------------
def parse_vtp(path):
    piece = ET.parse(path).getroot().find("PolyData/Piece")

    def arr(section, name):
        node = piece.find(f"{section}/DataArray[@Name='{name}']")
        return np.array(node.text.split(), dtype=float)

    return piece, arr


@pytest.mark.parametrize(("nx", "ny"), [(21, 31), (4, 3)])
def test_vtp_of_any_grid(tmp_path, nx, ny):
    x, y = np.linspace(-1, 1, nx), np.linspace(-2, 2, ny)
    loss = plane(*np.meshgrid(x, y)) ** 2 + 0.5
    loss[1, 2] = np.nan
    lw.Surface(x, y, loss, None).to_vtp(tmp_path / "s.vtp")
    piece, arr = parse_vtp(tmp_path / "s.vtp")
    assert int(piece.get("NumberOfPoints")) == nx * ny
    npolys = int(piece.get("NumberOfPolys"))
    assert npolys == (nx - 1) * (ny - 1) - 4  # the 4 cells around the NaN point are holes
    pts = arr("Points", "Points").reshape(-1, 3)
    conn = arr("Polys", "connectivity").astype(int).reshape(-1, 4)
    assert (arr("Polys", "offsets") == 4 * np.arange(1, npolys + 1)).all()
    for quad in conn:  # every quad is one grid cell, counter-clockwise
        ix = np.searchsorted(x, pts[quad, 0])
        iy = np.searchsorted(y, pts[quad, 1])
        assert list(ix - ix[0]) == [0, 1, 1, 0] and list(iy - iy[0]) == [0, 0, 1, 1]
    z = pts[:, 2].reshape(ny, nx)
    ok = ~np.isnan(loss)
    np.testing.assert_allclose(z[ok], loss[ok], rtol=1e-15)  # loss as height
    np.testing.assert_allclose(arr("PointData", "loss").reshape(ny, nx)[ok], loss[ok])
    lw.Surface(x, y, loss, None).to_vtp(tmp_path / "log.vtp", log=True)
    _, arr = parse_vtp(tmp_path / "log.vtp")
    np.testing.assert_allclose(arr("Points", "Points").reshape(-1, 3)[:, 2].reshape(ny, nx)[ok],
                               np.log10(loss[ok]), rtol=1e-12)
    with pytest.raises(FileExistsError):
        lw.Surface(x, y, loss, None).to_vtp(tmp_path / "s.vtp")
