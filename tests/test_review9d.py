"""Review 9d: today's changes (input writes, put-back attributes, ...) with other inputs.

Each test checks a property against an independent oracle: the float64 per-point loop of
tests/oracle.py, a fresh deep copy of the model per point, or a full snapshot of the
user's model and data (tests/snapshots.py).
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from oracle import naive_eval, surface_coords
from snapshots import assert_same_snapshot, snapshot
from test_review9a import ScalesLaterInput, Temperature, twice_against_fresh_copies
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

import landscape_widget as lw


def _data(n: int = 32, features: int = 6, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


class WritesThroughData(nn.Module):
    """Changes its input in place where no version counter sees it."""

    def __init__(self, how: str):
        super().__init__()
        torch.manual_seed(0)
        self.how, self.fc = how, nn.Linear(6, 3)

    def forward(self, x):
        if self.how == "data":
            x.data.mul_(2)
        else:
            x.numpy()[:] *= 2
        return self.fc(x)


@pytest.mark.parametrize("how", ["data", "numpy"])
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_a_write_through_x_data_is_found_by_the_probe(how, strategy):
    # The probe compared version counters only: x.data.mul_(2) and x.numpy() bump none,
    # so every pass doubled the user's data again (off by 278 on a 3x3 grid).
    model, (x, y) = WritesThroughData(how), _data()
    data, before = x.clone(), snapshot(model)
    dirs = lw.random_directions(model, 2, seed=1)
    s = lw.compute_surface(model, (x, y), directions=dirs, x=(-1, 1, 3), y=(-1, 1, 3),
                           progress=False, evaluator_options={"strategy": strategy})
    ref, _ = naive_eval(model, data.clone(), y, list(dirs), surface_coords(s.x, s.y))
    np.testing.assert_allclose(s.loss.ravel(), np.asarray(ref).ravel(), rtol=1e-5)
    assert torch.equal(x, data)
    assert_same_snapshot(before, snapshot(model))


class Carries(nn.Module):
    """Keeps the last call's mean logits in an attribute its first call adds."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        out = self.fc(x)
        if hasattr(self, "prev"):
            out = out + 0.5 * self.prev
        self.prev = out.detach().mean(0)
        return out


@pytest.mark.parametrize("options", [{"strategy": "loop", "stem": False},
                                     {"strategy": "vmap", "stem": False},
                                     {"strategy": "loop", "lanes": 2, "stem": False},
                                     {"strategy": "loop"}])
def test_attributes_a_pass_adds_are_removed_after_it(options):
    # Only attributes present at set-up were put back: the one the probe's pass added
    # stayed, every pass saw the one before (0.027 off a fresh copy's values), a vmap
    # pass left a dead batched tensor (the next pass failed with a shape error) and the
    # stem's torch.fx trace a Proxy ("'NoneType' object has no attribute 'create_node'").
    model, (x, y) = Carries(), _data()
    twice_against_fresh_copies(model, x, y, options)
    assert not hasattr(model, "prev")


def test_a_worker_forgets_the_data_its_forward_changed():
    # The worker's cached evaluator kept its copy of the data, halved by the failing
    # call: the same call again returned a surface of the halved data, silently (the
    # user's own data, pickled, were unchanged).
    model, (x, y) = ScalesLaterInput(), _data()
    x[20, 0] = 20.0
    data = x.clone()
    with ThreadPoolExecutor(1) as pool:
        for _ in range(2):
            with pytest.raises(lw.InputChanged):
                lw.compute_surface(model, (x, y), executor=pool, x=(-1, 1, 3), y=(-1, 1, 3),
                                   progress=False)
    assert torch.equal(x, data)


class CountsCalls(nn.Module):
    """A forward that uses a call counter it keeps, and noise from a generator it holds."""

    def __init__(self, noise: bool):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.calls, self.noise = nn.Linear(6, 3), 0, noise
        self.g = torch.Generator().manual_seed(5)

    def forward(self, x):
        self.calls += 1
        out = torch.tanh(self.fc(x)) * 3 / (1.0 + 0.1 * self.calls)
        if self.noise:
            out = out + torch.randn(out.shape, generator=self.g)
        return out


def _top_eigenvalue_of_fresh_copies(model, x, y, batch: int) -> float:
    # torch's own float64 Hessian of the mean loss over batches of ``batch`` samples, each
    # on a fresh copy of the model (its counter and generator as the user's), at the
    # model's weights: every pass starts from the user's state, as the surfaces' do.
    twin = copy.deepcopy(model).double()
    flat = torch.cat([p.detach().reshape(-1) for p in twin.parameters()])

    def loss(v):
        params, at = {}, 0
        for k, p in twin.named_parameters():
            params[k] = v[at : at + p.numel()].view_as(p)
            at += p.numel()
        parts = [nn.functional.cross_entropy(torch.func.functional_call(
            copy.deepcopy(twin), params, (x[s : s + batch].double(),)).double(),
            y[s : s + batch]) for s in range(0, len(x), batch)]
        return torch.stack(parts).mean()

    return torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))[-1].item()


@pytest.mark.parametrize("noise", [False, True])
def test_the_hessian_puts_back_what_a_forward_changes_in_the_model(noise):
    # The surfaces put back attributes and generators after every pass, the Hessian
    # operator did not: batch by batch, every product differentiated another function (a
    # counter the forward used, a generator's next draws), refused as "Hessian-vector
    # products are not symmetric" with a word on weight_norm.
    model, (x, y) = CountsCalls(noise), _data(64)
    before = snapshot(model)
    want = _top_eigenvalue_of_fresh_copies(model, x, y, 16)
    got = lw.hessian_eigenpairs(model, (x, y), k=1, ignore=None, batch_size=16,
                                progress=False)
    assert got.values[0] == pytest.approx(want, rel=1e-4)
    assert_same_snapshot(before, snapshot(model))


def test_side_and_mined_directions_take_the_weights_dtype_for_the_inputs():
    # Review 9a cast the engine's and the Hessian's inputs to the weights' dtype; the
    # objective of mining and side directions still took the first parameter's (float64):
    # "mat1 and mat2 must have the same dtype" from the float32 layer.
    from landscape_widget.experiments._objective import _Objective

    model, (x, y) = Temperature(), _data(64)
    before = snapshot(model)
    obj = _Objective(model, (x, y), loss_fn=None, bn="eval", ignore=None)
    with torch.no_grad(), obj.session():
        got = float(obj.full_loss({}))
        want = float(nn.functional.cross_entropy(model(x), y))
    assert got == pytest.approx(want, rel=1e-6)
    names = {k: p.dtype for k, p in model.named_parameters()}
    for d in (lw.side_direction(model, (x, y), ignore=None),
              lw.mine_direction(model, (x, y), "w-peak", steps=2, ignore=None, progress=False)):
        assert {k: v.dtype for k, v in d.items()} == names
    assert_same_snapshot(before, snapshot(model))


class _NoLength(Sampler):
    """Visits every index in order; its ``__len__`` says it has no length."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self):
        raise NotImplementedError


def test_a_loader_whose_sampler_has_no_length_is_still_read():
    # The data-size guard asked the sampler for its length and caught TypeError only: a
    # sampler raising NotImplementedError stopped the collection before it began.
    torch.manual_seed(0)
    model, (x, y) = nn.Linear(6, 3), _data(40)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, sampler=_NoLength(40))
    dirs = lw.random_directions(model, 2, seed=1)
    s = lw.compute_surface(model, loader, directions=dirs, x=(-1, 1, 3), y=(-1, 1, 3),
                           progress=False)
    ref, _ = naive_eval(model, x, y, list(dirs), surface_coords(s.x, s.y))
    np.testing.assert_allclose(s.loss.ravel(), np.asarray(ref).ravel(), rtol=1e-5)


class CountsAndSees(nn.Module):
    """An MLP whose forward counts its calls (used), draws noise from its own generator
    and adds the batch size to a float buffer in place."""

    def __init__(self, noise: bool):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        self.calls, self.noise = 0, noise
        self.g = torch.Generator().manual_seed(3)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        self.seen.add_(x.shape[0])
        out = self.b(torch.relu(self.a(x))) / (1 + 0.1 * self.calls)
        if self.noise:
            out = out + torch.randn(out.shape, generator=self.g)
        return out


@pytest.mark.parametrize("noise", [False, True])
def test_the_permutation_check_runs_both_networks_from_the_users_state(noise):
    # The check ran theta, then the permuted twin, on one copy: the counter (and the
    # generator) had moved between them, so the twin was "another function" and the
    # permutation refused as an architecture it cannot follow; and theta's tensors were
    # the user's own, so the buffer written in place was the user's (16 after the call).
    model, x = CountsAndSees(noise), _data(16)[0]
    before = snapshot(model)
    d = lw.permutation_direction(model, check_inputs=x)
    outs = []
    for shift in (0.0, 1.0):  # the oracle: a fresh copy at theta and at theta + d
        fresh = copy.deepcopy(model)
        with torch.no_grad():
            for k, t in list(fresh.named_parameters()) + list(fresh.named_buffers()):
                if k in d:
                    t.add_(shift * d[k])
            outs.append(fresh(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("noise", [False, True])
def test_the_mining_objective_puts_back_what_a_forward_changes(noise):
    # Mining's and side directions' objective ran every forward on one copy: a call
    # counter (or a generator) the forward used made each minibatch another function,
    # and the loss over all data differed from call to call.
    from landscape_widget.experiments._objective import _Objective

    model, (x, y) = CountsCalls(noise), _data(64)
    obj = _Objective(model, (x, y), loss_fn=None, bn="eval", ignore=None)
    with torch.no_grad(), obj.session():
        got = [float(obj.full_loss({}, chunk=16)) for _ in range(2)]
    parts = []  # the oracle: each chunk on a fresh copy of the user's model
    for s in range(0, 64, 16):
        with torch.no_grad():
            parts.append(float(nn.functional.cross_entropy(copy.deepcopy(model)(x[s:s + 16]),
                                                           y[s:s + 16])))
    assert got[0] == got[1] == pytest.approx(float(np.mean(parts)), rel=1e-6)


def test_the_permutation_check_of_a_model_in_training_mode_runs_both_in_eval_mode():
    # The attributes put back between the two calls were taken before eval(): the twin ran
    # with the user's training flags, its dropout drew other units and the permutation
    # was refused as an architecture the check cannot follow.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    model.train()
    x = _data(16)[0]
    before = snapshot(model)
    d = lw.permutation_direction(model, check_inputs=x)
    fresh = copy.deepcopy(model).eval()
    with torch.no_grad():
        want = fresh(x)
        for k, t in fresh.named_parameters():
            t.add_(d[k])
        torch.testing.assert_close(fresh(x), want, rtol=1e-5, atol=1e-5)
    assert model.training
    assert_same_snapshot(before, snapshot(model))


class _F64First(nn.Module):
    """A float64 input layer before float32 layers (review 9d's reproducer A)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.Linear(6, 6).double()
        self.body = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 3))

    def forward(self, x):
        return self.body(self.norm(x).float())


@pytest.mark.parametrize("data_dtype", [torch.float64, torch.float32])
def test_a_float64_input_layer_gets_its_dtype_whatever_the_datas(data_dtype):
    # The inputs were cast to the weights' dtype (float32, most of the elements): the
    # float64 first layer failed ("mat1 and mat2 must have the same dtype"), which float64
    # data passed as they are had computed before. Now dtype mismatches retry the data's
    # own dtype, then the model's other dtypes.
    model = _F64First()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=g, dtype=data_dtype)
    y = torch.randint(0, 3, (32,), generator=g)
    before = snapshot(model)
    dirs = lw.random_directions(model, 2, seed=1)
    s = lw.compute_surface(model, (x, y), directions=dirs, x=(-1, 1, 3), y=(-1, 1, 3),
                           progress=False)
    ref = []
    for a, b in surface_coords(s.x, s.y):
        net = copy.deepcopy(model)
        with torch.no_grad():
            for k, p in net.named_parameters():
                p.add_(a * dirs[0][k] + b * dirs[1][k])
            ref.append(float(nn.functional.cross_entropy(net(x.double()), y)))
    np.testing.assert_allclose(s.loss.ravel(), ref, rtol=1e-5)
    assert_same_snapshot(before, snapshot(model))
