"""The landscape statistics in the widget's status line (issue 17, a first step of item 5)."""

from __future__ import annotations

import torch
from torch import nn

from landscape_widget import LandscapeWidget
from landscape_widget.widget.protocol import Spec


def test_done_message_carries_the_surface_statistics():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    data = (torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
    w = LandscapeWidget(model, data, autostart=False, resolution=5)
    sent = []
    w.send = lambda content, buffers=None: sent.append(content)
    try:
        w._handle_custom_msg({"kind": "compute", "id": "a", "spec": Spec(resolution=5).to_dict()},
                             [])
        surface = w.wait(60)
        done = [m for m in sent if m["kind"] == "done"]
        assert len(done) == 1
        assert done[0]["stats"] == surface.stats().summary()
        assert done[0]["stats"].startswith("non-convex ")
        # A 1D curve has no surface statistics.
        sent.clear()
        w._handle_custom_msg({"kind": "compute", "id": "b",
                              "spec": Spec(resolution=5, mode="1d").to_dict()}, [])
        w.wait(60)
        assert [m["stats"] for m in sent if m["kind"] == "done"] == [""]
    finally:
        w.close()
