"""Curvature against a dense float64 Hessian (PAPERS (a4)); the model is never touched."""

from __future__ import annotations

import copy
import pickle
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import bn_res_cnn, cnn_data, mlp, mlp_data, tied_data, tied_mlp
from snapshots import assert_same_snapshot, snapshot
from torch import nn
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


def test_curvature_map_on_a_subset_is_the_subsets_dense_hessian():
    """samples=N: the eigenvalues of the dense Hessian of the drawn subset's mean loss."""
    from landscape_widget.core.subset import subset_indices

    model = mlp()
    x, y = mlp_data()
    d1, d2 = lw.random_directions(model, 2, seed=1)
    n = len(y) // 2
    cmap = lw.curvature_map(model, (x, y), (d1, d2), x=(-0.5, 0.5, 2), y=(0.0, 0.0, 1),
                            tol=1e-6, progress=False, samples=n, sample_seed=4)
    assert cmap.spec["samples"] == {"n": n, "of": len(y), "seed": 4}
    idx = subset_indices(len(y), n, 4)
    base = {k: p.detach() for k, p in model.named_parameters()}
    for ix, a in enumerate(cmap.x):
        point = {k: v + a * d1[k] for k, v in base.items()}
        ev = torch.linalg.eigvalsh(dense_hessian(model, x[idx], y[idx], point=point)[0])
        full = torch.linalg.eigvalsh(dense_hessian(model, x, y, point=point)[0])
        assert cmap.lambda_max[0, ix] == pytest.approx(float(ev[-1]), rel=1e-4)
        assert cmap.lambda_min[0, ix] == pytest.approx(float(ev[0]), abs=1e-3 * float(ev[-1]))
        assert abs(float(full[-1]) - float(ev[-1])) > 1e-3 * float(ev[-1])  # not all data
    assert lw.curvature_map(model, (x, y), (d1, d2), x=(0, 0, 1), y=(0, 0, 1),
                            progress=False).spec["samples"] is None
    with pytest.raises(TypeError, match="sample_seed=3 has no effect without samples"):
        lw.curvature_map(model, (x, y), (d1, d2), sample_seed=3, progress=False)
    with pytest.raises(ValueError, match="samples"):
        lw.curvature_map(model, (x, y), (d1, d2), samples=len(y) + 1, progress=False)


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
    from landscape_widget.core import lanczos

    model = mlp()
    x, y = mlp_data()
    ev = torch.linalg.eigvalsh(dense_hessian(model, x, y)[0]).numpy()
    monkeypatch.setattr(lanczos, "BASIS_BYTES", 1)  # the basis cap: 2k + 2 steps
    vals, _ = lw.hessian_eigenpairs(model, (x, y), k=1, which="smallest", tol=1e-8)
    assert vals[0] == pytest.approx(ev[0], abs=1e-3 * ev[-1])


class Recurrent(nn.Module):
    """A sequence classifier: an LSTM or GRU over 5 steps, then a linear head."""

    def __init__(self, cell: type[nn.Module], seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.rnn = cell(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def recurrent_case(cell):
    model = Recurrent(cell)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(12, 5, 3, generator=g), torch.randint(0, 3, (12,), generator=g)
    return model, (x, y)


def dense_hessian_double_backward(model, x, y, point=None):
    """Dense float64 Hessian over all parameters by reverse-over-reverse, row by row.

    ``torch.autograd.functional.hessian`` (no forward AD, which an LSTM lacks on CPU).
    """
    net = copy.deepcopy(model).double().eval()
    params = {n: p.detach().double() for n, p in net.named_parameters()}
    if point is not None:
        params.update({k: v.detach().double() for k, v in point.items()})
    keys, sizes = list(params), [p.numel() for p in params.values()]

    def loss(flat):
        parts = {k: c.reshape(params[k].shape)
                 for k, c in zip(keys, torch.split(flat, sizes), strict=True)}
        return F.cross_entropy(functional_call(net, parts, (x.double(),)), y)

    flat0 = torch.cat([p.reshape(-1) for p in params.values()])
    return torch.autograd.functional.hessian(loss, flat0)


@pytest.mark.parametrize("cell, batched", [(nn.LSTM, "backward"), (nn.GRU, "jvp")])
def test_recurrent_models_against_a_dense_double_backward_hessian(cell, batched):
    model, (x, y) = recurrent_case(cell)
    before = snapshot(model)
    h = dense_hessian_double_backward(model, x, y)
    ev = torch.linalg.eigvalsh(h).numpy()
    lmax = ev[-1]
    for batch_size, method in [(None, "graph"), (5, batched)]:
        opts = {"ignore": None, "batch_size": batch_size}
        top = lw.hessian_eigenpairs(model, (x, y), k=2, **opts)
        assert top.method == method and top.converged
        np.testing.assert_allclose(top.values, ev[::-1][:2], rtol=1e-4)
        low = lw.hessian_eigenpairs(model, (x, y), k=1, which="smallest", **opts)
        assert low.values[0] == pytest.approx(ev[0], abs=1e-3 * lmax)
        est = lw.hessian_trace(model, (x, y), samples=60, seed=2, **opts)
        assert est.products == 60 and est.method == method
        assert abs(est.value - ev.sum()) <= 3 * est.stderr
    if method == "backward":  # torch.func has no forward AD for the CPU LSTM kernel
        assert "forward AD" in top.fallback
    d1, d2 = lw.random_directions(model, 2, seed=1)
    cmap = lw.curvature_map(model, (x, y), (d1, d2), x=(-0.3, 0.3, 2), y=(0.0, 0.0, 1),
                            tol=1e-6, progress=False, ignore=None, batch_size=5)
    assert cmap.spec["method"] == batched and cmap.spec["not_converged"] == 0
    base = {n: p.detach() for n, p in model.named_parameters()}
    for ix, a in enumerate(cmap.x):
        point = {k: v + a * d1[k] for k, v in base.items()}
        ev = torch.linalg.eigvalsh(dense_hessian_double_backward(model, x, y, point)).numpy()
        assert cmap.lambda_max[0, ix] == pytest.approx(ev[-1], rel=1e-4)
        assert cmap.lambda_min[0, ix] == pytest.approx(ev[0], abs=1e-4 * ev[-1])
    assert_same_snapshot(before, snapshot(model))


def test_a_method_that_cannot_run_says_what_to_do_and_leaves_the_model():
    model, data = recurrent_case(nn.LSTM)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="method='backward'"):
        lw.hessian_eigenpairs(model, data, k=1, ignore=None, method="jvp")
    assert_same_snapshot(before, snapshot(model))


def test_qat_model_observers_stay_untouched():
    import torch.ao.quantization as q

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    net.qconfig = q.get_default_qat_qconfig("fbgemm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = q.prepare_qat(net.train())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    model(x)  # the observers have statistics and stay enabled
    model.eval()
    before = snapshot(model)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    graph = HessianOperator(model, (x, y), ignore=None)
    batched = HessianOperator(model, (x, y), ignore=None, batch_size=6)
    hv = graph.matvec(v)
    np.testing.assert_allclose(batched.matvec(v).numpy(), hv.numpy(), rtol=1e-4,
                               atol=1e-5 * float(hv.abs().max()))
    assert (graph.method, batched.method) == ("graph", "backward")
    np.testing.assert_allclose(graph.matvec(v).numpy(), hv.numpy())  # observers frozen
    assert_same_snapshot(before, snapshot(model))


def test_results_report_residuals_products_and_method(monkeypatch):
    model = mlp()
    x, y = mlp_data()
    h, keys = dense_hessian(model, x, y)
    calls = [0]
    matvec = HessianOperator.matvec

    def counted(self, v):
        calls[0] += 1
        return matvec(self, v)

    monkeypatch.setattr(HessianOperator, "matvec", counted)
    res = lw.hessian_eigenpairs(model, (x, y), k=2, tol=1e-3)
    vals, vecs = res  # still unpacks as a pair
    assert res.products == calls[0] and res.method == "graph" and res.converged
    again = pickle.loads(pickle.dumps(res))  # results travel between processes
    assert again.products == res.products and np.array_equal(again.values, vals)
    lmax = float(torch.linalg.eigvalsh(h)[-1])
    for val, vec, reported in zip(vals, vecs, res.residuals, strict=True):
        v = flat(vec, keys)
        true = float((h @ v - val * v).norm())
        assert reported <= 1e-3 * lmax and abs(reported - true) <= 1e-5 * lmax
    calls[0] = 0
    est = lw.hessian_trace(model, (x, y), samples=7)
    assert calls[0] == est.products == 7
    calls[0] = 0
    dens = lw.hessian_density(model, (x, y), steps=10, runs=2)
    assert calls[0] == dens.products == 20
    with pytest.warns(RuntimeWarning, match="not converged"):
        short = lw.hessian_eigenpairs(model, (x, y), k=1, tol=1e-8, max_products=3)
    assert not short.converged and short.products == 3


def test_a_cancel_midway_leaves_the_model_untouched():
    model, data = recurrent_case(nn.LSTM)
    before = snapshot(model)
    stop = threading.Event()
    with pytest.raises(Cancelled):
        lw.hessian_eigenpairs(model, data, k=1, batch_size=5, cancel=stop,
                              on_product=lambda n: n == 3 and stop.set())
    assert_same_snapshot(before, snapshot(model))


class Tagger(nn.Module):
    """Token tagging with HuggingFace-style dict outputs: ``{"logits": (N, C, T)}``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return {"logits": self.head(torch.tanh(self.emb(x))).transpose(1, 2),
                "hidden": self.emb(x)}


def test_ignored_targets_and_dict_outputs_over_batches():
    """The Hessian of the mean over counted targets, whatever the batches hold.

    Batches of 3 sequences hold very different numbers of counted targets (one holds
    none: its loss alone is NaN). The oracle is the dense float64 Hessian of one
    cross-entropy over all counted targets, computed by reverse-over-reverse.
    """
    model = Tagger()
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 7, (9, 5), generator=g)
    y = torch.randint(0, 3, (9, 5), generator=g)
    y[3:6] = -100  # a batch with no counted target
    y[0, :4] = -100
    net = copy.deepcopy(model).double()
    params = {n: p.detach().double() for n, p in net.named_parameters()}
    keys, sizes = list(params), [p.numel() for p in params.values()]

    def loss(flat):
        parts = {k: c.reshape(params[k].shape)
                 for k, c in zip(keys, torch.split(flat, sizes), strict=True)}
        return F.cross_entropy(functional_call(net, parts, (x,))["logits"], y)

    h = torch.autograd.functional.hessian(loss, torch.cat([p.reshape(-1) for p in params.values()]))
    v = torch.randn(h.shape[0], generator=g, dtype=torch.float64)
    before = snapshot(model)
    for batch_size in (None, 3, 2):
        op = HessianOperator(model, (x, y), ignore=None, batch_size=batch_size)
        hv = op.matvec(v.float()).double()
        torch.testing.assert_close(hv, h @ v, rtol=1e-4, atol=1e-5 * float((h @ v).abs().max()))
    with pytest.raises(ValueError, match="every target is ignored"):
        HessianOperator(model, (x, torch.full_like(y, -100)), ignore=None)
    assert_same_snapshot(before, snapshot(model))


def test_rademacher_signs_are_balanced_and_reproducible():
    from landscape_widget.core.hessian import _rademacher

    class Op:
        size, device, dtype = 56 * 4000 + 13, torch.device("cpu"), torch.float32

    a = _rademacher(Op, torch.Generator().manual_seed(0))
    b = _rademacher(Op, torch.Generator().manual_seed(0))
    assert a.shape == (Op.size,) and torch.equal(a, b)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    # Every bit position of the random words is used: each must be a fair coin
    # (4000 draws per position: 5 standard errors is 0.079).
    per_bit = a[: 56 * 4000].reshape(4000, 56).mean(0)
    assert per_bit.abs().max() < 0.079
    assert abs(float(a.mean())) < 5 / Op.size**0.5
