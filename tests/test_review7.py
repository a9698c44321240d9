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
