"""Multi-point optimisation: PAPERS.md (c1)-(c4), the batched step, evaluation, state, files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import bn_res_cnn, cnn_data, mlp, mlp_data, tied_data, tied_mlp

import landscape_widget as lw
from landscape_widget.experiments.plane import cell_losses


def naive_ternary(binary: np.ndarray) -> np.ndarray:
    """The rule of PAPERS (c) step 1, cell by cell (independent of the vectorised one)."""
    h, w = binary.shape
    out = np.zeros((h, w), np.int8)
    for i in range(h):
        for j in range(w):
            nb = [binary[a, b] for a in range(max(0, i - 1), min(h, i + 2))
                  for b in range(max(0, j - 1), min(w, j + 2))]
            if binary[i, j] == 0:
                out[i, j] = 0 if sum(nb) == 0 else -1
            else:
                out[i, j] = 0 if all(nb) else 1
    return out


# --- (c1) the ternary mask -------------------------------------------------------------
def test_c1_checkerboard_counts():
    m = lw.ternary_mask(lw.checkerboard(8))
    assert m.dtype == np.int8
    assert [(m == 1).sum(), (m == -1).sum(), (m == 0).sum()] == [32, 32, 0]


def test_c1_centred_block():
    b = np.zeros((9, 9), np.uint8)
    b[2:7, 2:7] = 1
    m = lw.ternary_mask(b)
    assert [(m == 1).sum(), (m == -1).sum(), (m == 0).sum()] == [16, 24, 41]
    assert (m[3:6, 3:6] == 0).all() and (m[0] == 0).all() and (m[:, -1] == 0).all()


def test_c1_all_ones_ignored():
    assert (lw.ternary_mask(np.ones((3, 3), int)) == 0).all()


@pytest.mark.parametrize("shape", [(2, 2), (3, 7), (13, 5), (64, 64), (17, 2)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_ternary_matches_cell_by_cell_rule(shape, p):
    b = lw.random_mask(*shape, p=p, seed=shape[0] * 7 + int(p * 10))
    np.testing.assert_array_equal(lw.ternary_mask(b), naive_ternary(b))


def test_presets():
    sq = lw.random_squares(30, p=0.3, seed=1)
    assert sq.shape == (30, 30) and (sq[1, 1:29] == 1).all() and (sq[0] == 0).all()
    assert abs(sq[2:28, 2:28].mean() - 0.3) < 0.06
    a = lw.text_mask("A", 16)
    assert a.shape[0] == 16 and 0.1 < a.mean() < 0.6
    img = np.zeros((40, 40), np.float32)
    img[10:30, 5:15] = 1.0
    m = lw.image_mask(img, rows=8)
    assert m.shape == (8, 8) and m[4, 2] == 1 and m[4, 6] == 0


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 2, 2)), "2D"), (np.full((4, 4), 2), "only 0"), (np.zeros((70, 4)), "64"),
    (np.zeros((1, 5)), r"\[2, 64\]"),
])
def test_bad_patterns(bad, match):
    with pytest.raises(ValueError, match=match):
        lw.ternary_mask(bad)


# --- fits -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return lw.datasets.digits("train"), lw.datasets.digits("test")


def fresh(build):
    """A model_fn over a test case: every call a new seed (the cases reinit from a seed)."""
    seeds = iter(range(100, 10_000))
    return lambda: build(seed=next(seeds))


def small_fit(steps=0, **kw):
    x, y = mlp_data()
    kw.setdefault("progress", False)
    return lw.fit_pattern(fresh(mlp), (x, y), lw.checkerboard(4), steps=steps, **kw)


# --- (c2) plane geometry -----------------------------------------------------------------
@pytest.mark.parametrize("steps", [0, 5])
def test_c2_plane_geometry(steps):
    fit = small_fit(steps)
    right, up = (t.detach().double() for t in fit.plane.basis())
    assert abs(float(up @ right / (up.norm() * right.norm()))) < 1e-5
    assert abs(float(up.norm() / right.norm()) - 1) < 1e-6
    h, w = fit.shape
    assert torch.equal(fit.cell_vector(h // 2, w // 2), fit.plane.w0.detach())
    s = float(fit.plane.s.detach())
    step = float(right.norm()) * abs(s)
    for (i, j), (a, b) in [((1, 1), (1, 2)), ((1, 1), (2, 1)), ((0, 3), (1, 3))]:
        dist = float((fit.cell_vector(i, j).double() - fit.cell_vector(a, b).double()).norm())
        assert dist == pytest.approx(step, rel=1e-5)


def test_c2_up_is_gram_schmidt_of_raw_w2():
    fit = small_fit(0)
    w0, w1, w2 = (fit.plane.w0.detach().double(), fit.plane.w1.detach().double(),
                  fit.plane.w2.detach().double())
    right = w1 - w0
    up = w2 - right * (w2 @ right) / (right @ right)
    up = up / up.norm() * right.norm()
    np.testing.assert_allclose(fit.plane.basis()[1].detach().double(), up, rtol=1e-5, atol=1e-7)


# --- (c3) the clamp at tau ---------------------------------------------------------------
def test_c3_zero_gradient_through_bad_cell_past_tau():
    fit = small_fit(0)
    x, y = mlp_data()
    off = torch.tensor([[0, 1]])  # one cell
    flats = fit.plane.cells(off)
    ce = cell_losses(fit.layout, flats, x, y)
    from landscape_widget.experiments.plane import mpo_loss

    tau = float(ce.detach()) * 0.5  # its CE is past tau
    mpo_loss(ce[:0], ce, 0, 1, tau, 1.0).backward()
    for p in fit.plane.parameters():
        assert p.grad is None or not p.grad.any()
    fit.plane.zero_grad()
    flats = fit.plane.cells(off)
    ce = cell_losses(fit.layout, flats, x, y)
    mpo_loss(ce[:0], ce, 0, 1, float(ce.detach()) * 2, 1.0).backward()
    assert fit.plane.w0.grad.abs().sum() > 0


# --- the batched step equals the per-cell loop ---------------------------------------
@pytest.mark.parametrize("make", ["mlp", "tied", "bn_res_cnn"])
def test_batched_step_equals_per_cell_loop(make):
    models = {"mlp": (mlp, mlp_data), "tied": (tied_mlp, tied_data),
              "bn_res_cnn": (bn_res_cnn, cnn_data)}
    build, data = models[make]
    x, y = data()
    fits = [lw.fit_pattern(fresh(build), (x, y), lw.checkerboard(3, 5), steps=0,
                           seed=3, progress=False) for _ in range(2)]
    idx = torch.arange(min(16, len(x)))
    fits[0].step_once(x[idx], y[idx], batched=True)
    fits[1].step_once(x[idx], y[idx], batched=False)
    # Gradients, not the updated weights: Adam's first step is ~lr * sign(g), which turns
    # float noise in near-zero gradient entries into lr-sized differences.
    for a, b in zip(fits[0].plane.parameters(), fits[1].plane.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5 * float(b.grad.abs().max()))
    assert fits[0].history[0]["good_ce"] == pytest.approx(fits[1].history[0]["good_ce"], rel=1e-5)


def test_chunked_step_equals_one_pass():
    x, y = mlp_data()
    fits = [small_fit(0, seed=2) for _ in range(2)]
    fits[1].chunk = 3
    for f in fits:
        f.step_once(x, y)
    for a, b in zip(fits[0].plane.parameters(), fits[1].plane.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5 * float(b.grad.abs().max()))
