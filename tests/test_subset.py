"""Issue 15 (4): grids on a fixed random data subset, with standard errors (``samples=N``).

The oracle is a float64 per-point loop over exactly the subset's samples (``load_state_dict``
into a float64 copy, per-sample losses with ``reduction='none'``), and the standard error is
the closed form computed from those per-sample losses in float64. The subset's indices come
from :func:`~landscape_widget.core.subset.subset_indices` (the subset is part of the
definition); their properties (distinct, sorted, seeded) are tested separately.
"""

from __future__ import annotations

import copy

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import landscape_widget as lw
from landscape_widget.core.subset import SubsetError, subset_indices

GRID = dict(x=(-1.0, 1.0, 5), y=(-0.8, 0.6, 4), progress=False)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).eval()


def _data(n=400, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def per_sample_oracle(model, x, y, dirs, xs, ys, loss_fn):
    """Per-sample losses ``(ny, nx, n)`` and correct predictions, float64, point by point."""
    ref = copy.deepcopy(model).double()
    base = {k: v.detach().double() for k, v in model.state_dict().items()}
    d64 = [{k: v.double() for k, v in d.items()} for d in dirs]
    losses = np.zeros((len(ys), len(xs), len(y)))
    hits = np.zeros_like(losses)
    for iy, b in enumerate(ys):
        for ix, a in enumerate(xs):
            state = {k: v + a * d64[0].get(k, 0 * v) + b * d64[1].get(k, 0 * v)
                     for k, v in base.items()}
            ref.load_state_dict(state)
            with torch.no_grad():
                out = ref(x.double())
                losses[iy, ix] = loss_fn(out, y).numpy()
                hits[iy, ix] = (out.argmax(-1) == y).double().numpy()
    return losses, hits


def closed_form_se(per_sample: np.ndarray, population: int) -> np.ndarray:
    """std(ddof=1) / sqrt(n) * sqrt((N - n) / (N - 1)) along the last axis."""
    n = per_sample.shape[-1]
    return per_sample.std(-1, ddof=1) / np.sqrt(n) * np.sqrt((population - n) / (population - 1))


def test_subset_indices_are_distinct_sorted_and_seeded():
    a = subset_indices(1000, 300, seed=5)
    assert a.shape == (300,) and len(set(a.tolist())) == 300
    assert (a[1:] > a[:-1]).all() and 0 <= int(a.min()) and int(a.max()) < 1000
    assert torch.equal(a, subset_indices(1000, 300, seed=5))
    assert not torch.equal(a, subset_indices(1000, 300, seed=6))
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    subset_indices(1000, 300, seed=5)  # does not consume the global RNG
    assert torch.equal(torch.rand(1), before)


@pytest.mark.parametrize("how", ["default", "module", "vmap-module"])
def test_subset_values_and_se_equal_float64_loop_over_the_subset(how):
    model, (x, y) = _mlp(), _data()
    dirs = lw.random_directions(model, 2, seed=3)
    kw = {}
    if how != "default":
        kw["loss_fn"] = nn.CrossEntropyLoss()
        kw["evaluator_options"] = {"strategy": "vmap" if how == "vmap-module" else "loop"}
    n, seed = 120, 7
    s = lw.compute_surface(model, (x, y), directions=dirs, samples=n, sample_seed=seed,
                           **GRID, **kw)
    assert s.spec["samples"] == {"n": n, "of": 400, "seed": seed}
    assert s.spec["n_samples"] == n
    idx = subset_indices(400, n, seed)
    per, hits = per_sample_oracle(model, x[idx], y[idx], dirs, s.x, s.y,
                                  lambda o, t: F.cross_entropy(o, t, reduction="none"))
    np.testing.assert_allclose(s.loss, per.mean(-1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(s.accuracy, hits.mean(-1), atol=1e-12)
    np.testing.assert_allclose(s.loss_se, closed_form_se(per, 400), rtol=1e-4, atol=1e-9)
    assert (s.loss_se > 0).all()


def test_weighted_loss_with_ignored_targets_uses_the_ratio_estimator():
    """Class weights and ignore_index: the loss is sum(w l) / sum(w); its se the ratio form."""
    model, (x, y) = _mlp(), _data()
    y = y.clone()
    y[::7] = -100
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0])
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    dirs = lw.random_directions(model, 2, seed=4)
    n = 150
    s = lw.compute_surface(model, (x, y), directions=dirs, samples=n, loss_fn=loss_fn,
                           metrics=("loss",), **GRID)
    idx = subset_indices(400, n)
    ys = y[idx]
    a, _ = per_sample_oracle(model, x[idx], ys, dirs, s.x, s.y,
                             lambda o, t: F.cross_entropy(o, t, weight=weight.double(),
                                                          reduction="none"))
    counted = (ys != -100).numpy()
    b = np.where(counted, weight.double().numpy()[ys.clamp_min(0).numpy()], 0.0)
    r = a.sum(-1) / b.sum()
    np.testing.assert_allclose(s.loss, r, rtol=1e-5)
    resid = a - r[..., None] * b
    se = (np.sqrt((resid ** 2).sum(-1) / (n - 1) / n) / b.mean()
          * np.sqrt((400 - n) / (400 - 1)))
    np.testing.assert_allclose(s.loss_se, se, rtol=1e-4)


def test_default_loss_with_ignored_targets_through_the_fast_batched_loss():
    """The engine's own cross-entropy (class-major head, core/losses.py) on a subset."""
    model, (x, y) = _mlp(), _data()
    y = y.clone()
    y[::5] = -100
    dirs = lw.random_directions(model, 2, seed=6)
    n = 160
    s = lw.compute_surface(model, (x, y), directions=dirs, samples=n, **GRID,
                           evaluator_options={"stem": True, "strategy": "vmap"})
    assert s.spec["plan"]["stem"]
    idx = subset_indices(400, n)
    ys = y[idx]
    a, hits = per_sample_oracle(model, x[idx], ys, dirs, s.x, s.y,
                                lambda o, t: F.cross_entropy(o, t, reduction="none"))
    b = (ys != -100).double().numpy()
    r = a.sum(-1) / b.sum()
    np.testing.assert_allclose(s.loss, r, rtol=1e-5)
    np.testing.assert_allclose(s.accuracy, (hits * b).sum(-1) / b.sum(), atol=1e-12)
    resid = a - r[..., None] * b
    se = (np.sqrt((resid ** 2).sum(-1) / (n - 1) / n) / b.mean()
          * np.sqrt((400 - n) / (400 - 1)))
    np.testing.assert_allclose(s.loss_se, se, rtol=1e-4)


def test_se_is_zero_and_values_exact_when_the_subset_is_all_data():
    model, data = _mlp(), _data(200)
    s = lw.compute_surface(model, data, samples=200, **GRID)
    exact = lw.compute_surface(model, data, **GRID)
    assert exact.loss_se is None and exact.spec["samples"] is None
    np.testing.assert_array_equal(s.loss_se, np.zeros_like(s.loss))
    np.testing.assert_allclose(s.loss, exact.loss, rtol=1e-6)


def test_curve_with_samples_and_loader_and_dataset_match_tensors():
    model, (x, y) = _mlp(), _data()
    d = lw.random_direction(model, seed=2)
    kw = dict(direction=d, x=(-1, 1, 7), progress=False, samples=90, sample_seed=3)
    ref = lw.compute_curve(model, (x, y), **kw)
    assert ref.loss_se.shape == (7,) and np.isfinite(ref.loss_se).all()
    ds = TensorDataset(x, y)
    for data in (ds, DataLoader(ds, batch_size=32, shuffle=True)):
        got = lw.compute_curve(model, data, **kw)
        np.testing.assert_allclose(got.loss, ref.loss, rtol=1e-6)
        np.testing.assert_allclose(got.loss_se, ref.loss_se, rtol=1e-6)


def test_file_round_trip_keeps_loss_se_and_loss_landscape_keys(tmp_path):
    model, data = _mlp(), _data()
    s = lw.compute_surface(model, data, samples=100, **GRID)
    path = tmp_path / "s.h5"
    s.save(path)
    with h5py.File(path, "r") as f:  # what loss-landscape's plot_2D.py reads is still there
        assert f["train_loss"].shape == (4, 5) and "xcoordinates" in f
        np.testing.assert_allclose(f["train_loss_se"][()], s.loss_se)
    back = lw.Surface.load(path)
    np.testing.assert_array_equal(back.loss_se, s.loss_se)
    np.testing.assert_array_equal(back.values("loss_se"), s.loss_se)
    assert back.spec["samples"] == {"n": 100, "of": 400, "seed": 0}
    assert "train_loss_se" not in back.extra.get("datasets", {})
    exact = lw.compute_surface(model, data, **GRID)
    exact.save(tmp_path / "e.h5")
    assert lw.Surface.load(tmp_path / "e.h5").loss_se is None
    with pytest.raises(ValueError, match="samples=N"):
        exact.values("loss_se")


def test_reuse_of_a_subset_result_with_the_same_subset():
    model, data = _mlp(), _data()
    dirs = lw.random_directions(model, 2, seed=3)
    a = lw.compute_surface(model, data, directions=dirs, samples=100, **GRID)
    grid = dict(GRID, x=(-1.0, 1.0, 9))
    b = lw.compute_surface(model, data, directions=dirs, samples=100, reuse=a, **grid)
    assert b.spec["reused"] == 20
    np.testing.assert_array_equal(b.loss_se[:, ::2], a.loss_se)
    with pytest.raises(ValueError, match="reuse="):  # another subset is other data
        lw.compute_surface(model, data, directions=dirs, samples=100, sample_seed=1,
                           reuse=a, **grid)


class _Stream(IterableDataset):
    def __iter__(self):
        x, y = _data(40)
        return iter(zip(x, y, strict=True))


@pytest.mark.parametrize("data,match", [
    (lambda: _data(), "data function"),
    (DataLoader(_Stream(), batch_size=8), "iterable dataset"),
    (_Stream(), "iterable dataset"),
])
def test_data_that_cannot_be_subset_is_refused_with_the_fix(data, match):
    with pytest.raises(SubsetError, match=match):
        lw.compute_surface(_mlp(), data, samples=10, **GRID)


def test_bad_samples_and_losses_without_per_sample_values_are_refused():
    model, data = _mlp(), _data(50)
    with pytest.raises(ValueError, match="exceeds the 50 samples"):
        lw.compute_surface(model, data, samples=51, **GRID)
    with pytest.raises(ValueError, match="at least 2"):
        lw.compute_surface(model, data, samples=1, **GRID)
    with pytest.raises(TypeError, match="samples must be an int"):
        lw.compute_surface(model, data, samples=True, **GRID)
    with pytest.raises(SubsetError, match="reduction='none'"):
        lw.compute_surface(model, data, samples=20,
                           loss_fn=lambda o, t: F.cross_entropy(o, t), **GRID)
    # a partial of a torch function works, and the user's loss module is not changed
    loss = nn.CrossEntropyLoss()
    s = lw.compute_surface(model, data, samples=20, loss_fn=loss, **GRID)
    assert loss.reduction == "mean" and np.isfinite(s.loss_se).all()


def test_exact_value_lies_within_3_se_at_99_percent_of_points(trained_digits_mlp):
    """The issue's acceptance: honest standard errors on a real model's 15 x 15 grid.

    Not vacuous: the standard errors are small against the surface's range.
    """
    model, data = trained_digits_mlp
    dirs = lw.random_directions(model, 2, seed=0)
    grid = dict(x=(-1.0, 1.0, 15), y=(-1.0, 1.0, 15), progress=False)
    exact = lw.compute_surface(model, data, directions=dirs, **grid)
    s = lw.compute_surface(model, data, directions=dirs, samples=300, sample_seed=0, **grid)
    z = np.abs(exact.loss - s.loss) / s.loss_se
    inside = float((z <= 3).mean())
    spread = float(np.nanmax(exact.loss) - np.nanmin(exact.loss))
    assert inside >= 0.99, f"only {inside:.1%} of points within 3 se (max z {z.max():.2f})"
    assert float(np.median(s.loss_se)) < 0.05 * spread, (np.median(s.loss_se), spread)
    assert float(np.median(z)) > 0.05  # the subset really differs from all data


def test_a_subset_without_counted_targets_names_the_draw_and_the_fix():
    """Review M1: the data has counted targets, the drawn subset has none."""
    model, (x, y) = _mlp(), _data(40)
    y = torch.full_like(y, -100)
    y[0] = 1  # subset_indices(40, 5, 0) does not hold sample 0
    assert 0 not in subset_indices(40, 5, 0).tolist()
    with pytest.raises(SubsetError, match=r"the subset of 5 samples of the data's 40 drawn "
                                          r"with sample_seed=0 has no counted target") as info:
        lw.compute_surface(model, (x, y), samples=5, **GRID)
    text = str(info.value)
    assert "ignore_index=-100" in text and "Raise samples=" in text
    assert "change sample_seed=" in text
    # The same data in full is fine; exact data with no counted target keeps its own error.
    assert np.isfinite(lw.compute_surface(model, (x, y), **GRID).loss).all()
    with pytest.raises(ValueError, match="Pass data with counted targets"):
        lw.compute_surface(model, (x, torch.full_like(y, -100)), **GRID)


def test_sample_seed_without_samples_is_refused_with_the_fix():
    """Review M2: a seed that would silently do nothing."""
    model, data = _mlp(), _data(50)
    with pytest.raises(TypeError, match="sample_seed=3 has no effect without samples="):
        lw.compute_surface(model, data, sample_seed=3, **GRID)
    with pytest.raises(TypeError, match="no effect without samples="):
        lw.compute_curve(model, data, sample_seed=0, progress=False, x=(-1, 1, 3))


@pytest.mark.parametrize("seed", ["x", 1.5, True, None])
def test_a_sample_seed_that_is_not_an_int_is_a_clear_type_error(seed):
    model, data = _mlp(), _data(50)
    if seed is None:  # None means the default seed, 0
        s = lw.compute_surface(model, data, samples=10, sample_seed=None, **GRID)
        assert s.spec["samples"]["seed"] == 0
        return
    with pytest.raises(TypeError, match="sample_seed must be an int"):
        lw.compute_surface(model, data, samples=10, sample_seed=seed, **GRID)


def test_numpy_integers_are_accepted_for_samples_and_sample_seed():
    """Review M2: samples=np.int64(10) (e.g. from a numpy computation) is an integer."""
    model, data = _mlp(), _data()
    ref = lw.compute_surface(model, data, samples=60, sample_seed=2, **GRID)
    got = lw.compute_surface(model, data, samples=np.int64(60), sample_seed=np.int32(2), **GRID)
    assert got.spec["samples"] == {"n": 60, "of": 400, "seed": 2}
    assert type(got.spec["samples"]["n"]) is int and type(got.spec["samples"]["seed"]) is int
    np.testing.assert_array_equal(got.loss, ref.loss)
    np.testing.assert_array_equal(got.loss_se, ref.loss_se)
    with pytest.raises(TypeError, match="samples must be an int"):
        lw.compute_surface(model, data, samples=np.float64(60), **GRID)
