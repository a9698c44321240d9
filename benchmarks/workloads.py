"""The two benchmark workloads (issue 2, "Benchmark") and their analytic costs."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

CNN_PARAMS = 9_098
N_SAMPLES = 1024
N_CLASSES = 10


@dataclass
class Workload:
    """A model, its data and the plane to evaluate (``n`` x ``n`` points on [-1, 1]^2)."""

    key: str
    title: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    n: int
    goal: str  # "fastest_peer" or "loop"
    goal_factor: float

    @property
    def points(self) -> int:
        return self.n * self.n

    @property
    def samples(self) -> int:
        return int(self.inputs.shape[0])


def make_cnn() -> nn.Module:
    """conv(1->8, 3x3, pad 1), ReLU, AvgPool2d(2), conv(8->16, 3x3, pad 1), ReLU, AvgPool2d(2),
    flatten, Linear(784->10): 80 + 1,168 + 7,850 = 9,098 parameters.
    """
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, N_CLASSES),
    )
    count = sum(p.numel() for p in model.parameters())
    assert count == CNN_PARAMS, f"CNN has {count} parameters, expected {CNN_PARAMS}"
    assert 16 * 7 * 7 == 784
    return model


def make_mlp() -> nn.Module:
    """MLP 64-32-10 with a ReLU."""
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, N_CLASSES))


def cnn_workload(n: int = 21, seed: int = 0) -> Workload:
    """Workload (i): the 9,098-parameter CNN on 1024 random 1x28x28 inputs."""
    torch.manual_seed(seed)
    model = make_cnn().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(N_SAMPLES, 1, 28, 28, generator=gen)
    y = torch.randint(0, N_CLASSES, (N_SAMPLES,), generator=gen)
    return Workload("cnn", f"(i) CNN 1-8-16 conv + 784-10, {CNN_PARAMS:,} params, "
                    f"{N_SAMPLES} x 1x28x28, {n}x{n} plane", model, x, y, n,
                    "fastest_peer", 2.0)


def mlp_workload(n: int = 41, seed: int = 0) -> Workload:
    """Workload (ii): the overhead-bound MLP 64-32-10 on 1024 random 64-feature inputs."""
    torch.manual_seed(seed)
    model = make_mlp().eval()
    count = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(N_SAMPLES, 64, generator=gen)
    y = torch.randint(0, N_CLASSES, (N_SAMPLES,), generator=gen)
    return Workload("mlp", f"(ii) MLP 64-32-10, {count:,} params, {N_SAMPLES} x 64 features, "
                    f"{n}x{n} plane", model, x, y, n, "loop", 50.0)


def forward_flops_per_sample(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """Forward FLOPs of one sample: (analytic count of conv/linear, FlopCounterMode count).

    Both count a multiply-add as 2 FLOPs and ignore biases, activations and pooling.
    """
    analytic = 0

    def hook(mod, inp, out):
        nonlocal analytic
        if isinstance(mod, nn.Conv2d):
            k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            analytic += 2 * k * out[0].numel()
        elif isinstance(mod, nn.Linear):
            analytic += 2 * mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example[:1])
    return analytic, int(counter.get_total_flops())


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    """Best measured float32 FLOP/s of a ``size`` x ``size`` @ ``size`` x ``size`` matmul."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best
