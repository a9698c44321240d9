"""Shared set-up: one intra-op thread, and a small MLP trained on scikit-learn's digits.

The tests use tiny tensors. With several OpenMP threads on a busy 2-core machine (CI
running beside other jobs) a 1 ms forward pass was measured at 50 ms, spinning in thread
barriers; one thread keeps the suite's run time predictable. Results do not depend on it.
"""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

REPORT: list[str] = []


def report(line: str) -> None:
    """Print ``line`` now (with ``-s``) and again in the terminal summary (always)."""
    print(line)
    REPORT.append(line)


def pytest_terminal_summary(terminalreporter):
    if NOT_RUN:
        terminalreporter.section("NOT RUN", sep="!", red=True, bold=True)
        for line in NOT_RUN:
            terminalreporter.write_line(line, red=True, bold=True)
    if REPORT:
        terminalreporter.section("measured")
        for line in REPORT:
            terminalreporter.write_line(line)


def pytest_configure(config):
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def trained_digits_mlp():
    """MLP 64-32-10 trained with Adam (lr 1e-2, 300 steps, batch 128) on 1400 digits.

    Returns ``(model, (x_train, y_train))`` with the model in eval mode. Built here rather
    than with ``lw.demo`` so the tests do not depend on the demo module.
    """
    digits = load_digits()
    x = torch.tensor(digits.data[:1400] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[:1400], dtype=torch.long)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(y), (128,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model, (x, y)


NOT_RUN: list[str] = []


def not_run(line: str) -> None:
    """Say loudly, in its own section of the terminal summary, that a test could not run."""
    print(line)
    if line not in NOT_RUN:
        NOT_RUN.append(line)


@pytest.fixture
def worker_factory():
    """``make(model=None, data=None, hook=None, **kwargs) -> (Worker, Recorder)``; closes
    every worker it made. Defaults: :func:`widget_cases.worker_model` and ``worker_data``."""
    from widget_cases import Recorder, worker_data, worker_model

    from landscape_widget.widget.worker import Worker

    made = []

    def make(model=None, data=None, hook=None, **kwargs):
        rec = Recorder(hook)
        w = Worker(model if model is not None else worker_model(),
                   data if data is not None else worker_data(), send=rec, **kwargs)
        made.append(w)
        return w, rec

    yield make
    for w in made:
        w.close()


@pytest.fixture
def widget():
    """A LandscapeWidget of :func:`widget_cases.model_data` at resolution 5, not started;
    closed after the test."""
    from widget_cases import model_data

    from landscape_widget import LandscapeWidget

    model, data = model_data()
    w = LandscapeWidget(model, data, autostart=False, resolution=5)
    yield w
    w.close()
