"""Optimizer comparisons and planes through three models: PAPERS.md (b1)-(b4), B5-B7."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import bn_res_cnn, cnn_data, mlp_data, mlp_dropout, reinit, tied_data, tied_mlp
from oracle import naive_eval
from torch import nn

import landscape_widget as lw
from landscape_widget.core.evaluate import Evaluator
from landscape_widget.experiments.optimizers import state_hash
from landscape_widget.experiments.triangle import barycentric_point, model_point


def snapshot(model: nn.Module):
    return state_hash(model.state_dict()), [m.training for m in model.modules()]


def _three(build, seeds=(0, 1, 2)):
    return [reinit(build(), s, gain=1.5) for s in seeds]


# --- (b1) the barycentric plane --------------------------------------------------------
@pytest.mark.parametrize("case", ["dropout", "tied", "bn_res_cnn"])
def test_b1_triangle_matches_naive_oracle(case):
    build, data = {"dropout": (mlp_dropout, mlp_data), "tied": (tied_mlp, tied_data),
                   "bn_res_cnn": (bn_res_cnn, cnn_data)}[case]
    models = _three(build)
    x, y = data()
    before = [snapshot(m) for m in models]
    tri = lw.triangle_surface(*models, (x, y), resolution=4, margin=0.25, progress=False)
    assert [snapshot(m) for m in models] == before
    axis = tri.alpha[0]
    assert axis[0] == -0.25 and axis[-1] == 1.5 and {0.0, 1.0} <= set(axis)
    # Oracle: the plane as theta_3 + a (theta_1 - theta_3) + b (theta_2 - theta_3) in float64,
    # weights and BatchNorm statistics alike, loaded into a float64 copy point by point.
    pts = [{k: v.double() for k, v in model_point(m).items()} for m in models]
    d1 = {k: pts[0][k] - pts[2][k] for k in pts[2]}
    d2 = {k: pts[1][k] - pts[2][k] for k in pts[2]}
    inside = tri.alpha + tri.beta <= 1.25 + 1e-12
    coords = np.stack([tri.alpha[inside], tri.beta[inside]], 1)
    loss, acc = naive_eval(models[2], x, y, [d1, d2], coords)
    np.testing.assert_allclose(tri.loss[inside], loss, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(tri.accuracy[inside], acc, atol=1e-12)
    assert np.isnan(tri.loss[~inside]).all()
    for i, m in enumerate(models):
        with torch.no_grad():
            direct = float(F.cross_entropy(copy.deepcopy(m).eval()(x), y))
        assert tri.loss_at_model(i) == pytest.approx(direct, rel=1e-6, abs=1e-7)


def test_b1_vertices_are_bit_exact():
    models = _three(bn_res_cnn)
    pts = [model_point(m) for m in models]
    ev = Evaluator(models[2], cnn_data(), pts, barycentric=True, strategy="loop")
    for i, c in enumerate([(1.0, 0.0), (0.0, 1.0), (0.0, 0.0)]):
        full = torch.cat([torch.tensor(c, dtype=torch.float64),
                          torch.tensor([1.0 - sum(c)], dtype=torch.float64)])
        engine = ev._point(full, "contiguous")
        helper = barycentric_point(pts, *c)
        for k, v in pts[i].items():
            assert torch.equal(engine[k], v), k
            assert torch.equal(helper[k], v), k
        # The engine's vertex loss is the model's own (same arithmetic on the same tensors).
        loss = ev.evaluate(np.array([c]))["loss"][0]
        with torch.no_grad():
            direct = float(F.cross_entropy(copy.deepcopy(models[i]).eval()(cnn_data()[0]),
                                           cnn_data()[1]))
        assert loss == pytest.approx(direct, rel=1e-6)


def test_triangle_errors_name_the_problem():
    a, b = _three(mlp_dropout, (0, 1))
    other = tied_mlp()
    with pytest.raises(ValueError, match="architecture"):
        lw.triangle_surface(a, b, other, mlp_data(), progress=False)
    with pytest.raises(ValueError, match="resolution"):
        lw.triangle_surface(a, b, a, mlp_data(), resolution=1, progress=False)
    with pytest.raises(TypeError, match="nn.Module"):
        lw.triangle_surface(a, b, "c", mlp_data(), progress=False)
    tri = lw.triangle_surface(a, b, a, mlp_data(), resolution=2, margin=0, progress=False)
    with pytest.raises(IndexError):
        tri.loss_at_model(3)
    assert tri.to_plotly().data[1].type == "contourcarpet"


# --- compare_optimizers on offline data ------------------------------------------------
OPTIMIZERS = {
    "sgd": functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
    "adam": functools.partial(torch.optim.Adam, lr=1e-2),
    "rmsprop": functools.partial(torch.optim.RMSprop, lr=1e-3),
}


@pytest.fixture(scope="module")
def digits():
    return lw.datasets.digits("train"), lw.datasets.digits("test")


@pytest.fixture(scope="module")
def runs(digits):
    train, test = digits
    return lw.compare_optimizers(lambda: lw.demo.mlp(seed=None), train, OPTIMIZERS, epochs=6,
                                 seed=0, test_data=test, progress=False)


def test_b2_distinct_solutions(runs):
    final = {n: torch.cat([p.detach().flatten() for p in runs[n].parameters()])
             for n in OPTIMIZERS}
    diff = runs.functional_difference()
    for a, b in [("sgd", "adam"), ("sgd", "rmsprop"), ("adam", "rmsprop")]:
        assert float((final[a] - final[b]).norm()) > 1.0
        assert diff[(a, b)]["disagreement"] > 0.005
    assert all(run.history["test_accuracy"][-1] > 0.8 for run in runs.runs.values())


LOG: list = []  # module-level: a list attribute would be deep-copied with each run's model


class _Recorder(nn.Module):
    """Logs the first input feature of every training batch (the sample's index here)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))

    def forward(self, x):
        if self.training:
            LOG.append(x[:, 0].long().tolist())
        return self.net(x)


def test_shared_init_batch_order_and_dropout():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 5, generator=g)
    x[:, 0] = torch.arange(50)  # each sample carries its index
    y = torch.randint(0, 3, (50,), generator=g)
    LOG.clear()
    log = LOG
    sgd = functools.partial(torch.optim.SGD, lr=0.01)
    runs = lw.compare_optimizers(_Recorder, (x, y),
                                 {"a": sgd, "b": torch.optim.Adam, "c": sgd},
                                 epochs=3, batch_size=16, progress=False)
    steps = 3 * 4
    assert len(log) == 3 * steps
    per_run = [log[i * steps : (i + 1) * steps] for i in range(3)]
    assert per_run[0] == per_run[1] == per_run[2]
    for e in range(3):  # every epoch visits every sample once
        assert sorted(sum(per_run[0][e * 4 : (e + 1) * 4], [])) == list(range(50))
    a, b, c = (runs.runs[n] for n in "abc")
    assert a.init == b.init == c.init == state_hash(a.checkpoints[0])
    assert a.batch_log == b.batch_log == c.batch_log
    assert all(torch.equal(a.checkpoints[0][k], b.checkpoints[0][k]) for k in a.checkpoints[0])
    # Same optimizer, same start, same batches, same dropout masks: the same weights, bitwise.
    for k in a.checkpoints[-1]:
        assert torch.equal(a.checkpoints[-1][k], c.checkpoints[-1][k])
    assert not torch.equal(a.checkpoints[-1]["net.0.weight"], b.checkpoints[-1]["net.0.weight"])
    # Another seed: another start.
    other = lw.compare_optimizers(_Recorder, (x, y), {"a": sgd}, epochs=1,
                                  batch_size=16, seed=1, progress=False)
    assert other.runs["a"].init != a.init


def test_user_model_and_rng_untouched(digits):
    train, _ = digits
    model = lw.demo.mlp(seed=3).train()
    before = snapshot(model)
    rng = torch.get_rng_state()
    runs = lw.compare_optimizers(model, train, {"sgd": OPTIMIZERS["sgd"]}, epochs=1,
                                 progress=False)
    assert snapshot(model) == before
    assert torch.equal(torch.get_rng_state(), rng)
    assert runs.runs["sgd"].init == state_hash(model.state_dict())


def test_b3_switch_is_continuous_with_a_fresh_optimizer(runs, digits):
    train, test = digits
    k = 4
    sw = runs.switch("adam", "sgd", at_epoch=k)
    assert sw.name == "adam4-sgd2" and runs.runs["adam4-sgd2"] is sw
    adam = runs.runs["adam"]
    assert len(sw.checkpoints) == runs.epochs + 1 and sw.switched == ("adam", k)
    for e in range(k + 1):
        assert all(torch.equal(sw.checkpoints[e][n], adam.checkpoints[e][n])
                   for n in adam.checkpoints[e])
    # Oracle: a fresh SGD on adam's epoch-k weights, over the same batches, by hand.
    model = runs.model("adam", k).train()
    opt = OPTIMIZERS["sgd"](model.parameters())
    x, y = train
    for epoch in range(k, runs.epochs):
        for step, idx in runs.schedule.batches(epoch):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(runs.schedule.step_seed(step))
                loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for n, v in model.state_dict().items():
        assert torch.equal(sw.checkpoints[-1][n], v), n
    first = next(iter(adam.checkpoints[-1]))
    assert not torch.equal(sw.checkpoints[-1][first], adam.checkpoints[-1][first])
    with pytest.raises(ValueError, match="at_epoch"):
        runs.switch("adam", "sgd", at_epoch=runs.epochs)
    with pytest.raises(KeyError, match="No optimizer"):
        runs.switch("adam", "lbfgs", at_epoch=1)
    with pytest.raises(KeyError, match="No run"):
        runs.switch("nadam", "sgd", at_epoch=1)


def test_b4_distance_log(runs):
    log = runs.distance_from_init()
    theta0 = torch.cat([p.detach().double().flatten()
                        for p in runs.initial_model().parameters()])
    for name in OPTIMIZERS:
        entry = log[name]
        assert entry["distance"][0] == 0.0 and entry["epoch"].tolist() == list(range(7))
        final = torch.cat([p.detach().double().flatten() for p in runs[name].parameters()])
        assert entry["distance"][-1] == pytest.approx(float((final - theta0).norm()), rel=1e-9)
        assert entry["norm"][-1] == pytest.approx(float(final.norm()), rel=1e-9)
        assert entry["norm"][0] == pytest.approx(float(theta0.norm()), rel=1e-9)


def test_functional_difference_against_numpy(runs, digits):
    _, (x, y) = digits
    got = runs.functional_difference(names=["sgd", "adam"])[("sgd", "adam")]
    with torch.no_grad():
        pa = torch.softmax(runs["sgd"](x).double(), 1).numpy()
        pb = torch.softmax(runs["adam"](x).double(), 1).numpy()
    yy = y.numpy()
    kl = np.mean(np.sum(pa * np.log(pa / pb), 1) + np.sum(pb * np.log(pb / pa), 1))
    assert got["disagreement"] == pytest.approx(np.mean(pa.argmax(1) != pb.argmax(1)))
    assert got["symmetric_kl"] == pytest.approx(kl, rel=1e-6)
    assert got["ensemble_accuracy"] == pytest.approx(np.mean((pa + pb).argmax(1) == yy))
    assert got["accuracy_a"] == pytest.approx(np.mean(pa.argmax(1) == yy))
    same = runs.functional_difference(names=["sgd", "sgd"])[("sgd", "sgd")]
    assert same["disagreement"] == 0 and same["symmetric_kl"] == pytest.approx(0, abs=1e-12)


def test_b7_basin_size_against_naive_curves(runs, digits):
    train, _ = digits
    sizes = runs.basin_size(directions=3, radii=(0, 1.5, 16), names=["adam"], seed=5)
    r = np.linspace(0, 1.5, 16)
    model = runs["adam"]
    dirs = lw.random_directions(model, 3, seed=5)
    x, y = train
    for j, d in enumerate(dirs):
        loss, _ = naive_eval(model, x, y, [d], r[:, None])
        above = np.flatnonzero(loss > loss[0] + 0.1)
        expect = r[above[0]] if above.size else np.inf
        assert sizes["adam"]["r"][j] == pytest.approx(expect)
    assert sizes["adam"]["median"] == pytest.approx(np.median(sizes["adam"]["r"]))


def test_interpolation_and_figure(runs):
    curves = runs.interpolate("sgd", "adam", x=(-0.5, 1.5, 9))
    assert set(curves) == {"train", "test"}
    ends = curves["train"].loss[[2, 6]]  # alpha = 0 and 1
    x, y = runs.data
    with torch.no_grad():
        direct = [float(F.cross_entropy(runs[n](x), y)) for n in ("sgd", "adam")]
    np.testing.assert_allclose(ends, direct, rtol=1e-5)
    fig = runs.figure(names=["sgd", "adam", "rmsprop"], resolution=4, progress=False)
    kinds = [t.type for t in fig.data]
    assert kinds.count("contourcarpet") == 3 and kinds.count("carpet") == 3
    assert len(fig.layout.annotations) == 3 + 3


def test_bad_input_is_explained(digits):
    train, _ = digits
    with pytest.raises(TypeError, match="optimizers"):
        lw.compare_optimizers(lambda: lw.demo.mlp(), train, {}, progress=False)
    with pytest.raises(TypeError, match="not a torch.optim.Optimizer"):
        lw.compare_optimizers(lambda: lw.demo.mlp(), train, {"x": lambda p: 3},
                              progress=False)
    with pytest.raises(TypeError, match="model_fn"):
        lw.compare_optimizers("mlp", train, OPTIMIZERS, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        lw.compare_optimizers(lambda: lw.demo.mlp(), train, OPTIMIZERS, epochs=0)


def test_diverging_run_stops_with_a_warning(digits):
    train, _ = digits
    with pytest.warns(RuntimeWarning, match="non-finite"):
        runs = lw.compare_optimizers(
            lambda: lw.demo.mlp(seed=None), train,
            {"wild": functools.partial(torch.optim.SGD, lr=1e8),
             "calm": functools.partial(torch.optim.SGD, lr=0.05)},
            epochs=3, progress=False)
    assert runs.runs["wild"].diverged is not None
    assert runs.runs["calm"].diverged is None and len(runs.runs["calm"].checkpoints) == 4
    with pytest.warns(RuntimeWarning, match="wild: the run diverged"):
        sizes = runs.basin_size(directions=2, radii=(0, 0.5, 3))
    assert np.isnan(sizes["wild"]["median"]) and not np.isnan(sizes["calm"]["r"]).any()


# --- edge cases found in review --------------------------------------------------------
SGD = {"sgd": functools.partial(torch.optim.SGD, lr=0.05)}


def test_float64_model_trains_on_float32_data():
    x, y = mlp_data()
    model = reinit(nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 4)), 0).double()
    runs = lw.compare_optimizers(model, (x.float(), y), SGD, epochs=2, test_data=(x, y),
                                 progress=False)
    assert next(runs["sgd"].parameters()).dtype == torch.float64
    assert np.isfinite(runs.runs["sgd"].history["train_loss"][1:]).all()
    assert set(runs.functional_difference(data=(x, y))) == set()  # one run: no pairs


def test_shuffling_loader_is_reproducible_and_leaves_the_rng_alone():
    from torch.utils.data import DataLoader, TensorDataset

    x, y = mlp_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = lw.compare_optimizers(lambda: mlp_dropout(), loader, SGD, epochs=2, progress=False)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = lw.compare_optimizers(lambda: mlp_dropout(), loader, SGD, epochs=2, progress=False)
    assert all(torch.equal(a.runs["sgd"].checkpoints[-1][k], v)
               for k, v in b.runs["sgd"].checkpoints[-1].items())


def test_a_single_leftover_sample_joins_the_last_batch():
    from landscape_widget.experiments.optimizers import Schedule

    schedule = Schedule(201, 50, 1, 0)
    sizes = [idx.numel() for _, idx in schedule.batches(0)]
    assert sizes == [50, 50, 50, 51] and schedule.steps_per_epoch == 4
    assert sorted(torch.cat([i for _, i in schedule.batches(0)]).tolist()) == list(range(201))
    x, y = cnn_data()
    x, y = torch.cat([x, x[:1]]), torch.cat([y, y[:1]])  # n % batch_size == 1
    runs = lw.compare_optimizers(bn_res_cnn, (x, y), SGD, epochs=1, batch_size=x.shape[0] - 1,
                                 progress=False)
    assert len(runs.runs["sgd"].checkpoints) == 2


def test_soft_targets_and_regression():
    x, y = mlp_data()
    soft = F.one_hot(y, 4).float()

    def soft_ce(out, t):
        return -(t * F.log_softmax(out, 1)).sum(1).mean()

    runs = lw.compare_optimizers(lambda: mlp_dropout(), (x, soft), {**SGD, "sgd2": SGD["sgd"]},
                                 epochs=2, test_data=(x, soft), loss_fn=soft_ce, progress=False)
    expect = float((runs["sgd"](x).argmax(1) == y).double().mean())
    assert runs.runs["sgd"].history["test_accuracy"][-1] == pytest.approx(expect)
    diff = runs.functional_difference()[("sgd", "sgd2")]
    assert diff["accuracy_a"] == pytest.approx(expect) and diff["disagreement"] == 0.0
    reg = lw.compare_optimizers(lambda: mlp_dropout(), (x, torch.randn(len(x), 4)),
                                {**SGD, "sgd2": SGD["sgd"]}, epochs=1, loss_fn=F.mse_loss,
                                test_data=(x, torch.randn(len(x), 4)), progress=False)
    assert np.isnan(reg.runs["sgd"].history["test_accuracy"][-1])  # no accuracy, not 0
    with pytest.raises(ValueError, match="class-index"):
        reg.functional_difference(data=(x, torch.randn(len(x), 3)))


def test_basin_radii_that_never_leave_are_inf_not_nan(runs):
    sizes = runs.basin_size(directions=4, radii=(0, 0.01, 3), names=["sgd"])
    assert np.isinf(sizes["sgd"]["r"]).all()
    assert sizes["sgd"]["median"] == np.inf and sizes["sgd"]["iqr"] == (np.inf, np.inf)


def test_switching_and_closure_optimizers_explain_themselves():
    x, y = mlp_data()
    one = lw.compare_optimizers(lambda: mlp_dropout(), (x, y), SGD, epochs=1, progress=False)
    with pytest.raises(ValueError, match="at least 2 epochs"):
        one.switch("sgd", "sgd", at_epoch=1)
    with pytest.raises(TypeError, match="needs a closure"):
        lw.compare_optimizers(lambda: mlp_dropout(), (x, y),
                              {"lbfgs": functools.partial(torch.optim.LBFGS, lr=0.1)},
                              epochs=1, progress=False)


def test_negative_running_variances_are_named_as_the_cause_of_nan():
    m1, m2 = bn_res_cnn(3), bn_res_cnn(4)
    with torch.no_grad():
        for m in m2.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.mul_(5)
    d = lw.interpolation_direction(m1, m2)
    with pytest.warns(RuntimeWarning, match="BatchNorm running variances.*bn='batch'"):
        curve = lw.compute_curve(m1, cnn_data(), direction=d, x=(-1, 2, 7), progress=False)
    assert np.isnan(curve.loss[0]) and np.isfinite(curve.loss[2:5]).all()  # alpha 0, .5, 1
    batch = lw.compute_curve(m1, cnn_data(), direction=d, x=(-1, 2, 7), bn="batch",
                             progress=False)
    assert np.isfinite(batch.loss).all()


def test_models_with_other_layers_or_dtypes_are_refused():
    """Same tensors, other function: points would be computed with one model's layers."""
    x, y = mlp_data()
    relu = reinit(nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4)), 0)
    tanh = reinit(nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 4)), 1)
    with pytest.raises(ValueError, match=r"differ at '1': ReLU\(\) against Tanh\(\)"):
        lw.interpolation_direction(relu, tanh)
    with pytest.raises(ValueError, match="differ at '1'"):
        lw.triangle_surface(relu, relu, tanh, (x, y), progress=False)
    with pytest.raises(ValueError, match="different dtypes"):
        lw.triangle_surface(relu, copy.deepcopy(relu), copy.deepcopy(relu).double(), (x, y),
                            progress=False)
    eps = [nn.Sequential(nn.Linear(10, 4), nn.BatchNorm1d(4, eps=e), nn.Linear(4, 4))
           for e in (1e-5, 1e-3)]
    with pytest.raises(ValueError, match="eps=0.001"):
        lw.interpolation_direction(*eps)


def test_b7_unit_norm_variant_against_naive_curves(runs, digits):
    train, _ = digits
    sizes = runs.basin_size(directions=2, radii=(0, 30, 16), names=["sgd"], seed=2, norm="unit")
    r = np.linspace(0, 30, 16)
    model = runs["sgd"]
    x, y = train
    for j, d in enumerate(lw.random_directions(model, 2, norm=None, seed=2)):
        n = float(torch.sqrt(sum((v.double() ** 2).sum() for v in d.values())))
        loss, _ = naive_eval(model, x, y, [{k: v / n for k, v in d.items()}], r[:, None])
        above = np.flatnonzero(loss > loss[0] + 0.1)
        assert sizes["sgd"]["r"][j] == pytest.approx(r[above[0]] if above.size else np.inf)


def test_test_history_weighs_batches_as_the_loss_does():
    """The logged test loss and accuracy are the full-data values, not means of batch means.

    Targets equal to ``ignore_index`` are spread unevenly over the 1024-sample evaluation
    batches, with class weights, and the model returns a dict: the oracle is the loss and
    the counted accuracy of the whole test set at once, in float64.
    """
    from landscape_widget.experiments.optimizers import _evaluate

    torch.manual_seed(0)
    n, classes = 2500, 4
    x = torch.randn(n, 6)
    y = torch.randint(0, classes, (n,))
    y[:900] = -100  # most ignored targets in the first batch
    y[2100:2200] = -100

    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, classes)

        def forward(self, x):
            return {"logits": self.lin(x), "aux": x.sum()}

    model = DictNet()
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0])
    loss = nn.CrossEntropyLoss(weight=weight, ignore_index=-100)
    loss_fn = lambda out, t: loss(out["logits"], t)  # noqa: E731
    loss_fn.ignore_index = -100  # how a wrapped loss tells the engine what it ignores
    loss_fn.weight = weight
    model.train()
    got_loss, got_acc = _evaluate(model, x, y, loss_fn)
    assert model.training  # flags restored
    with torch.no_grad():
        logits = model.double()(x.double())["logits"]
    keep = y != -100
    expected = F.cross_entropy(logits, y, weight=weight.double(), ignore_index=-100)
    assert got_loss == pytest.approx(float(expected), rel=1e-5)
    acc = float((logits.argmax(1)[keep] == y[keep]).double().mean())
    assert got_acc == pytest.approx(acc, abs=1e-12)
