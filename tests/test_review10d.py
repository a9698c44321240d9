"""Review 10d: multi-point optimisation (fit_pattern) with targets, models and state beyond
the classifiers it was written for, and torch's vmap warnings.

Each test checks a property against an independent oracle: a float64 forward of a fresh
deep copy of the user's model per cell (its own unflattening, torch's F.cross_entropy), a
full snapshot of the user's model (tests/snapshots.py), or the error a user must get.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import (
    legacy_weight_norm_mlp,
    mlp6_data,
    multilabel_data,
    parametrized_mlp,
    token_data,
)
from snapshots import assert_same_snapshot, snapshot
from torch import nn

import landscape_widget as lw
from landscape_widget.experiments.plane import cell_losses


def _data(n: int = 24, features: int = 6, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


def fresh_copy_ce(model: nn.Module, flat: torch.Tensor, x, y) -> float:
    """F.cross_entropy of a fresh float64 deep copy of ``model`` whose parameters, in the
    order of ``named_parameters()``, are the flat vector ``flat`` (no BatchNorm here)."""
    net = copy.deepcopy(model).double()
    at = 0
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(flat[at:at + p.numel()].reshape(p.shape))
            at += p.numel()
        out = net(x.double() if x.is_floating_point() else x)
    return float(F.cross_entropy(out, y.double() if y.is_floating_point() else y))


# --- targets MPO's cross-entropy would misread ---------------------------------------------
def _mlp(outputs: int, inputs: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, 12), nn.Tanh(), nn.Linear(12, outputs))


def test_multilabel_targets_are_refused_naming_the_fix_and_probabilities_train_torchs_ce():
    # 0/1 multi-label rows (sums 0..4) passed the [0, 1] check and were trained as
    # unnormalised class probabilities, a loss the task does not have; evaluate() then had
    # no accuracy and scores() failed with a TypeError.
    x, y = multilabel_data()
    model = _mlp(4)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"multi-label.*y\.long\(\)"):
        lw.fit_pattern(model, (x, y), lw.checkerboard(3), steps=1, progress=False)
    soft = y + 0.1
    soft = soft / soft.sum(1, keepdim=True)
    fit = lw.fit_pattern(model, (x, soft), lw.checkerboard(3), steps=2, progress=False)
    with pytest.raises(ValueError, match="multi-label"):
        fit.evaluate((x, y))
    # Probabilities that sum to 1 train torch's cross-entropy of each cell.
    cells = torch.tensor([[0, 0], [1, -1]])
    with torch.no_grad():
        got = cell_losses(fit.layout, fit.plane.cells(cells), x, soft)
        flats = fit.plane.cells(cells).double()
    want = [fresh_copy_ce(model, f, x, soft) for f in flats]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("targets,outputs,match", [
    ("float-indices", 3, r"y\.long\(\)"),  # failed in vmap, advice: strategy='loop'
    ("bool-labels", 3, r"y\.long\(\)"),
    ("one-logit", 1, "at least 2 class scores"),  # CE over one class: 0, nothing trained
    ("out-of-range", 2, r"indices must lie in \[0, 2\)"),
    ("unnormalised", 3, "Normalise them"),
    ("column-indices", 3, r"y\.squeeze\(1\)"),  # failed in vmap, advice: strategy='loop'
])
def test_targets_cross_entropy_would_misread_are_refused_before_any_step(targets, outputs,
                                                                           match):
    x, y = _data(features=10)
    y = {"float-indices": y.clamp(max=1).float(), "bool-labels": F.one_hot(y, 3).bool(),
         "one-logit": y.clamp(max=0), "out-of-range": y,
         "unnormalised": F.one_hot(y, 3).float() * 0.5, "column-indices": y[:, None]}[targets]
    model = _mlp(outputs)
    with pytest.raises(ValueError, match=match):
        lw.fit_pattern(model, (x, y), lw.checkerboard(3), steps=1, progress=False)


class TokenNet(nn.Module):
    """Embedding + per-token linear head, classes at dim 1 (or last): (N, C, T) logits."""

    def __init__(self, classes_last: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(20, 8), nn.Linear(8, 5)
        self.classes_last = classes_last

    def forward(self, tokens):
        out = self.head(torch.tanh(self.emb(tokens)))
        return out if self.classes_last else out.transpose(1, 2)


def test_classes_last_logits_are_refused_naming_the_transpose():
    # torch's own words came from inside the step: "Expected target size [26, 5], got
    # [26, 6]", wrapped in advice to use strategy='loop'.
    x, y = token_data()()
    with pytest.raises(ValueError, match=r"last dimension.*transpose\(1, 2\)"):
        lw.fit_pattern(TokenNet(classes_last=True), (x, y), lw.checkerboard(3), steps=1,
                       progress=False)


def test_ignored_tokens_count_in_no_cells_mean_in_both_paths():
    # The batched path averaged over all tokens, ignored ones (-100, loss 0) included: its
    # cell losses were smaller than F.cross_entropy's (the loop path's) by the share of
    # ignored tokens, and tau clamped another number than the one evaluated.
    x, y = token_data()()
    model = TokenNet()
    fits = {s: lw.fit_pattern(model, (x, y), lw.checkerboard(3), steps=3, progress=False,
                              strategy=s, cells_per_step=4) for s in ("vmap", "loop")}
    for key in ("good_ce", "bad_ce"):
        np.testing.assert_allclose([h[key] for h in fits["vmap"].history],
                                   [h[key] for h in fits["loop"].history], rtol=1e-4)
    fit = fits["vmap"]
    cells = torch.tensor([[0, 0], [-1, 1], [1, 0]])
    with torch.no_grad():
        got = cell_losses(fit.layout, fit.plane.cells(cells), x, y)
        flats = fit.plane.cells(cells).double()
    want = [fresh_copy_ce(model, f, x, y) for f in flats]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)


# --- state a forward writes ---------------------------------------------------------------
class Remembers(nn.Module):
    """A forward that counts its calls in a buffer and an attribute, appends to a list, and
    sets an attribute it reads on the next call: its outputs depend on all of them."""

    def __init__(self, noise: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.register_buffer("calls", torch.zeros(()))
        self.steps, self.seen = 0, []
        self.gen = torch.Generator().manual_seed(5) if noise else None

    def forward(self, x):
        self.calls += 1
        self.steps = self.steps + 1
        self.seen.append(self.steps)
        h = torch.tanh(self.fc1(x))
        if hasattr(self, "prev"):
            h = h + 0.1
        self.prev = True
        if self.gen is not None:
            h = h + 0.3 * torch.randn(h.shape[-1], generator=self.gen)
        return self.fc2(h) * (1 + 0.2 * self.calls) + 0.1 * len(self.seen) + 0.05 * self.steps


@pytest.mark.parametrize("noise", [False, True])
def test_state_a_forward_writes_is_put_back_before_every_pass(noise):
    # The MPO plane ran its forwards on its template without putting anything back: every
    # pass saw the counters, list and generator as the passes before had left them, so the
    # batched and looped paths (one pass per chunk, one per cell) trained different losses,
    # a repeated evaluation of the same cells differed, and evaluate() read a network
    # whose counters had run with training.
    x, y = _data()
    model = Remembers(noise)
    before = snapshot(model)
    strategies = ("loop",) if noise else ("vmap", "loop")  # vmap refuses a generator
    fits = {s: lw.fit_pattern(model, (x, y), lw.checkerboard(3), steps=3, progress=False,
                              strategy=s, cells_per_step=4) for s in strategies}
    fit = fits[strategies[0]]
    if not noise:
        np.testing.assert_allclose([h["good_ce"] for h in fits["vmap"].history],
                                   [h["good_ce"] for h in fits["loop"].history], rtol=1e-4)
    cells = torch.tensor([[0, 0], [1, 1], [-1, 0]])
    with torch.no_grad():
        flats = fit.plane.cells(cells)
        if noise:  # the loop path, one cell per pass (vmap refuses the generator)
            got, again = (torch.stack([F.cross_entropy(fit.layout.forward_one(f, x), y)
                                       for f in flats]) for _ in range(2))
        else:
            got, again = (cell_losses(fit.layout, flats, x, y) for _ in range(2))
    want = [fresh_copy_ce(model, f, x, y) for f in flats.double()]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    assert torch.equal(got, again)
    # evaluate(): the surface engine on a copy of the plane's template, which the training
    # passes must have left as the user's model was.
    ev = fit.evaluate((x, y), batch_size=x.shape[0])
    h, w = fit.shape
    for i, j in [(0, 0), (1, 2), (2, 1)]:
        flat = fit.cell_vector(i, j).double()
        assert ev["loss"][i, j] == pytest.approx(fresh_copy_ce(model, flat, x, y), rel=1e-5)
    assert_same_snapshot(before, snapshot(model))


# --- torch's vmap warnings ------------------------------------------------------------
def _weight_norm_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(6, 8)), nn.Tanh(),
                         nn.Linear(8, 3))


class WarnsItself(nn.Module):
    """A forward that warns about the user's own code."""

    def __init__(self):
        super().__init__()
        self.net = _weight_norm_mlp()

    def forward(self, x):
        warnings.warn("the user's own warning", UserWarning, stacklevel=1)
        return self.net(x)


def _caught(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("what", ["surface", "fit_pattern"])
def test_torchs_vmap_fallback_warning_is_not_shown_but_the_users_own_are(what):
    # weight_norm has no batching rule: every vmap pass of the engine (surfaces, the
    # widget, MPO's batched step) printed torch's "There is a performance drop because we
    # have not yet implemented the batching rule for aten::_weight_norm" in the notebook.
    x, y = _data()
    model = WarnsItself()

    def run():
        if what == "surface":
            dirs = lw.random_directions(model, 2, seed=1)
            lw.compute_surface(model, (x, y), directions=dirs, x=(-1, 1, 3), y=(-1, 1, 3),
                               progress=False, evaluator_options={"strategy": "vmap"})
        else:
            lw.fit_pattern(model, (x, y), lw.checkerboard(3), steps=1, progress=False,
                           strategy="vmap")

    messages = _caught(run)
    assert not [m for m in messages if "performance drop" in m]
    assert "the user's own warning" in messages
    # torch's switch is back on after the engine: the user's own vmap still warns.
    params = {k: v.detach().expand(2, *v.shape) for k, v in model.net.named_parameters()}
    own = _caught(lambda: torch.vmap(
        lambda p: torch.func.functional_call(model.net, p, (x,)))(params))
    assert [m for m in own if "performance drop" in m]


# --- the pattern editor ------------------------------------------------------------------
def test_the_pattern_editor_fits_a_model_vmap_cannot_run():
    # The editor trained with strategy='vmap' only: an LSTM's fit ended in an error telling
    # the user to pass strategy='loop', which the editor's fit message has no field for.
    from cases import lstm_net, seq_data
    from test_widget_patterns import fit_msg, updates
    from widget_cases import FakeFrontEnd

    from landscape_widget.widget.protocol import decode_buffer

    model, (x, y) = lstm_net(), seq_data()
    before = snapshot(model)
    w = lw.LandscapeWidget(model, (x, y), autostart=False, resolution=5)
    try:
        front = FakeFrontEnd(w)
        w._handle_custom_msg(fit_msg(mask=lw.checkerboard(3).astype(int).tolist(), steps=4,
                                     batch_size=16, cells_per_step=3), [])
        fit = w.wait_fit(120)
        assert front.errors() == [] and w.fit_status["state"] == "done" and fit.step == 4
        msg, bufs = updates(front)[-1]
        loss = decode_buffer(bufs[0]).reshape(3, 3)
        for i, j in [(0, 0), (1, 1), (2, 1)]:
            want = fresh_copy_ce(model, fit.cell_vector(i, j).double(), x, y)
            assert loss[i, j] == pytest.approx(want, rel=1e-5)
    finally:
        w.close()
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("strategy", ["loop", "auto"])
def test_a_forward_that_cannot_be_differentiated_is_named_as_such(strategy):
    # stateful_net scales its output by a buffer and then changes it in place: torch itself
    # cannot differentiate it (the oracle below), and the fit failed with torch's words
    # about "version 7; expected version 6" and anomaly detection.
    from cases import mlp6_data, stateful_net

    model, (x, y) = stateful_net(), mlp6_data()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        F.cross_entropy(stateful_net()(x), y).backward()  # a model of its own
    with pytest.raises(RuntimeError, match=r"changes a tensor in place after using it"):
        lw.fit_pattern(model, (x, y), lw.checkerboard(3), steps=2, progress=False,
                       strategy=strategy)


def test_loading_a_fit_onto_a_device_leaves_the_users_model_where_it_was(tmp_path):
    # PatternFit.load(path, model_fn=model, device=...) moved the user's own model there
    # (nn.Module.to moves in place): onto the GPU, or here onto the meta device, where its
    # weights are gone.
    x, y = _data(features=10)
    model = _mlp(3)
    fit = lw.fit_pattern(model, (x, y), lw.checkerboard(3), steps=1, progress=False)
    fit.save(tmp_path / "fit.pt")
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="meta"):  # no weights on the meta device
        lw.PatternFit.load(tmp_path / "fit.pt", model_fn=model, device="meta")
    assert_same_snapshot(before, snapshot(model))
    again = lw.PatternFit.load(tmp_path / "fit.pt", model_fn=model, device="cpu")
    assert torch.equal(again.weights["w1"], fit.weights["w1"])
    assert_same_snapshot(before, snapshot(model))


class OwnParameters(nn.Module):
    """Parameters held directly (no reset_parameters), optionally after a Linear layer."""

    def __init__(self, with_linear: bool):
        super().__init__()
        self.fc = nn.Linear(10, 8) if with_linear else None
        self.w = nn.Parameter(torch.randn(8 if with_linear else 10, 3) * 0.3)

    def forward(self, x):
        return (torch.tanh(self.fc(x)) if self.fc is not None else x) @ self.w


def test_parameters_fit_pattern_cannot_reinitialise_are_named_in_a_warning_and_the_result():
    # From a model, fit_pattern re-initialises layers with reset_parameters(); the others
    # kept the model's values in all three networks (the plane started flat along them)
    # without a word, and a model without any such layer was refused as "model_fn built
    # identical networks ... do not seed inside model_fn", which the user never passed.
    x, y = _data(features=10)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"reset_parameters.*identical.*model_fn="), \
            pytest.warns(UserWarning, match="not re-initialised"):
        lw.fit_pattern(OwnParameters(False), (x, y), lw.checkerboard(3), steps=1,
                       progress=False)
    # Parametrized and legacy weight_norm layers: Linear.reset_parameters() initialises the
    # computed weight, not the originals the fit trains (the bias alone was drawn).
    for model, data in [(OwnParameters(True), (x, y)), (parametrized_mlp(), mlp6_data()),
                        (legacy_weight_norm_mlp(), mlp6_data())]:
        with pytest.warns(UserWarning, match=r"are not re-initialised by any reset_param"):
            fit = lw.fit_pattern(model, data, lw.checkerboard(3), steps=0, progress=False)
        # The oracle: which of the three networks' parameters coincide.
        nets = {k: fit.layout.unflatten(fit.weights[k]) for k in ("w0", "w1", "w2")}
        same = [n for n in nets["w0"] if torch.equal(nets["w0"][n], nets["w1"][n])
                and torch.equal(nets["w0"][n], nets["w2"][n])]
        assert same and fit.config["kept_parameters"] == same
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model_fn draws every parameter: no warning
        fit = lw.fit_pattern(lambda: OwnParameters(True), (x, y),
                             lw.checkerboard(3), steps=0, progress=False, seed=1)
    assert fit.config["kept_parameters"] == []


@pytest.mark.parametrize("call", ["surface", "hessian", "compare_optimizers"])
def test_the_default_loss_refuses_multilabel_rows_and_names_bce(call):
    # The same gap in the engine: with the default loss, 0/1 multi-label targets gave a
    # surface of F.cross_entropy over unnormalised "probabilities" (2.13 at the centre),
    # no task's loss, with only the accuracy dropped.
    x, y = multilabel_data()
    model = _mlp(4)
    before = snapshot(model)
    run = {"surface": lambda data, **kw: lw.compute_curve(model, data, x=(0, 0, 1),
                                                          progress=False, **kw),
           "hessian": lambda data, **kw: lw.hessian_eigenpairs(model, data, k=1, **kw),
           "compare_optimizers": lambda data, **kw: lw.compare_optimizers(
               lambda: _mlp(4), data, {"sgd": lambda p: torch.optim.SGD(p, lr=0.1)},
               epochs=1, progress=False, **kw)}[call]
    with pytest.raises(ValueError, match=r"multi-label rows.*BCEWithLogitsLoss"):
        run((x, y))
    if call == "surface":  # the task's loss, and one-hot rows with the default, go through
        got = run((x, y), loss_fn=nn.BCEWithLogitsLoss(), metrics=("loss",))
        with torch.no_grad():
            want = F.binary_cross_entropy_with_logits(copy.deepcopy(model).double()(
                x.double()), y.double())
        assert got.loss[0] == pytest.approx(float(want), rel=1e-6)
        onehot = F.one_hot(y.argmax(1), 4).float()
        with torch.no_grad():
            want = F.cross_entropy(copy.deepcopy(model).double()(x.double()), onehot.double())
        assert run((x, onehot)).loss[0] == pytest.approx(float(want), rel=1e-6)
    assert_same_snapshot(before, snapshot(model))


def test_one_hot_rows_with_some_all_zero_are_named_as_such():
    # Review 10e: one-hot targets with rows of no class were refused as "0/1 multi-label
    # rows" with the fix y.long(), which does not fit them. F.cross_entropy gives such a
    # row loss 0 while it counts in the mean (the oracle below), so it is still refused,
    # naming what the rows are.
    x, y = multilabel_data()
    onehot = F.one_hot(y.argmax(1), 4).float()
    onehot[::5] = 0
    logits = torch.randn(len(y), 4, dtype=torch.float64)
    full = F.cross_entropy(logits, onehot.double())
    kept = onehot.sum(1) > 0
    assert float(full) == pytest.approx(float(F.cross_entropy(logits[kept], onehot[kept].double()))
                                        * int(kept.sum()) / len(y))
    with pytest.raises(ValueError, match=rf"{int((~kept).sum())} of the one-hot target rows are "
                                         r"all 0 \(no class\).*Leave those samples out"):
        lw.compute_curve(_mlp(4), (x, onehot), x=(0, 0, 1), progress=False)
