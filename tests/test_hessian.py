"""Curvature against a dense float64 Hessian (PAPERS (a4)); the model is never touched."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import bn_res_cnn, cnn_data, mlp, mlp_data, tied_data, tied_mlp
from snapshots import assert_same_snapshot, snapshot
from torch.func import functional_call

import landscape_widget as lw
from landscape_widget.core.curvature import CurvatureMap
from landscape_widget.core.hessian import Cancelled, HessianOperator


def dense_hessian(model, x, y, ignore="biasbn", point=None):
    """The exact Hessian of the mean CE (float64, eval mode) over the selected parameters."""
    net = copy.deepcopy(model).double().eval()
    params = {n: p.detach().double() for n, p in net.named_parameters()}
    if point is not None:
        params.update({k: v.detach().double() for k, v in point.items()})
    buffers = {n: b.double() if b.is_floating_point() else b for n, b in net.named_buffers()}
    keys = [n for n, p in params.items() if ignore is None or p.dim() > 1]
    sizes = [params[k].numel() for k in keys]
    flat0 = torch.cat([params[k].reshape(-1) for k in keys])

    def loss(flat):
        parts = dict(params)
        for k, chunk in zip(keys, torch.split(flat, sizes), strict=True):
            parts[k] = chunk.reshape(params[k].shape)
        out = functional_call(net, {**buffers, **parts}, (x.double(),))
        return F.cross_entropy(out, y)

    return torch.func.hessian(loss)(flat0), keys


CASES = {"mlp": (mlp, mlp_data), "tied": (tied_mlp, tied_data),
         "bn_res_cnn": (bn_res_cnn, cnn_data)}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    build, data = CASES[request.param]
    model = build()
    x, y = data()
    h, keys = dense_hessian(model, x, y)
    return model, (x, y), h, keys


def flat(d, keys):
    return torch.cat([d[k].reshape(-1).double() for k in keys])


def test_hvp_equals_dense_product(case):
    model, data, h, keys = case
    op = HessianOperator(model, data, batch_size=7)  # uneven batches are weighted exactly
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    np.testing.assert_allclose(op.matvec(v).numpy(), (h @ v).numpy(), rtol=1e-4,
                               atol=1e-5 * float((h @ v).abs().max()))


def test_a4_eigenpairs_match_dense(case):
    model, data, h, keys = case
    before = snapshot(model)
    ev, evec = torch.linalg.eigh(h)
    lmax = float(ev[-1])
    vals, vecs = lw.hessian_eigenpairs(model, data, k=2, which="largest")
    assert abs(vals[0] - lmax) <= 1e-3 * lmax and abs(vals[1] - float(ev[-2])) <= 1e-3 * lmax
    small, svecs = lw.hessian_eigenpairs(model, data, k=2, which="smallest")
    assert abs(small[0] - float(ev[0])) <= 1e-2 * lmax and small[0] <= small[1]
    gaps = np.diff(ev.numpy())
    for i, (v, idx) in enumerate([(vecs[0], -1), (vecs[1], -2), (svecs[0], 0)]):
        vec = flat(v, keys)
        assert abs(float(vec.norm()) - 1) < 1e-5
        gap = min(abs(gaps[idx]) if idx < len(gaps) else np.inf,
                  abs(gaps[idx - 1]) if idx - 1 >= -len(gaps) else np.inf)
        if gap > 1e-2 * lmax:  # well separated: the eigenvector is determined
            assert abs(float(vec @ evec[:, idx])) >= 0.99, (i, gap)
    # Directions cover every parameter (zero where excluded) and work as surface directions.
    assert set(vecs[0]) == {n for n, _ in model.named_parameters()}
    assert_same_snapshot(before, snapshot(model))


def test_a4_trace_within_three_standard_errors(case):
    model, data, h, _ = case
    est = lw.hessian_trace(model, data, samples=100, seed=1)
    assert est.samples == 100 and est.stderr > 0
    assert abs(est.value - float(h.trace())) <= 3 * est.stderr


def test_density_is_a_density_with_the_right_mean():
    model = mlp()
    x, y = mlp_data()
    h, _ = dense_hessian(model, x, y)
    ev = torch.linalg.eigvalsh(h).numpy()
    grid, dens = lw.hessian_density(model, (x, y), steps=80, runs=4, seed=0)
    assert np.all(dens >= 0) and np.trapezoid(dens, grid) == pytest.approx(1.0, abs=1e-6)
    mean = np.trapezoid(grid * dens, grid)
    assert mean == pytest.approx(ev.mean(), abs=0.15 * (ev.max() - ev.min()))
    assert grid[0] < ev.min() and grid[-1] > ev.max()


def test_ignore_none_includes_biases():
    model = mlp()
    x, y = mlp_data()
    h, _ = dense_hessian(model, x, y, ignore=None)
    vals, _ = lw.hessian_eigenpairs(model, (x, y), k=1, ignore=None)
    lmax = float(torch.linalg.eigvalsh(h)[-1])
    assert abs(vals[0] - lmax) <= 1e-3 * lmax


def test_deterministic_and_cancellable():
    model = mlp()
    data = mlp_data()
    a = lw.hessian_eigenpairs(model, data, k=1, seed=3)
    b = lw.hessian_eigenpairs(model, data, k=1, seed=3)
    assert a[0][0] == b[0][0] and torch.equal(a[1][0]["0.weight"], b[1][0]["0.weight"])
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        lw.hessian_eigenpairs(model, data, k=1, cancel=stop)


def test_curvature_map_matches_dense_eigenvalues():
    model = mlp()
    x, y = mlp_data()
    d1, d2 = lw.random_directions(model, 2, seed=0)
    before = snapshot(model)
    cmap = lw.curvature_map(model, (x, y), (d1, d2), x=(-0.5, 0.5, 3), y=(-0.5, 0.5, 2),
                            tol=1e-6, progress=False)
    assert isinstance(cmap, CurvatureMap) and cmap.ratio.shape == (2, 3)
    base = {n: p.detach() for n, p in model.named_parameters()}
    for iy, b in enumerate(cmap.y):
        for ix, a in enumerate(cmap.x):
            point = {k: v + a * d1[k] + b * d2[k] for k, v in base.items()}
            ev = torch.linalg.eigvalsh(dense_hessian(model, x, y, point=point)[0]).numpy()
            assert cmap.lambda_max[iy, ix] == pytest.approx(ev[-1], rel=1e-4)
            assert cmap.lambda_min[iy, ix] == pytest.approx(ev[0], abs=1e-3 * ev[-1])
    np.testing.assert_allclose(cmap.ratio, np.abs(cmap.lambda_min / cmap.lambda_max))
    assert cmap.to_plotly().data[0].z.shape == (2, 3)
    assert_same_snapshot(before, snapshot(model))


def test_curvature_map_cancel_leaves_nan():
    model = mlp()
    d = lw.random_directions(model, 2, seed=0)
    stop = threading.Event()
    stop.set()
    cmap = lw.curvature_map(model, mlp_data(), d, x=(-1, 1, 3), y=(-1, 1, 3), progress=False,
                            cancel=stop)
    assert np.isnan(cmap.ratio).all()


@pytest.mark.parametrize("kw, match", [({"k": 0}, "k must"), ({"which": "middle"}, "which"),
                                       ({"ignore": "bias"}, "ignore"), ({"bn": "train"}, "bn")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        lw.hessian_eigenpairs(mlp(), mlp_data(), **kw)


def test_graph_and_jvp_products_agree():
    model = bn_res_cnn()
    x, y = cnn_data()
    v = torch.randn(HessianOperator(model, (x, y)).size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    graph = HessianOperator(model, (x, y), method="graph")
    fwd = HessianOperator(model, (x, y), method="jvp")
    assert graph.method == "graph" and fwd.method == "jvp"
    hv = graph.matvec(v)
    np.testing.assert_allclose(hv.numpy(), fwd.matvec(v).numpy(), rtol=1e-4,
                               atol=1e-5 * float(hv.abs().max()))
    np.testing.assert_allclose(graph.matvec(v).numpy(), hv.numpy())  # the kept graph reruns
    with pytest.raises(ValueError, match="one batch"):
        HessianOperator(model, (x, y), method="graph", batch_size=5)


def test_arpack_takes_over_when_the_lanczos_basis_is_capped(monkeypatch):
    from landscape_widget.core import hessian

    model = mlp()
    x, y = mlp_data()
    ev = torch.linalg.eigvalsh(dense_hessian(model, x, y)[0]).numpy()
    monkeypatch.setattr(hessian, "BASIS_BYTES", 1)  # the basis cap: 2k + 2 steps
    vals, _ = lw.hessian_eigenpairs(model, (x, y), k=1, which="smallest", tol=1e-8)
    assert vals[0] == pytest.approx(ev[0], abs=1e-3 * ev[-1])
