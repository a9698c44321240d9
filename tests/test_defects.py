"""Defects found in existing loss-landscape tools; each one is a test that ours does not have."""

from __future__ import annotations

import inspect

import numpy as np
import torch
from cases import bn_res_cnn, cnn_data, mlp, mlp_data, mlp_dropout, reinit
from oracle import naive_eval, naive_surface
from torch import nn

import landscape_widget as lw


def test_directions_are_gaussian_not_uniform():
    model = nn.Linear(400, 250, bias=False)
    w = lw.random_direction(model, norm=None, seed=0)["weight"].flatten()
    assert float((w < 0).float().mean()) > 0.45  # uniform [0, 1) has none
    assert abs(float(w.mean())) < 0.01  # uniform [0, 1): 0.5
    assert float(w.std()) > 0.95  # uniform [0, 1): 0.29


def test_biases_are_not_renormalised_per_element():
    """1-D tensors are theta itself (ignore=None) or zero (biasbn), never sign(g) * |theta|."""
    model = reinit(nn.Linear(5, 64), seed=0)
    theta = model.bias.detach()
    assert (theta < 0).any() and (theta > 0).any()
    for norm in ("filter", "layer", "weight", None):
        d = lw.random_direction(model, norm=norm, ignore=None, seed=1)
        assert torch.equal(d["bias"], theta), norm
        assert not lw.random_direction(model, norm=norm, seed=1)["bias"].any(), norm


def test_filter_normalisation_is_per_filter_not_per_tensor():
    """Rows of theta with norms 0.01 .. 100: each row of d gets its own row's norm."""
    model = nn.Linear(20, 5)
    scales = torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.weight.copy_(torch.randn(5, 20, generator=g) * scales[:, None])
    d = lw.random_direction(model, seed=2)["weight"]
    row_norms = d.norm(dim=1)
    torch.testing.assert_close(row_norms, model.weight.detach().norm(dim=1), rtol=1e-5, atol=0)
    assert float(row_norms.max() / row_norms.min()) > 1e3
    # And for convolutions, a slice is a whole output filter [in, k, k].
    conv = reinit(nn.Conv2d(3, 4, 3), seed=1)
    with torch.no_grad():
        conv.weight.mul_(torch.tensor([0.1, 1.0, 10.0, 100.0])[:, None, None, None])
    dc = lw.random_direction(conv, seed=3)["weight"]
    want = conv.weight.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(dc.flatten(1).norm(dim=1), want, rtol=1e-5, atol=0)


def test_default_grids_contain_theta():
    """The default ranges are symmetric with an odd number of points: theta is a grid point."""
    for fn in (lw.compute_surface, lw.compute_curve, lw.iter_tiles):
        params = inspect.signature(fn).parameters
        for axis in ("x", "y"):
            if axis in params and params[axis].default is not None:
                default = params[axis].default
                if default == "auto":  # (-1, 1, 51) unless the directions carry a path
                    surf = lw.compute_surface(nn.Linear(2, 2), (torch.randn(4, 2),
                                              torch.tensor([0, 1, 0, 1])), progress=False)
                    default = (float(surf.x[0]), float(surf.x[-1]), surf.x.size)
                start, stop, num = default
                assert num % 2 == 1 and start == -stop, (fn.__name__, axis)
                assert np.linspace(start, stop, num)[num // 2] == 0.0


def test_grid_evaluates_theta_itself():
    model = bn_res_cnn().eval()
    x, y = cnn_data()
    surf = lw.compute_surface(model, (x, y), x=(-1, 1, 5), y=(-1, 1, 5), seed=0, progress=False)
    with torch.no_grad():
        direct = float(nn.functional.cross_entropy(model(x), y))
    assert surf.x[2] == 0.0 and surf.y[2] == 0.0
    np.testing.assert_allclose(surf.loss[2, 2], direct, rtol=1e-6)


def test_model_not_left_displaced():
    model = bn_res_cnn().eval()
    x, y = cnn_data()
    with torch.no_grad():
        before = model(x)
    lw.compute_surface(model, (x, y), x=(0.5, 1, 3), y=(0.5, 1, 3), progress=False)
    lw.compute_curve(model, (x, y), x=(0.5, 1, 3), bn="batch", progress=False)
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_no_noise_is_added():
    """Repeated computations are identical (no noise), and equal the oracle point by point."""
    model = mlp().eval()
    x, y = mlp_data()
    d1, d2 = lw.random_directions(model, 2, seed=0)
    kw = {"directions": (d1, d2), "x": (-2, 2, 7), "y": (-2, 2, 5), "progress": False}
    a = lw.compute_surface(model, (x, y), **kw)
    b = lw.compute_surface(model, (x, y), **kw)
    np.testing.assert_array_equal(a.loss, b.loss)
    want, _ = naive_surface(model, x, y, d1, d2, a.x, a.y)
    np.testing.assert_allclose(a.loss, want, rtol=1e-5, atol=0)


def test_dropout_is_off_even_in_train_mode():
    model = mlp_dropout().train()
    x, y = mlp_data()
    d = lw.random_direction(model, seed=0)
    runs = [lw.compute_curve(model, (x, y), direction=d, x=(-1, 1, 7), progress=False)
            for _ in range(3)]
    for run in runs[1:]:
        np.testing.assert_array_equal(run.loss, runs[0].loss)
    want, _ = naive_eval(model, x, y, [d], runs[0].x[:, None])  # the oracle runs in eval mode
    np.testing.assert_allclose(runs[0].loss, want, rtol=1e-5, atol=0)
    assert model.training


def test_xy_order_on_a_non_square_grid():
    """With d2 = 0 every row (fixed y) is the curve along d1; with d1 = 0 every column is."""
    model = bn_res_cnn().eval()
    data = cnn_data()
    d = lw.random_direction(model, seed=5)
    zero = {k: torch.zeros_like(v) for k, v in d.items()}
    curve_x = lw.compute_curve(model, data, direction=d, x=(-1, 1, 7), progress=False)
    curve_y = lw.compute_curve(model, data, direction=d, x=(-0.5, 1, 5), progress=False)
    along_x = lw.compute_surface(model, data, directions=(d, zero), x=(-1, 1, 7),
                                 y=(-0.5, 1, 5), progress=False)
    along_y = lw.compute_surface(model, data, directions=(zero, d), x=(-1, 1, 7),
                                 y=(-0.5, 1, 5), progress=False)
    assert along_x.loss.shape == (5, 7)
    for iy in range(5):
        np.testing.assert_allclose(along_x.loss[iy], curve_x.loss, rtol=1e-6, atol=0)
    for ix in range(7):
        np.testing.assert_allclose(along_y.loss[:, ix], curve_y.loss, rtol=1e-6, atol=0)


class CountingDict(dict):
    """A direction dict that counts how often its tensors are looked up."""

    reads = 0

    def __getitem__(self, key):
        CountingDict.reads += 1
        return super().__getitem__(key)

    def items(self):
        CountingDict.reads += len(self)
        return super().items()

    def values(self):
        CountingDict.reads += len(self)
        return super().values()

    def get(self, key, default=None):
        CountingDict.reads += 1
        return super().get(key, default)


def test_directions_are_read_once_not_per_point():
    model = mlp().eval()
    data = mlp_data()
    d1, d2 = (CountingDict(d) for d in lw.random_directions(model, 2, seed=0))
    reads = []
    for n in (3, 25):
        CountingDict.reads = 0
        surf = lw.compute_surface(model, data, directions=(d1, d2), x=(-1, 1, n), y=(-1, 1, n),
                                  progress=False)
        reads.append(CountingDict.reads)
        assert all(torch.equal(surf.directions[0][k], d1[k]) for k in d1)
    assert 0 < reads[0] == reads[1], reads
