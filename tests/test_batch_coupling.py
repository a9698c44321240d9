"""Forwards that mix the samples of a batch (core/coupling.py).

A model whose output for a sample depends on the other samples of its batch (``h -
h.mean(0)``, a batch-wide attention) has a loss that depends on how the data are split into
passes. The engine finds it at set-up and holds all data in every pass, as one call of the
model on the data does: the values then equal a float64 oracle over all data in one batch
whatever the plan or memory budget. Every other case of tests/cases.py stays unflagged.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import CASES, REAL_CASES, TASK_CASES, build, engine_options
from snapshots import assert_same_snapshot, snapshot
from torch import nn
from torch.func import functional_call
from widget_cases import Recorder

import landscape_widget as lw
from landscape_widget.core import coupling
from landscape_widget.core.coupling import first_rows_difference
from landscape_widget.core.evaluate import Evaluator
from landscape_widget.widget.protocol import Spec
from landscape_widget.widget.worker import Worker

N = 48
GRID = {"x": (-1.0, 1.0, 3), "y": (-0.5, 0.5, 3)}


class Centred(nn.Module):
    """Features centred over the batch before the head (a batch-wide normalisation)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(0))


class BatchAttention(nn.Module):
    """Each sample attends to every sample of its batch (the batch as one sequence)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(5, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.emb(x).unsqueeze(0)  # (1, N, 8): the batch is the sequence
        return self.head(self.att(h, h, h, need_weights=False)[0].squeeze(0))


class MaskedCentred(Centred):
    """Centred, with two of five classes masked out by a large fill (a padding mask)."""

    fill = -1e9

    def __init__(self):
        super().__init__()
        self.b = nn.Linear(16, 5)

    def forward(self, x):
        mask = torch.tensor([False, False, False, True, True])
        return super().forward(x).masked_fill(mask, self.fill)


class InfMaskedCentred(MaskedCentred):
    fill = float("-inf")


class Noisy(nn.Module):
    """Per-sample noise (not coupling): its draws depend on the batch size anyway."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 3)

    def forward(self, x):
        return self.a(x) + 0.1 * torch.randn(x.shape[0], 3)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)


def _model(cls):
    torch.manual_seed(1)
    return cls().eval()


def _oracle(model, x, y, d1, d2, xs, ys):
    """The float64 loss of one call of a fresh copy of the model on all data, per point."""
    fresh = type(model)().double().eval()
    base = {k: v.detach().double() for k, v in model.state_dict().items()}
    out = np.empty((len(ys), len(xs)))
    for i, b in enumerate(ys):
        for j, a in enumerate(xs):
            p = {k: v + a * d1[k].double() + b * d2[k].double() if k in d1 else v
                 for k, v in base.items()}
            out[i, j] = float(F.cross_entropy(functional_call(fresh, p, (x.double(),)), y))
    return out


# The masked ones were missed: -1e9 set the scale of the outputs' relative difference (the
# coupling's 0.5 read as 5e-10), and -inf made it NaN (the outputs were not compared).
@pytest.mark.parametrize("cls", [Centred, BatchAttention, MaskedCentred, InfMaskedCentred])
@pytest.mark.parametrize("strategy", ["auto", "loop", "vmap"])
def test_a_model_mixing_its_batch_gets_the_one_batch_values_whatever_the_budget(cls, strategy):
    model = _model(cls)
    x, y = _data()
    before = snapshot(model)
    d1, d2 = lw.random_directions(model, 2, seed=3)
    # A budget of a few samples per pass: without the check the passes held a few samples
    # each and the loss was off by 2.5 % (Centred, 5x5 grid, passes of 13 samples).
    opts = {"memory_budget": 4000, **({} if strategy == "auto" else {"strategy": strategy})}
    with pytest.warns(UserWarning, match="depend on the other samples of its batch"):
        s = lw.compute_surface(model, (x, y), directions=(d1, d2), progress=False,
                               evaluator_options=opts, **GRID)
    xs, ys = np.linspace(*GRID["x"]), np.linspace(*GRID["y"])
    np.testing.assert_allclose(s.loss, _oracle(model, x, y, d1, d2, xs, ys), rtol=1e-5)
    assert f"all {N} samples" in s.spec["batch_coupling"]
    assert s.spec["plan"]["batch"] == N
    assert_same_snapshot(before, snapshot(model))


def test_a_batch_size_given_is_kept_and_not_judged():
    model = _model(Centred)
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        s = lw.compute_surface(model, (x, y), progress=False,
                               evaluator_options={"batch_size": 16}, **GRID)
    assert s.spec["batch_coupling"] is None and s.spec["plan"]["batch"] == 16


def test_noise_drawn_per_sample_is_not_taken_for_coupling():
    model = _model(Noisy)
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ev = Evaluator(model, (x, y), lw.random_directions(model, 2, seed=0))
    assert ev.batch_coupling is None


def _cases():
    for c in CASES + REAL_CASES:
        model, x, _, data = build(c)
        yield c["name"], model, data, {"loss_fn": c["loss_fn"], "bn": c["bn"],
                                       **engine_options(c, "auto", x.shape[0])}
    for c in TASK_CASES:
        yield c["name"], c["model"]().eval(), c["data"](), {
            "loss_fn": c["loss_fn"], "output_fn": c.get("output_fn"), "metrics": ("loss",)}


def test_no_case_of_the_suite_is_taken_for_coupling():
    """LSTMs, Transformers, BatchNorm (eval and batch), dropout in train mode, QAT, hooks
    with state, sparse buffers, token models with ignored targets, dict outputs: none mixes
    its batch, and none may be forced into one pass or warned about."""
    seen = []
    for name, model, data, kw in _cases():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own (sparse invariants)
            warnings.filterwarnings("error", message=".*other samples of its batch")
            ev = Evaluator(model, data, lw.random_directions(model, 2, seed=0), **kw)
        assert ev.batch_coupling is None, name
        seen.append(name)
    assert {"lstm", "transformer", "mlp-dropout-train-mode", "cnn-bn-res-batch",
            "tokens-ignore-100", "dict-outputs"} <= set(seen)


def test_the_executor_path_reports_the_coupling_too():
    model = _model(Centred)
    x, y = _data()
    d1, d2 = lw.random_directions(model, 2, seed=3)
    with ThreadPoolExecutor(1) as pool, pytest.warns(UserWarning, match="its batch"):
        s = lw.compute_surface(model, (x, y), directions=(d1, d2), progress=False,
                               executor=pool, evaluator_options={"memory_budget": 4000}, **GRID)
    xs, ys = np.linspace(*GRID["x"]), np.linspace(*GRID["y"])
    np.testing.assert_allclose(s.loss, _oracle(model, x, y, d1, d2, xs, ys), rtol=1e-5)
    assert s.spec["batch_coupling"]


def test_the_widget_says_every_pass_held_all_data():
    model = _model(Centred)
    statuses = []
    worker = Worker(model, _data(), send=Recorder(), tile_points=5, on_status=statuses.append)
    try:
        with pytest.warns(UserWarning, match="its batch"):
            worker.submit("j", Spec(resolution=5, seed=3))
            assert worker.wait(120)
    finally:
        worker.close()
    assert f"all {N} samples in every pass" in statuses[-1]["message"]


def test_rows_are_compared_along_the_samples_dimension_wherever_it_is():
    g = torch.Generator().manual_seed(0)
    seq_first = torch.randn(8, 6, 4, generator=g)  # (T, N, H): an RNN without batch_first
    assert first_rows_difference(seq_first, seq_first[:, :3], 6, 3) == 0.0
    mixed = seq_first - seq_first.mean(1, keepdim=True)
    part = seq_first[:, :3] - seq_first[:, :3].mean(1, keepdim=True)
    assert first_rows_difference(mixed, part, 6, 3) > 0.1
    # Integer outputs count when not equal; a squeezed size-1 batch cannot be compared.
    labels = torch.arange(6)
    assert first_rows_difference(labels, labels[:3] + 1, 6, 3) == 1.0
    assert first_rows_difference(torch.randn(2, 3), torch.randn(3), 2, 1) is None


def test_the_tolerance_is_above_the_rounding_of_another_batch_size():
    """fp32 kernels for 4 and 8 samples round differently; that is not coupling."""
    assert all(t >= 1e-3 for t in coupling.COUPLING_TOLERANCE.values())


class PassThrough(nn.Module):
    """Per sample: ``x - dec(enc(x))``, whose first column passes 1e4 through exactly."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(16, 8), nn.Linear(8, 16)

    def forward(self, x):
        return x - self.dec(self.enc(x))


def test_an_exact_large_pass_through_is_not_taken_for_a_mask():
    """Review 11c: the 1e4 column, equal in both runs, was left out of the scale like a
    mask's fill; the cancelling residuals (1e-3 apart between batch sizes) then read as
    coupling, and every pass was forced to hold all the data."""
    torch.manual_seed(3)
    model, n = PassThrough(), 6
    x = torch.randn(n, 16)
    x[:, 0] = 1e4
    with torch.no_grad():
        a = torch.randn(16, 8)
        a[0] = 0
        x[:, 1:] = (torch.randn(n, 8) @ a.T)[:, 1:]
        model.enc.weight.copy_(torch.linalg.pinv(a))
        model.enc.bias.zero_()
        model.dec.weight.copy_(a)
        model.dec.bias.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ev = Evaluator(model, (x, torch.zeros(n, 16)), lw.random_directions(model, 2, seed=0),
                       loss_fn=F.mse_loss)
    assert ev.batch_coupling is None
