"""Review 4 findings on 5cda2f8 (XXH3 fingerprints, legacy BLAKE2b ones recognised by
``reuse=``) and e93a88d (one set-up forward that also measures ``act_bytes``), and
models nobody had tested (GRU on packed sequences, mobilenet_v3_small, a tiny ViT, dict
outputs, multi-output regression, a tied-embedding language-model head).

Oracles: the float64 per-point loop (tests/oracle.py) and planted values of a result
saved with the older fingerprints (they come back only if it is reused).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from oracle import naive_values, surface_coords
from snapshots import assert_same_snapshot, snapshot
from torch import nn

import landscape_widget as lw
from landscape_widget.core.fingerprints import legacy_fingerprint


def _small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    g = torch.Generator().manual_seed(1)
    return model, (torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g))


def _data_fn():
    return _small()[1]


def _as_saved_before_xxh3(result, model, dirs, data) -> lw.Surface:
    """``result`` with the 24-digit BLAKE2b fingerprints of a result saved before 2026-12
    and its loss planted at -7 (which comes back only if it is reused)."""
    x, y = data
    spec = {**result.spec, "model": legacy_fingerprint(dict(model.state_dict())),
            "directions": legacy_fingerprint({f"{i}/{k}": v for i, d in enumerate(dirs)
                                              for k, v in d.items()}),
            "data": legacy_fingerprint({"x": x, "y": y})}
    return lw.Surface(result.x, result.y, np.full_like(result.loss, -7.0), result.accuracy,
                      spec, result.directions)


@pytest.mark.parametrize("how", ["tensors", "data_fn"])
def test_r1_an_executor_reuses_a_result_saved_with_the_older_fingerprints(how):
    """R1: grid_job recomputed the legacy data fingerprint from ``runner.x``, which an
    ExecutorRunner does not have (its data is on the workers; a ``data_fn``'s never
    leaves them): every older result was refused as 'a different data' with an executor,
    while the same call without one reused it."""
    model, data = _small()
    dirs = tuple(lw.random_directions(model, 2, seed=3))
    kw = {"directions": dirs, "x": (-1, 1, 3), "y": (-1, 1, 3), "progress": False}
    old = _as_saved_before_xxh3(lw.compute_surface(model, data, **kw), model, dirs, data)
    with ThreadPoolExecutor(2) as ex:
        got = lw.compute_surface(model, data if how == "tensors" else _data_fn, **kw,
                                 reuse=old, executor=ex)
    assert got.spec["reused"] == 9 and np.all(got.loss == -7.0)


# --- outputs other than a Tensor, dict or plain tuple --------------------------------------
@dataclasses.dataclass
class _Output:
    """A ModelOutput-like dataclass that is not a Mapping (attributes only)."""

    logits: torch.Tensor
    aux: torch.Tensor | None = None


_Pair = collections.namedtuple("_Pair", "logits aux")


class _Structured(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.body = nn.Sequential(nn.Linear(6, 12), nn.GELU())
        self.head, self.aux = nn.Linear(12, 3), nn.Linear(12, 2)

    def forward(self, x):
        h = self.body(x)
        make = _Output if self.kind == "dataclass" else _Pair
        return make(self.head(h), self.aux(h))


def _logits_ce(out, y):
    return F.cross_entropy(out.logits, y)


@pytest.mark.parametrize("kind", ["namedtuple", "dataclass"])
def test_r2_a_user_loss_on_namedtuple_or_dataclass_outputs(kind):
    """R2: check_reduction slices the probe's outputs to check the loss is a batch mean;
    slice_outputs rebuilt a namedtuple as ``type(out)(generator)`` (TypeError: missing
    argument 'aux') and left a dataclass unsliced, so the loss saw 8 outputs for 4 targets
    (ValueError: 'Expected input batch_size (8) to match target batch_size (4)'). Both
    outputs work with the default loss (``.logits``); a user loss must work too."""
    torch.manual_seed(0)
    model = _Structured(kind).eval()
    (x, y) = data = _small()[1]
    dirs = lw.random_directions(model, 2, seed=1)
    want = naive_values(model, x, y, dirs, surface_coords(*(np.linspace(-0.5, 0.5, 3),) * 2),
                        loss_fn=_logits_ce, metrics={})["loss"].reshape(3, 3)
    for strategy in ("loop", "vmap"):
        got = lw.compute_surface(model, data, directions=dirs, x=(-0.5, 0.5, 3),
                                 y=(-0.5, 0.5, 3), loss_fn=_logits_ce, progress=False,
                                 evaluator_options={"strategy": strategy})
        np.testing.assert_allclose(got.loss, want, rtol=1e-5)


# --- a user loss or metric that changes the outputs in place -------------------------------
_PRIOR = torch.log(torch.tensor([0.2, 0.3, 0.5]))


def _adjusted_in_place(out, y):
    """Logit adjustment written in place (``+=``): the engine then reads changed outputs."""
    out += _PRIOR
    return F.cross_entropy(out, y)


def _shift_in_place(out, y):
    out.add_(1.0)
    return (out.argmax(-1) == y).double()


@pytest.mark.parametrize("where", ["loss_fn", "metric"])
@pytest.mark.parametrize("samples", [None, 20])
def test_r3_outputs_changed_in_place_get_a_clear_error(where, samples):
    """R3: the set-up calls the loss several times on one probe output (check_reduction;
    since e93a88d also the samples= check, on the same object), and every point's
    accuracy, metrics and loss_se read the outputs the loss just used. A loss that changes
    them in place was refused as 'loss_fn is not a mean over samples' (the wrong cause and
    fix); a metric doing so silently changed later metrics. Now the error says so."""
    model, data = _small()
    kw = {"loss_fn": _adjusted_in_place} if where == "loss_fn" else {
        "metrics": {"loss": None, "hits": _shift_in_place, "accuracy": None}}
    with pytest.raises(ValueError, match=r"changed the model's outputs .* in place.*out of place"):
        lw.compute_surface(model, data, x=(-1, 1, 3), y=(-1, 1, 3), samples=samples,
                           progress=False, **kw)


def _caching_ce(out, y):
    out["ce"] = F.cross_entropy(out["logits"], y)  # adds an entry: changes nothing read
    return out["ce"]


def test_r3_a_loss_that_only_adds_an_entry_to_dict_outputs_is_accepted():
    model = _DictAux().eval()
    x, y = _small()[1]
    got = lw.compute_curve(model, (x, y), x=(-1, 1, 3), loss_fn=_caching_ce, progress=False)
    want = lw.compute_curve(model, (x, y), x=(-1, 1, 3), output_fn=lambda out: out["logits"],
                            progress=False)
    np.testing.assert_allclose(got.loss, want.loss, rtol=1e-6)


# --- regression targets with the default loss ----------------------------------------------
def test_r4_real_valued_targets_with_the_default_loss_are_refused():
    """R4: without loss_fn the loss is cross-entropy, which torch also accepts with float
    targets shaped like the outputs (class probabilities). A 3-output regression (targets
    N(0, 1)) forgetting loss_fn=MSELoss() got a surface of -sum(y * log_softmax(out)), a
    number with no meaning (negative 'probabilities'), with only accuracy dropped as
    'undefined for regression targets'. With MSELoss it agrees with the float64 loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.SiLU(), nn.Linear(12, 3)).eval()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(18, 5, generator=g), torch.randn(18, 3, generator=g)
    kw = {"x": (-0.5, 0.5, 3), "y": (-0.5, 0.5, 3), "progress": False}
    with pytest.raises(ValueError, match=r"real-valued.*loss_fn=torch\.nn\.MSELoss\(\)"):
        lw.compute_surface(model, (x, y), **kw)
    dirs = lw.random_directions(model, 2, seed=1)
    got = lw.compute_surface(model, (x, y), directions=dirs, loss_fn=nn.MSELoss(), **kw)
    want = naive_values(model, x, y, dirs, surface_coords(*(np.linspace(-0.5, 0.5, 3),) * 2),
                        loss_fn=F.mse_loss, metrics={})["loss"].reshape(3, 3)
    np.testing.assert_allclose(got.loss, want, rtol=1e-5)
    # Class probabilities (soft targets) stay accepted.
    soft = lw.compute_surface(model, (x, y.softmax(-1)), **kw)
    assert np.all(np.isfinite(soft.loss))


def test_r4_curvature_mining_and_optimizer_runs_refuse_real_valued_targets_too():
    """R4, elsewhere: the Hessian operator, mining and optimizer runs also default to
    cross-entropy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.SiLU(), nn.Linear(12, 3)).eval()
    x, y = torch.randn(18, 5), torch.randn(18, 3)
    d = lw.random_direction(model, seed=1)
    with pytest.raises(ValueError, match=r"real-valued.*loss_fn=torch\.nn\.MSELoss\(\)"):
        lw.rayleigh_quotient(model, (x, y), d)
    assert np.isfinite(lw.rayleigh_quotient(model, (x, y), d, loss_fn=F.mse_loss))
    # Mining and optimizer runs default to cross-entropy as well (they would train on it).
    with pytest.raises(ValueError, match=r"real-valued.*MSELoss"):
        lw.mine_direction(model, (x, y), steps=2)
    with pytest.raises(ValueError, match=r"real-valued.*MSELoss"):
        lw.compare_optimizers(lambda: copy.deepcopy(model), (x, y),
                              {"sgd": functools.partial(torch.optim.SGD, lr=0.1)}, epochs=1,
                              progress=False)


# --- samples= with a loss of one's own on dict outputs -------------------------------------
def _dict_ce(out, y, reduction="mean"):
    return F.cross_entropy(out["logits"], y, reduction=reduction)


def test_r6_samples_with_a_users_loss_that_takes_reduction():
    """R6: samples= needs per-sample losses; a loss of the user's own with a reduction=
    keyword was refused ("this loss_fn cannot give them"), although functools.partial of
    the same function was accepted, and the fix named (a torch loss module) cannot take
    a model's dict outputs. Now the function is accepted (its per-sample mean is checked
    as for any loss), and the message for dict outputs names output_fn= as well."""
    model = _DictAux().eval()
    data = _small()[1]
    kw = {"x": (-1, 1, 3), "y": (-1, 1, 3), "samples": 20, "progress": False}
    got = lw.compute_surface(model, data, loss_fn=_dict_ce, **kw)
    want = lw.compute_surface(model, data, output_fn=lambda out: out["logits"], **kw)
    np.testing.assert_allclose(got.loss, want.loss, rtol=1e-6)
    np.testing.assert_allclose(got.loss_se, want.loss_se, rtol=1e-6)
    with pytest.raises(ValueError, match=r"reduction='none'.*output_fn="):
        lw.compute_surface(model, data, loss_fn=lambda out, y: _dict_ce(out, y), **kw)


# --- a state_dict holding more than tensors ------------------------------------------------
class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(6, 3)

    def forward(self, x):
        return self.l(x)


class _WithExtraState(_Linear):
    """A module with extra state (``get_extra_state``): its state_dict holds a dict."""

    def __init__(self, version: int = 2):
        super().__init__()
        self.config = {"version": version, "scale": [1.0, 2.0]}

    def get_extra_state(self):
        return self.config

    def set_extra_state(self, state):
        self.config = state


def test_r5_a_state_dict_with_extra_state_is_fingerprinted():
    """R5: the model fingerprint hashed every state_dict entry as a tensor, so a model with
    extra state (torch's get_extra_state, any picklable object) failed every call with
    "AttributeError: 'dict' object has no attribute 'shape'" from the hash thread. Now
    other objects are hashed by their contents: the surface is the float64 loop's (on a
    plain copy), reuse works for the same state and is refused for another."""
    torch.manual_seed(0)
    model = _WithExtraState().eval()
    before = snapshot(model)  # extra state included (tests/snapshots.py)
    plain = _Linear().eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "extra" not in k})
    data = _small()[1]
    dirs = lw.random_directions(model, 2, seed=1)
    kw = {"directions": dirs, "x": (-0.5, 0.5, 3), "y": (-0.5, 0.5, 3), "progress": False}
    got = lw.compute_surface(model, data, **kw)
    want = naive_values(plain, *data, dirs, surface_coords(*(np.linspace(-0.5, 0.5, 3),) * 2),
                        loss_fn=F.cross_entropy, metrics={})["loss"].reshape(3, 3)
    np.testing.assert_allclose(got.loss, want, rtol=1e-5)
    assert lw.compute_surface(model, data, **kw, reuse=got).spec["reused"] == 9
    assert_same_snapshot(before, snapshot(model))
    other = _WithExtraState(version=3).eval()
    other.load_state_dict(model.state_dict() | {"_extra_state": other.config})
    with pytest.raises(ValueError, match="different model"):
        lw.compute_surface(other, data, **kw, reuse=got)


# --- models nobody had tested: they agree with the float64 loop (no bug found) -------------
class _PackedGRU(nn.Module):
    """A GRU over zero-padded sequences, packed by their lengths (vmap cannot batch it)."""

    def __init__(self):
        super().__init__()
        self.gru, self.head = nn.GRU(4, 8, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        lengths = (x.abs().sum(-1) != 0).sum(1).clamp(min=1)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        return self.head(self.gru(packed)[1][-1])


class _TinyViT(nn.Module):
    """Patch convolution, cls token, position embedding, nn.TransformerEncoder (dropout)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls = nn.Parameter(0.1 * torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.1 * torch.randn(1, 5, d))
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=32, dropout=0.1,
                                           batch_first=True)
        self.enc, self.head = nn.TransformerEncoder(layer, 2), nn.Linear(d, 5)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        return self.head(self.enc(t)[:, 0])


class _TiedLM(nn.Module):
    """A language model whose output layer is its input embedding (tied weights)."""

    def __init__(self, vocab: int = 11, d: int = 8):
        super().__init__()
        self.emb, self.rnn = nn.Embedding(vocab, d), nn.GRU(d, d, batch_first=True)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, tokens):
        return self.lm_head(self.rnn(self.emb(tokens))[0])


class _DictAux(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(6, 12), nn.Linear(12, 3), nn.Linear(12, 2)

    def forward(self, x):
        h = F.gelu(self.body(x))
        return {"logits": self.head(h), "aux": self.aux(h)}


def _token_ce(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _packed_data():
    g = torch.Generator().manual_seed(1)
    x, lengths = torch.randn(12, 6, 4, generator=g), torch.randint(1, 7, (12,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        x[i, n:] = 0
    return x, torch.randint(0, 3, (12,), generator=g)


def _mobilenet():
    from cases import reinit  # torchvision's init gives logits ~1e-10: a flat loss
    return reinit(torchvision.models.mobilenet_v3_small(num_classes=10), 7, gain=1.5)


def _tokens():
    t = torch.randint(0, 11, (10, 7), generator=torch.Generator().manual_seed(6))
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def _images(n, size, classes, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,),
                                                                     generator=g)


# (name, model, data, loss_fn, output_fn, half-width of the grid). mobilenet_v3_small
# (SE blocks, hardswish, depthwise convolutions) at +-0.1: at +-0.5 its loss reaches ~700
# and a plain float32 loop itself is 2e-5 off the float64 one.
UNTESTED = [
    ("packed-gru", _PackedGRU, _packed_data, None, None, 0.5),
    ("mobilenet-v3-small", _mobilenet, lambda: _images(6, 32, 10, 2), None, None, 0.1),
    ("tiny-vit", _TinyViT, lambda: _images(10, 8, 5, 3), None, None, 0.5),
    ("tied-embedding-lm", _TiedLM, _tokens, _token_ce, None, 0.5),
    ("dict-output-fn", _DictAux, lambda: _small()[1], None, lambda out: out["logits"], 0.5),
]


@pytest.mark.parametrize("case", UNTESTED, ids=[c[0] for c in UNTESTED])
def test_untested_models_agree_with_the_float64_loop(case):
    _, make, data, loss_fn, output_fn, r = case
    torch.manual_seed(0)
    model = make().train()  # the engine evaluates in eval mode whatever the user's flags
    x, y = data()
    dirs = lw.random_directions(model, 2, seed=1)
    axis = np.linspace(-r, r, 3)
    oracle_loss = loss_fn or (lambda out, t: F.cross_entropy(
        output_fn(out) if output_fn else out, t))
    # naive_values loads every state_dict name: a tied tensor must move under each of them.
    first: dict[int, str] = {}
    tied = {name: first.setdefault(id(p), name)
            for name, p in model.named_parameters(remove_duplicate=False)}
    moved = [{**d, **{k: d[v] for k, v in tied.items() if v in d}} for d in dirs]
    want = naive_values(copy.deepcopy(model).eval(), x, y, moved, surface_coords(axis, axis),
                        loss_fn=oracle_loss, metrics={})["loss"].reshape(3, 3)
    before = snapshot(model)
    for strategy in ("auto", "loop", "vmap"):
        got = lw.compute_surface(model, (x, y), directions=dirs, x=(-r, r, 3), y=(-r, r, 3),
                                 loss_fn=loss_fn, output_fn=output_fn, progress=False,
                                 evaluator_options={"strategy": strategy})
        np.testing.assert_allclose(got.loss, want, rtol=1e-5, err_msg=strategy)
        assert_same_snapshot(before, snapshot(model))


def test_r7_a_model_on_the_meta_device_gets_a_clear_error():
    """R7: a model whose weights were never loaded (built on the meta device, as
    accelerate's init_empty_weights does) failed deep in the direction check with
    "Tensor.item() cannot be called on meta tensors"."""
    model = nn.Sequential(nn.Linear(6, 3)).to("meta")
    with pytest.raises(ValueError, match=r"meta device.*load_state_dict"):
        lw.compute_surface(model, _small()[1], x=(-1, 1, 3), y=(-1, 1, 3), progress=False)


def test_r4_fit_pattern_refuses_real_valued_targets_with_its_own_fix():
    """R4 in MPO (noticed by review 4): fit_pattern's loss is cross-entropy by design and has
    no loss_fn=, so regression targets are refused with a fix that fits it."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 8, generator=g), torch.randn(40, 3, generator=g)
    with pytest.raises(ValueError, match=r"real-valued.*MPO.*y\.long\(\)") as err:
        lw.fit_pattern(lambda: nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)),
                       (x, y), lw.checkerboard(2), steps=1, progress=False)
    assert "loss_fn" not in str(err.value)
