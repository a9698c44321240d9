"""Acceptance 5: progressive (coarse-to-fine) order and reuse of computed points."""

from __future__ import annotations

import numpy as np
import pytest
from cases import mlp, mlp_data

import landscape_widget as lw
from landscape_widget.core.grid import cut_tiles, progressive_order

SHAPES = [(1,), (2,), (3,), (4,), (5,), (17,), (50,), (51,), (1025,),
          (1, 1), (1, 9), (9, 1), (2, 2), (3, 3), (7, 5), (5, 7), (21, 21), (41, 41), (50, 51),
          (64, 3)]


def _offsets(n: int) -> np.ndarray:
    """Signed distance of each index from the anchor (the middle index)."""
    return np.arange(n) - (n - 1) // 2


def _lattice_level(shape, flat) -> np.ndarray:
    """Largest L such that the point lies on the lattice of every 2**L-th index (capped at 40)."""
    idx = np.unravel_index(flat, shape)
    level = np.full(flat.shape, 40)
    for axis, i in enumerate(idx):
        off = _offsets(shape[axis])[i]
        for p in range(40):
            level = np.where((off % (2 ** (p + 1)) != 0) & (level > p), p, level)
    return level


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_progressive_order_visits_every_point_once(shape):
    order = progressive_order(shape)
    flat = np.concatenate([idx for _, idx in order])
    total = int(np.prod(shape))
    assert flat.size == total
    np.testing.assert_array_equal(np.sort(flat), np.arange(total))


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_progressive_order_is_coarse_to_fine(shape):
    order = progressive_order(shape)
    levels = [level for level, _ in order]
    assert levels == sorted(levels, reverse=True), "levels non-increasing"
    assert levels[-1] == 0 or int(np.prod(shape)) == 1
    for level, idx in order:
        # Every point of level L lies on the lattice of every 2**L-th index ...
        assert np.all(_lattice_level(shape, idx) >= level)
    for (level, _), (_, later) in zip(order, order[1:], strict=False):
        # ... and the finer levels only hold points off that coarser lattice.
        assert np.all(_lattice_level(shape, later) < level)


@pytest.mark.parametrize("shape", [(3,), (51,), (1025,), (3, 3), (7, 5), (5, 7), (21, 21),
                                   (41, 41)], ids=str)
def test_centre_of_symmetric_odd_grid_comes_first(shape):
    centre = np.ravel_multi_index(tuple(n // 2 for n in shape), shape)
    first_level = progressive_order(shape)[0][1]
    assert centre in first_level
    if len(shape) == 2 and min(shape) >= 21:
        # The first level is a coarse lattice, not (nearly) the whole grid.
        assert first_level.size <= np.prod(shape) // 4


@pytest.mark.parametrize("tile_points", [1, 3, 16])
def test_tiles_cover_the_order(tile_points):
    shape = (7, 5)
    tiles = list(cut_tiles(shape, tile_points))
    flat = np.concatenate([f for _, f in tiles])
    expected = np.concatenate([idx for _, idx in progressive_order(shape)])
    np.testing.assert_array_equal(flat, expected)
    assert all(f.size <= tile_points for _, f in tiles)
    # A tile lies on one level (the tiles' indices in the stream: see the next test).
    level_of = {int(i): level for level, idx in progressive_order(shape) for i in idx}
    assert all({level_of[int(i)] for i in f} == {level} for level, f in tiles)


def test_tiles_are_sized_by_a_function_asked_before_each_tile():
    sizes = iter([1, 4, 2, 100, 3])
    tiles = list(cut_tiles((9,), lambda: next(sizes)))
    assert [f.tolist() for _, f in tiles] == [[0], [2, 4, 6, 8], [1, 3], [5, 7]]
    with pytest.raises(ValueError, match="at least one point"):
        list(cut_tiles((9,), 0))


def test_streamed_tiles_cover_grid_once_coarse_to_fine():
    model, data = mlp().eval(), mlp_data()
    stream = lw.iter_tiles(model, data, x=(-1, 1, 7), y=(-1, 1, 5), tile_points=3)
    seen, levels, indices = [], [], []
    for tile in stream:
        seen.append(tile.flat)
        levels.append(tile.level)
        indices.append(tile.index)
        assert tile.values["loss"].shape == tile.flat.shape
        assert np.all(np.isfinite(tile.values["loss"]))
        assert tile.done == sum(s.size for s in seen) and tile.total == 35
    flat = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(flat), np.arange(35))
    assert levels == sorted(levels, reverse=True)
    assert indices == list(range(len(indices)))
    full = stream.result()
    direct = lw.compute_surface(model, data, x=(-1, 1, 7), y=(-1, 1, 5), progress=False)
    np.testing.assert_allclose(full.loss, direct.loss, rtol=1e-6, atol=0)


def test_partial_result_is_nan_where_not_computed():
    model, data = mlp().eval(), mlp_data()
    stream = lw.iter_tiles(model, data, x=(-1, 1, 9), y=(-1, 1, 9), tile_points=5)
    it = iter(stream)
    first = next(it)
    part = stream.result()
    done = np.zeros(81, dtype=bool)
    done[first.flat] = True
    assert np.all(np.isfinite(part.loss.ravel()[done]))
    assert np.all(np.isnan(part.loss.ravel()[~done]))


# --- reuse -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reuse_setup():
    model, data = mlp().eval(), mlp_data()
    dirs = tuple(lw.random_directions(model, 2, seed=3))
    kw = {"directions": dirs, "x": (-1, 1, 21), "y": (-1, 1, 21), "progress": False}
    coarse = lw.compute_surface(model, data, **kw)
    return model, data, dirs, coarse


def test_reuse_counts_and_values(reuse_setup):
    model, data, dirs, coarse = reuse_setup
    stream = lw.iter_tiles(model, data, directions=dirs, x=(-1, 1, 41), y=(-1, 1, 41),
                           reuse=coarse)
    for _ in stream:
        pass
    fine = stream.result()
    new_points = 41 * 41 - 21 * 21
    assert fine.spec["evaluated"] == new_points
    assert fine.spec["reused"] == 21 * 21
    assert stream.evaluator.points_evaluated == new_points
    np.testing.assert_array_equal(fine.loss[::2, ::2], coarse.loss)
    np.testing.assert_array_equal(fine.accuracy[::2, ::2], coarse.accuracy)
    fresh = lw.compute_surface(model, data, directions=dirs, x=(-1, 1, 41), y=(-1, 1, 41),
                               progress=False)
    assert fresh.spec["evaluated"] == 41 * 41
    np.testing.assert_allclose(fine.loss, fresh.loss, rtol=1e-6, atol=0)
    np.testing.assert_allclose(fine.accuracy, fresh.accuracy, rtol=0, atol=1e-12)


def test_reused_points_are_copied_not_recomputed(reuse_setup):
    """Independent of the engine's counters: plant a sentinel in the old result and see
    exactly the coinciding points come back with it."""
    model, data, dirs, coarse = reuse_setup
    planted = lw.Surface(coarse.x, coarse.y, np.full_like(coarse.loss, -7.0),
                         np.full_like(coarse.accuracy, -3.0), dict(coarse.spec), coarse.directions)
    fine = lw.compute_surface(model, data, directions=dirs, x=(-1, 1, 41), y=(-1, 1, 41),
                              reuse=planted, progress=False)
    mask = np.zeros((41, 41), dtype=bool)
    mask[::2, ::2] = True
    assert np.all(fine.loss[mask] == -7.0) and np.all(fine.accuracy[mask] == -3.0)
    assert np.all(fine.loss[~mask] > 0) and np.all(fine.accuracy[~mask] >= 0)


def test_reuse_of_a_curve():
    model, data = mlp().eval(), mlp_data()
    d = lw.random_direction(model, seed=4)
    coarse = lw.compute_curve(model, data, direction=d, x=(-1, 1, 11), progress=False)
    fine = lw.compute_curve(model, data, direction=d, x=(-1, 1, 21), reuse=coarse,
                            progress=False)
    assert fine.spec["evaluated"] == 10
    np.testing.assert_array_equal(fine.loss[::2], coarse.loss)


def test_reuse_refuses_another_model_or_direction(reuse_setup):
    model, data, dirs, coarse = reuse_setup
    with pytest.raises(ValueError, match="reuse"):
        lw.compute_surface(mlp(seed=5).eval(), data, directions=dirs, x=(-1, 1, 41),
                           y=(-1, 1, 41), reuse=coarse, progress=False)
    other = tuple(lw.random_directions(model, 2, seed=4))
    with pytest.raises(ValueError, match="reuse"):
        lw.compute_surface(model, data, directions=other, x=(-1, 1, 41), y=(-1, 1, 41),
                           reuse=coarse, progress=False)


def _legacy_spec(spec: dict, model, dirs, data) -> dict:
    """``spec`` with the BLAKE2b fingerprints a result saved before 2026-12 holds."""
    from landscape_widget.core.fingerprints import legacy_fingerprint

    x, y = data
    return {**spec, "model": legacy_fingerprint(dict(model.state_dict())),
            "directions": legacy_fingerprint({f"{i}/{k}": v for i, d in enumerate(dirs)
                                              for k, v in d.items()}),
            "data": legacy_fingerprint({"x": x, "y": y})}


def test_reuse_of_a_result_saved_with_the_older_fingerprints(reuse_setup, tmp_path):
    """An HDF5 file written before the fingerprints became XXH3 is still reused; the
    planted values show that its points, not recomputed ones, come back."""
    model, data, dirs, coarse = reuse_setup
    assert len(coarse.spec["model"]) == 32  # XXH3-128 now
    old = lw.Surface(coarse.x, coarse.y, np.full_like(coarse.loss, -7.0), coarse.accuracy,
                     _legacy_spec(coarse.spec, model, dirs, data), coarse.directions)
    assert len(old.spec["model"]) == 24
    old.save(tmp_path / "old.h5")
    fine = lw.compute_surface(model, data, directions=dirs, x=(-1, 1, 41), y=(-1, 1, 41),
                              reuse=lw.Surface.load(tmp_path / "old.h5"), progress=False)
    assert fine.spec["reused"] == 21 * 21
    assert np.all(fine.loss[::2, ::2] == -7.0) and np.all(fine.loss[1::2, 1::2] > 0)


@pytest.mark.parametrize("changed", ["model", "directions", "data"])
def test_older_fingerprints_of_something_else_are_refused(reuse_setup, changed):
    model, data, dirs, coarse = reuse_setup
    other = {"model": mlp(seed=5).eval(), "directions": tuple(
        lw.random_directions(model, 2, seed=4)), "data": (data[0] + 1, data[1])}
    parts = {"model": model, "directions": dirs, "data": data, changed: other[changed]}
    old = lw.Surface(coarse.x, coarse.y, coarse.loss, coarse.accuracy,
                     _legacy_spec(coarse.spec, parts["model"], parts["directions"],
                                  parts["data"]), coarse.directions)
    with pytest.raises(ValueError, match=f"different {changed}"):
        lw.compute_surface(model, data, directions=dirs, x=(-1, 1, 41), y=(-1, 1, 41),
                           reuse=old, progress=False)
