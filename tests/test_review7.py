"""Review 7: models, data and files the earlier tests did not cover.

Each test checks a property against an independent oracle: the object a file was written
from (a save/load round trip must give it back), a float64 per-point loop written here, or
a full snapshot of the user's model (tests/snapshots.py).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import scaled_pair
from snapshots import assert_same_snapshot, snapshot
from torch import nn

import landscape_widget as lw


class _SlashNamed(nn.Module):
    """Parameter names with '/' in them (an ``nn.ModuleDict`` keyed by paths)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({"enc/0": nn.Linear(4, 5), "enc/1": nn.Linear(5, 3)})

    def forward(self, x):
        return self.blocks["enc/1"](torch.tanh(self.blocks["enc/0"](x)))


def _top2(out, y):
    return (out.topk(2, -1).indices == y[:, None]).any(-1).double()


def _same_grid(a, b) -> None:
    for name in ("loss", "accuracy", "acc/top2", "val/top2"):
        # Accuracy is stored in percent (loss-landscape's unit): x * 100 / 100 may move an ulp.
        np.testing.assert_allclose(a.values(name), b.values(name), rtol=1e-14, err_msg=name)
    assert set(a.extra_metrics) == set(b.extra_metrics)
    assert len(a.directions) == len(b.directions)
    for d, e in zip(a.directions, b.directions, strict=True):
        assert set(d) == set(e)
        for k in d:
            assert torch.equal(d[k], e[k]), k


def test_names_with_a_slash_survive_a_save_and_load(tmp_path):
    # HDF5 reads '/' in a dataset name as a path: a metric named like TensorBoard's tags
    # ("acc/top2") or a parameter of a ModuleDict keyed "enc/0" was written as a nested
    # group, and Surface.load / Curve.load then failed ("Accessing a group is done with
    # bytes or str, not tuple", "can't convert np.ndarray of type numpy.str_").
    torch.manual_seed(0)
    model = _SlashNamed()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    metrics = {"loss": None, "accuracy": None, "acc/top2": _top2, "val/top2": _top2}
    surf = lw.compute_surface(model, (x, y), x=(-1, 1, 3), y=(-0.5, 0.5, 2), metrics=metrics,
                              progress=False)
    surf.save(tmp_path / "s.h5")
    _same_grid(surf, lw.Surface.load(tmp_path / "s.h5"))
    curve = lw.compute_curve(model, (x, y), x=(-1, 1, 3), metrics=metrics, progress=False)
    curve.save(tmp_path / "c.h5")
    _same_grid(curve, lw.Curve.load(tmp_path / "c.h5"))


def test_a_float64_models_path_is_recorded_in_float64():
    # Trajectory.record rounded every checkpoint to float32: for a float64 model whose
    # steps are small next to its weights (1e-7 on weights near 3, where float32's spacing
    # is 2.4e-7) the PCA of the differences was mostly rounding noise: explained variance,
    # directions and the projected path came out wrong with no error.
    g = torch.Generator().manual_seed(0)
    w0 = 3 + torch.rand(30, 20, generator=g, dtype=torch.float64)
    b0 = torch.randn(20, generator=g, dtype=torch.float64)
    u, v = (torch.randn(30, 20, generator=g, dtype=torch.float64) for _ in range(2))
    traj, rows = lw.Trajectory(), []
    for t in range(8):
        w = w0 + 1e-7 * (t * u + 2 * np.sin(t) * v)
        traj.record({"w": w, "b": b0 + 1e-7 * t})
        rows.append(w.reshape(-1))
    # The oracle: float64 PCA of the weight rows (biases are zeroed by ignore="biasbn").
    m = torch.stack([r - rows[-1] for r in rows])
    _, s, vh = torch.linalg.svd(m - m.mean(0), full_matrices=False)
    dirs, evr = traj.pca_directions(2)
    np.testing.assert_allclose(evr, (s[:2] ** 2 / (s ** 2).sum()).numpy(), rtol=1e-9)
    got = torch.stack([traj.flatten(d)[:600] for d in dirs])
    np.testing.assert_allclose((got @ vh[:2].T).diagonal().abs().numpy(), 1.0, rtol=1e-9)
    want = (m @ vh[:2].T).numpy() * np.sign((got @ vh[:2].T).diagonal().numpy())
    np.testing.assert_allclose(traj.project(dirs), want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
    assert traj.points[-1].dtype == torch.float64


def _untracked_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16, track_running_stats=False),
                         nn.ReLU(), nn.Linear(16, 3)).eval()


def _shifted_data(n: int = 60):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g) + torch.linspace(0, 3, n)[:, None]
    return x, torch.randint(0, 3, (n,), generator=g)


def test_batchnorm_without_running_statistics_is_not_left_to_the_engines_batches():
    # BatchNorm(track_running_stats=False) normalises with each batch's statistics in eval
    # mode too. With bn="eval" its loss silently depended on the engine's batch size
    # (batch_size=7 vs the whole data: 4 % apart here; on a GPU the tuner's or the
    # out-of-memory fallback's choice). Now refused, naming bn="batch", whose batches are
    # fixed: checked against an eval-mode loop over DataLoader-style batches in float64.
    model = _untracked_bn_net()
    x, y = _shifted_data()
    d = lw.random_direction(model, seed=2)
    for fn, kw in ((lw.compute_curve, {"direction": d, "x": (-1, 1, 3)}),
                   (lw.hessian_trace, {"samples": 2}),
                   (lw.side_direction, {})):
        try:
            fn(model, (x, y), bn="eval", **kw)
        except ValueError as err:
            assert "track_running_stats" in str(err) and "bn='batch'" in str(err), fn
        else:
            raise AssertionError(f"{fn.__name__} accepted batch-dependent BatchNorm")
    ref = copy.deepcopy(model).double()
    for b in (7, 60):
        want = []
        for a in (-1.0, 0.0, 1.0):
            moved = {k: v.detach().double() + a * d[k].double()
                     for k, v in ref.named_parameters()}
            with torch.no_grad():
                per = torch.cat([F.cross_entropy(torch.func.functional_call(
                    ref, moved, (x[s:s + b].double(),)), y[s:s + b], reduction="none")
                    for s in range(0, len(x), b)])
            want.append(float(per.mean()))
        got = lw.compute_curve(model, (x, y), direction=d, x=(-1, 1, 3), bn="batch",
                               bn_batch_size=b, progress=False)
        np.testing.assert_allclose(got.loss, want, rtol=1e-5)


class _FreqScaledBag(nn.Module):
    """Token classifier whose embedding has ``scale_grad_by_freq=True`` (or another flag)."""

    def __init__(self, **flags):
        super().__init__()
        self.emb = nn.Embedding(12, 6, **(flags or {"scale_grad_by_freq": True}))
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens).mean(1)))


@pytest.mark.parametrize("flag", ["scale_grad_by_freq", "sparse"])
def test_embedding_gradient_flags_do_not_reach_gradients_or_the_hessian(flag):
    # Embedding(scale_grad_by_freq=True) divides each row's gradient by the row's count in
    # the batch: a training heuristic, not the derivative of the loss. Hessian products
    # were therefore not symmetric and hessian_* refused the model blaming weight_norm,
    # and side_direction followed the rescaled gradient instead of -grad L (no error).
    # Embedding(sparse=True) gives sparse gradients: both failed with torch's "reshape is
    # not implemented for sparse tensors".
    # The oracle: torch.func on a float64 copy with the flag off (the same function).
    torch.manual_seed(0)
    model = _FreqScaledBag(**{flag: True}).double().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 4, (30, 5), generator=g), torch.randint(0, 3, (30,), generator=g)
    before = snapshot(model)
    ref = _FreqScaledBag().double()
    ref.load_state_dict(model.state_dict())
    ref.emb.scale_grad_by_freq = ref.emb.sparse = False
    theta = {k: v.detach() for k, v in ref.named_parameters()}
    keys = list(theta)  # all of them: ignore=None

    def loss(flat):
        parts, at = {}, 0
        for k in keys:
            n = theta[k].numel()
            parts[k] = flat[at:at + n].reshape(theta[k].shape)
            at += n
        return F.cross_entropy(torch.func.functional_call(ref, parts, (x,)), y)

    flat = torch.cat([theta[k].reshape(-1) for k in keys])
    want = torch.linalg.eigvalsh(torch.func.hessian(loss)(flat))
    got = lw.hessian_eigenpairs(model, (x, y), k=2, ignore=None, tol=1e-8)
    np.testing.assert_allclose(np.sort(got.values), want[-2:].numpy(), rtol=1e-6)
    side = lw.side_direction(model, (x, y), ignore=None)
    d = torch.cat([side[k].reshape(-1) for k in keys]).double()
    grad = torch.func.grad(loss)(flat)
    assert float(d @ -grad / (d.norm() * grad.norm())) > 1 - 1e-9
    assert_same_snapshot(before, snapshot(model))  # the user's flag stays on


def _dynamic_quantized_mlp() -> nn.Module:
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3), nn.LayerNorm(3))
    return torch.ao.quantization.quantize_dynamic(float_model, {nn.Linear}, dtype=torch.qint8)


def _zero_init_logistic() -> nn.Module:
    model = nn.Linear(6, 3)
    nn.init.zeros_(model.weight)  # a convex model started at 0
    return model


@pytest.mark.parametrize(("make", "words"), [
    (_dynamic_quantized_mlp, ("ignore=None", "quantized", "float model")),
    (_zero_init_logistic, ("norm=None",)),
])
def test_random_directions_that_move_nothing_are_refused(make, words):
    # The default directions are filter-normalised on tensors of dim > 1. A dynamically
    # quantized model keeps its Linear weights as packed int8 data, not parameters (only
    # LayerNorm's 1-D ones are left), and a zero-initialised weight has zero filters: both
    # gave an all-zero direction, and compute_surface drew a flat plane with no error.
    model = make()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
    before = snapshot(model)
    for call in (lambda: lw.random_directions(model, 2, seed=0),
                 lambda: lw.compute_surface(model, (x, y), x=(-1, 1, 3), y=(-1, 1, 3),
                                            progress=False)):
        with pytest.raises(ValueError) as err:
            call()
        assert all(w in str(err.value) for w in words), str(err.value)
    assert_same_snapshot(before, snapshot(model))
    # What the message proposes moves the model: the oracle is the loss of its own forward.
    fix = {"ignore": None} if "ignore=None" in words else {"norm": None}
    d = lw.random_direction(model, seed=0, **fix)
    assert any(bool(v.any()) for v in d.values())
    curve = lw.compute_curve(model, (x, y), direction=d, x=(-1, 1, 3), progress=False)
    assert np.ptp(curve.loss) > 0
    with torch.no_grad():
        np.testing.assert_allclose(curve.loss[1], float(F.cross_entropy(model(x), y)),
                                   rtol=1e-6)


def test_a_direction_on_a_non_persistent_buffer_survives_its_file(tmp_path):
    # interpolation_direction moves every float buffer, non-persistent ones too, but
    # save_directions wrote the state_dict's entries only: the 'scale' part was dropped
    # with no error, and the loaded direction no longer led to model_b at alpha = 1.
    a, b = scaled_pair()
    d = lw.interpolation_direction(a, b)
    before = snapshot(a)
    lw.save_directions(tmp_path / "d.h5", [d], a)
    (back,) = lw.load_directions(tmp_path / "d.h5", a)
    assert set(back) == set(d)
    for k in d:
        assert torch.equal(back[k], d[k]), k
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    with torch.no_grad():
        want = float(F.cross_entropy(copy.deepcopy(b).double()(x.double()), y))
    curve = lw.compute_curve(a, (x, y), direction=back, x=(0, 1, 2), progress=False)
    np.testing.assert_allclose(curve.loss[1], want, rtol=1e-5)
    assert_same_snapshot(before, snapshot(a))


def test_statistics_of_a_surface_along_a_descending_axis():
    # x=(1, -1, n) is a range compute_surface accepts (np.linspace runs downwards), but
    # landscape_stats, nonconvex_fraction and basin_radius raised "x must be strictly
    # increasing" about coordinates the user never passed them. Oracle: the closed form
    # of x^2 + 4 y^2 (radii 0.5 and 0.25 at rise 0.25, convex everywhere).
    t = np.linspace(1, -1, 201)
    u = np.linspace(-1, 1, 201)
    z = t[None, :] ** 2 + 4 * u[:, None] ** 2
    r = lw.basin_radius(t, u, z, rise=0.25)
    np.testing.assert_allclose([r[k] for k in ("+x", "-x", "+y", "-y")],
                               [0.5, 0.5, 0.25, 0.25], atol=1e-12)
    assert lw.nonconvex_fraction((t, u[::-1], z[::-1])) == 0.0
    saddle = t[None, :] ** 2 - u[:, None] ** 2
    assert lw.nonconvex_fraction((t, u, saddle)) == 1.0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g))
    dirs = lw.random_directions(model, 2, seed=0)
    down = lw.compute_surface(model, data, directions=dirs, x=(1, -1, 5), y=(-1, 1, 5),
                              progress=False)
    up = lw.compute_surface(model, data, directions=dirs, x=(-1, 1, 5), y=(-1, 1, 5),
                            progress=False)
    np.testing.assert_allclose(down.loss, up.loss[:, ::-1], rtol=1e-6)
    a, b = lw.landscape_stats(down), lw.landscape_stats(up)
    for k, v in vars(b).items():
        np.testing.assert_allclose(getattr(a, k), v, rtol=1e-6, err_msg=k)


def test_embedding_max_norm_is_refused_by_hessians_and_gradient_directions():
    """max_norm renormalises the weight in place in forward: surfaces refuse it (they see the
    write); Hessians and gradient directions differentiated another function, silently."""

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(20, 8, max_norm=1.0)
            self.lin = nn.Linear(8, 3)

        def forward(self, t):
            return self.lin(self.e(t).mean(1))

    torch.manual_seed(0)
    model = Bag().eval()
    data = (torch.randint(0, 20, (16, 5)), torch.randint(0, 3, (16,)))
    before = model.e.weight.detach().clone()
    for call in (lambda: lw.hessian_trace(model, data, samples=2),
                 lambda: lw.side_direction(model, data)):
        with pytest.raises(ValueError, match="max_norm=1.0.*without max_norm"):
            call()
    assert torch.equal(model.e.weight, before)
