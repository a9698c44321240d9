"""A user's direction that moves the signs torch's Householder ``orthogonal`` keeps.

Random directions leave those entries at zero (review 12c); a direction the user makes
(``torch.randn_like`` per parameter, a loss-landscape file) moved them, and every surface
through the model had a spike at its centre with no word of why. It is kept as given (the
user's tensor) and a warning names the entries and the fix; the surface is what the model
computes there (float64 ``functional_call`` oracle).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from public_cases import Untouched
from review12c_cases import data, oracle_curve, orthogonal_net

import landscape_widget as lw

KEY = "2.parametrizations.weight.original"


def test_a_users_direction_moving_the_signs_is_warned_about_and_kept():
    model = orthogonal_net()
    x, y = data()
    g = torch.Generator().manual_seed(0)
    d = {k: torch.randn(p.shape, generator=g) for k, p in model.named_parameters()}
    kept = {k: v.clone() for k, v in d.items()}
    with Untouched(model), pytest.warns(UserWarning, match="3 entries of '2.parametriz") as w:
        curve = lw.compute_curve(model, (x, y), direction=d, x=(-0.02, 0.02, 5),
                                 progress=False, metrics=("loss",))
    assert "diagonal(dim1=-2, dim2=-1).zero_()" in str(w[0].message)
    assert all(torch.equal(d[k], kept[k]) for k in d)  # the user's tensors as given
    np.testing.assert_allclose(curve.loss, oracle_curve(model, x, y, d, curve.x),
                               rtol=1e-5, atol=1e-6)
    # Zeroed as the warning says: no warning, and the curve is smooth through theta.
    d[KEY].diagonal(dim1=-2, dim2=-1).zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        smooth = lw.compute_curve(model, (x, y), direction=d, x=(-0.02, 0.02, 5),
                                  progress=False, metrics=("loss",))
    second = np.diff(smooth.loss, 2)
    assert np.abs(second).max() < 1e-3, smooth.loss


def test_random_directions_raise_no_warning():
    model = orthogonal_net()
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d1, d2 = lw.random_directions(model, 2, seed=0)
        lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-1, 1, 3), y=(-1, 1, 3),
                           progress=False, metrics=("loss",))
