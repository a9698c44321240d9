"""Review 10e: the batch-coupling check (core/coupling.py) and the model-code fingerprint
(core/reuse.py) on models their authors did not try.

The check runs the first samples once more, half of them alone. A forward that takes only
some batch sizes must keep working (it did before the check); a half-precision model whose
kernels for another batch size round differently (a split-K GEMM, as cuBLAS picks by batch
size), a padded Transformer on torch's fast path, fixed noise drawn in fork_rng and an
output the default loss does not read must not be taken for a model mixing its samples; a
coupled model whose data do not fit one pass must not be batched silently, and a process
executor's caller must hear of the coupling. A model keeping a log in a global, or next to
a notebook global named like one of its attributes, stays the same model for reuse=.
"""

from __future__ import annotations

import multiprocessing
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from snapshots import assert_same_snapshot, snapshot

# The centred model (spawned workers import it from there) and the one-call oracle.
from test_batch_coupling import Centred, _oracle
from torch import nn

import landscape_widget as lw

N = 32
GRID = {"x": (-1.0, 1.0, 3), "y": (-0.5, 0.5, 3)}


class EightsOnly(nn.Module):
    """A forward that takes batches of a multiple of 8 samples only (groups of 8 rows)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x.view(-1, 8, x.shape[1])))  # (groups, 8, 8): per sample still
        return self.b(h).reshape(-1, 3)


class SplitK(nn.Module):
    """Per sample, but its first layer sums two half products for 8 or more rows (a split-K
    GEMM for larger batches): in bf16 each half is rounded, so rows round otherwise."""

    def __init__(self, cast: bool = False):
        super().__init__()
        self.a, self.b = nn.Linear(64, 32), nn.Linear(32, 3)
        self.cast = cast  # its logits as float32

    def forward(self, x):
        w = self.a.weight
        if x.shape[0] >= 8:
            h = x[:, :32] @ w[:, :32].T + x[:, 32:] @ w[:, 32:].T
        else:
            h = x @ w.T
        out = self.b(torch.tanh(h + self.a.bias))
        return out.float() if self.cast else out


def test_a_forward_taking_only_multiples_of_8_samples_still_works():
    torch.manual_seed(0)
    model = EightsOnly().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)
    before = snapshot(model)
    d1, d2 = lw.random_directions(model, 2, seed=3)
    # The check's 4-sample forward raised the model's own error at set-up (the view),
    # though every batch the engine runs it on (8 probed, 32 in a pass) is a multiple of 8.
    s = lw.compute_surface(model, (x, y), directions=(d1, d2), progress=False,
                           evaluator_options={"strategy": "loop"}, **GRID)
    xs, ys = np.linspace(*GRID["x"]), np.linspace(*GRID["y"])
    np.testing.assert_allclose(s.loss, _oracle(model, x, y, d1, d2, xs, ys), rtol=1e-5)
    assert s.spec["batch_coupling"] is None
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("cast", [False, True])
def test_a_bf16_model_whose_kernels_round_by_batch_size_is_not_taken_for_coupling(cast):
    torch.manual_seed(0)
    model = SplitK(cast).bfloat16().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 64, generator=g), torch.randint(0, 3, (48,), generator=g)
    # The oracle that it does not mix its samples: in float64 the first 4 rows of 8 are
    # the 4 rows run alone (to rounding); in bf16 they differ by about 0.5 % of the largest.
    wide = SplitK().double().eval()
    wide.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    with torch.no_grad():
        xd = x[:8].double()
        torch.testing.assert_close(wide(xd)[:4], wide(xd[:4]), rtol=1e-12, atol=1e-12)
        xb = x[:8].bfloat16()
        assert not torch.equal(model(xb)[:4], model(xb[:4]))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*other samples of its batch")
        s = lw.compute_surface(model, (x, y), progress=False, **GRID)
    assert s.spec["batch_coupling"] is None


class CentredBig(nn.Module):
    """Mixes its batch (h - h.mean(0)); passes of more than 16 samples run out of memory."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 16), nn.Linear(16, 3)

    def forward(self, x):
        if x.shape[0] > 16:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(0))


def test_a_coupled_model_whose_data_do_not_fit_one_pass_is_not_batched_silently():
    torch.manual_seed(1)
    model = CentredBig().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)
    # The oracle that batches of 16 change its loss: one call on all data against the mean
    # of four calls on 16 samples each (a float64 copy without the memory limit).
    a, b = model.a, model.b
    with torch.no_grad():
        def loss(xb, yb):
            h = torch.tanh(F.linear(xb.double(), a.weight.double(), a.bias.double()))
            out = F.linear(h - h.mean(0), b.weight.double(), b.bias.double())
            return float(F.cross_entropy(out, yb))
        whole = loss(x, y)
        split = np.mean([loss(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)])
    assert abs(whole - split) > 1e-4
    # It halved the batch to 16 after the out-of-memory error, while spec["batch_coupling"]
    # said every pass held all 64 samples: the values were those of 16-sample batches.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the coupling's own warning
        with pytest.raises(MemoryError, match="all 64 samples runs out of memory"):
            lw.compute_surface(model, (x, y), progress=False,
                               evaluator_options={"strategy": "loop"}, **GRID)


class Tagger(nn.Module):
    """Per-token classes from a Transformer encoder with a padding mask (token 0 pads)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16, padding_idx=0)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.enc(self.emb(x), src_key_padding_mask=x == 0)
        return self.head(h).transpose(1, 2)  # (N, C, T) for cross_entropy


def test_a_padded_transformer_on_its_fast_path_is_not_taken_for_coupling():
    torch.manual_seed(0)
    model = Tagger().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 20, (32, 10), generator=g)
    for i, k in enumerate(torch.randint(3, 11, (32,), generator=g).tolist()):
        x[i, k:] = 0
    y = torch.randint(0, 3, (32, 10), generator=g).masked_fill(x == 0, -100)
    # The oracle that it does not mix its samples: the first 4 samples' outputs in a batch
    # of 8 are those of the 4 alone, on torch's own (fast, nested-tensor) path. The check
    # ran the 4 under a torch function mode, off that path, where padded tokens are not 0.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's nested-tensor prototype note
        torch.testing.assert_close(model(x[:8])[:4], model(x[:4]), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*other samples of its batch")
        s = lw.compute_surface(model, (x, y), progress=False, **GRID)
    assert s.spec["batch_coupling"] is None


def test_a_process_executor_warns_the_caller_of_the_coupling():
    torch.manual_seed(1)
    model = Centred().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 5, generator=g), torch.randint(0, 3, (48,), generator=g)
    d1, d2 = lw.random_directions(model, 2, seed=3)
    context = multiprocessing.get_context("spawn")
    # The worker's warning went to the worker's stderr: the caller heard nothing.
    with ProcessPoolExecutor(1, mp_context=context) as pool, pytest.warns(
            UserWarning, match="other samples of its batch"):
        s = lw.compute_surface(model, (x, y), directions=(d1, d2), progress=False,
                               executor=pool, evaluator_options={"memory_budget": 4000},
                               **GRID)
    xs, ys = np.linspace(*GRID["x"]), np.linspace(*GRID["y"])
    np.testing.assert_allclose(s.loss, _oracle(model, x, y, d1, d2, xs, ys), rtol=1e-5)
    assert s.spec["batch_coupling"]


class FixedNoise(nn.Module):
    """Fixed noise drawn inside its own fork_rng: 16 draws for 8 samples are not 8 draws
    for 4 samples followed by others (torch's vectorised normal path from 16 values)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = self.a(x)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            h = h + torch.randn(h.shape[0], 2)[:, :1]
        return self.b(h)


def test_noise_drawn_inside_fork_rng_is_not_taken_for_coupling():
    torch.manual_seed(0)
    model = FixedNoise().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 5, generator=g), torch.randint(0, 3, (48,), generator=g)
    with torch.no_grad():  # its first 4 samples' outputs do depend on the batch size
        assert not torch.allclose(model(x[:8])[:4], model(x[:4]), atol=0.1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*other samples of its batch")
        s = lw.compute_surface(model, (x, y), progress=False, **GRID)
    assert s.spec["batch_coupling"] is None


CALLS = 0  # a log the forward below keeps in a global
SCALE = 1.0  # a global the forward below reads: it decides the outputs


class Logged(nn.Module):
    """Counts its calls in a global and reads a global scale; its layer is ``self.head``."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        global CALLS
        CALLS += 1
        return self.head(x) * SCALE


def test_reuse_of_a_model_keeping_a_global_log_and_a_global_of_an_attribute_name():
    global SCALE
    torch.manual_seed(0)
    model = Logged().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 5, generator=g), torch.randint(0, 3, (48,), generator=g)
    d1, d2 = lw.random_directions(model, 2, seed=3)
    kw = {"directions": (d1, d2), "progress": False, "x": (-1.0, 1.0, 3), "y": (-0.5, 0.5, 5)}
    first = lw.compute_surface(model, (x, y), **kw)
    # A notebook global named like an attribute the forward reads (self.head): hashed as
    # one of its globals, it made the same model "a different model" once assigned; and
    # CALLS, which every pass of the engine moved, did too.
    globals()["head"] = first
    try:
        again = lw.compute_surface(model, (x, y), reuse=first, **kw)
    finally:
        del globals()["head"]
    xs, ys = np.linspace(-1, 1, 3), np.linspace(-0.5, 0.5, 5)
    base = {k: v.detach().double() for k, v in model.state_dict().items()}
    oracle = np.array([[float(F.cross_entropy(F.linear(
        x.double(), base["head.weight"] + a * d1["head.weight"].double()
        + b * d2["head.weight"].double(), base["head.bias"] + a * d1["head.bias"].double()
        + b * d2["head.bias"].double()), y)) for a in xs] for b in ys])
    np.testing.assert_allclose(again.loss, oracle, rtol=1e-5)
    # A global it reads still decides: another scale is another model.
    SCALE = 2.0
    try:
        with pytest.raises(lw.ReuseMismatch, match="other code"):
            lw.compute_surface(model, (x, y), reuse=first, **kw)
    finally:
        SCALE = 1.0


class LogsBatchWeights(nn.Module):
    """Per-sample logits, and a weighting of the batch's samples it logs (softmax over them)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 3)

    def forward(self, x):
        logits = self.a(x)
        return {"logits": logits, "weights": logits.logsumexp(1).softmax(0)}


@pytest.mark.parametrize("output_fn", [None, lambda out: out["logits"]])
def test_an_output_the_default_loss_does_not_read_is_not_judged(output_fn):
    torch.manual_seed(0)
    model = LogsBatchWeights().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 5, generator=g), torch.randint(0, 3, (48,), generator=g)
    d1, d2 = lw.random_directions(model, 2, seed=3)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*other samples of its batch")
        s = lw.compute_surface(model, (x, y), directions=(d1, d2), progress=False,
                               output_fn=output_fn, evaluator_options={"memory_budget": 4000},
                               **GRID)
    assert s.spec["batch_coupling"] is None
    # The oracle: cross-entropy of the logits of one float64 call on all data, per point.
    xs, ys = np.linspace(*GRID["x"]), np.linspace(*GRID["y"])
    base = {k: v.detach().double() for k, v in model.state_dict().items()}
    oracle = np.array([[float(F.cross_entropy(F.linear(
        x.double(), base["a.weight"] + a * d1["a.weight"].double()
        + b * d2["a.weight"].double(), base["a.bias"] + a * d1["a.bias"].double()
        + b * d2["a.bias"].double()), y)) for a in xs] for b in ys])
    np.testing.assert_allclose(s.loss, oracle, rtol=1e-5)
