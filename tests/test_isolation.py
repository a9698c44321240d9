"""Isolation of the user's model beyond ``state_dict`` (issue 14, item 2) and the vmap
fallback after a failure the first trial did not see (item 1)."""

from __future__ import annotations

import io
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import legacy_weight_norm_mlp, mlp6_data, stateful_net
from oracle import naive_eval
from snapshots import assert_same_snapshot, snapshot
from torch import nn

import landscape_widget as lw
from landscape_widget.core.params import IsolationError, evaluation_copy


class Locked(nn.Module):
    """Holds a lock: no copy of it can be made, so it is refused."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 3))
        self.body.guard = threading.Lock()

    def forward(self, x):
        with self.body.guard:
            return self.body(x)


def test_uncopyable_model_is_refused_before_anything_runs():
    model = Locked()
    x, y = mlp6_data()
    before = snapshot(model)
    with pytest.raises(IsolationError, match=r"model\.body\.guard \(lock\).*Fix:"):
        lw.compute_curve(model, (x, y), x=(-1, 1, 3), progress=False)
    assert_same_snapshot(before, snapshot(model))


class RefusesDeepcopy(nn.Sequential):
    def __deepcopy__(self, memo):
        raise TypeError("no deepcopy for this class")


def test_class_refusing_deepcopy_is_copied_part_by_part():
    model = RefusesDeepcopy(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).train()
    copy_ = evaluation_copy(model)
    assert type(copy_) is RefusesDeepcopy and copy_ is not model
    assert copy_[0].weight is not model[0].weight
    assert torch.equal(copy_[0].weight, model[0].weight)
    assert copy_[1].running_mean.data_ptr() != model[1].running_mean.data_ptr()


def test_hook_closures_and_objects_are_copied():
    model = stateful_net()
    copy_ = evaluation_copy(model)
    x, _ = mlp6_data()
    with torch.no_grad():
        copy_(x)
    assert "last" not in model.closure_store and "last" in copy_.closure_store
    assert model.counter.count == 0 and copy_.counter.count == 1
    assert not hasattr(model, "features") and model.seen == []


def test_legacy_weight_norm_leaks_nothing_and_keeps_working():
    """After the call the user's weight is still a plain tensor (no vmap BatchedTensor),
    torch.save works, and after another ordinary forward the engine still runs."""
    model = legacy_weight_norm_mlp()
    x, y = mlp6_data()
    d = lw.random_direction(model, seed=1)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: no batching rule for _weight_norm
        for strategy in ("vmap", "auto"):
            curve = lw.compute_curve(model, (x, y), direction=d, x=(-1, 1, 5), progress=False,
                                     evaluator_options={"strategy": strategy})
    assert_same_snapshot(before, snapshot(model))
    assert type(model[0].weight) is torch.Tensor
    torch.save(model, io.BytesIO())
    model(x)  # an ordinary training-style forward
    again = lw.compute_curve(model, (x, y), direction=d, x=(-1, 1, 5), progress=False)
    np.testing.assert_allclose(again.loss, curve.loss, rtol=1e-6)
    ref, _ = naive_eval(model, x, y, [d], np.linspace(-1, 1, 5)[:, None],
                        template=legacy_weight_norm_mlp())
    np.testing.assert_allclose(curve.loss, ref, rtol=1e-5, atol=1e-6)


class LateBranch(nn.Module):
    """Runs under vmap except on a short batch, where it reads a value (``float``): the
    first trial (a full batch) passes, the last batch of the run fails under vmap."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(6, 3)

    def forward(self, x):
        out = self.l1(x)
        if x.shape[0] < 8:
            out = out + 0.0 * float(out.sum())
        return out


def test_vmap_failing_mid_run_falls_back_to_the_loop():
    torch.manual_seed(0)
    model = LateBranch().eval()
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    d = lw.random_direction(model, seed=2)
    with pytest.warns(RuntimeWarning, match="one at a time"):
        curve = lw.compute_curve(model, (x, y), direction=d, x=(-1, 1, 9), progress=False,
                                 evaluator_options={"strategy": "vmap", "batch_size": 16})
    assert curve.spec["plan"]["strategy"] == "loop" and curve.spec["plan"]["vmap_error"]
    ref, _ = naive_eval(model, x, y, [d], np.linspace(-1, 1, 9)[:, None])
    np.testing.assert_allclose(curve.loss, ref, rtol=1e-5, atol=1e-6)


def test_user_exception_under_vmap_is_not_taken_for_a_vmap_failure():
    class MyError(Exception):
        pass

    calls = {"n": 0}

    def loss_once(outputs, targets):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MyError("bad batch")
        return F.cross_entropy(outputs, targets)

    model = nn.Linear(6, 3)
    x, y = mlp6_data()
    with pytest.raises(MyError):
        lw.compute_curve(model, (x, y), x=(-1, 1, 9), loss_fn=loss_once, progress=False,
                         evaluator_options={"strategy": "vmap"})


def test_forward_writing_into_a_parameter_is_refused():
    """A forward that moves a parameter the directions leave alone (the bias, with
    ``ignore="biasbn"``): the point's value would depend on the order, so it is refused."""

    class Clips(nn.Linear):
        def forward(self, x):
            with torch.no_grad():
                self.bias.add_(0.1)
            return super().forward(x)

    model = Clips(6, 3)
    x, y = mlp6_data()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="writes into its parameter 'bias' in place"):
        lw.compute_curve(model, (x, y), x=(-1, 1, 3), progress=False,
                         evaluator_options={"strategy": "loop"})
    assert_same_snapshot(before, snapshot(model))
