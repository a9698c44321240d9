"""The engine's set-up runs the user's forward once on the first 8 samples (one probe serves
the checks, the memory budget's activation size and ``samples=``), and once on the first 4
(whether the forward mixes a batch's samples, core/coupling.py), and measures the activation
size exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import bn_res_cnn, cnn_data, lstm_net, mlp, mlp_data, seq_data
from oracle import naive_eval
from torch import fx, nn

import landscape_widget as lw
from landscape_widget.core.evaluate import Evaluator


class Counting(nn.Module):
    """Wraps a model; counts forwards on real tensors in a global (the engine runs a copy)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if not isinstance(x, fx.Proxy):
            CALLS.append(int(x.shape[0]))
        return self.inner(x)


CALLS: list[int] = []


@pytest.mark.parametrize("samples", [None, 40])
def test_set_up_runs_forward_once_on_the_first_samples(samples):
    model, (x, y) = Counting(mlp().eval()), mlp_data()
    d = lw.random_directions(model, 2, seed=0)
    CALLS.clear()
    Evaluator(model, (x, y), d, population=None if samples is None else x.shape[0])
    assert CALLS == [8, 4]


def _leaf_output_bytes(model: nn.Module, x: torch.Tensor) -> float:
    """Oracle: the bytes of every leaf module's tensor outputs, per sample, on a plain copy."""
    total = 0

    def hook(_m, _i, out):
        nonlocal total
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    hs = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return total / x.shape[0]


@pytest.mark.parametrize("build,data", [(mlp, mlp_data), (bn_res_cnn, cnn_data),
                                        (lstm_net, seq_data)], ids=["mlp", "bn_res", "lstm"])
def test_activation_bytes_are_the_leaf_outputs_per_sample(build, data):
    model, (x, y) = build().eval(), data()
    ev = Evaluator(model, (x, y), lw.random_directions(model, 1, seed=0))
    want = _leaf_output_bytes(model, x[:1])
    assert ev.act_bytes == max(int(want), 4 * x[:1].numel(), 64)
    assert ev.describe()["activation_bytes_per_sample"] == ev.act_bytes
    # The probe's outputs are kept only for the stem's check.
    assert (ev._probed is None) is (ev.stem is None)


def test_the_stems_check_takes_the_probes_outputs_and_still_refuses_a_wrong_split():
    """The split model is checked against the whole model's outputs from the set-up's probe
    (no second forward of the whole model); a suffix that does not reproduce them (here
    shifted by 1e-3) is still refused, and the surface is then exact without a stem."""
    model, (x, y) = Counting(mlp().eval()), mlp_data()
    dirs = lw.random_directions(model, 2, seed=0)
    CALLS.clear()
    ev = Evaluator(model, (x, y), dirs, stem=True)
    assert ev.stem is not None and ev._probed is not None
    assert ev._prepare_stem()
    assert CALLS == [8, 4] and ev._probed is None

    bad = Evaluator(model, (x, y), dirs, stem=True, strategy="loop")
    suffix = bad.stem.suffix
    real = suffix.forward
    suffix.forward = lambda h: real(h) + 1e-3
    assert not bad._prepare_stem()
    got = bad.evaluate(torch.tensor([[0.5, -0.25], [0.0, 1.0]]))["loss"]
    want, _ = naive_eval(model, x, y, list(dirs), np.array([[0.5, -0.25], [0.0, 1.0]]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)


def test_large_probe_outputs_are_not_kept_and_the_stem_check_runs_the_model_again(
        monkeypatch):
    """Outputs above PROBE_KEEP_BYTES (a segmentation net's maps) are dropped after the
    set-up; the stem's check then runs the whole model once more, on the probe's samples."""
    from landscape_widget.core import evaluate

    monkeypatch.setattr(evaluate, "PROBE_KEEP_BYTES", 8)  # any output is "large"
    model, (x, y) = Counting(mlp().eval()), mlp_data()
    dirs = lw.random_directions(model, 2, seed=0)
    CALLS.clear()
    ev = Evaluator(model, (x, y), dirs, stem=True)
    assert ev.stem is not None and ev._probed is None
    assert ev._prepare_stem() and CALLS == [8, 4, 8]
