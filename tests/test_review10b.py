"""Review 10b: sample-progressive evaluation (``samples=N``) on data forms and losses.

Each test names the defect it guards against. Oracles: the float64 per-point loop of
``tests/oracle.py`` over exactly the samples the exact pass reads, and the exact pass's own
error for data it refuses.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import mlp, mlp_data
from oracle import naive_eval, surface_coords
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, TensorDataset

import landscape_widget as lw
from landscape_widget.core.subset import subset_indices

XS = np.linspace(-1, 1, 3)
GRID = dict(x=(-1, 1, 3), y=(-1, 1, 3), progress=False)


@pytest.mark.parametrize("extra", [8, -8])
def test_inputs_and_targets_of_different_lengths_are_refused_as_without_samples(extra):
    # samples= drew the subset by the inputs' length and indexed both: targets longer than
    # the inputs were cut to fit without a word (a surface over mismatched data), shorter
    # ones stopped with an IndexError. The exact pass refuses both, naming the lengths.
    model = mlp(seed=1).eval()
    x, y = mlp_data()  # 40 samples
    y = torch.cat([y, y[:extra]]) if extra > 0 else y[:extra]
    with pytest.raises(ValueError) as exact:
        lw.compute_surface(model, (x, y), **GRID)
    with pytest.raises(ValueError) as subset:
        lw.compute_surface(model, (x, y), samples=20, **GRID)
    assert str(subset.value) == str(exact.value)
    assert f"targets have {len(y)}" in str(subset.value)


@pytest.mark.parametrize("sampler", ["sequential", "random"])
def test_a_loader_whose_sampler_visits_part_of_its_dataset_is_subset_from_that_part(sampler):
    # DataLoader(ds, sampler=SequentialSampler(range(24))) reads the first 24 of 40 samples,
    # but the subset was drawn from all 40: samples=24 said "24 of 40" and gave values
    # and standard errors of samples the exact pass never reads.
    model = mlp(seed=1).eval()
    x, y = mlp_data()
    visited = 24
    source = range(visited)
    loader = DataLoader(TensorDataset(x, y), batch_size=10,
                        sampler=(SequentialSampler(source) if sampler == "sequential" else
                                 RandomSampler(source)))
    d1, d2 = lw.random_directions(model, 2, seed=2)
    kw = dict(directions=(d1, d2), **GRID)
    coords = surface_coords(XS, XS)
    want = naive_eval(model, x[:visited], y[:visited], [d1, d2], coords)[0]
    np.testing.assert_allclose(lw.compute_surface(model, loader, **kw).loss.ravel(), want,
                               rtol=1e-5)
    whole = lw.compute_surface(model, loader, samples=visited, **kw)
    assert whole.spec["samples"] == {"n": visited, "of": visited, "seed": 0}
    np.testing.assert_allclose(whole.loss.ravel(), want, rtol=1e-5)
    assert (whole.loss_se == 0).all()
    part = lw.compute_surface(model, loader, samples=10, sample_seed=3, **kw)
    idx = subset_indices(visited, 10, 3)
    np.testing.assert_allclose(part.loss.ravel(),
                               naive_eval(model, x[idx], y[idx], [d1, d2], coords)[0], rtol=1e-5)
    with pytest.raises(ValueError, match=f"exceeds the {visited} samples"):
        lw.compute_surface(model, loader, samples=visited + 1, **kw)
