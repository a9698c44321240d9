"""Data too large to hold at once is refused before it fills the machine's memory.

The engine collects a Dataset or DataLoader into one pair of tensors. An ImageNet-sized
loader (about 30 GB at 224 px) took all the RAM and the kernel with it; collecting now
stops with the fix (``samples=N``, drawn before anything is read) once the samples would
fill more than ``DATA_RAM_SHARE`` of the available RAM. The available RAM is set small
here (monkeypatched) so the data stay tiny.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import mlp
from oracle import naive_eval, surface_coords
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import landscape_widget as lw
from landscape_widget.core import data as data_module

SAMPLES, FEATURES = 400, 10  # 400 x (10 float32 + one int64 target) = 19,200 bytes


def _tensors():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(SAMPLES, FEATURES, generator=g),
            torch.randint(0, 4, (SAMPLES,), generator=g))


class _Stream(IterableDataset):
    """An iterable dataset (no length): found while reading."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y, strict=True))


@pytest.fixture
def small_ram(monkeypatch):
    """20 KB of available RAM: 8 KB of data may be collected (the subset of 100: 4.8 KB)."""
    read = []

    def available(device):
        read.append(device)
        return 20_000

    monkeypatch.setattr(data_module, "free_memory", available)
    return read


@pytest.mark.parametrize("form", ["dataset", "loader", "shuffled", "stream"])
def test_data_past_the_share_of_ram_is_refused_with_the_fix(small_ram, form):
    x, y = _tensors()
    data = {"dataset": TensorDataset(x, y),
            "loader": DataLoader(TensorDataset(x, y), batch_size=50),
            "shuffled": DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True),
            "stream": DataLoader(_Stream(x, y), batch_size=50)}[form]
    with pytest.raises(ValueError, match=r"too much to evaluate at once.*samples=N"):
        lw.compute_surface(mlp(), data, x=(-1, 1, 3), y=(-1, 1, 3), progress=False)
    assert small_ram, "the guard read the available RAM"


def test_a_loader_of_known_length_is_refused_after_its_first_batch(small_ram):
    # Predicted from the first batch: the rest is never read.
    x, y = _tensors()
    read = []

    class Counting(TensorDataset):
        def __getitem__(self, i):
            read.append(i)
            return super().__getitem__(i)

    loader = DataLoader(Counting(x, y), batch_size=50)
    with pytest.raises(ValueError, match=f"{SAMPLES:,} samples"):
        lw.compute_surface(mlp(), loader, x=(-1, 1, 3), y=(-1, 1, 3), progress=False)
    assert len(read) == 50


def test_a_subset_of_the_same_loader_fits_and_is_exact_on_its_samples(small_ram):
    # samples= draws its indices first and reads only those samples.
    x, y = _tensors()
    model = mlp()
    loader = DataLoader(TensorDataset(x, y), batch_size=50)
    dirs = lw.random_directions(model, 2, seed=0)
    s = lw.compute_surface(model, loader, directions=dirs, x=(-1, 1, 3), y=(-1, 1, 3),
                           samples=100, progress=False)
    idx = lw.core.subset.subset_indices(SAMPLES, 100)
    ref, _ = naive_eval(model, x[idx], y[idx], list(dirs), surface_coords(s.x, s.y))
    np.testing.assert_allclose(s.loss.ravel(), ref, rtol=1e-5)


def test_data_within_the_share_are_collected_as_they_are(monkeypatch):
    monkeypatch.setattr(data_module, "free_memory", lambda device: 100_000)
    x, y = _tensors()
    got_x, got_y = data_module.as_tensors(DataLoader(TensorDataset(x, y), batch_size=64))
    assert torch.equal(got_x, x) and torch.equal(got_y, y)


def test_a_containers_memory_limit_bounds_the_free_memory(monkeypatch, tmp_path):
    # The host's MemAvailable is not what a container (docker --memory) may use: past its
    # cgroup's limit the kernel kills the process. cgroup v1 files here (v2: the doctest).
    from landscape_widget.core import plans

    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("50000\n")
    (tmp_path / "memory" / "memory.usage_in_bytes").write_text("40000\n")
    (tmp_path / "memory" / "memory.stat").write_text("cache 1\ntotal_inactive_file 2000\n")
    assert plans.cgroup_available(str(tmp_path)) == 12_000
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert plans.cgroup_available(str(tmp_path)) is None
    host = plans.free_memory(torch.device("cpu"))
    monkeypatch.setattr(plans, "cgroup_available", lambda: 12_000)
    assert plans.free_memory(torch.device("cpu")) == min(host, 12_000)
    x, y = _tensors()  # 19,200 bytes: more than 40 % of 12,000
    with pytest.raises(ValueError, match="too much to evaluate at once"):
        lw.compute_surface(mlp(), TensorDataset(x, y), x=(-1, 1, 3), y=(-1, 1, 3),
                           progress=False)
