"""Review 7, continued: checkpoints, training runs and curvature of models the earlier
tests did not cover (tied weights read from files, pruning, BatchNorm batches).

As in test_review7.py, each test checks a property against an independent oracle.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from test_review7 import _shifted_data, _untracked_bn_net
from torch import nn

import landscape_widget as lw


class _TiedLM(nn.Module):
    """Output layer tied to the embedding: both names in state_dict, one tensor."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid = nn.Embedding(11, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mid(self.emb(tokens)))).mean(1)


def test_checkpoints_of_a_tied_model_read_without_the_model(tmp_path):
    # Without model=, from_checkpoints kept every float entry of the state_dict: a tied
    # weight, saved under two names (sharing one storage), counted twice in the PCA (its
    # explained variances and directions off) and compute_surface then refused the
    # directions ("unknown keys ['head.weight']", fix: lw.random_direction). The oracle:
    # the same files read with model=, whose names are those of named_parameters().
    torch.manual_seed(0)
    model = _TiedLM()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 11, (30, 4), generator=g), torch.randint(0, 11, (30,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.pt")
        torch.save({"state_dict": model.state_dict()}, paths[-1])
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    want, want_evr = lw.Trajectory.from_checkpoints(paths, model=model).pca_directions(2)
    got, got_evr = lw.Trajectory.from_checkpoints(paths).pca_directions(2)
    np.testing.assert_allclose(got_evr, want_evr, rtol=1e-6)
    for d, e in zip(got, want, strict=True):
        assert set(d) == set(e)
        for k in e:
            torch.testing.assert_close(d[k], e[k], rtol=1e-5, atol=1e-6)
    surf = lw.compute_surface(model, (x, y), directions=list(got), x=(-1, 1, 3),
                              y=(-1, 1, 3), progress=False)
    assert np.isfinite(surf.loss).all()


def _pruned_mlp() -> nn.Module:
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    torch.nn.utils.prune.l1_unstructured(net[0], "weight", amount=0.5)
    return net  # its 'weight' attribute is weight_orig * mask: a non-leaf tensor


def test_optimizer_runs_and_pattern_fits_of_a_pruned_model():
    # torch.nn.utils.prune keeps 'weight' as a non-leaf plain attribute, which
    # copy.deepcopy refuses: compare_optimizers and fit_pattern crashed ("Only Tensors
    # created explicitly by the user (graph leaves) support the deepcopy protocol").
    # Oracle: full-batch SGD written here on the model built from the same seed.
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
    runs = lw.compare_optimizers(_pruned_mlp, (x, y), {"sgd": lambda p: torch.optim.SGD(
        p, lr=0.5)}, epochs=2, batch_size=24, seed=3, progress=False)
    torch.manual_seed(3)
    net = _pruned_mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for epoch in range(3):
        for k, v in net.state_dict().items():
            torch.testing.assert_close(runs.runs["sgd"].checkpoints[epoch][k], v, msg=k)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    fit = lw.fit_pattern(_pruned_mlp, (x, y), lw.checkerboard(3), steps=2, batch_size=8,
                         cells_per_step=4, progress=False)
    loss = fit.evaluate((x, y))["loss"]
    with torch.no_grad():  # each cell's network, materialised, gives its cell's loss
        for i, j in ((0, 0), (1, 1), (2, 1)):
            want = float(F.cross_entropy(fit.materialize(i, j)(x), y))
            np.testing.assert_allclose(loss[i, j], want, rtol=1e-5)


def test_batch_statistics_curvature_uses_the_surfaces_batchnorm_batches():
    # With bn="batch" a surface's BatchNorm normalises over consecutive batches of 128
    # samples (bn_batch_size's default), but Hessian products took one batch of up to
    # 2048: on 300 samples rayleigh_quotient said the curve bends down (-8.8e-4) where the
    # plotted curve bends up (+2.1e-4). Oracle: f''(0) by torch.func of the loss over
    # 128-sample train-mode batches, in float64.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(),
                          nn.Linear(16, 3)).double().eval()
    g = torch.Generator().manual_seed(1)
    n = 300
    x = torch.randn(n, 5, generator=g, dtype=torch.float64) * torch.linspace(
        0.2, 3, n, dtype=torch.float64)[:, None]
    y = torch.randint(0, 3, (n,), generator=g)
    d = lw.random_direction(model, seed=2, ignore=None)
    ref = copy.deepcopy(model).train()
    ref[1].track_running_stats, ref[1].running_mean, ref[1].running_var = False, None, None
    theta = {k: v.detach() for k, v in ref.named_parameters()}

    def f(a):
        moved = {k: theta[k] + a * d[k] for k in theta}
        return sum(F.cross_entropy(torch.func.functional_call(ref, moved, (x[s:s + 128],)),
                                   y[s:s + 128], reduction="sum")
                   for s in range(0, n, 128)) / n

    want = torch.func.grad(torch.func.grad(f))(torch.tensor(0.0, dtype=torch.float64))
    want = float(want) / sum(float(v.pow(2).sum()) for v in d.values())
    got = lw.rayleigh_quotient(model, (x, y), d, bn="batch")
    np.testing.assert_allclose(got, want, rtol=1e-8)


def test_optimizer_runs_of_untracked_batchnorm_take_bn_batch():
    # After the refusal above, basin_size and interpolate needed a bn= to follow its fix.
    # Oracle: at alpha = 0 and 1, interpolate's curve is each run's final model's loss over
    # 128-sample train-mode batches (float64 loop written here).
    x, y = _shifted_data(150)
    runs = lw.compare_optimizers(_untracked_bn_net(), (x, y), {
        "a": lambda p: torch.optim.SGD(p, lr=0.1), "b": lambda p: torch.optim.SGD(p, lr=0.3)},
        epochs=1, batch_size=50, progress=False)
    with pytest.raises(ValueError, match="bn='batch'"):
        runs.interpolate("a", "b", x=(0, 1, 2))
    curve = runs.interpolate("a", "b", x=(0, 1, 2), bn="batch")["train"]
    for alpha, name in ((0, "a"), (1, "b")):
        net = copy.deepcopy(runs.model(name)).double().train()
        with torch.no_grad():
            want = sum(F.cross_entropy(net(x[s:s + 128].double()), y[s:s + 128],
                                       reduction="sum") for s in range(0, 150, 128)) / 150
        np.testing.assert_allclose(curve.loss[alpha], float(want), rtol=1e-5)
    radii = runs.basin_size(2, radii=(0, 1, 3), bn="batch")
    assert set(radii) == {"a", "b"}
