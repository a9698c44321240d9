"""Review 10f: the experiments' loss weighting, spec["precision"], the pattern editor's notes.

Each test checks a property against an independent oracle: the loss of one call on all
data in float64, torch's own flags, or the fit's own record.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import naive_surface
from snapshots import assert_same_snapshot, snapshot
from torch import nn

import landscape_widget as lw

N, T, V, C = 40, 6, 9, 5


class Tagger(nn.Module):
    """Token logits ``(N, T, C)`` from token ids ``(N, T)``."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.emb, self.head = nn.Embedding(V, 8), nn.Linear(8, C)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)))


def sequence_mean(out, y):
    """A per-sequence-mean token loss: each sequence's mean over its counted tokens."""
    tok = F.cross_entropy(out.transpose(1, 2), y, ignore_index=-100, reduction="none")
    keep = y != -100
    return (tok.sum(1) / keep.sum(1)).mean()


def padded_tokens():
    """Sequences sorted by length (full ones first), padded with -100."""
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, V, (N, T), generator=g)
    y = torch.randint(0, C, (N, T), generator=g)
    lengths = torch.linspace(T, 1, N).round().long()
    for i, n in enumerate(lengths.tolist()):
        y[i, n:] = -100
    return x, y


def whole(model, x, y) -> float:
    """The oracle: one call of the loss on all data, in float64."""
    with torch.no_grad():
        return float(sequence_mean(copy.deepcopy(model).double()(x), y))


def test_mining_objective_weighs_chunks_of_a_per_sequence_mean_by_sequences():
    # full_loss weighed its chunks by counted tokens whatever the loss: a mean of
    # per-sequence means over chunks of long and of short sequences came out wrong.
    from landscape_widget.experiments._objective import _Objective

    model, (x, y) = Tagger(), padded_tokens()
    before = snapshot(model)
    want = whole(model, x, y)
    obj = _Objective(model, (x, y), loss_fn=sequence_mean, bn="eval", ignore=None)
    with torch.no_grad(), obj.session():
        for chunk in (7, 16, N):
            assert float(obj.full_loss({}, chunk=chunk)) == pytest.approx(want, rel=1e-5)
    assert_same_snapshot(before, snapshot(model))


def test_mining_objective_still_weighs_a_token_mean_by_counted_tokens():
    # The other reading: torch's ignore_index mean over all counted tokens.
    from landscape_widget.experiments._objective import _Objective

    model, (x, y) = Tagger(), padded_tokens()

    def token_mean(out, t):
        return F.cross_entropy(out.transpose(1, 2), t, ignore_index=-100)

    with torch.no_grad():
        want = float(token_mean(copy.deepcopy(model).double()(x), y))
    obj = _Objective(model, (x, y), loss_fn=token_mean, bn="eval", ignore=None)
    with torch.no_grad(), obj.session():
        assert float(obj.full_loss({}, chunk=7)) == pytest.approx(want, rel=1e-5)


def test_optimizer_evaluation_weighs_batches_of_a_per_sequence_mean_by_sequences():
    from landscape_widget.experiments.optimizers import _evaluate

    model, (x, y) = Tagger(), padded_tokens()
    got, _ = _evaluate(model, x, y, sequence_mean, batch=7)
    assert got == pytest.approx(whole(model, x, y), rel=1e-5)


XS = np.linspace(-1, 1, 3)


def mlp():
    torch.manual_seed(3)  # the tests' models never depend on the global generator's state
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).eval()


def mlp_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(30, 6, generator=g), torch.randint(0, 3, (30,), generator=g)


@pytest.mark.parametrize(("dtype", "precision"), [(torch.float32, "tf32"),
                                                  (torch.float64, "bf16"),
                                                  (torch.float64, "tf32")])
def test_spec_precision_says_what_was_computed_and_reuse_still_matches(dtype, precision):
    # tf32 on a CPU computes true fp32 and bf16 on a float64 model computes float64, but
    # spec["precision"] said "tf32" / "bf16". It now records fp32 (the exact path), and a
    # second identical call still reuses the points.
    model, (x, y) = mlp().to(dtype), mlp_data()
    d1, d2 = lw.random_directions(model, 2, seed=1)
    kw = dict(directions=(d1, d2), x=(-1, 1, 3), y=(-1, 1, 3), progress=False)
    s = lw.compute_surface(model, (x, y), precision=precision, **kw)
    exact = lw.compute_surface(model, (x, y), precision="fp32", **kw)
    assert s.spec["precision"] == "fp32" and s.spec["precision_error"] is None
    assert "has no effect" in s.spec["plan"]["precision_note"]
    np.testing.assert_array_equal(s.loss, exact.loss)  # the very computation of fp32
    want, _ = naive_surface(model, x, y, d1, d2, XS, XS)
    np.testing.assert_allclose(s.loss, want, rtol=1e-5 if dtype == torch.float32 else 1e-10)
    again = lw.compute_surface(model, (x, y), precision=precision, reuse=s, **kw)
    assert again.spec["reused"] == 9
    np.testing.assert_array_equal(again.loss, s.loss)
    also = lw.compute_surface(model, (x, y), precision="fp32", reuse=s, **kw)
    assert also.spec["reused"] == 9


def test_reuse_reads_a_tf32_result_saved_before_spec_said_fp32():
    model, (x, y) = mlp(), mlp_data()
    kw = dict(directions=tuple(lw.random_directions(model, 2, seed=1)), x=(-1, 1, 3),
              y=(-1, 1, 3), progress=False)
    s = lw.compute_surface(model, (x, y), precision="tf32", **kw)
    s.spec["precision"] = "tf32"  # as recorded before: fp32 values, "no effect" note
    again = lw.compute_surface(model, (x, y), precision="tf32", reuse=s, **kw)
    assert again.spec["reused"] == 9 and again.spec["precision"] == "fp32"


def test_widget_at_tf32_on_a_cpu_notes_it_and_reuses_its_grid():
    from landscape_widget.widget.grid_job import _fell_back, _precision_note

    model, (x, y) = mlp(), mlp_data()
    w = lw.LandscapeWidget(model, (x, y), resolution=5, precision="tf32", seed=3)
    try:
        got = w.wait(120)
        assert got is not None and got.spec["precision"] == "fp32", w.status
        spec = w.spec()
        assert not _fell_back(spec, got)
        assert _precision_note(spec, got) == got.spec["plan"]["precision_note"]
        assert _precision_note(spec, got).startswith("tf32 has no effect on a CPU")
        assert "failed" not in w.status
        w.resolution = 9
        finer = None
        for _ in range(600):  # the debounced job replaces the 5 x 5 grid
            finer = w.wait(120)
            if finer is not None and finer.loss.shape == (9, 9):
                break
            time.sleep(0.05)
        assert finer.spec["reused"] == 25, w.status
        d = lw.random_directions(model, 2, seed=3)
        ref = lw.compute_surface(model, (x, y), directions=d, x=(-1, 1, 9), y=(-1, 1, 9),
                                 progress=False)
        np.testing.assert_allclose(finer.loss, ref.loss, rtol=1e-6)
    finally:
        w.close()


def never_reset(model: nn.Module) -> list[str]:
    """The oracle: parameters that keep their values when every reset_parameters() runs."""
    fresh = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(12345)
        for m in fresh.modules():
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
    old = dict(model.named_parameters())
    return [k for k, v in fresh.named_parameters() if torch.equal(v, old[k])]


@pytest.mark.parametrize("build", ["parametrized_mlp", "mlp"])
def test_pattern_editor_status_carries_the_kept_parameters_note(build):
    # fit_pattern warns of parameters no reset_parameters() re-initialises, but in the
    # fit's thread: the editor's user never saw it. fit_status and the last fit_update
    # (pattern_result, which the front end shows) now carry it.
    import cases

    model = cases.parametrized_mlp() if build == "parametrized_mlp" else mlp()
    kept = never_reset(model)
    assert bool(kept) == (build == "parametrized_mlp")  # the case is what it claims
    w = lw.LandscapeWidget(model, cases.mlp6_data(), autostart=False)
    try:
        w.fit_pattern(lw.checkerboard(4), steps=2)
        w.wait_fit(120)
        for _ in range(200):  # fit_done reaches the traits right after the thread ends
            if w.fit_status.get("state") == "done":
                break
            time.sleep(0.05)
        assert w.fit_status["state"] == "done", w.fit_status
        note = w.fit_status.get("note", "")
        assert note == (w.pattern_result or {}).get("note", "")
        if not kept:
            assert note == ""
            return
        assert note.startswith(f"{len(kept)} parameter tensor(s) of the model (")
        named = note.split("of the model (", 1)[1].split(")", 1)[0].replace(", ...", "").split(", ")
        assert named == kept[:4]
        assert "model_fn=" in note
    finally:
        w.close()
