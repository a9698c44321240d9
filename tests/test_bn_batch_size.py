"""``bn="batch"``: BatchNorm batch statistics come from consecutive batches of
``bn_batch_size`` samples in data order, whatever the engine's plan.

On class-sorted data (as ``ImageFolder`` yields it) the old engine's value at theta moved
with the batch size its timing picked (1.85 / 1.43 / 1.25 in the issue). Here every
strategy, memory budget, tile size and executor gives the float64 per-point loop over the
same consecutive batches.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from cases import bn_res_cnn, class_sorted_cnn_data, gaussian_direction
from oracle import linspace, naive_eval
from snapshots import assert_same_snapshot, snapshot

import landscape_widget as lw
from landscape_widget.core.evaluate import Evaluator
from landscape_widget.core.state import BN_BATCH_SIZE
from landscape_widget.widget.protocol import Spec
from landscape_widget.widget.worker import Worker

X = (-0.5, 0.5, 5)


@pytest.fixture(scope="module")
def setup():
    model = bn_res_cnn(7).eval()
    x, y = class_sorted_cnn_data()
    return model, x, y, gaussian_direction(model, 5, 0.3)


@pytest.mark.parametrize("bn_batch_size", [7, 16, 60])
def test_every_plan_gives_the_oracle(setup, bn_batch_size):
    model, x, y, d = setup
    ref, _ = naive_eval(model, x, y, [d], linspace(X)[:, None], bn="batch",
                        bn_batch_size=bn_batch_size)
    before = snapshot(model)
    variants = [{"strategy": "loop"}, {"strategy": "vmap"}, {},
                {"memory_budget": 1 << 14}, {"memory_budget": 1 << 28, "stem": False}]
    for opts in variants:
        curve = lw.compute_curve(model, (x, y), direction=d, x=X, bn="batch",
                                 bn_batch_size=bn_batch_size, progress=False,
                                 evaluator_options=opts, tile_points=2)
        np.testing.assert_allclose(curve.loss, ref, rtol=1e-5, atol=1e-6, err_msg=str(opts))
        assert curve.spec["bn_batch_size"] == bn_batch_size
        assert curve.spec["plan"]["batch"] == min(bn_batch_size, len(x))
    assert_same_snapshot(before, snapshot(model))


def test_values_differ_between_batch_sizes_on_sorted_data(setup):
    """The quantity is real: on sorted data the batch size changes the loss at theta, so
    a plan-dependent batch would change the answer."""
    model, x, y, d = setup
    values = [lw.compute_curve(model, (x, y), direction=d, x=(0, 0, 1), bn="batch",
                               bn_batch_size=b, progress=False).loss[0] for b in (8, 60)]
    assert abs(values[0] - values[1]) > 1e-2


def test_default_is_documented_and_recorded(setup):
    model, x, y, d = setup
    big_x, big_y = x.repeat(3, 1, 1, 1), y.repeat(3)  # 180 samples > 128
    surf = lw.compute_surface(model, (big_x, big_y), directions=(d, d), x=(0, 0.2, 2),
                              y=(0, 0.2, 2), bn="batch", progress=False)
    assert surf.spec["bn_batch_size"] == BN_BATCH_SIZE == 128
    ref, _ = naive_eval(model, big_x, big_y, [d, d], [(0, 0), (0.2, 0), (0, 0.2), (0.2, 0.2)],
                        bn="batch", bn_batch_size=128)
    np.testing.assert_allclose(surf.loss.ravel(), ref, rtol=1e-5, atol=1e-6)
    eval_curve = lw.compute_curve(model, (x, y), direction=d, x=(0, 0, 1), progress=False)
    assert eval_curve.spec["bn_batch_size"] is None


def test_executor_and_iter_tiles_give_the_same(setup):
    model, x, y, d = setup
    local = lw.compute_curve(model, (x, y), direction=d, x=X, bn="batch", bn_batch_size=16,
                             progress=False)
    with ThreadPoolExecutor(2) as pool:
        remote = lw.compute_curve(model, (x, y), direction=d, x=X, bn="batch",
                                  bn_batch_size=16, progress=False, executor=pool)
    np.testing.assert_allclose(remote.loss, local.loss, rtol=1e-6, atol=1e-7)
    assert remote.spec["bn_batch_size"] == 16
    stream = lw.iter_tiles(model, (x, y), directions=[d], x=X, y=None, bn="batch",
                           evaluator_options={"bn_batch_size": 16})
    list(stream)
    np.testing.assert_allclose(stream.result().loss, local.loss, rtol=1e-6, atol=1e-7)


def test_reuse_needs_the_same_bn_batch_size(setup):
    model, x, y, d = setup
    old = lw.compute_curve(model, (x, y), direction=d, x=(-1, 1, 3), bn="batch",
                           bn_batch_size=8, progress=False)
    with pytest.raises(ValueError, match="bn_batch_size"):
        lw.compute_curve(model, (x, y), direction=d, x=(-1, 1, 5), bn="batch",
                         bn_batch_size=16, progress=False, reuse=old)


def test_widget_worker_uses_bn_batch_size(setup):
    model, x, y, _ = setup
    sent = []
    worker = Worker(model, (x, y), send=lambda m, b: sent.append(m), bn_batch_size=12)
    try:
        worker.submit("a", Spec(mode="1d", resolution=3, bn="batch"))
        assert worker.wait(120)
        res = worker.latest
        assert res.spec["bn_batch_size"] == 12
        ref, _ = naive_eval(model, x, y, res.directions, res.x[:, None], bn="batch",
                            bn_batch_size=12)
        np.testing.assert_allclose(res.loss, ref, rtol=1e-5, atol=1e-6)
    finally:
        worker.close()
    with pytest.raises(ValueError, match="bn_batch_size"):
        Worker(model, (x, y), send=lambda m, b: None, bn_batch_size=0)


@pytest.mark.parametrize(("kw", "match"), [
    ({"bn": "batch", "bn_batch_size": 0}, "int >= 1"),
    ({"bn": "batch", "bn_batch_size": 2.5}, "int >= 1"),
    ({"bn": "batch", "bn_batch_size": True}, "int >= 1"),
    ({"bn": "eval", "bn_batch_size": 16}, "only applies to bn='batch'"),
    ({"bn": "batch", "evaluator_options": {"batch_size": 8}}, "pass bn_batch_size"),
])
def test_bad_bn_batch_size_is_refused(setup, kw, match):
    model, x, y, d = setup
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        lw.compute_curve(model, (x, y), direction=d, x=X, progress=False, **kw)
    assert_same_snapshot(before, snapshot(model))


def test_evaluator_takes_bn_batch_size(setup):
    model, x, y, d = setup
    ev = Evaluator(model, (x, y), [d], bn="batch", bn_batch_size=16)
    ref, _ = naive_eval(model, x, y, [d], [[0.3]], bn="batch", bn_batch_size=16)
    np.testing.assert_allclose(ev.evaluate([[0.3]])["loss"], ref, rtol=1e-5)
    assert ev.describe()["bn_batch_size"] == 16
    assert torch.equal(ev.x, x)


def test_landscape_widget_takes_bn_batch_size(setup):
    from landscape_widget import LandscapeWidget

    model, x, y, _ = setup
    with pytest.raises(ValueError, match="bn_batch_size"):
        LandscapeWidget(model, (x, y), bn_batch_size=-1, autostart=False)
    widget = LandscapeWidget(model, (x, y), bn_batch_size=12, bn="batch", mode="1d",
                             resolution=3, autostart=False)
    try:
        assert widget._worker.bn_batch_size == 12
    finally:
        widget.close()


def test_ignored_targets_spread_unevenly_count_once_each(setup):
    """With ignored targets concentrated in one BatchNorm batch, the loss is the mean over
    every counted target of the data (as with bn="eval"), not the size-weighted mean of the
    batches' mean losses. Oracle: float64, written here, BN in train mode per batch; checked
    against the tests' float64 loop (naive_eval) where no target is ignored."""
    import copy

    import torch.nn.functional as F

    model, x, y0, d = setup
    b = 16
    net = copy.deepcopy(model).double().train()
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
    theta = {k: v.detach().clone() for k, v in net.named_parameters()}

    def oracle(y):
        """(mean over counted targets, size-weighted mean of batch means) per point."""
        counted, starts = y != -100, range(0, len(x), b)
        out = []
        with torch.no_grad():
            for a in linspace(X):
                for k, v in net.named_parameters():
                    v.copy_(theta[k] + a * d[k].double() if k in d else theta[k])
                per = torch.cat([F.cross_entropy(net(x[s:s + b].double()), y[s:s + b],
                                                 reduction="none") for s in starts])
                means = [float(per[s:s + b][counted[s:s + b]].mean()) for s in starts]
                sizes = [min(b, len(x) - s) for s in starts]
                out.append((float(per[counted].mean()), np.dot(means, sizes) / len(x)))
        return np.array(out)

    plain, _ = naive_eval(model, x, y0, [d], linspace(X)[:, None], bn="batch",
                          bn_batch_size=b)
    np.testing.assert_allclose(oracle(y0)[:, 0], plain, rtol=1e-10)
    y = y0.clone()
    y[:12] = -100  # 12 of the first batch's 16 targets ignored, none in the others
    want = oracle(y)
    curve = lw.compute_curve(model, (x, y), direction=d, x=X, bn="batch", bn_batch_size=b,
                             progress=False)
    np.testing.assert_allclose(curve.loss, want[:, 0], rtol=1e-5)
    assert np.max(np.abs(want[:, 1] / want[:, 0] - 1)) > 1e-3  # the other mean: another number
