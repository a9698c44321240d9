"""Review 12b: researchers' own loss-landscape files (directions and surfaces), both ways.

Files are written here the way tomgoldstein/loss-landscape writes them (``h5_util.write_list``:
datasets ``'0'..'n-1'`` in ``parameters()`` or ``state_dict()`` order, no attributes), and
the oracle applies them the way its ``net_plotter.set_weights`` / ``set_states`` do, in
float64, sharing no code with the engine.
"""

from __future__ import annotations

import copy

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import scaled_pair, tied_data, tied_mlp
from snapshots import assert_same_snapshot, snapshot
from torch import nn

import landscape_widget as lw


def write_list(f, name, tensors) -> None:
    """h5_util.write_list: one dataset per tensor, named by its position."""
    g = f.create_group(name)
    for i, t in enumerate(tensors):
        g.create_dataset(str(i), data=np.asarray(t))


def ll_states_loss(model, x, y, dirs, step) -> float:
    """net_plotter.set_states in float64: a deepcopy of the state_dict, each entry += its
    change (zip over the file's order), then load_state_dict; the mean cross-entropy."""
    net = copy.deepcopy(model).double().eval()
    new = copy.deepcopy(net.state_dict())
    assert len(new) == len(dirs[0])  # set_states asserts the same
    for i, (_, v) in enumerate(new.items()):
        change = sum(s * torch.as_tensor(d[i]).double() for s, d in zip(step, dirs, strict=True))
        v.add_(change.to(v.dtype))
    net.load_state_dict(new)
    with torch.no_grad():
        return float(F.cross_entropy(net(x.double()), y))


def test_states_file_of_a_tied_model_moves_the_tensor_by_all_its_entries(tmp_path):
    """A tied weight is in state_dict twice; loss-landscape's set_states moves it by the sum
    of both entries (its deepcopy keeps the sharing). Reading only the first entry gave
    losses 3-19 % off with no error."""
    model = tied_mlp().eval()
    x, y = tied_data()
    state = model.state_dict()
    assert len(state) > len(list(model.parameters()))  # the tie is in state_dict twice
    g = torch.Generator().manual_seed(1)
    dirs = [[torch.randn(v.shape, generator=g) for v in state.values()] for _ in range(2)]
    with h5py.File(tmp_path / "d.h5", "w") as f:
        write_list(f, "xdirection", dirs[0])
        write_list(f, "ydirection", dirs[1])
    before = snapshot(model)
    d1, d2 = lw.load_directions(tmp_path / "d.h5", model)
    for sx, sy in ((0.3, -0.2), (-0.5, 0.4)):
        s = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(sx, sx, 1),
                               y=(sy, sy, 1), progress=False)
        want = ll_states_loss(model, x, y, dirs, (sx, sy))
        assert s.loss[0, 0] == pytest.approx(want, rel=1e-5)
    assert_same_snapshot(before, snapshot(model))


def test_states_file_with_a_non_persistent_buffer_is_read_by_set_states(tmp_path):
    """save_directions appended the non-persistent buffer's entry to xdirection: one dataset
    more than state_dict, and loss-landscape's set_states stopped at its
    ``assert len(new_states) == len(changes)``."""
    a, b = scaled_pair()
    d = lw.interpolation_direction(a, b)
    assert "scale" in d
    before = snapshot(a)
    assert lw.save_directions(tmp_path / "d.h5", [d], a) == "states"
    with h5py.File(tmp_path / "d.h5", "r") as f:  # net_plotter.load_directions / read_list
        dx = [f["xdirection"][str(i)][()] for i in range(len(f["xdirection"]))]
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    # set_states moves what state_dict holds: model_b with model_a's scale at alpha = 1
    mixed = copy.deepcopy(b)
    mixed.scale.copy_(a.scale)
    with torch.no_grad():
        want = float(F.cross_entropy(mixed.double()(x.double()), y))
    assert ll_states_loss(a, x, y, [dx], (1.0,)) == pytest.approx(want, rel=1e-12)
    (back,) = lw.load_directions(tmp_path / "d.h5", a)  # ours still reads the whole of it
    assert set(back) == set(d) and all(torch.equal(back[k], d[k]) for k in d)
    assert_same_snapshot(before, snapshot(a))


def _state(path):
    """Bytes, modification time and mode of a file (what 'not changed' means here)."""
    st = path.lstat()
    return path.read_bytes() if path.is_file() else None, st.st_mtime_ns, st.st_mode


def _small_surface():
    model = tied_mlp().eval()
    x, y = tied_data()
    dirs = lw.random_directions(model, 2, seed=1)
    s = lw.compute_surface(model, (x, y), directions=dirs, x=(-1, 1, 3), y=(-1, 1, 2),
                           progress=False)
    return model, dirs, s


def test_finishing_a_loss_landscape_file_keeps_what_it_held(tmp_path):
    """README: ``done = compute_surface(..., reuse=Surface.load(f))`` computes the missing
    points; saving ``done`` over the file dropped its test_loss/test_acc (no test_data this
    time), dir_file and the user's own datasets."""
    model, dirs, _ = _small_surface()
    x, y = tied_data()
    full = lw.compute_surface(model, (x, y), directions=dirs, x=(-1, 1, 4), y=(-1, 1, 3),
                              test_data=(x[:10], y[:10]), progress=False)

    def as_ll(arr, pending):  # plot_surface.py: declared (len(x), len(y)), -1 pre-fill
        a = np.array(arr, dtype=np.float64).ravel()
        a[list(pending)] = -1.0
        return a.reshape(len(full.x), len(full.y))

    path = tmp_path / "surf.h5"
    with h5py.File(path, "w") as f:
        f["dir_file"] = "dirs.h5"
        f["xcoordinates"], f["ycoordinates"] = full.x, full.y
        f["train_loss"] = as_ll(full.loss, {2, 5})
        f["train_acc"] = as_ll(full.accuracy * 100, {2, 5})
        f["test_loss"] = as_ll(full.test_loss, ())
        f["test_acc"] = as_ll(full.test_accuracy * 100, ())
        f["my_notes"] = np.arange(3.0)
        f.attrs["experiment"] = "run 7"
        test_loss, test_acc = f["test_loss"][()], f["test_acc"][()]
    done = lw.compute_surface(model, (x, y), directions=dirs, x=(-1, 1, 4), y=(-1, 1, 3),
                              reuse=lw.Surface.load(path), progress=False)
    done.save(path, overwrite=True)
    with h5py.File(path, "r") as f:
        np.testing.assert_allclose(f["train_loss"][()].ravel(), full.loss.ravel(), rtol=1e-5)
        np.testing.assert_array_equal(f["test_loss"][()].ravel(), test_loss.ravel())
        np.testing.assert_array_equal(f["test_acc"][()].ravel(), test_acc.ravel())
        assert f["dir_file"].asstr()[()] == "dirs.h5"
        np.testing.assert_array_equal(f["my_notes"][()], np.arange(3.0))
        assert f.attrs["experiment"] == "run 7"


def test_finishing_a_file_with_the_loss_only_keeps_the_files_accuracy(tmp_path):
    """reuse= with metrics=("loss",) on a file holding accuracy: saving over it wrote an
    all-NaN train_acc ("not computed") in place of the file's values."""
    model, dirs, _ = _small_surface()
    x, y = tied_data()
    grid = dict(directions=dirs, x=(-1, 1, 4), y=(-1, 1, 3), progress=False)
    path = tmp_path / "s.h5"
    lw.compute_surface(model, (x, y), **grid).save(path)
    with h5py.File(path, "a") as f:  # one point unfinished, as a stopped run leaves it
        f["train_loss"][0, 1] = np.nan
        acc = f["train_acc"][()]
    done = lw.compute_surface(model, (x, y), metrics=("loss",), reuse=lw.Surface.load(path),
                              **grid)
    done.save(path, overwrite=True)
    with h5py.File(path, "r") as f:
        assert not np.isnan(f["train_loss"][()]).any()
        np.testing.assert_array_equal(f["train_acc"][()], acc)


def test_directions_saved_with_a_compiled_model_load_on_the_plain_one(tmp_path):
    """torch.compile names every tensor '_orig_mod.<name>': a directions file saved with the
    compiled model was refused by the plain one ('tensors [...] are not in this model'),
    and the other way round, though loss-landscape's reader (by position) takes both."""
    model, dirs, _ = _small_surface()
    compiled = torch.compile(model)
    assert next(iter(lw.random_direction(compiled, seed=0))).startswith("_orig_mod.")
    lw.save_directions(tmp_path / "plain.h5", dirs, model)
    cdirs = [{"_orig_mod." + k: v for k, v in d.items()} for d in dirs]
    lw.save_directions(tmp_path / "compiled.h5", cdirs, compiled)
    for path, target, want in ((tmp_path / "compiled.h5", model, dirs),
                               (tmp_path / "plain.h5", compiled, cdirs)):
        got = lw.load_directions(path, target)
        for g, w in zip(got, want, strict=True):
            assert set(g) == set(w) and all(torch.equal(g[k], w[k]) for k in w)
    other = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="saved for another model; pass the model"):
        lw.load_directions(tmp_path / "plain.h5", other)


def test_a_1d_directions_file_given_to_compute_surface_says_it_is_a_line(tmp_path):
    """A loss-landscape 1D file (xdirection only) loads as [d]; compute_surface said
    'directions must be a pair (d1, d2) of dicts; got list' of a list of dicts."""
    model = tied_mlp().eval()
    x, y = tied_data()
    with h5py.File(tmp_path / "line.h5", "w") as f:
        write_list(f, "xdirection", [torch.randn(p.shape) for p in model.parameters()])
    dirs = lw.load_directions(tmp_path / "line.h5", model)
    assert len(dirs) == 1
    with pytest.raises(TypeError, match=r"got a list of 1 \(a directions file with only an "
                                        r"xdirection is a line: lw.compute_curve\)"):
        lw.compute_surface(model, (x, y), directions=dirs, x=(-1, 1, 2), y=(-1, 1, 2),
                           progress=False)
    c = lw.compute_curve(model, (x, y), direction=dirs[0], x=(-1, 1, 2), progress=False)
    assert c.loss.shape == (2,)


def test_a_bfloat16_models_directions_and_surface_are_saved(tmp_path):
    """numpy has no bfloat16: save_directions and Surface.save (which keeps the directions)
    failed with 'Got unsupported ScalarType BFloat16', the latter after the computation."""
    model = tied_mlp().eval().to(torch.bfloat16)
    x, y = tied_data()
    dirs = lw.random_directions(model, 2, seed=1)
    before = snapshot(model)
    lw.save_directions(tmp_path / "d.h5", dirs, model)
    with h5py.File(tmp_path / "d.h5", "r") as f:  # what loss-landscape's set_weights adds
        for i, (name, p) in enumerate(model.named_parameters()):
            stored = torch.from_numpy(f["xdirection"][str(i)][()])
            assert torch.equal(stored.to(p.dtype), dirs[0][name])
    back = lw.load_directions(tmp_path / "d.h5", model)
    for b, d in zip(back, dirs, strict=True):
        assert all(b[k].dtype == torch.bfloat16 and torch.equal(b[k], d[k]) for k in d)
    s = lw.compute_surface(model, (x.bfloat16(), y), directions=dirs, x=(-1, 1, 3),
                           y=(-1, 1, 2), progress=False)
    s.save(tmp_path / "s.h5")
    again = lw.Surface.load(tmp_path / "s.h5")
    np.testing.assert_array_equal(again.loss, s.loss)
    assert all(torch.equal(again.directions[0][k].to(torch.bfloat16), dirs[0][k])
               for k in dirs[0])
    assert_same_snapshot(before, snapshot(model))


def test_accuracies_plot_surface_wrote_into_our_stand_in_are_read(tmp_path):
    """A loss-only surface saved with missing=-1 gets an all-"not computed" train_acc;
    plot_surface.py finishing the file fills the accuracy of the points it computes. Those
    were read as not computed (the stand-in's attribute) and lost on the next save."""
    model, dirs, _ = _small_surface()
    x, y = tied_data()
    s = lw.compute_surface(model, (x, y), directions=dirs, x=(-1, 1, 3), y=(-1, 1, 2),
                           metrics=("loss",), progress=False)
    s.loss[1, 2] = np.nan
    path = tmp_path / "handoff.h5"
    s.save(path, missing=-1)
    with h5py.File(path, "r+") as f:  # plot_surface.crunch: values where train_loss <= 0
        loss, acc = f["train_loss"][:], f["train_acc"][:]
        todo = np.flatnonzero(loss.ravel() <= 0)
        assert todo.tolist() == [5]
        loss.ravel()[todo], acc.ravel()[todo] = 1.25, 55.0
        f["train_loss"][:], f["train_acc"][:] = loss, acc
    back = lw.Surface.load(path)
    want = np.full((2, 3), np.nan)
    want[1, 2] = 0.55
    np.testing.assert_array_equal(back.accuracy, want)
    back.save(tmp_path / "again.h5")
    with h5py.File(tmp_path / "again.h5", "r") as f:
        np.testing.assert_array_equal(f["train_acc"][()], want * 100)
    # an unfilled stand-in still reads as not computed
    s.save(tmp_path / "plain.h5", missing=-1)
    assert lw.Surface.load(tmp_path / "plain.h5").accuracy is None
