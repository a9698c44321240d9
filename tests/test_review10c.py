"""Review 10c: reusing plans and results across calls, as in a notebook.

Compute a surface, change something about the model, compute again: a value copied from
the earlier result (``reuse=``) must still be the changed model's, checked against the
float64 per-point oracle (tests/oracle.py).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import linspace, naive_eval, naive_surface, surface_coords
from snapshots import assert_same_snapshot, snapshot
from torch import nn
from widget_cases import model_data

import landscape_widget as lw
from landscape_widget.core.errors import ReuseMismatch
from landscape_widget.core.fingerprints import fingerprint
from landscape_widget.core.plans import forget_plans

X, Y = (-1, 1, 5), (-1, 1, 3)


class Flagged(nn.Module):
    """Same repr and state_dict whatever its activation attribute and flag."""

    def __init__(self, act=F.relu, clamp: bool = False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)
        self.act, self.clamp = act, clamp
        self.register_buffer("scale", torch.ones(16), persistent=False)

    def forward(self, x):
        h = self.act(self.fc1(x)) * self.scale
        return self.fc2(h.clamp(max=0.3) if self.clamp else h)


def _data():
    gen = torch.Generator().manual_seed(6)
    return torch.randn(40, 6, generator=gen), torch.randint(0, 3, (40,), generator=gen)


def _surface(model, data, dirs, reuse=None):
    return lw.compute_surface(model, data, directions=dirs, x=X, y=Y, progress=False,
                              reuse=reuse)


def _hook_first(m):
    m.fc1.register_forward_hook(lambda mod, i, out: 2 * out)


def _pre_hook_root(m):
    m.register_forward_pre_hook(lambda mod, i: (i[0] + 1,))


def _flag(m):
    m.clamp = True


def _activation(m):
    m.act = torch.tanh


def _hidden_buffer(m):
    m.scale.fill_(3.0)  # a buffer outside the state_dict


@pytest.mark.parametrize("change", [_hook_first, _pre_hook_root, _flag, _activation,
                                    _hidden_buffer])
def test_reuse_after_the_model_changed_besides_its_weights(change):
    """Same state_dict, other outputs: reuse= copied the old model's values."""
    torch.manual_seed(0)
    model, data = Flagged(), _data()
    dirs = lw.random_directions(model, 2, seed=1)
    old = _surface(model, data, dirs)
    change(model)
    before = snapshot(model)
    want, _ = naive_surface(model, *data, *dirs, linspace(X), linspace(Y))
    try:
        again = _surface(model, data, dirs, reuse=old)
    except ReuseMismatch as err:
        assert "other code, attributes, hooks" in str(err)
    else:
        np.testing.assert_allclose(again.loss, want, rtol=1e-5, atol=0)
    assert_same_snapshot(before, snapshot(model))
    fresh = _surface(model, data, dirs)
    np.testing.assert_allclose(fresh.loss, want, rtol=1e-5, atol=0)


def test_reuse_of_an_unchanged_model_still_copies_every_point():
    torch.manual_seed(0)
    model, data = Flagged(), _data()
    dirs = lw.random_directions(model, 2, seed=1)
    old = _surface(model, data, dirs)
    twin = Flagged()
    twin.load_state_dict(model.state_dict())  # another instance, same code and weights
    again = _surface(twin, data, dirs, reuse=old)
    assert again.spec["reused"] == np.prod(again.loss.shape)
    want, _ = naive_surface(twin, *data, *dirs, linspace(X), linspace(Y))
    np.testing.assert_allclose(again.loss, want, rtol=1e-5, atol=0)


def test_widget_recomputes_after_a_hook_on_its_model():
    """Raising the resolution reused the 5 x 5 points computed before the hook: a 9 x 9
    grid mixing two models (25 stale points, 56 new ones)."""
    model, data = model_data()
    w = lw.LandscapeWidget(model, data, resolution=5)
    try:
        w.wait()
        model[0].register_forward_hook(lambda mod, i, out: 2 * out)
        w.resolution = 9
        s = w.wait()
        dirs = w._worker.ctx.random(w.spec(), 2)  # the widget's directions, drawn again
    finally:
        w.close()
    # The oracle's deep copy of the model keeps the hook.
    xs, ys = np.linspace(-1, 1, 9), np.linspace(-1, 1, 9)
    want, _ = naive_eval(model, *data, dirs, surface_coords(xs, ys))
    np.testing.assert_allclose(s.loss.ravel(), want, rtol=1e-5, atol=0)


class Twin(nn.Module):
    """One repr for every ``mode``: 1 branches on the data (no vmap), 2 draws noise."""

    def __init__(self, mode: int = 0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)
        self.mode = mode

    def forward(self, x):
        h = F.relu(self.fc1(x))
        if self.mode == 1 and h.sum() > 0:
            h = h * 1.0
        if self.mode == 2:
            h = h + 0.01 * torch.randn_like(h)
        return self.fc2(h)


def _twins(mode: int):
    torch.manual_seed(0)
    plain = Twin()
    other = Twin(mode)
    other.load_state_dict(plain.state_dict())
    assert repr(plain) == repr(other)
    return plain, other


def test_a_twin_of_one_repr_does_not_get_the_others_vmap_failure():
    """The plan cache was keyed on the repr: after the twin whose forward vmap cannot run,
    the plain model got its loop plan, with the twin's vmap_error and "the vmap path
    failed on this model" (and lost its vmap speed-up)."""
    plain, branching = _twins(1)
    data = _data()
    dirs = lw.random_directions(plain, 2, seed=1)
    forget_plans()
    with pytest.warns(RuntimeWarning, match="strategy='vmap' is not possible"):
        first = lw.compute_surface(branching, data, directions=dirs, x=X, y=Y,
                                   progress=False, evaluator_options={"strategy": "vmap"})
    assert first.spec["plan"]["vmap_error"]  # the twin's forward cannot run under vmap
    before = snapshot(plain)
    s = lw.compute_surface(plain, data, directions=dirs, x=X, y=Y, progress=False,
                           evaluator_options={"strategy": "vmap"})
    assert s.spec["plan"]["vmap_error"] == "" and s.spec["plan"]["strategy"] == "vmap"
    want, _ = naive_surface(plain, *data, *dirs, linspace(X), linspace(Y))
    np.testing.assert_allclose(s.loss, want, rtol=1e-5, atol=0)
    assert_same_snapshot(before, snapshot(plain))


def test_a_twin_of_one_repr_keeps_its_lanes():
    """Lanes dropped for the twin that draws noise were dropped, reason and all, for the
    plain model of the same repr too."""
    plain, noisy = _twins(2)
    data = _data()
    dirs = lw.random_directions(plain, 2, seed=1)
    forget_plans()
    opts = {"strategy": "loop", "lanes": 2}
    first = lw.compute_surface(noisy, data, directions=dirs, x=X, y=Y, progress=False,
                               evaluator_options=opts)
    assert "lanes dropped" in first.spec["plan"]["reason"]
    s = lw.compute_surface(plain, data, directions=dirs, x=X, y=Y, progress=False,
                           evaluator_options=opts)
    assert s.spec["plan"]["lanes"] == 2 and "lanes dropped" not in s.spec["plan"]["reason"]
    want, _ = naive_surface(plain, *data, *dirs, linspace(X), linspace(Y))
    np.testing.assert_allclose(s.loss, want, rtol=1e-5, atol=0)


def _eigen_residual(model, data, d) -> float:
    """``|H v - (v.Hv / v.v) v| / |H v|`` for the Hessian of the mean cross-entropy in the
    weights (parameters of dim > 1, as the widget's ``ignore="biasbn"``), in float64:
    autograd's double backward on a deep copy (which keeps the model's hooks)."""
    ref = copy.deepcopy(model).double().eval()
    names, params = zip(*ref.named_parameters(), strict=True)
    x, y = data
    grads = torch.autograd.grad(F.cross_entropy(ref(x.double()), y), params, create_graph=True)
    v = [d[k].double() for k in names]
    hv = torch.autograd.grad(grads, params, grad_outputs=v)
    weights = [i for i, p in enumerate(params) if p.dim() > 1]
    hv = torch.cat([hv[i].reshape(-1) for i in weights])
    flat = torch.cat([v[i].reshape(-1) for i in weights])
    lam = flat @ hv / (flat @ flat)
    return float((hv - lam * flat).norm() / hv.norm())


def _hook(model, data):
    model.register_forward_hook(lambda mod, i, out: 3 * out)


def _data_in_place(model, data):
    data[0].mul_(3)


@pytest.mark.parametrize("change", [_hook, _data_in_place])
def test_widget_hessian_directions_follow_its_model_and_data(change):
    """The widget's direction cache was keyed on the state_dict: after a hook scaling the
    logits, or the data changed in place, the "Hessian top-2 eigenvectors" were still the
    old model's (or data's)."""
    model, data = model_data()
    w = lw.LandscapeWidget(model, data, resolution=5, direction="hessian")
    try:
        w.wait()
        change(model, data)
        w.resolution = 7
        s = w.wait()
        dirs = w._worker.directions_for(w.spec())  # the cached set this surface used
    finally:
        w.close()
    assert s.spec["directions"] == fingerprint(
        {f"{i}/{k}": v for i, d in enumerate(dirs) for k, v in d.items()})
    for d in dirs:
        assert _eigen_residual(model, data, d) < 1e-2


def test_reuse_after_a_hook_on_the_loss_module():
    """The loss fingerprint hashed a module's attributes and tensors, not its hooks."""
    torch.manual_seed(0)
    model, data = Flagged(), _data()
    dirs = lw.random_directions(model, 2, seed=1)
    loss = nn.CrossEntropyLoss()
    kw = dict(directions=dirs, x=X, y=Y, progress=False, loss_fn=loss, metrics=("loss",))
    old = lw.compute_surface(model, data, **kw)
    loss.register_forward_hook(lambda mod, i, out: 2 * out)
    want, _ = naive_surface(model, *data, *dirs, linspace(X), linspace(Y), loss_fn=loss)
    try:
        again = lw.compute_surface(model, data, reuse=old, **kw)
    except ReuseMismatch as err:
        assert "loss (same name, other settings or code)" in str(err)
    else:
        np.testing.assert_allclose(again.loss, want, rtol=1e-5, atol=0)
