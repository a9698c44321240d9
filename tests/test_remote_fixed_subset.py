"""Review 2 R4: the widget's fixed subset of a ``data_fn`` on an executor.

Only the workers call the ``data_fn``; its size comes from their probe, so a fixed subset
at least as large as the data is computed exact (as for tensors or a local data_fn) and its
result is reused as exact, never as a subset; a smaller one is still a subset.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch import nn
from widget_cases import Recorder

import landscape_widget as lw
from landscape_widget.core import progressive
from landscape_widget.widget.protocol import Spec
from landscape_widget.widget.worker import Worker

N = 300


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def data_fn():
    g = torch.Generator().manual_seed(2)
    return torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)


def _grid(model, n):
    dirs = lw.random_directions(model, 2, ignore="biasbn", seed=3)
    return {"directions": dirs, "x": (-1, 1, n), "y": (-1, 1, n), "progress": False}


def test_an_exact_result_of_a_fixed_subset_is_reused_as_exact_only(monkeypatch):
    model, rec, statuses, latest = _model(), Recorder(), [], {}
    with ThreadPoolExecutor(2) as pool:
        worker = Worker(model, data_fn, send=rec, tile_points=5, executor=pool,
                        on_status=statuses.append)
        try:
            for job, res, samples in (("a", 5, "1k"), ("b", 9, "exact"), ("c", 9, "1k")):
                if job == "c":  # "1k" now draws 100 of the 300 samples: a real subset
                    monkeypatch.setitem(progressive.SUBSET_CHOICES, "1k", 100)
                worker.submit(job, Spec(resolution=res, seed=3, samples=samples))
                assert worker.wait(120)
                latest[job] = (worker.latest, statuses[-1]["message"])
        finally:
            worker.close()
    assert not [m for m, _ in rec.messages if m["kind"] == "error"]
    done = {job: rec.of(job, "done")[0][0] for job in "abc"}
    first, note = latest["a"]
    assert first.spec["samples"] is None and first.loss_se is None
    assert "all of them were used (exact)" in note
    exact5 = lw.compute_surface(model, data_fn(), **_grid(model, 5))
    np.testing.assert_allclose(first.loss, exact5.loss, rtol=1e-6, atol=1e-7)
    # The exact 5x5 points are reused by the exact 9x9 grid (keyed exact, not as "1k").
    assert done["b"]["reused"] == 25 and done["b"]["evaluated"] == 81 - 25
    exact9 = lw.compute_surface(model, data_fn(), **_grid(model, 9))
    np.testing.assert_allclose(latest["b"][0].loss, exact9.loss, rtol=1e-6, atol=1e-7)
    # A real subset after it reuses none of the exact points and is labelled a subset.
    assert done["c"]["reused"] == 0 and done["c"]["evaluated"] == 81
    sub = latest["c"][0]
    assert sub.spec["samples"]["n"] == 100 and sub.spec["samples"]["of"] == N
    assert done["c"]["stats"].startswith(f"subset 100 of {N} samples (±")
    ref = lw.compute_surface(model, data_fn(), samples=100, **_grid(model, 9))
    np.testing.assert_allclose(sub.loss, ref.loss, rtol=1e-6)
    np.testing.assert_allclose(sub.loss_se, ref.loss_se, rtol=1e-6)


def test_samples_beyond_an_executors_data_fn_is_refused_with_its_size_and_the_fix():
    """Headless ``samples=N`` asks for N explicitly: still refused, but the message says
    how many samples the data_fn returned and what to pass instead."""
    with ThreadPoolExecutor(1) as pool:
        with pytest.raises(ValueError, match=rf"samples=1000 exceeds the {N} samples that "
                           rf"data_fn returned.*pass samples={N} or fewer.*samples=None"):
            lw.compute_surface(_model(), data_fn, samples=1000, executor=pool,
                               x=(-1, 1, 3), y=(-1, 1, 3), progress=False)
