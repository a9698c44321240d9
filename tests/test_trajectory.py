"""Training paths: PAPERS (a5) on an SGD path of the demo MLP; recording; plots."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import bn_res_cnn
from conftest import report
from snapshots import assert_same_snapshot, snapshot

import landscape_widget as lw


@pytest.fixture(scope="module")
def sgd_path():
    """The demo MLP trained by plain SGD (lr 0.1, 300 steps), recorded every 10 steps."""
    data = lw.datasets.digits("train")
    model = lw.demo.mlp(seed=0)
    traj = lw.Trajectory()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    traj.attach(opt, model, every=10)
    g = torch.Generator().manual_seed(0)
    x, y = data
    for _ in range(300):
        idx = torch.randint(0, len(x), (128,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    traj.detach()
    return model, data, traj


def test_attach_records_every_k_steps(sgd_path):
    _, _, traj = sgd_path
    assert len(traj) == 31 and traj.steps[:3] == [0, 10, 20] and traj.steps[-1] == 300


def test_a5_pca_directions(sgd_path):
    model, _, traj = sgd_path
    dirs, evr = traj.pca_directions(k=2)
    v = torch.stack([traj.flatten(d) for d in dirs])
    np.testing.assert_allclose((v @ v.T).numpy(), np.eye(2), atol=1e-6)
    assert evr[0] > 0.5 and evr[0] >= evr[1] and evr.sum() <= 1 + 1e-9
    # Biases are excluded (ignore="biasbn") and the direction dicts fit the model.
    assert not dirs[0]["0.bias"].any() and dirs[0]["0.weight"].shape == (32, 64)
    xy = traj.project(dirs)
    assert xy.shape == (31, 2) and np.all(xy[-1] == 0.0)
    np.testing.assert_allclose(xy, traj.project(dirs, method="lstsq"), atol=1e-4)
    # dirs.path projects on the float64 components, project() on the float32 directions
    # the user gets: they agree to float32 rounding, not to float64's.
    np.testing.assert_allclose(xy, dirs.path, rtol=1e-6, atol=1e-6 * np.abs(xy).max())
    assert dirs.axis_labels[0] == f"1st PC: {100 * evr[0]:.1f} %"
    report(f"PCA of an SGD path (digits MLP, lr 0.1, 300 steps, 31 checkpoints): "
           f"EVR {evr[0]:.3f}, {evr[1]:.3f}")


def test_projection_on_random_directions_is_in_their_units(sgd_path):
    model, _, traj = sgd_path
    dirs = lw.random_directions(model, 2, seed=0)  # filter-normalised: far from unit norm
    xy = traj.project(dirs)
    norms = np.array([float(traj.flatten(d).norm()) for d in dirs])
    m = (traj.points[0].double() - traj.points[-1].double()) * traj._weight_mask()
    expected = np.array([float(m @ (traj.flatten(d) * traj._weight_mask())) for d in dirs])
    np.testing.assert_allclose(xy[0], expected / norms ** 2, rtol=1e-6)


def test_auto_range_has_the_model_on_the_grid(sgd_path):
    _, _, traj = sgd_path
    dirs, _ = traj.pca_directions()
    for axis in (0, 1):
        start, stop, num = dirs.covering_range(axis)
        grid = np.linspace(start, stop, num)
        assert np.abs(grid).min() < 1e-9 * (stop - start)
        assert start < dirs.path[:, axis].min() and stop > dirs.path[:, axis].max()


def test_projection_agrees_with_least_squares_oracle(sgd_path):
    _, _, traj = sgd_path
    dirs, _ = traj.pca_directions(k=2)
    m = torch.stack([p.double() - traj.points[-1].double() for p in traj.points])
    m = m * traj._weight_mask()
    basis = torch.stack([traj.flatten(d) for d in dirs]).numpy()
    coef, *_ = np.linalg.lstsq(basis.T, m.numpy().T, rcond=None)
    np.testing.assert_allclose(traj.project(dirs), coef.T, atol=1e-4)


def test_surface_around_the_path(sgd_path):
    model, data, traj = sgd_path
    before = snapshot(model)
    dirs, evr = traj.pca_directions(k=2)
    surf = lw.compute_surface(model, data, directions=dirs, progress=False)
    xy = traj.project(dirs)
    assert surf.x.min() < xy[:, 0].min() and surf.x.max() > xy[:, 0].max()
    assert surf.y.min() < xy[:, 1].min() and surf.y.max() > xy[:, 1].max()
    fig = surf.to_plotly("contour", path=xy)
    assert fig.layout.xaxis.title.text.startswith("1st PC: ")
    path = next(t for t in fig.data if t.name == "path")
    np.testing.assert_allclose(np.asarray(path.x, dtype=float), xy[:, 0])
    # The path's end is the model, on the grid: the surface there is the model's loss.
    iy, ix = np.argmin(np.abs(surf.y)), np.argmin(np.abs(surf.x))
    with torch.no_grad():
        own = float(torch.nn.functional.cross_entropy(model(data[0]), data[1]))
    assert surf.loss[iy, ix] == pytest.approx(own, rel=1e-5)
    assert_same_snapshot(before, snapshot(model))


def test_from_checkpoints_equals_recording(tmp_path):
    model = bn_res_cnn(seed=0)
    traj = lw.Trajectory()
    paths = []
    for i in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (i + 1))
        traj.record(model)
        torch.save({"state_dict": model.state_dict()}, tmp_path / f"c{i}.pt")
        paths.append(tmp_path / f"c{i}.pt")
    loaded = lw.Trajectory.from_checkpoints(paths)
    with_model = lw.Trajectory.from_checkpoints(paths, model=model)
    for other in (loaded, with_model):
        assert other.names == traj.names
        for a, b in zip(other.points, traj.points, strict=True):
            assert torch.equal(a, b)


def test_errors():
    traj = lw.Trajectory()
    traj.record(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="at least 3"):
        traj.pca_directions()
    with pytest.raises(ValueError, match="differ"):
        traj.record(torch.nn.Linear(4, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        traj.record([1, 2])
    with pytest.raises(ValueError, match="ignore"):
        lw.Trajectory(ignore="bias")
