"""Acceptance 2, PAPERS (a3): filter-normalised random 1D slices of a trained net are v-basins."""

from __future__ import annotations

import numpy as np
import torch
from oracle import naive_eval

import landscape_widget as lw


def test_trained_model_is_fit(trained_digits_mlp):
    model, (x, y) = trained_digits_mlp
    with torch.no_grad():
        out = model(x)
    assert float(torch.nn.functional.cross_entropy(out, y)) < 0.1
    assert float((out.argmax(-1) == y).float().mean()) > 0.97


def test_v_basin_sanity(trained_digits_mlp):
    """10 random directions, 41 points on [-1, 1]: the minimum sits at theta, walls are high."""
    model, data = trained_digits_mlp
    at_centre, ratios = 0, []
    for seed in range(10):
        d = lw.random_direction(model, seed=seed)
        curve = lw.compute_curve(model, data, direction=d, x=(-1, 1, 41), progress=False)
        assert curve.x[20] == 0.0
        if abs(curve.x[int(np.nanargmin(curve.loss))]) <= 0.05:
            at_centre += 1
        ratios.append(min(curve.loss[0], curve.loss[-1]) / curve.loss[20])
    assert at_centre >= 9, at_centre
    assert min(ratios) > 10, ratios


def test_trained_model_origin_and_accuracy(trained_digits_mlp):
    """(a2) on the trained net: the centre is L(theta) to 1e-6 and accuracy is in [0, 1]."""
    model, (x, y) = trained_digits_mlp
    surf = lw.compute_surface(model, (x, y), x=(-1, 1, 5), y=(-1, 1, 5), seed=0, progress=False)
    loss, acc = naive_eval(model, x, y, [], np.zeros((1, 0)))
    np.testing.assert_allclose(surf.loss[2, 2], loss[0], rtol=1e-6)
    assert surf.accuracy[2, 2] == acc[0]
    assert np.all((surf.accuracy >= 0) & (surf.accuracy <= 1))
