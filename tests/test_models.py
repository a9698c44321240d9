"""The model zoo (landscape_widget.models) and the CIFAR-10 loader.

Oracles: He et al.'s published parameter counts; the shortcut written out by hand
(subsample, zero-pad); the network's own outputs (a permuted network computes the same
function); a Hessian-vector product by double backward through ``functional_call``.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from snapshots import assert_same_snapshot, snapshot
from torch.func import functional_call

import landscape_widget as lw
from landscape_widget import models
from landscape_widget.models import count_parameters


@pytest.mark.parametrize(("depth", "count"), [(20, 269_722), (56, 853_018), (110, 1_727_962)])
def test_resnet_parameter_counts_of_he_et_al(depth, count):
    assert count_parameters(models.resnet(depth)) == count
    assert count_parameters(models.resnet(depth, shortcut=False)) == count


def test_zoo_parameter_counts():
    # Wide: every conv grows by k^2 except the stem (3 input channels), which grows by k.
    k2 = models.resnet(20, width=2)
    convs = sum(p.numel() for p in models.resnet(20).parameters() if p.dim() == 4)
    stem = 3 * 16 * 9
    assert sum(p.numel() for p in k2.parameters() if p.dim() == 4) == 4 * (convs - stem) + 2 * stem
    assert count_parameters(models.vgg9()) == 2_789_706
    assert count_parameters(models.densenet()) == 1_000_618


def test_shortcut_a_is_subsample_and_zero_pad():
    x = torch.randn(2, 3, 7, 7)
    out = models.ShortcutA(3, 5, 2)(x)
    expected = torch.zeros(2, 5, 4, 4)
    for i in range(4):
        for j in range(4):
            expected[:, :3, i, j] = x[:, :, 2 * i, 2 * j]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    sig = torch.randn(2, 3, 9)
    torch.testing.assert_close(models.ShortcutA(3, 6, 2, dims=1)(sig)[:, :3], sig[:, :, ::2])


@pytest.mark.parametrize("shortcut", [True, False])
def test_block_adds_input_only_with_shortcut(shortcut):
    block = models.BasicBlock(4, 4, shortcut=shortcut).eval()
    torch.nn.init.zeros_(block.bn2.weight)  # residual branch outputs bn2.bias = 0
    x = torch.rand(3, 4, 5, 5)
    out = block(x)
    torch.testing.assert_close(out, x if shortcut else torch.zeros_like(x))


def test_seeded_construction_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = models.resnet(8, seed=3), models.resnet(8, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = models.resnet(8, seed=4)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_zoo_runs_on_offline_data():
    x, y = lw.datasets.digits_images("test")
    for net in (models.resnet(8, in_channels=1, base=4), models.vgg9(in_channels=1, input_size=8),
                models.densenet((2, 2, 2), growth_rate=4, in_channels=1),
                models.squares_net("skip")):
        assert net(x[:5]).shape == (5, 10)
    s, _ = lw.datasets.mnist1d("test", num_samples=100)
    sig = s[:5, None, :]
    for net in (models.resnet(8, in_channels=1, dims=1, base=4),
                models.vgg9(in_channels=1, input_size=40, dims=1),
                models.densenet((2, 2), growth_rate=4, in_channels=1, dims=1)):
        assert net(sig).shape == (5, 10)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="6n \\+ 2.*depth=20"):
        models.resnet(21)
    with pytest.raises(ValueError, match="width"):
        models.resnet(20, width=0)
    with pytest.raises(ValueError, match="dims"):
        models.resnet(20, dims=3)
    with pytest.raises(ValueError, match="unsqueeze"):
        models.resnet(8, in_channels=1, dims=1)(torch.zeros(2, 40))
    with pytest.raises(ValueError, match="input_size="):
        models.vgg9()(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="kind"):
        models.squares_net("wide")
    for bad in (0, -1.0, True, "half"):
        with pytest.raises(ValueError, match="width must be a positive number"):
            models.squares_net("plain", width=bad)


def test_squares_net_width_scales_channels_and_keeps_the_skips():
    """width=0.25: channels 2,2,8,8,16,16, head 32; skips only where widths agree."""
    net = models.squares_net("skip", width=0.25)
    convs = [layer.conv for layer in net.features]
    assert [c.out_channels for c in convs] == [2, 2, 8, 8, 16, 16]
    assert [layer.skip for layer in net.features] == [False, True, False, True, False, True]
    assert net.head[0].in_features == 16 * 16 and net.head[0].out_features == 32
    # By hand: 6 convs (3x3 weights + bias) + Linear(256, 32) + Linear(32, 10).
    cins = [1, 2, 2, 8, 8, 16]
    by_hand = sum(ci * co * 9 + co for ci, co in zip(cins, [2, 2, 8, 8, 16, 16], strict=True))
    by_hand += 256 * 32 + 32 + 32 * 10 + 10
    assert models.count_parameters(net) == by_hand
    x = torch.randn(3, 1, 8, 8)
    assert net(x).shape == (3, 10)


# --- CIFAR-10 from disk ---------------------------------------------------------------
def test_cifar10_missing_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads.*download=True"):
        lw.datasets.cifar10(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing was written, nothing fetched
    with pytest.raises(ValueError, match="split"):
        lw.datasets.cifar10(tmp_path, "valid")


def test_cifar10_reads_torchvision_layout(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    raw = {}
    for name, _ in CIFAR10.train_list + CIFAR10.test_list:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 4).tolist()
        raw[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / CIFAR10.meta["filename"], "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    # The fake files do not match torchvision's checksums; the layout is what is tested.
    import torchvision.datasets.cifar as cifar_module

    monkeypatch.setattr(cifar_module, "check_integrity", lambda *args, **kwargs: True)
    x, y = lw.datasets.cifar10(tmp_path, "test", normalize=False)
    data, labels = raw["test_batch"]
    assert x.shape == (4, 3, 32, 32) and y.tolist() == labels
    torch.testing.assert_close(x, torch.tensor(data.reshape(4, 3, 32, 32) / 255.0).float())
    xn, _ = lw.datasets.cifar10(tmp_path, "train", limit=5)
    assert xn.shape == (5, 3, 32, 32)
    mean, std = torch.tensor(lw.datasets.CIFAR10_MEAN), torch.tensor(lw.datasets.CIFAR10_STD)
    first = torch.tensor(raw["data_batch_1"][0][0].reshape(3, 32, 32) / 255.0).float()
    torch.testing.assert_close(xn[0], (first - mean[:, None, None]) / std[:, None, None])


# --- the project's tools on zoo models ------------------------------------------------
@pytest.mark.parametrize("build", [
    lambda: models.resnet(8, in_channels=1, base=4, seed=1),
    lambda: models.resnet(8, in_channels=1, base=4, shortcut=False, seed=1),
    lambda: models.densenet((2, 2), growth_rate=4, in_channels=1, seed=1),
    lambda: models.squares_net("bn", seed=1),
])
def test_permutation_direction_on_zoo(build):
    net = build().eval()
    x, _ = lw.datasets.digits_images("test")
    before = snapshot(net)
    d = lw.permutation_direction(net, seed=0, check_inputs=x[:16])
    assert_same_snapshot(before, snapshot(net))
    params = dict(net.named_parameters())
    moved = sum(float(d[k].abs().sum()) for k in params if k in d)
    assert moved > 0
    state = {k: v + d[k] if k in d else v for k, v in net.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(functional_call(net, state, (x[:32],)), net(x[:32]),
                                   atol=1e-4, rtol=1e-4)


def test_hessian_top_eigenpair_on_resnet():
    net = models.resnet(8, in_channels=1, base=4, seed=2).eval()
    x, y = lw.datasets.digits_images("test")
    data = (x[:64], y[:64])
    before = snapshot(net)
    vals, vecs = lw.hessian_eigenpairs(net, data, k=1, tol=1e-4)
    assert_same_snapshot(before, snapshot(net))
    v = vecs[0]
    # loss-landscape's parameter set (ignore="biasbn"): the tensors of dimension > 1.
    params = {k: p.detach().clone().double().requires_grad_(True)
              for k, p in net.named_parameters() if p.dim() > 1}
    assert all(float(v[k].abs().max()) == 0 for k in v if k not in params)
    rest = {k: t.double() for k, t in net.state_dict().items() if k not in params}
    net64 = models.resnet(8, in_channels=1, base=4).double().eval()
    loss = F.cross_entropy(functional_call(net64, {**rest, **params}, (data[0].double(),)),
                           data[1])
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    dot = sum((g * v[k].double()).sum() for g, k in zip(grads, params, strict=True))
    hv = torch.autograd.grad(dot, list(params.values()))
    hv = torch.cat([h.reshape(-1) for h in hv])
    vv = torch.cat([v[k].double().reshape(-1) for k in params])
    lam = float(vals[0])
    assert float((hv @ vv) / (vv @ vv)) == pytest.approx(lam, rel=1e-3)
    assert float((hv - lam * vv).norm() / (abs(lam) * vv.norm())) < 1e-2


@pytest.mark.parametrize("build", [
    lambda: models.squares_net("plain", seed=None),
    lambda: models.squares_net("bn", seed=None),
    lambda: models.squares_net("skip", seed=None),
    lambda: models.resnet(8, in_channels=1, base=2, seed=None),
])
def test_mpo_fits_zoo_models(build):
    x, y = lw.datasets.digits_images("train")
    data = (x[:64], y[:64])
    fit = lw.fit_pattern(build, data, lw.checkerboard(3), steps=2, batch_size=32,
                         cells_per_step=4, progress=False)
    assert fit.step == 2
    # The cell at the plane's centre is w0: materialised, it is a working network.
    net = fit.materialize(1, 1)
    assert torch.isfinite(net(x[:4])).all()
    scores = fit.scores(data)
    assert -1.0 <= scores["acc_diff"] <= 1.0


def test_skip_study_tiny():
    from landscape_widget.experiments.skip import skip_study, study_figure

    x, y = lw.datasets.digits_images("train")
    data = (x[:64], y[:64])
    state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    runs = skip_study(data, depths=(8,), widths=(1,), base=2, epochs=1, points=5, seed=3)
    assert torch.get_num_threads() == threads  # the study's 1 thread is restored
    assert [r.name for r in runs] == ["ResNet-8", "ResNet-8-noshort"]
    for r in runs:
        assert r.surface.loss.shape == (5, 5)
        # theta's loss is the trained model's loss on the data (eval-mode BatchNorm).
        with torch.no_grad():
            expected = float(F.cross_entropy(r.model(data[0]), data[1]))
        assert r.surface.loss[2, 2] == pytest.approx(expected, rel=1e-5)
        assert r.train_loss == pytest.approx(expected, rel=1e-5)
        assert r.stats == lw.landscape_stats(r.surface)
        assert r.row()["name"] == r.name
    # Seeded builders, batch order and directions: the global RNG is left as it was.
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(study_figure(runs).data) == 2
    with pytest.raises(ValueError, match="odd"):
        skip_study(data, depths=(8,), points=4)
