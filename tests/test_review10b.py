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


class TinyLM(torch.nn.Module):
    """Token logits ``(B, V, T)`` (class dim 1, as F.cross_entropy takes them)."""

    def __init__(self, vocab: int = 6):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.out = torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab)

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x))).transpose(1, 2)


def length_sorted_tokens(n: int = 96, t: int = 6, vocab: int = 6):
    """Sequences padded with -100 after their length, longest first (so the first samples
    all count ``t`` targets), as a length-bucketed language-model data set. ``t == vocab``:
    the oracle's accuracy (unused here) compares ``argmax(-1)`` with the targets."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (n, t), generator=g)
    y = torch.randint(0, vocab, (n, t), generator=g)
    lengths = torch.randint(1, t + 1, (n,), generator=g).sort(descending=True).values
    y[torch.arange(t) >= lengths[:, None]] = -100
    return x, y


def per_sequence_mean(out, y, reduction="mean"):
    """The mean over sequences of each sequence's mean token loss."""
    tokens = torch.nn.functional.cross_entropy(out, y, reduction="none")
    each = tokens.sum(1) / (y != -100).sum(1)
    return each.mean() if reduction == "mean" else each


@pytest.mark.parametrize("loss_fn", [per_sequence_mean, torch.nn.CrossEntropyLoss()],
                         ids=["per-sequence mean", "token mean"])
def test_a_mean_of_per_sequence_means_on_length_sorted_tokens(loss_fn):
    # The reduction check ran on the first 8 samples, which all counted 6 targets: a mean
    # over counted tokens and a mean of per-sequence means agree there, so the per-sequence
    # mean was taken for a token mean and its 16-sample batches weighted by their counted
    # tokens (0.026 off, a surface that changed with the batch size); samples= refused it,
    # saying the loss had no per-sample values. The oracle: the loss on all data at once.
    model = TinyLM().eval()
    x, y = length_sorted_tokens()
    d1, d2 = lw.random_directions(model, 2, seed=3)
    kw = dict(directions=(d1, d2), loss_fn=loss_fn, metrics=("loss",),
              evaluator_options={"batch_size": 16}, **GRID)
    coords = surface_coords(XS, XS)
    exact = lw.compute_surface(model, (x, y), **kw)
    want = naive_eval(model, x, y, [d1, d2], coords, loss_fn=loss_fn)[0]
    np.testing.assert_allclose(exact.loss.ravel(), want, rtol=1e-5)
    if loss_fn is not per_sequence_mean:
        return
    n, population = 20, len(y)
    s = lw.compute_surface(model, (x, y), samples=n, sample_seed=1, **kw)
    idx = subset_indices(population, n, 1)
    each = np.stack([naive_eval(model, x[i : i + 1], y[i : i + 1], [d1, d2], coords,
                                loss_fn=loss_fn)[0] for i in idx.tolist()], -1)
    np.testing.assert_allclose(s.loss.ravel(), each.mean(-1), rtol=1e-5)
    se = each.std(-1, ddof=1) / np.sqrt(n) * np.sqrt((population - n) / (population - 1))
    np.testing.assert_allclose(s.loss_se.ravel(), se, rtol=1e-4)


def test_a_loader_making_several_samples_of_each_item_is_refused_with_the_fix():
    # A DataLoader over chunks (each dataset item 8 samples, concatenated by its collate_fn):
    # samples= drew items but the standard error counted rows, so its finite-population
    # correction (N - n) / (N - 1) went negative with N items and n rows: loss_se was NaN at
    # every point, also with samples= all items. The fix the message names is checked
    # against the oracle: the rows as tensors give the float64 loop's subset values.
    from torch.utils.data import Dataset

    model = mlp(seed=1).eval()
    x, y = mlp_data()  # 40 samples: 5 items of 8
    items = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]

    class Chunks(Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return items[i]

    def cat(batch):
        return torch.cat([b[0] for b in batch]), torch.cat([b[1] for b in batch])

    loader = DataLoader(Chunks(), batch_size=2, collate_fn=cat)
    d1, d2 = lw.random_directions(model, 2, seed=2)
    kw = dict(directions=(d1, d2), **GRID)
    for n in (3, 5):
        with pytest.raises(lw.core.subset.SubsetError,
                           match=rf"drew {n} of the data's 5 items, but the batches of those "
                                 rf"items hold {8 * n} samples.*map\(torch.cat, zip\(\*loader"):
            lw.compute_surface(model, loader, samples=n, **kw)
    rows = tuple(map(torch.cat, zip(*loader, strict=True)))
    s = lw.compute_surface(model, rows, samples=12, **kw)
    idx = subset_indices(40, 12)
    np.testing.assert_allclose(s.loss.ravel(), naive_eval(model, x[idx], y[idx], [d1, d2],
                                                          surface_coords(XS, XS))[0], rtol=1e-5)
    assert np.isfinite(s.loss_se).all() and (s.loss_se > 0).all()


@pytest.mark.parametrize("loss", ["MultiLabelMarginLoss", "per-sequence"])
def test_a_loss_reduced_within_each_sample_of_several_class_indices(loss):
    # MultiLabelMarginLoss takes (N, C) class indices (-1 padded) and gives one value per
    # sample; so does a per-sequence loss on (N, T) class indices. loss_se weighed each
    # sample's value by its T counted targets: the per-sample values averaged to 1/T of
    # the loss and samples= refused the loss, telling the user to pass an nn.*Loss.
    # The oracle: each drawn sample's own loss in float64, their mean and closed-form SE.
    model = mlp(seed=1).eval()  # 4 outputs
    x, _ = mlp_data()
    g = torch.Generator().manual_seed(4)
    y = torch.stack([torch.randperm(4, generator=g) for _ in range(len(x))])
    if loss == "MultiLabelMarginLoss":
        y[:, 2:] = -1  # labels end at the first -1
        y[torch.arange(len(x)) % 3 == 0, 1] = -1  # 1 label, the others 2
        loss_fn = torch.nn.MultiLabelMarginLoss()
    else:
        def loss_fn(out, t, reduction="mean"):
            each = (out - t.to(out.dtype)).pow(2).mean(1)
            return each.mean() if reduction == "mean" else each
    d1, d2 = lw.random_directions(model, 2, seed=2)
    n, coords = 12, surface_coords(XS, XS)
    s = lw.compute_surface(model, (x, y), directions=(d1, d2), loss_fn=loss_fn, samples=n,
                           metrics=("loss",), **GRID)
    idx = subset_indices(len(x), n)
    each = np.stack([naive_eval(model, x[i : i + 1], y[i : i + 1], [d1, d2], coords,
                                loss_fn=loss_fn)[0] for i in idx.tolist()], -1)
    np.testing.assert_allclose(s.loss.ravel(), each.mean(-1), rtol=1e-5)
    se = each.std(-1, ddof=1) / np.sqrt(n) * np.sqrt((len(x) - n) / (len(x) - 1))
    np.testing.assert_allclose(s.loss_se.ravel(), se, rtol=1e-4)


def test_a_draw_of_only_classes_weighted_0_is_named_as_such():
    # CrossEntropyLoss(weight=[0, 1, 1]) on a draw whose targets are all of class 0: the
    # loss is 0/0 as for a draw of only ignored targets, and the error said "every drawn
    # target equals ignore_index=-100", which none did. The data's own targets are the
    # oracle of which cause it is.
    import pickle

    from landscape_widget.core.errors import NoCountedTargets

    model = mlp(seed=1).eval()
    x, _ = mlp_data()
    y = torch.zeros(len(x), dtype=torch.long)
    y[0] = 1  # not drawn by subset_indices(40, 5, 0)
    assert 0 not in subset_indices(len(x), 5, 0).tolist()
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor([0.0, 1.0, 1.0, 1.0]))
    with pytest.raises(lw.core.subset.SubsetError,
                       match="equals ignore_index=-100 or is of a class whose weight is 0"):
        lw.compute_surface(model, (x, y), samples=5, loss_fn=loss_fn, **GRID)
    with pytest.raises(NoCountedTargets, match="is of a class whose weight is 0") as info:
        lw.compute_surface(model, (x, torch.zeros_like(y)), loss_fn=loss_fn, **GRID)
    back = pickle.loads(pickle.dumps(info.value))  # as an executor's worker sends it
    assert back.zero_weight and back.ignore_index == -100 and str(back) == str(info.value)
    y[0] = -100  # only ignored and weight-0 targets: the same, and still said of both
    with pytest.raises(NoCountedTargets, match="is of a class whose weight is 0"):
        lw.compute_surface(model, (x, y), loss_fn=loss_fn, **GRID)
    with pytest.raises(NoCountedTargets, match="every target equals ignore_index=-100"):
        lw.compute_surface(model, (x, torch.full_like(y, -100)), loss_fn=loss_fn, **GRID)


@pytest.mark.parametrize("loss_fn", [per_sequence_mean, torch.nn.CrossEntropyLoss()],
                         ids=["per-sequence mean", "token mean"])
def test_the_hessian_of_a_mean_of_per_sequence_means_over_several_batches(loss_fn):
    # The Hessian tools weighed every batch by its counted targets without checking the
    # loss's reduction: a mean of per-sequence means over 16-sample batches gave the top
    # eigenvalue 0.2952 for 0.2875 (the Hessian of another loss). The oracle: torch's dense
    # Hessian of the loss on all data at once, in float64.
    from torch.func import functional_call

    model = TinyLM().eval()
    x, y = length_sorted_tokens()
    net = TinyLM().double().eval()
    base = {k: v.detach().double() for k, v in model.named_parameters()}
    names = [k for k, v in base.items() if v.dim() > 1]

    def loss_at(flat):
        state, offset = dict(base), 0
        for k in names:
            size = base[k].numel()
            state[k] = base[k] + flat[offset:offset + size].reshape(base[k].shape)
            offset += size
        return loss_fn(functional_call(net, state, (x,)), y)

    size = sum(base[k].numel() for k in names)
    dense = torch.autograd.functional.hessian(loss_at, torch.zeros(size, dtype=torch.float64))
    top = float(torch.linalg.eigvalsh(dense)[-1])
    vals, _ = lw.hessian_eigenpairs(model, (x, y), k=1, loss_fn=loss_fn, batch_size=16)
    assert abs(float(vals[0]) - top) <= 1e-4 * abs(top), (float(vals[0]), top)


def test_loss_se_of_token_losses_with_uneven_counted_targets_is_honest():
    # Not a defect found: the guard for the ratio estimator (core/subset_se.py) where each
    # sequence counts 1 to 10 tokens and classes weigh 0.2 to 3. Over 60 draws the exact
    # full-data surface (the oracle, checked against the float64 loop at the centre) lies
    # within 3 standard errors at >= 99 % of the points, and the z-scores spread as N(0, 1).
    torch.manual_seed(0)
    vocab, t, n_seq = 10, 10, 600  # t == vocab: see length_sorted_tokens
    model = TinyLM(vocab).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (n_seq, t), generator=g)
    y = torch.randint(0, vocab, (n_seq, t), generator=g)
    y[torch.arange(t) >= torch.randint(1, t + 1, (n_seq, 1), generator=g)] = -100
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.linspace(0.2, 3.0, vocab))
    d1, d2 = lw.random_directions(model, 2, seed=3)
    kw = dict(directions=(d1, d2), loss_fn=loss_fn, metrics=("loss",), **GRID)
    exact = lw.compute_surface(model, (x, y), **kw)
    loss64 = torch.nn.CrossEntropyLoss(weight=loss_fn.weight.double())
    centre = naive_eval(model, x, y, [d1, d2], [(0.0, 0.0)], loss_fn=loss64)[0][0]
    assert abs(exact.loss[1, 1] - centre) <= 1e-5 * centre
    z = np.stack([(s.loss - exact.loss) / s.loss_se for s in (
        lw.compute_surface(model, (x, y), samples=30, sample_seed=seed, **kw)
        for seed in range(60))])
    assert (np.abs(z) <= 3).mean() >= 0.99, (np.abs(z) <= 3).mean()
    assert 0.8 <= z.std() <= 1.25, z.std()  # calibrated, not merely wide
