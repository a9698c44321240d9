"""Review 7: models, data and files the earlier tests did not cover.

Each test checks a property against an independent oracle: the object a file was written
from (a save/load round trip must give it back), a float64 per-point loop written here, or
a full snapshot of the user's model (tests/snapshots.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import landscape_widget as lw


class _SlashNamed(nn.Module):
    """Parameter names with '/' in them (an ``nn.ModuleDict`` keyed by paths)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({"enc/0": nn.Linear(4, 5), "enc/1": nn.Linear(5, 3)})

    def forward(self, x):
        return self.blocks["enc/1"](torch.tanh(self.blocks["enc/0"](x)))


def _top2(out, y):
    return (out.topk(2, -1).indices == y[:, None]).any(-1).double()


def _same_grid(a, b) -> None:
    for name in ("loss", "accuracy", "acc/top2", "val/top2"):
        # Accuracy is stored in percent (loss-landscape's unit): x * 100 / 100 may move an ulp.
        np.testing.assert_allclose(a.values(name), b.values(name), rtol=1e-14, err_msg=name)
    assert set(a.extra_metrics) == set(b.extra_metrics)
    assert len(a.directions) == len(b.directions)
    for d, e in zip(a.directions, b.directions, strict=True):
        assert set(d) == set(e)
        for k in d:
            assert torch.equal(d[k], e[k]), k


def test_names_with_a_slash_survive_a_save_and_load(tmp_path):
    # HDF5 reads '/' in a dataset name as a path: a metric named like TensorBoard's tags
    # ("acc/top2") or a parameter of a ModuleDict keyed "enc/0" was written as a nested
    # group, and Surface.load / Curve.load then failed ("Accessing a group is done with
    # bytes or str, not tuple", "can't convert np.ndarray of type numpy.str_").
    torch.manual_seed(0)
    model = _SlashNamed()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    metrics = {"loss": None, "accuracy": None, "acc/top2": _top2, "val/top2": _top2}
    surf = lw.compute_surface(model, (x, y), x=(-1, 1, 3), y=(-0.5, 0.5, 2), metrics=metrics,
                              progress=False)
    surf.save(tmp_path / "s.h5")
    _same_grid(surf, lw.Surface.load(tmp_path / "s.h5"))
    curve = lw.compute_curve(model, (x, y), x=(-1, 1, 3), metrics=metrics, progress=False)
    curve.save(tmp_path / "c.h5")
    _same_grid(curve, lw.Curve.load(tmp_path / "c.h5"))


def test_a_float64_models_path_is_recorded_in_float64():
    # Trajectory.record rounded every checkpoint to float32: for a float64 model whose
    # steps are small next to its weights (1e-7 on weights near 3, where float32's spacing
    # is 2.4e-7) the PCA of the differences was mostly rounding noise: explained variance,
    # directions and the projected path came out wrong with no error.
    g = torch.Generator().manual_seed(0)
    w0 = 3 + torch.rand(30, 20, generator=g, dtype=torch.float64)
    b0 = torch.randn(20, generator=g, dtype=torch.float64)
    u, v = (torch.randn(30, 20, generator=g, dtype=torch.float64) for _ in range(2))
    traj, rows = lw.Trajectory(), []
    for t in range(8):
        w = w0 + 1e-7 * (t * u + 2 * np.sin(t) * v)
        traj.record({"w": w, "b": b0 + 1e-7 * t})
        rows.append(w.reshape(-1))
    # The oracle: float64 PCA of the weight rows (biases are zeroed by ignore="biasbn").
    m = torch.stack([r - rows[-1] for r in rows])
    _, s, vh = torch.linalg.svd(m - m.mean(0), full_matrices=False)
    dirs, evr = traj.pca_directions(2)
    np.testing.assert_allclose(evr, (s[:2] ** 2 / (s ** 2).sum()).numpy(), rtol=1e-9)
    got = torch.stack([traj.flatten(d)[:600] for d in dirs])
    np.testing.assert_allclose((got @ vh[:2].T).diagonal().abs().numpy(), 1.0, rtol=1e-9)
    want = (m @ vh[:2].T).numpy() * np.sign((got @ vh[:2].T).diagonal().numpy())
    np.testing.assert_allclose(traj.project(dirs), want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
    assert traj.points[-1].dtype == torch.float64
