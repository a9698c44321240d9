"""Issue 15 (4) on executors: ``samples=N`` with ``executor=`` (Dask, concurrent.futures).

Two oracles: the local ``compute_surface(..., samples=N)`` on the same subset (same seed,
same indices: the transport must not change a value), and a float64 per-point loop over
exactly the drawn samples (``subset_indices``), with the closed-form standard error
``std(ddof=1) / sqrt(n) * sqrt((N - n) / (N - 1))`` of the per-sample losses. Workers are
real processes (a Dask LocalCluster of two); ``data_fn`` is defined at module level so that
they import it by name.
"""

from __future__ import annotations

import copy
import logging
import pickle
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dask.distributed import Client, LocalCluster
from torch import nn

import landscape_widget as lw
from landscape_widget.core import _remote
from landscape_widget.core.errors import ReuseMismatch
from landscape_widget.core.subset import SubsetError, subset_indices

POP, N, SEED = 300, 80, 5
GRID = dict(x=(-1.0, 1.0, 5), y=(-0.8, 0.6, 5), progress=False)
REVERSED = False  # data_fn's order on "another worker" (test_a_worker_drawing_...)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).eval()


def data_fn():
    """Runs on the workers: the data is made there, never sent."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(POP, 6, generator=g), torch.randint(0, 3, (POP,), generator=g)
    return (x.flip(0), y.flip(0)) if REVERSED else (x, y)


def one_counted_target():
    """40 samples of which only the first has a counted target (the others ignore_index)."""
    x, y = data_fn()
    y = torch.full((40,), -100)
    y[0] = 1
    return x[:40], y


@pytest.fixture(scope="module")
def client():
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=":0", silence_logs=logging.CRITICAL)
    client = Client(cluster)
    client.wait_for_workers(2, timeout=120)
    yield client
    client.close()
    cluster.close()


def float64_points(model, dirs, coords):
    """Subset mean loss and its standard error at ``coords``, float64, point by point."""
    x, y = data_fn()
    idx = subset_indices(POP, N, SEED)
    x, y = x[idx].double(), y[idx]
    ref = copy.deepcopy(model).double()
    base = {k: v.detach().double() for k, v in model.state_dict().items()}
    loss, se = [], []
    for a, b in coords:
        ref.load_state_dict({k: v + a * dirs[0][k].double() + b * dirs[1][k].double()
                             for k, v in base.items()})
        with torch.no_grad():
            per = F.cross_entropy(ref(x), y, reduction="none").numpy()
        loss.append(per.mean())
        se.append(per.std(ddof=1) / np.sqrt(N) * np.sqrt((POP - N) / (POP - 1)))
    return np.array(loss), np.array(se)


def _same(a, b):
    for m in ("loss", "accuracy", "loss_se"):
        np.testing.assert_allclose(getattr(a, m), getattr(b, m), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["tensors", "data_fn"])
def test_dask_subset_equals_local_subset_and_float64_oracle(client, kind):
    """Tensors are subset on the client (only the drawn samples travel); a data_fn's
    workers draw the same indices themselves. Either way: the local subset surface, with
    loss_se in every tile."""
    model = make_model()
    dirs = lw.random_directions(model, 2, seed=3)
    local = lw.compute_surface(model, data_fn(), directions=dirs, samples=N, sample_seed=SEED,
                               **GRID)
    data = data_fn if kind == "data_fn" else data_fn()
    stream = lw.iter_tiles(model, data, directions=dirs, samples=N, sample_seed=SEED,
                           executor=client, tile_points=4, x=GRID["x"], y=GRID["y"])
    for tile in stream:  # every tile brings its points' standard errors
        assert tile.evaluated and np.isfinite(tile.values["loss_se"]).all()
    remote = stream.result()
    assert remote.spec["executor"]["tiles"] == 7  # ceil(25 / 4)
    assert remote.spec["samples"] == local.spec["samples"] == {"n": N, "of": POP, "seed": SEED}
    assert remote.spec["n_samples"] == N and remote.spec["data"] == local.spec["data"]
    _same(remote, local)
    picks = [(0, 0), (2, 2), (4, 1), (3, 4)]  # (iy, ix)
    coords = [(remote.x[ix], remote.y[iy]) for iy, ix in picks]
    loss, se = float64_points(model, dirs, coords)
    got = np.array([remote.loss[p] for p in picks])
    got_se = np.array([remote.loss_se[p] for p in picks])
    np.testing.assert_allclose(got, loss, rtol=1e-5)
    np.testing.assert_allclose(got_se, se, rtol=1e-4)
    assert (got_se > 0).all()


def test_dask_subset_reuse_and_file_as_for_local_runs(client, tmp_path):
    """reuse= and the HDF5 file behave as for a local subset result, in both directions;
    a subset is never reused as exact (nor another seed's subset)."""
    model = make_model()
    dirs = lw.random_directions(model, 2, seed=4)
    kw = dict(directions=dirs, samples=N, sample_seed=SEED, progress=False)
    coarse, fine = dict(x=(-1, 1, 5), y=(-1, 1, 5)), dict(x=(-1, 1, 9), y=(-1, 1, 9))
    remote = lw.compute_surface(model, data_fn, executor=client, **coarse, **kw)
    fresh = lw.compute_surface(model, data_fn(), **fine, **kw)
    local = lw.compute_surface(model, data_fn(), reuse=remote, **fine, **kw)  # remote -> local
    again = lw.compute_surface(model, data_fn, executor=client, reuse=local, **fine, **kw)
    assert local.spec["reused"] == 25 and local.spec["evaluated"] == 81 - 25
    assert again.spec["reused"] == 81 and again.spec["evaluated"] == 0  # local -> remote
    _same(local, fresh)
    _same(again, fresh)
    with pytest.raises(ReuseMismatch):  # a subset is not the exact surface
        lw.iter_tiles(model, data_fn, directions=dirs, executor=client, reuse=remote, **fine)
    with pytest.raises(ReuseMismatch):  # another draw is other data
        lw.iter_tiles(model, data_fn, directions=dirs, executor=client, reuse=remote,
                      samples=N, sample_seed=SEED + 1, **fine)
    path = tmp_path / "remote.h5"
    remote.save(path)
    with h5py.File(path, "r") as f:  # loss-landscape's keys, and the standard errors
        np.testing.assert_allclose(f["train_loss"][()], remote.loss)
        np.testing.assert_allclose(f["train_loss_se"][()], remote.loss_se)
    back = lw.Surface.load(path)
    np.testing.assert_array_equal(back.loss_se, remote.loss_se)
    assert back.spec["samples"] == {"n": N, "of": POP, "seed": SEED}


def test_a_worker_drawing_another_subset_is_refused():
    """A worker whose data_fn returns the samples in another order draws another subset:
    its tile fails with the fix instead of mixing two subsets in one grid."""
    global REVERSED
    model = make_model()
    with ThreadPoolExecutor(1) as pool:
        stream = lw.iter_tiles(model, data_fn, samples=N, sample_seed=SEED, executor=pool,
                               x=(-1, 1, 3), y=None)
        runner = stream.evaluator
        list(stream)
        got = stream.result()
        np.testing.assert_allclose(
            got.loss_se, lw.compute_curve(model, data_fn(), samples=N, sample_seed=SEED,
                                          x=(-1, 1, 3), progress=False).loss_se, rtol=1e-6)
        coords = np.zeros((1, 1))
        assert "loss_se" in _remote.run_tile(runner.shipped, coords, 3, None,
                                             runner.subset)["values"]
        # "Another worker": a fresh process state whose data_fn gives another order.
        _remote._EVALUATORS.clear()
        _remote._DATA.clear()
        REVERSED = True
        try:
            with pytest.raises(RuntimeError, match="drew another data subset"):
                _remote.run_tile(runner.shipped, coords, 3, None, runner.subset)
        finally:
            REVERSED = False
            _remote._EVALUATORS.clear()
            _remote._DATA.clear()


def test_subset_errors_on_an_executor_name_the_draw_and_the_fix():
    with ThreadPoolExecutor(1) as pool:
        with pytest.raises(SubsetError, match=r"subset of 5 samples drawn with sample_seed=0"):
            lw.iter_tiles(make_model(), one_counted_target, samples=5, executor=pool,
                          x=(-1, 1, 3), y=None)
        with pytest.raises(ValueError, match="exceeds the 300 samples"):
            lw.iter_tiles(make_model(), data_fn, samples=POP + 1, executor=pool,
                          x=(-1, 1, 3), y=None)
        with pytest.raises(TypeError, match="sample_seed must be an int"):
            lw.iter_tiles(make_model(), data_fn, samples=10, sample_seed="x", executor=pool,
                          x=(-1, 1, 3), y=None)


def test_only_the_drawn_samples_travel():
    """Tensors are subset on the client: the payload holds the N drawn samples, not all
    POP; a data_fn travels as the function (its workers load the data and draw)."""
    with ThreadPoolExecutor(1) as pool:
        tensors = lw.iter_tiles(make_model(), data_fn(), samples=N, sample_seed=SEED,
                                executor=pool, x=(-1, 1, 3), y=None)
        function = lw.iter_tiles(make_model(), data_fn, samples=N, sample_seed=SEED,
                                 executor=pool, x=(-1, 1, 3), y=None)
    x, y = pickle.loads(tensors.evaluator.shipped.data_blob)
    idx = subset_indices(POP, N, SEED)
    assert torch.equal(x, data_fn()[0][idx]) and torch.equal(y, data_fn()[1][idx])
    assert callable(pickle.loads(function.evaluator.shipped.data_blob))
    for stream in (tensors, function):
        assert stream.spec["samples"] == {"n": N, "of": POP, "seed": SEED}
