"""Acceptance 2 (PAPERS (a1)) and 4: direction rules, Gaussian entries, seeds and the global RNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import bn_res_cnn, mlp, mlp_data, resnet18, tied_mlp
from torch import nn

import landscape_widget as lw

FACTORIES = [mlp, tied_mlp, bn_res_cnn, resnet18]
FACTORY_IDS = ["mlp", "tied", "cnn-bn-res", "resnet18"]


def _own_gaussian_draws(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The raw entries as documented: N(0, 1) from a CPU generator, in named_parameters() order."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=g) for k, p in model.named_parameters()}


@pytest.mark.parametrize("factory", FACTORIES, ids=FACTORY_IDS)
def test_filter_norm_per_slice(factory):
    """(a1): every slice along dim 0 of every dim > 1 tensor has ||d_j|| = ||theta_j||."""
    model = factory()
    d = lw.random_direction(model, seed=0)
    params = dict(model.named_parameters())
    assert list(d) == list(params)
    for k, theta in params.items():
        assert d[k].shape == theta.shape and d[k].dtype == theta.dtype
        assert d[k].device == theta.device
        if theta.dim() <= 1:
            assert torch.equal(d[k], torch.zeros_like(theta)), k
            continue
        got = d[k].reshape(d[k].shape[0], -1).norm(dim=1)
        want = theta.detach().reshape(theta.shape[0], -1).norm(dim=1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("factory", FACTORIES, ids=FACTORY_IDS)
def test_one_dim_tensors_equal_theta_without_ignore(factory):
    """(a1): with ignore=None, 1-D tensors (biases, BN scales and shifts) are a copy of theta."""
    model = factory()
    d = lw.random_direction(model, ignore=None, seed=0)
    for k, theta in model.named_parameters():
        if theta.dim() <= 1:
            assert torch.equal(d[k], theta.detach()), k
            assert d[k].data_ptr() != theta.data_ptr(), "a copy, not the model's own tensor"


def test_filter_norm_formula_against_own_draws():
    """d_j = g_j * ||theta_j|| / (||g_j|| + 1e-10) for the documented Gaussian draws g."""
    model = bn_res_cnn()
    raw = _own_gaussian_draws(model, seed=5)
    d = lw.random_direction(model, seed=5)
    for k, theta in model.named_parameters():
        if theta.dim() <= 1:
            continue
        g = raw[k].reshape(raw[k].shape[0], -1)
        t = theta.detach().reshape(theta.shape[0], -1)
        want = (g * t.norm(dim=1, keepdim=True) / (g.norm(dim=1, keepdim=True) + 1e-10))
        torch.testing.assert_close(d[k], want.reshape(theta.shape), rtol=1e-6, atol=1e-7)


def test_raw_directions_are_the_documented_gaussian_draws():
    model = bn_res_cnn()
    raw = _own_gaussian_draws(model, seed=9)
    d = lw.random_direction(model, norm=None, ignore=None, seed=9)
    for k, theta in model.named_parameters():
        want = raw[k] if theta.dim() > 1 else theta.detach()
        assert torch.equal(d[k], want), k


@pytest.mark.parametrize("factory", [mlp, bn_res_cnn], ids=["mlp", "cnn-bn-res"])
def test_layer_norm(factory):
    model = factory()
    d = lw.random_direction(model, norm="layer", seed=1)
    for k, theta in model.named_parameters():
        if theta.dim() <= 1:
            assert not d[k].any(), k
        else:
            torch.testing.assert_close(d[k].norm(), theta.detach().norm(), rtol=1e-5, atol=0)
            # A whole-tensor scaling: the direction of the raw draw is kept.
            raw = lw.random_direction(model, norm=None, seed=1)[k]
            cos = torch.dot(raw.flatten(), d[k].flatten()) / (raw.norm() * d[k].norm())
            assert float(cos) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("factory", [mlp, bn_res_cnn], ids=["mlp", "cnn-bn-res"])
def test_weight_norm_is_elementwise_product(factory):
    model = factory()
    raw = _own_gaussian_draws(model, seed=2)
    d = lw.random_direction(model, norm="weight", seed=2)
    for k, theta in model.named_parameters():
        if theta.dim() <= 1:
            assert not d[k].any(), k
        else:
            torch.testing.assert_close(d[k], raw[k] * theta.detach(), rtol=1e-6, atol=0)


def test_entries_are_standard_gaussian():
    """A 500k-entry raw direction has N(0, 1) moments; uniform [0, 1) would fail every one."""
    model = nn.Linear(1000, 500, bias=False)
    w = lw.random_direction(model, norm=None, seed=0)["weight"].double().flatten()
    mean, std = float(w.mean()), float(w.std())
    z = (w - mean) / std
    skew, kurt = float((z**3).mean()), float((z**4).mean())
    assert abs(mean) < 0.005
    assert abs(std - 1) < 0.005
    assert abs(float((w < 0).double().mean()) - 0.5) < 0.005
    assert abs(skew) < 0.02
    assert abs(kurt - 3.0) < 0.05  # uniform: 1.8
    assert float(w.abs().max()) > 4.0


def test_normalize_direction_single_tensor():
    theta = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    d = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    out = lw.normalize_direction(d, theta, norm="filter", ignore="biasbn")
    torch.testing.assert_close(out, torch.tensor([[5.0, 0.0], [0.5**0.5, 0.5**0.5]]))
    assert torch.equal(d, torch.tensor([[1.0, 0.0], [2.0, 2.0]])), "input left unchanged"
    bias = torch.tensor([1.0, -2.0])
    assert torch.equal(lw.normalize_direction(torch.randn(2), bias, norm="filter", ignore=None),
                       bias)


# --- acceptance 4: seeds ---------------------------------------------------------------------
def _equal_dirs(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_direction_different_seed_different():
    model = bn_res_cnn()
    a, b, c = (lw.random_direction(model, seed=s) for s in (11, 11, 12))
    assert _equal_dirs(a, b)
    assert all(not torch.equal(a[k], c[k]) for k, p in model.named_parameters() if p.dim() > 1)
    n1, n2 = lw.random_direction(model, seed=None), lw.random_direction(model, seed=None)
    assert not _equal_dirs(n1, n2)


def test_random_directions_sequence():
    model = mlp()
    d1, d2 = lw.random_directions(model, 2, seed=3)
    assert _equal_dirs(d1, lw.random_direction(model, seed=3))
    assert not torch.equal(d1["0.weight"], d2["0.weight"])
    assert _equal_dirs(d2, lw.random_directions(model, 2, seed=3)[1])


@pytest.mark.parametrize("strategy", ["auto", "loop", "vmap"])
def test_same_seed_same_surface_different_seed_different(strategy):
    """Bit-identical repeats. With "auto" the engine picks its plan by timing, so the repeats
    may run different plans: they must still give the same bits."""
    model = mlp().eval()
    data = mlp_data()
    kw = {"x": (-2, 2, 7), "y": (-2, 2, 5), "progress": False,
          "evaluator_options": None if strategy == "auto" else {"strategy": strategy}}
    first = lw.compute_surface(model, data, seed=4, **kw)
    for _ in range(4):
        again = lw.compute_surface(model, data, seed=4, **kw)
        np.testing.assert_array_equal(again.loss, first.loss)
        np.testing.assert_array_equal(again.accuracy, first.accuracy)
    other = lw.compute_surface(model, data, seed=5, **kw)
    assert not np.allclose(other.loss, first.loss)
    assert first.spec["seed"] == 4 and other.spec["seed"] == 5


def test_global_rng_untouched():
    model, small, data = bn_res_cnn(), mlp().eval(), mlp_data()  # construction uses the RNG
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    lw.random_direction(model, seed=1)
    lw.random_direction(model, seed=None)
    lw.random_directions(model, 3, seed=2)
    assert torch.equal(torch.get_rng_state(), torch_state)
    np.testing.assert_array_equal(np.random.get_state()[1], np_state)
    # A seeded computation leaves it alone too.
    lw.compute_surface(small, data, x=(-1, 1, 3), y=(-1, 1, 3), seed=3, progress=False)
    assert torch.equal(torch.get_rng_state(), torch_state)
