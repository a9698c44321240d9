"""Models, data and fake front ends shared by the widget tests (a helper, not a test module).

Kept here rather than imported from one test module into another, so that running one
test file never collects (or depends on the set-up of) another. The ``worker_factory``
fixture that uses them is in ``conftest.py``.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch import nn

from landscape_widget.widget.protocol import decode_buffer


def model_data():
    """A small MLP (4-8-3, fixed weights) and 32 samples, for widgets."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    data = (torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
    return model, data


class FakeFrontEnd:
    """Records what the widget sends."""

    def __init__(self, widget):
        self.sent: list[tuple[dict, list]] = []
        widget.send = lambda content, buffers=None: self.sent.append((content, buffers or []))

    def kinds(self):
        return [m["kind"] for m, _ in self.sent]

    def errors(self):
        return [m for m, _ in self.sent if m["kind"] == "error"]


class Unprintable:
    """An object whose repr raises (a hostile value in a message)."""

    def __repr__(self):
        raise RuntimeError("hostile repr")


def worker_model(bn: bool = False, seed: int = 0):
    """A small MLP 6-12-3 (optionally with BatchNorm and trained statistics), eval mode."""
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(6, 12)] + ([nn.BatchNorm1d(12)] if bn else []) + [nn.ReLU(),
                                                                          nn.Linear(12, 3)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if bn:
            model.train()
            for _ in range(3):
                model(torch.randn(16, 6, generator=g))
    model.eval()
    return model


def worker_data(n: int = 48):
    """``n`` samples of 6 features and 3 classes, fixed."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


class Recorder:
    """A fake front end: collects messages; optional hook called on each."""

    def __init__(self, hook=None):
        self.messages: list[tuple[dict, list]] = []
        self.hook = hook
        self.lock = threading.Lock()

    def __call__(self, msg, buffers):
        with self.lock:
            self.messages.append((msg, buffers))
        if self.hook is not None:
            self.hook(msg)

    def of(self, job_id, kind=None):
        with self.lock:
            return [(m, b) for m, b in self.messages
                    if m.get("id") == job_id and (kind is None or m["kind"] == kind)]


def assemble(rec: Recorder, job_id: str):
    """The grid a front end would hold after the tiles of ``job_id``; checks coverage."""
    (start, bufs), = rec.of(job_id, "start")
    shape = tuple(start["shape"])
    size = int(np.prod(shape))
    loss = np.full(size, np.nan, dtype=np.float32)
    acc = np.full(size, np.nan, dtype=np.float32)
    seen = np.zeros(size, dtype=int)
    for msg, (flat, lo, ac) in rec.of(job_id, "tile"):
        idx = decode_buffer(flat, "<i4")
        assert idx.size == msg["n"]
        seen[idx] += 1
        loss[idx] = decode_buffer(lo)
        a = decode_buffer(ac)
        if a.size:  # empty when accuracy is not computed
            acc[idx] = a
    x = decode_buffer(bufs[0])
    return seen.reshape(shape), loss.reshape(shape), acc.reshape(shape), x
