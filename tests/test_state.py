"""Acceptance 3: the user's model is bit-identical after every public call.

Checked: ``state_dict()`` bytes, dtypes, devices and shapes; parameter identity,
``requires_grad`` and ``.grad``; every module's ``training`` flag and BatchNorm
``track_running_stats``; no hooks left behind. Models in eval and in train mode, one
that refuses ``copy.deepcopy`` (so the engine must switch the user's own flags and put
them back), and calls that are abandoned half-way or fail inside ``loss_fn``.
"""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import BNResCNN, bn_res_cnn, cnn_data, mlp_data, mlp_dropout, reinit, tied_data, tied_mlp
from snapshots import assert_same_snapshot, snapshot

import landscape_widget as lw


class NoDeepcopyCNN(BNResCNN):
    """A model that cannot be deep-copied (e.g. it holds a lock or a file handle)."""

    def __deepcopy__(self, memo):
        raise TypeError("this model refuses deepcopy")


def _prepare(model, train: bool):
    model.train(train)
    params = list(model.parameters())
    params[0].requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    params[-1].grad = torch.randn(params[-1].shape, generator=g)
    return model


MODELS = {
    "mlp-dropout-eval": (lambda s: mlp_dropout(s), mlp_data, False),
    "mlp-dropout-train": (lambda s: mlp_dropout(s), mlp_data, True),
    "tied-train": (lambda s: tied_mlp(s), tied_data, True),
    "cnn-bn-eval": (lambda s: bn_res_cnn(s), cnn_data, False),
    "cnn-bn-train": (lambda s: bn_res_cnn(s), cnn_data, True),
    "no-deepcopy-cnn-train": (lambda s: reinit(NoDeepcopyCNN(), s), cnn_data, True),
}


@pytest.fixture(params=list(MODELS), ids=list(MODELS))
def setup(request):
    factory, data, train = MODELS[request.param]
    model = _prepare(factory(3), train)
    other = factory(30)
    return model, data(), other


SMALL_GRID = {"x": (-1, 1, 7), "y": (-1, 1, 5), "progress": False}


def _abandon_tiles(model, data, other):
    stream = lw.iter_tiles(model, data, x=(-1, 1, 9), y=(-1, 1, 9), tile_points=4)
    it = iter(stream)
    next(it)
    next(it)
    del it, stream
    gc.collect()


def _cancel_tiles(model, data, other):
    cancel = threading.Event()
    stream = lw.iter_tiles(model, data, x=(-1, 1, 9), y=None, tile_points=2, cancel=cancel)
    for i, _ in enumerate(stream):
        if i == 1:
            cancel.set()
    assert stream.evaluated < 9
    stream.result()


CALLS = {
    "random_direction": lambda m, d, o: lw.random_direction(m, seed=0),
    "random_direction-unnormalised": lambda m, d, o: lw.random_direction(
        m, norm=None, ignore=None, seed=0),
    "random_directions": lambda m, d, o: lw.random_directions(m, 2, seed=0),
    "interpolation_direction-from": lambda m, d, o: lw.interpolation_direction(m, o),
    "interpolation_direction-to": lambda m, d, o: lw.interpolation_direction(o, m, buffers=False),
    "surface-eval": lambda m, d, o: lw.compute_surface(m, d, **SMALL_GRID),
    "surface-batch": lambda m, d, o: lw.compute_surface(m, d, bn="batch", **SMALL_GRID),
    "surface-vmap": lambda m, d, o: lw.compute_surface(
        m, d, evaluator_options={"strategy": "vmap"}, **SMALL_GRID),
    "surface-loop-batch": lambda m, d, o: lw.compute_surface(
        m, d, bn="batch", evaluator_options={"strategy": "loop"}, **SMALL_GRID),
    "curve-eval": lambda m, d, o: lw.compute_curve(m, d, x=(-1, 1, 9), progress=False),
    "curve-batch": lambda m, d, o: lw.compute_curve(m, d, x=(-1, 1, 9), bn="batch",
                                                    progress=False),
    "curve-interpolation": lambda m, d, o: lw.compute_curve(
        m, d, direction=lw.interpolation_direction(m, o), x=(-0.5, 1.5, 5), progress=False),
    "iter_tiles-abandoned": _abandon_tiles,
    "iter_tiles-cancelled": _cancel_tiles,
    "evaluator": lambda m, d, o: lw.Evaluator(m, d, [lw.random_direction(m, seed=1)]).evaluate(
        np.array([[0.0], [0.5], [1.0]])),
}


@pytest.mark.parametrize("call", list(CALLS), ids=list(CALLS))
def test_model_untouched_by_public_call(setup, call):
    model, data, other = setup
    before = snapshot(model)
    other_before = snapshot(other)
    CALLS[call](model, data, other)
    assert_same_snapshot(before, snapshot(model))
    assert_same_snapshot(other_before, snapshot(other))


def test_model_untouched_while_tiles_are_suspended(setup):
    """Between two tiles (generator suspended) the model is already back to its own state."""
    model, data, _ = setup
    before = snapshot(model)
    it = iter(lw.iter_tiles(model, data, x=(-1, 1, 9), y=(-1, 1, 9), bn="batch", tile_points=8))
    next(it)
    assert_same_snapshot(before, snapshot(model))
    next(it)
    assert_same_snapshot(before, snapshot(model))
    for _ in it:
        pass
    assert_same_snapshot(before, snapshot(model))


class Boom(RuntimeError):
    pass


def _failing_loss(fail_on: int, persistent: bool):
    calls = {"n": 0}

    def loss_fn(outputs, targets):
        calls["n"] += 1
        if calls["n"] == fail_on or (persistent and calls["n"] > fail_on):
            raise Boom(f"loss_fn failed on call {calls['n']}")
        return F.cross_entropy(outputs, targets)

    return loss_fn


@pytest.mark.parametrize("bn", ["eval", "batch"])
@pytest.mark.parametrize("strategy", ["auto", "vmap", "loop"])
def test_exception_in_loss_fn_propagates_and_model_untouched(setup, strategy, bn):
    """A loss_fn that fails from its 5th call on (mid-grid): the error reaches the caller
    and the model is untouched."""
    model, data, _ = setup
    before = snapshot(model)
    opts = {} if strategy == "auto" else {"strategy": strategy}
    with pytest.raises(Boom, match="loss_fn failed"):
        lw.compute_surface(model, data, loss_fn=_failing_loss(5, persistent=True), bn=bn,
                           evaluator_options=opts, **SMALL_GRID)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("strategy", ["auto", "vmap", "loop"])
def test_single_exception_in_loss_fn_is_not_swallowed(strategy):
    """A loss_fn that raises on its 5th call only: that exception must reach the caller.

    The engine must not mistake the user's error for "this strategy cannot be vmapped"
    while it times its candidate plans, and silently carry on.
    """
    model = _prepare(bn_res_cnn(3), train=True)
    data = cnn_data()
    before = snapshot(model)
    opts = {} if strategy == "auto" else {"strategy": strategy}
    with pytest.raises(Boom, match="call 5"):
        lw.compute_surface(model, data, loss_fn=_failing_loss(5, persistent=False),
                           evaluator_options=opts, **SMALL_GRID)
    assert_same_snapshot(before, snapshot(model))
