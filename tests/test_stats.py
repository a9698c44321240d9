"""Landscape statistics (core/stats.py) on analytic surfaces with closed-form answers."""

from __future__ import annotations

import numpy as np
import pytest

import landscape_widget as lw
from landscape_widget.core.stats import surface_curvature


def grid(f, lo=-1.0, hi=1.0, n=21, ny=None):
    x = np.linspace(lo, hi, n)
    y = np.linspace(lo, hi, ny or n)
    return x, y, f(x[None, :], y[:, None])


def test_surface_curvature_exact_on_quadratics_with_uneven_spacing():
    x = np.array([-1.0, -0.7, -0.1, 0.0, 0.2, 0.9, 1.0])
    y = np.array([-2.0, -0.5, 0.0, 0.3, 1.0])
    # z = a x^2 + b y^2 + c x y: Hessian [[2a, c], [c, 2b]].
    a, b, c = 1.5, -0.5, 0.8
    z = a * x[None, :] ** 2 + b * y[:, None] ** 2
    hi, lo = surface_curvature(x, y, z)
    np.testing.assert_allclose(hi[1:-1, 1:-1], 3.0)
    np.testing.assert_allclose(lo[1:-1, 1:-1], -1.0)
    assert np.isnan(hi[0]).all() and np.isnan(lo[:, -1]).all()
    xs = np.linspace(-1, 1, 9)
    z = a * xs[None, :] ** 2 + b * xs[:, None] ** 2 + c * xs[None, :] * xs[:, None]
    hi, lo = surface_curvature(xs, xs, z)
    expected = np.linalg.eigvalsh(np.array([[2 * a, c], [c, 2 * b]]))
    np.testing.assert_allclose(lo[1:-1, 1:-1], expected[0])
    np.testing.assert_allclose(hi[1:-1, 1:-1], expected[1])


def test_nonconvex_fraction_on_cosines_matches_the_analytic_area():
    # f = cos x + cos y: Hessian diag(-cos x, -cos y). Non-convex (threshold 0) where
    # cos x > 0 or cos y > 0: 3/4 of a full period square.
    x, y, z = grid(lambda a, b: np.cos(a) + np.cos(b), 0, 2 * np.pi, 401)
    assert lw.nonconvex_fraction((x, y, z), threshold=0.0) == pytest.approx(0.75, abs=0.01)
    # Against the exact Hessian at the same interior points, for any threshold.
    ex, ey = -np.cos(x[1:-1])[None, :], -np.cos(y[1:-1])[:, None]
    hi, lo = np.maximum(ex, ey), np.minimum(ex, ey)
    for t in (0.1, 0.5, 10.0):
        exact = ((lo < 0) & ((hi <= 0) | (-lo > t * hi))).mean()
        assert lw.nonconvex_fraction((x, y, z), threshold=t) == pytest.approx(exact, abs=2e-3)
    # A huge threshold leaves only the concave quarter (both cosines positive).
    assert lw.nonconvex_fraction((x, y, z), threshold=1e9) == pytest.approx(0.25, abs=0.01)


def test_nonconvex_fraction_from_a_curvature_map():
    lam_max = np.array([[1.0, 2.0], [3.0, np.nan]])
    lam_min = np.array([[0.5, -0.1], [-1.0, -5.0]])
    cmap = lw.CurvatureMap(np.arange(2.0), np.arange(2.0), lam_max, lam_min)
    # finite points: ratios 0.5 (convex: lambda_min > 0), -0.05, -1/3.
    assert lw.nonconvex_fraction(cmap, threshold=0.1) == pytest.approx(1 / 3)
    assert lw.nonconvex_fraction(cmap, threshold=0.01) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="threshold"):
        lw.nonconvex_fraction(cmap, threshold=-1)


def test_count_minima_closed_forms():
    x, y, z = grid(lambda a, b: (a - 0.3) ** 2 + (b + 0.2) ** 2)
    assert lw.count_minima(z) == 1
    # cos 2x cos 2y on [0, 2pi]: minima where one factor is 1 (at 0, pi, 2pi) and the other
    # -1 (at pi/2, 3pi/2): 2 * 3 * 2 = 12, of which 4 (the ones at pi) are interior.
    x, y, z = grid(lambda a, b: np.cos(2 * a) * np.cos(2 * b), 0, 2 * np.pi, 65)
    assert lw.count_minima(z) == 12 and lw.count_minima(z, border=False) == 4
    # A plane has its minimum at a corner: counted on the border only.
    x, y, z = grid(lambda a, b: a + 2 * b)
    assert lw.count_minima(z) == 1 and lw.count_minima(z, border=False) == 0
    flat = np.zeros((5, 5))
    flat[2, 2] = -1e-12
    assert lw.count_minima(flat) == 1 and lw.count_minima(flat, tol=1e-9) == 0
    nan = z.copy()
    nan[0, 1] = np.nan  # next to the corner minimum
    assert lw.count_minima(nan) == 0


@pytest.mark.parametrize(("k", "expected"), [(1, 2.0), (2, 4.0), (3, 6.0)])
def test_roughness_counts_sweeps(k, expected):
    # cos(k t) on [0, 2 pi] sweeps its range 2k times along every line.
    x, y, z = grid(lambda a, b: np.cos(k * a) + np.cos(k * b), 0, 2 * np.pi, 12 * k + 1)
    assert lw.roughness(z) == pytest.approx(expected)
    assert lw.roughness(3.0 * z - 7.0) == pytest.approx(expected)  # scale-free


def test_roughness_of_a_tilted_bowl_lies_between_monotone_and_symmetric():
    x, y, z = grid(lambda a, b: (a - 0.5) ** 2 + (b - 0.5) ** 2)
    # each line falls by (1.5^2 - d) ... rises by (0.5^2): TV/range = 1 + 0.25/2.25.
    assert lw.roughness(z) == pytest.approx(1 + 0.25 / 2.25)
    assert lw.roughness(np.ones((4, 4))) == 1.0


def test_basin_radius_closed_form_and_edges():
    x, y, z = grid(lambda a, b: a**2 + 4 * b**2, n=201)
    r = lw.basin_radius(x, y, z, rise=0.25)
    for key, value in (("+x", 0.5), ("-x", 0.5), ("+y", 0.25), ("-y", 0.25)):
        assert r[key] == pytest.approx(value, abs=1e-4)  # linear interpolation, h = 0.01
    assert r["min"] == pytest.approx(0.25, abs=1e-4) and r["mean"] == pytest.approx(0.375, 1e-3)
    wide = lw.basin_radius(x, y, z, rise=2.0)  # x^2 never reaches 2 on [-1, 1]
    assert np.isinf(wide["+x"]) and wide["+y"] == pytest.approx(np.sqrt(0.5), abs=1e-4)
    assert np.isinf(wide["mean"])
    hole = z.copy()
    hole[100, 110] = np.nan
    assert np.isnan(lw.basin_radius(x, y, hole, rise=0.25)["+x"])
    with pytest.raises(ValueError, match="no grid point at 0"):
        lw.basin_radius(np.linspace(-1, 1, 20), y, z[:, :20])
    with pytest.raises(ValueError, match="rise"):
        lw.basin_radius(x, y, z, rise=0)


def test_surface_stats_separates_bowl_from_egg_crate():
    x = np.linspace(-1, 1, 41)
    bowl = lw.Surface(x, x, x[None, :] ** 2 + x[:, None] ** 2)
    # The bowl minus an egg crate of period 0.5 with a pit at theta: along +x the loss
    # x^2 - 0.5 cos(4 pi x) first rises by 0.5 near x = 0.125.
    crate = lw.Surface(x, x, bowl.loss - 0.5 * np.cos(4 * np.pi * x)[None, :]
                       * np.cos(4 * np.pi * x)[:, None])
    a, b = bowl.stats(), crate.stats(rise=0.5)
    assert (a.nonconvex_fraction, a.minima, a.roughness) == (0.0, 1, 2.0)
    assert a.basin_radius == pytest.approx(np.sqrt(0.5), abs=0.01)
    # Pits where both cosines are 1 (x, y in {0, +-0.5, +-1}: 25) or both -1 (+-0.25, +-0.75: 16).
    assert b.minima == 41 and b.nonconvex_fraction > 0.5 and b.roughness > 3
    assert 0.1 < b.basin_radius < 0.15
    assert set(a.as_dict()) >= {"nonconvex_fraction", "minima", "roughness", "basin_radius"}
    assert "minima 1" in a.summary()
    assert lw.landscape_stats(bowl) == a


def test_stats_with_a_computed_curvature_map():

    x, y = lw.datasets.digits("test")
    data = (x[:64], y[:64])
    net = lw.demo.mlp((64, 8, 10), seed=0)
    dirs = lw.random_directions(net, 2, seed=1)
    kw = {"x": (-0.5, 0.5, 3), "y": (-0.5, 0.5, 3)}
    cmap = lw.curvature_map(net, data, dirs, progress=False, **kw)
    surface = lw.compute_surface(net, data, directions=dirs, progress=False, **kw)
    lo, hi = cmap.lambda_min, cmap.lambda_max
    expected = float(((lo < 0) & ((hi <= 0) | (-lo > 0.1 * hi))).mean())
    assert lw.nonconvex_fraction(cmap) == expected
    assert surface.stats(cmap).nonconvex_fraction == expected
    assert surface.stats().minima == lw.count_minima(surface.loss)


def test_landscape_stats_off_centre_grid_reports_no_basin():
    x = np.linspace(0.1, 1, 10)  # theta (0, 0) is not a grid point
    s = lw.Surface(x, x, x[None, :] ** 2 + x[:, None] ** 2).stats()
    assert np.isnan(s.basin_radius) and np.isnan(s.basin_radius_min)
    assert s.minima == 1 and s.nonconvex_fraction == 0.0
