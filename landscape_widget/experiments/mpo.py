"""Multi-point optimisation (MPO): carve a drawn pattern into a loss landscape.

Skorokhodov & Burtsev 2019 (universome/loss-patterns), as specified in PAPERS.md (c): the
cells of a mask are networks on a plane through three initialisations; good cells have
their cross-entropy minimised, bad cells maximised up to ``tau``. One step samples up to
``cells_per_step`` good and as many bad cells, evaluates them all on one shared minibatch
in a single ``vmap``-ed forward pass, clips the gradient norm of ``(w0, w1, w2, s)`` and
takes an Adam step. :func:`fit_pattern` returns a resumable :class:`PatternFit`.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..core.copies import module_copy
from ..core.data import as_tensors
from ..core.heap import holding_heap
from ..core.params import outside_inference_mode
from .masks import as_binary, ternary_mask
from .pattern_fit import PatternFit
from .plane import FlatLayout, PatternPlane

ModelFn = Callable[[], nn.Module]


def fresh_networks(model_fn: ModelFn | nn.Module, seed: int, count: int = 3) -> list[nn.Module]:
    """``count`` independently initialised networks, drawn from ``seed``.

    ``model_fn`` is called ``count`` times under a private RNG state (the global one is
    left as it was). An ``nn.Module`` is accepted too: it is copied (never modified) and
    every submodule with a ``reset_parameters`` method is re-initialised, which covers the
    standard layers; parameters of custom modules without one keep the model's values in
    every network, which a ``UserWarning`` names (and the fit's ``config["kept_parameters"]``).

    Returns:
        A list of ``count`` new networks (deep copies for an ``nn.Module``, so the user's
        model is untouched), initialised from ``seed``: the same seed gives the same
        weights.

    Raises:
        TypeError: If ``model_fn`` is neither an ``nn.Module`` nor callable, or
            ``model_fn()`` returns something other than an ``nn.Module``.

    Example:
        >>> a, b = fresh_networks(lambda: nn.Linear(3, 2), seed=0, count=2)
        >>> c, = fresh_networks(lambda: nn.Linear(3, 2), seed=0, count=1)
        >>> torch.equal(a.weight, c.weight), torch.equal(a.weight, b.weight)
        (True, False)
    """
    return _fresh_networks(model_fn, seed, count, stacklevel=3)[0]


def kept_note(kept: list[str]) -> str:
    """The warning on parameters no ``reset_parameters()`` re-initialises (else ``""``).

    Also the pattern editor's fit status, whose user never sees a warning of its thread.

    Returns:
        One line naming up to four of ``kept`` and the fix (``model_fn=``); ``""`` if none.
    """
    if not kept:
        return ""
    return (f"{len(kept)} parameter tensor(s) of the model ({', '.join(kept[:4])}"
            f"{', ...' if len(kept) > 4 else ''}) are not re-initialised by any "
            "reset_parameters(), so all three networks keep the model's values there. "
            "Pass model_fn=, a function that builds a fresh network (e.g. lambda: "
            "MyNet()), to draw them too.")


def _fresh_networks(model_fn: ModelFn | nn.Module, seed: int, count: int,
                    stacklevel: int) -> tuple[list[nn.Module], list[str]]:
    """:func:`fresh_networks`, and the parameters the networks share (see _reset_copies).

    ``stacklevel`` points the warning at the user's call (through the public function
    and its decorators).

    Returns:
        The networks, and the names of the model's parameters no ``reset_parameters()``
        re-initialised (none for a ``model_fn``), also named in a ``UserWarning``.

    Raises:
        TypeError: As :func:`fresh_networks`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if isinstance(model_fn, nn.Module):
            nets, kept = _reset_copies(model_fn, count)
            if kept:
                # The networks then coincide along these parameters (the plane has no extent
                # there): what was asked for (independent initialisations) falls short.
                warnings.warn(kept_note(kept), UserWarning, stacklevel=stacklevel)
            return nets, kept
        if not callable(model_fn):
            raise TypeError("model_fn must be a zero-argument callable that builds a fresh "
                            f"network (e.g. lambda: lw.demo.mlp(seed=None)), got {model_fn!r}.")
        nets = [model_fn() for _ in range(count)]
    for net in nets:
        if not isinstance(net, nn.Module):
            raise TypeError(f"model_fn() must return an nn.Module, got {type(net).__name__}.")
    return nets, []


def _reset_copies(model: nn.Module, count: int) -> tuple[list[nn.Module], list[str]]:
    """``count`` copies of ``model``, each module's ``reset_parameters()`` called.

    Returns:
        The copies, and the names of the parameters no reset wrote to (their version
        counters did not move): ``nn.Parameter`` attributes of custom modules,
        ``nn.MultiheadAttention``'s input projection, and the originals of parametrized
        or legacy weight_norm layers (their reset initialises a computed weight).
    """
    nets, kept = [], []
    for _ in range(count):
        net = module_copy(model)
        versions = {n: p._version for n, p in net.named_parameters()}
        for m in net.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
        kept = [n for n, p in net.named_parameters() if p._version == versions[n]]
        nets.append(net)
    return nets, kept


@outside_inference_mode
@holding_heap
def fit_pattern(
    model_fn: ModelFn | nn.Module,
    data,
    binary,
    *,
    steps: int = 300,
    lr: float = 3e-3,
    tau: float = 2.5,
    cells_per_step: int = 50,
    batch_size: int = 256,
    scale: float = 0.1,
    clip: float = 100.0,
    coef: float = 1.0,
    plane: str = "up_orthogonal",
    seed: int = 0,
    device=None,
    progress: bool = True,
    callback: Callable[[PatternFit], None] | None = None,
    every: int = 10,
    cancel: threading.Event | None = None,
    strategy: str = "vmap",
) -> PatternFit:
    """Fit the pattern ``binary`` into the loss landscape of a plane of networks.

    Args:
        model_fn: Zero-argument callable building a fresh network; called three times
            (w0, w1, w2) under ``seed``. An ``nn.Module`` is accepted and copied, its layers
            re-initialised (see :func:`fresh_networks`: parameters it cannot re-initialise
            are named in a warning and ``fit.config["kept_parameters"]``); it is never
            modified.
        data: Training ``(inputs, targets)``, a ``Dataset`` or a ``DataLoader`` (class labels).
        binary: 2D 0/1 pattern, 1 = drawn (good, loss minimised); see :func:`ternary_mask`.
        steps: Optimisation steps (one shared minibatch each).
        lr: Adam learning rate (3e-3 fits the digits MLP in 300 steps; the paper's
            convnets used 3e-4 for ~12k steps).
        tau: Bad cells' cross-entropy is maximised only up to ``tau`` (clamped).
        cells_per_step: Good cells sampled per step, and as many bad ones (without
            replacement; all of them when there are fewer).
        batch_size: Minibatch size (all data when smaller). The paper used 512 on 60k
            FashionMNIST images; on the 1400 digits images 256 fits better (4x4
            checkerboard, 6 seeds: train acc_diff 0.43-0.52 against 0.39-0.43 at 512).
        scale: Initial value of the learned scale ``s``.
        clip: Gradient-norm clip over ``(w0, w1, w2, s)``.
        coef: Weight of the bad-cell term.
        plane: ``"up_orthogonal"`` (the paper's) or ``"simple"``.
        seed: Seeds the three initialisations, the minibatches and the cell samples.
        device: Where to train (default: the device of the networks ``model_fn`` builds).
        progress: Show a tqdm bar.
        callback: Called as ``callback(fit)`` every ``every`` steps and after the last one.
        every: Steps between callbacks.
        cancel: A ``threading.Event``; once set, training stops after the current step
            (``fit.train(data, ...)`` resumes it).
        strategy: ``"vmap"`` (all sampled cells in one batched pass), ``"loop"`` (cell by
            cell, the same maths) or ``"auto"`` (time one step of each, keep the faster).

    Returns:
        A :class:`PatternFit` after ``steps`` steps (fewer if ``cancel`` was set); call its
        ``train`` to go on, ``evaluate``/``acc_diff`` to score it.

    Raises:
        ValueError: If ``binary`` is not a 2D 0/1 pattern with sides in [2, 64], has no
            good cell, a number or count argument is not positive, ``plane`` or
            ``strategy`` is unknown, ``model_fn`` builds identical networks or networks
            without parameters, the data is empty, or its targets or the networks' logits
            are not what cross-entropy takes (regression or 0/1 multi-label targets, one
            logit, classes last: see :meth:`PatternFit.train`).
        TypeError: If ``model_fn`` does not build ``nn.Module`` networks, or the data is
            of an unsupported form.
        RuntimeError: If a training step fails (see :meth:`PatternFit.step_once`).

    Example:
        >>> import landscape_widget as lw
        >>> data = lw.datasets.digits("train")
        >>> fit = fit_pattern(lambda: lw.demo.mlp(seed=None), data, lw.checkerboard(4),
        ...                   steps=3, progress=False)
        >>> fit.step, fit.state_size() == 3 * fit.layout.size + 1
        (3, True)
    """
    binary = as_binary(binary, "binary")
    mask = ternary_mask(binary)
    if not (mask == 1).any():
        raise ValueError("the pattern has no good cell: draw at least one cell that has a "
                         "background cell next to it (an all-drawn pattern is ignored).")
    for name, value in (("tau", tau), ("lr", lr), ("scale", scale), ("clip", clip)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}.")
    for name, value in (("cells_per_step", cells_per_step), ("batch_size", batch_size),
                        ("every", every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
    nets, kept = _fresh_networks(model_fn, seed, 3, stacklevel=5)  # (two decorators)
    if device is not None:
        nets = [n.to(device) for n in nets]  # our own fresh copies, not the user's
    layout = FlatLayout(nets[0])
    flats = [layout.flatten(n) for n in nets]
    if bool((flats[1] == flats[0]).all()):
        if isinstance(model_fn, nn.Module):
            raise ValueError(
                "no reset_parameters() of the model's modules re-initialises its parameters, "
                "so its three copies are identical networks: pass model_fn=, a function that "
                "builds a fresh network (e.g. lambda: MyNet()), instead of the model.")
        raise ValueError("model_fn built identical networks: each call must draw fresh "
                         "weights (do not seed inside model_fn; fit_pattern seeds it).")
    plane_ = PatternPlane(*flats, scale=scale, plane=plane)
    fit = PatternFit(layout, plane_, binary, mask, config={
        "lr": float(lr), "tau": float(tau), "cells_per_step": int(cells_per_step),
        "batch_size": int(batch_size), "clip": float(clip), "coef": float(coef),
        "seed": int(seed), "scale": float(scale), "plane": plane,
        # Parameters the three networks share (see fresh_networks): the result says so too.
        "kept_parameters": kept,
    })
    x, y = as_tensors(data)
    if x.shape[0] < 1:
        raise ValueError("data is empty.")
    if strategy not in ("vmap", "loop", "auto"):
        raise ValueError(f"strategy={strategy!r}: choose 'vmap', 'loop' or 'auto'.")
    fit.train((x, y), steps, progress=progress, callback=callback, every=every, cancel=cancel,
              strategy=strategy)
    return fit
