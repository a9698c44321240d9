"""Random draws inside a model's forward: the same at every point, the user's RNG untouched.

Some models draw random numbers in eval mode too: a VAE samples its latent with the
reparameterisation trick, a noise layer adds Gaussian noise. Drawn from the global
generator, each point of a surface saw other noise (a rough surface, different on every
call) and the computation advanced the caller's random state (their next
``torch.rand`` changed). The engine now runs every forward pass inside
:func:`batch_draws`: the generators are forked (the caller's state comes back unchanged)
and seeded from the batch's first sample index, so every point sees the same draws on the
same batch (common random numbers: differences between points are the parameters', not
the noise's), and a repeated call gives the same values. Deterministic models are not
affected.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

# The seed of the draws of the forward pass over the batch starting at sample s is
# FORWARD_SEED + s.
FORWARD_SEED = 20_240_601
_LOCK = threading.RLock()


def _after_fork_in_child() -> None:
    # A child forked while another thread was in a seeded block would wait forever.
    global _LOCK
    _LOCK = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def batch_draws(device: torch.device, start: int = 0) -> Iterator[None]:
    """Run the block with the CPU's (and ``device``'s) generator seeded for batch ``start``.

    The generators' states are restored afterwards (``torch.random.fork_rng``): nothing
    the block draws changes what the caller draws next. Blocks of different threads run
    one at a time (a process-wide lock; a thread may nest them).

    Args:
        device: The device the forward runs on (its CUDA generator is seeded too).
        start: Index of the batch's first sample.

    Yields:
        Nothing; the block's draws are seeded.

    Example:
        >>> _ = torch.manual_seed(0); before = torch.rand(1)
        >>> _ = torch.manual_seed(0)
        >>> with batch_draws(torch.device("cpu"), 8):
        ...     a = torch.rand(2)
        >>> with batch_draws(torch.device("cpu"), 8):
        ...     b = torch.rand(2)
        >>> bool(torch.equal(a, b)), bool(torch.equal(torch.rand(1), before))
        (True, True)
    """
    seed = FORWARD_SEED + int(start)
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()
             ) if cuda else None
    # The generators are the process's: two threads seeding them at once (the widget's
    # worker and a notebook cell, each computing) would draw from each other's seeds and
    # put back each other's states. Seeded blocks of different threads take turns.
    with _LOCK, torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


class DrawSpy(TorchFunctionMode):
    """Notes whether the calling thread's torch calls draw from torch's global CPU generator.

    A forward that draws inside ``torch.random.fork_rng`` (fixed noise from its own seed)
    leaves the generator as it found it, so comparing its state after the forward cannot
    tell that it drew; its calls can: a call draws when it moves the generator. A torch
    *function* mode, not a dispatch mode: the first dispatch mode of a process imports
    ``torch._dynamo`` (1.2-1.7 s on a Transformer's first surface). It may route calls
    through other kernels (a Transformer's fast path is off under it), so it watches a
    probe forward whose values are thrown away, never a grid point. Modes are per thread:
    only the thread that enters the spy is watched.

    Example:
        >>> with DrawSpy() as spy:
        ...     _ = torch.ones(2) + 1
        >>> spy.drew
        False
        >>> with DrawSpy() as spy, torch.random.fork_rng():
        ...     _ = torch.rand(2)
        >>> spy.drew
        True
    """

    def __init__(self):
        super().__init__()
        self.drew = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        if self.drew:
            return func(*args, **(kwargs or {}))
        before = torch.default_generator.get_state()
        out = func(*args, **(kwargs or {}))
        self.drew = not torch.equal(before, torch.default_generator.get_state())
        return out
