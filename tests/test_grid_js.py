"""The front end's coarse-to-fine display fill (js/src/grid.js ``fillCoarse``), run in Node.

The browser tests see it only through the picture. Here the module itself runs on grids
made in Python, and the properties are checked against numpy: computed points are shown
as computed; points a coarser lattice reaches show that lattice point's value; the others
(a coarsest level only partly computed: the kernel's first tile is small, and a grid
cancelled after it stayed so) show the value of a nearest filled point in grid steps,
found through computed NaN points too; a grid with no finite computed point stays NaN.
Before the nearest fill, a 201x201 grid cancelled after its first 16 points showed NaN
over most of the plot.

Node comes with the front end's build (``.ci/browser-deps``); in CI (``CI=true``) its
absence fails the test, elsewhere it is reported in the summary and the test not run.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from browser_utils import in_ci
from conftest import not_run

from landscape_widget.core.grid import coarsest_level, progressive_order

GRID_JS = Path(__file__).resolve().parents[1] / "js" / "src" / "grid.js"

def _fill(cases: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """``fillCoarse(values, known, shape)`` in Node for each ``(values, known)`` grid."""
    node = shutil.which("node")
    if node is None:
        why = "node is not installed (make test installs it with the front end's packages)"
        if in_ci():
            pytest.fail(f"CI=true and the JavaScript test cannot run: {why}.")
        not_run(f"THE JAVASCRIPT GRID TEST DID NOT RUN: {why}.")
        pytest.skip(why)
    payload = [{"values": [None if np.isnan(v) else float(v) for v in values.ravel()],
                "known": known.ravel().astype(int).tolist(), "shape": list(values.shape)}
               for values, known in cases]
    script = (
        f"import {{ fillCoarse }} from {json.dumps(GRID_JS.as_uri())};\n"
        "let text = '';\n"
        "process.stdin.on('data', (d) => { text += d; });\n"
        "process.stdin.on('end', () => {\n"
        "  const out = JSON.parse(text).map((c) => Array.from(fillCoarse(\n"
        "    Float32Array.from(c.values, (v) => (v === null ? NaN : v)),\n"
        "    Uint8Array.from(c.known), c.shape), (v) => (Number.isNaN(v) ? null : v)));\n"
        "  process.stdout.write(JSON.stringify(out));\n"
        "});\n")
    done = subprocess.run([node, "--input-type=module", "-e", script], check=True,
                          input=json.dumps(payload), capture_output=True, text=True, timeout=60)
    return [np.array([np.nan if v is None else v for v in out], dtype=np.float64)
            .reshape(values.shape) for out, (values, _) in zip(json.loads(done.stdout), cases,
                                                               strict=True)]


def _steps_to_filled(start: np.ndarray) -> np.ndarray:
    """Grid steps (4-neighbours) from every point to the nearest point of ``start``."""
    dist = np.full(start.shape, np.inf)
    queue = deque(zip(*np.nonzero(start), strict=True))
    for p in queue:
        dist[p] = 0
    while queue:
        p = queue.popleft()
        for axis in range(start.ndim):
            for step in (-1, 1):
                q = list(p)
                q[axis] += step
                q = tuple(q)
                if 0 <= q[axis] < start.shape[axis] and dist[q] == np.inf:
                    dist[q] = dist[p] + 1
                    queue.append(q)
    return dist


def _partial_first_level(shape, count: int, seed: int):
    """The first ``count`` points of the coarsest level computed (as a cancelled grid's)."""
    rng = np.random.default_rng(seed)
    values = np.full(shape, np.nan)
    known = np.zeros(shape, bool)
    level, flat = progressive_order(shape)[0]
    assert level == coarsest_level(shape)
    take = flat[:count]
    values.flat[take] = rng.uniform(0.5, 3.0, take.size)
    known.flat[take] = True
    return values, known


@pytest.mark.parametrize(("shape", "count"), [((201, 201), 16), ((201, 201), 1),
                                              ((41, 41), 7), ((33, 17), 5), ((201,), 3)])
def test_a_partly_computed_first_level_fills_the_whole_grid(shape, count):
    values, known = _partial_first_level(shape, count, seed=count)
    (shown,) = _fill([(values, known)])
    assert np.isfinite(shown).all()
    np.testing.assert_array_equal(shown[known], values[known].astype(np.float32))
    # Every shown value is a computed one, from a point no further than the nearest
    # computed point is (in grid steps) - or from a lattice point of a coarser level.
    assert set(np.unique(shown)) <= set(values[known].astype(np.float32))
    dist = _steps_to_filled(known)
    source = {float(np.float32(v)): np.argwhere(values == v)[0] for v in values[known]}
    for idx in zip(*np.nonzero(~known), strict=True):
        here = np.array(idx)
        src = source[float(shown[idx])]
        assert np.abs(src - here).sum() >= dist[idx]  # a nearest one, or a lattice one
    # The first tile's points themselves are computed, each shown where it lies.
    assert known.sum() == count


def _lattice_fill(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """The lattice rule alone, in numpy: the value of the nearest point of the lattice of
    every ``s``-th index (``s`` = 2, 4, ...) anchored at the middle, the first one found
    known and finite; NaN where none is."""
    shape = values.shape if values.ndim == 2 else (1, values.size)
    v, k = values.reshape(shape), known.reshape(shape)
    out = v.copy()

    def nearest(i, n, step):
        c = (n - 1) // 2
        j = c + math.floor((i - c) / step + 0.5) * step  # Math.round: halves up
        j = j - step if j > n - 1 else j
        j = j + step if j < 0 else j
        return j if 0 <= j < n else -1

    top = 2 * max(shape)
    for iy in range(shape[0]):
        for ix in range(shape[1]):
            if k[iy, ix]:
                continue
            step = 2
            while step <= top:
                jx = nearest(ix, shape[1], step)
                jy = 0 if shape[0] == 1 else nearest(iy, shape[0], step)
                if jx >= 0 and jy >= 0 and k[jy, jx] and not np.isnan(v[jy, jx]):
                    out[iy, ix] = v[jy, jx]
                    break
                step *= 2
    return out.reshape(values.shape)


@pytest.mark.parametrize(("shape", "count"), [((41, 41), 10**6), ((201, 201), 16),
                                              ((201,), 10**6), ((33, 17), 5)])
def test_points_a_lattice_reaches_keep_the_lattice_value(shape, count):
    """Where a lattice reaches, the fill is the lattice's, as before the nearest fill;
    a complete coarsest level reaches every point."""
    values, known = _partial_first_level(shape, count, seed=1)
    (shown,) = _fill([(values, known)])
    lattice = _lattice_fill(values, known)
    reached = ~np.isnan(lattice)
    np.testing.assert_array_equal(shown[reached], lattice[reached].astype(np.float32))
    if count == 10**6:
        assert reached.all()


def test_computed_nan_points_stay_nan_and_are_passed_through():
    values = np.full(9, np.nan)
    known = np.zeros(9, bool)
    values[0], known[0] = 1.5, True
    known[4] = True  # computed, NaN (a diverged point)
    (shown,) = _fill([(values, known)])
    assert np.isnan(shown[4])
    np.testing.assert_array_equal(np.delete(shown, 4), np.full(8, 1.5, np.float32))


def test_no_finite_computed_point_leaves_the_grid_nan():
    values = np.full((5, 5), np.nan)
    known = np.zeros((5, 5), bool)
    known[2, 2] = True  # computed, NaN
    (shown,) = _fill([(values, known)])
    assert np.isnan(shown).all()
