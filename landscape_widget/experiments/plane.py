"""The parameter plane of multi-point optimisation (PAPERS.md (c) steps 2 and 4).

:class:`FlatLayout` maps a network's parameters to one flat vector and back, and runs the
network for many flat vectors at once (``vmap`` over ``functional_call``). BatchNorm is
reparametrised as in universome/loss-patterns (commit 782b14a): the flat coordinate of a
BN scale is ``gamma - 1`` (so a default-initialised net has zero-mean scale coordinates,
which keeps the Gram-Schmidt step meaningful), and BN always uses batch statistics, with
no running statistics, in training and evaluation alike.

:class:`PatternPlane` holds the only trainable state of a fit: three flat vectors
``w0, w1, w2`` and the scale ``s``. Cell ``(i, j)`` of an ``H x W`` mask is the network
``w0 + s * ((i - H // 2) * up + (j - W // 2) * right)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..core.copies import module_copy
from ..core.metrics import find_logits
from ..core.params import Params, buffers_of, parameters_of
from ..core.passes import quiet_vmap_fallback
from ..core.state import BufferState
from .pattern_targets import cells_cross_entropy

PLANES = ("up_orthogonal", "simple")


def batch_stat_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` in eval mode whose BatchNorm layers use batch statistics only.

    Dropout is therefore off; BatchNorm has no running buffers, so nothing is updated in
    place (which ``vmap`` could not batch anyway). The original is not touched.

    Returns:
        The copy: eval mode, BatchNorm layers without running statistics (so they normalise with
        each batch's), parameters with ``requires_grad`` off.
    """
    out = module_copy(module).eval()  # pruned weights: non-leaf, refused by deepcopy
    for m in out.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
            m.track_running_stats = False
    for p in out.parameters():
        p.requires_grad_(False)
    return out


class FlatLayout(BufferState):
    """Names, shapes and the BN reparametrisation of a network's flat parameter vector.

    Every pass starts from the template's state, as the surface engine's do
    (:class:`~landscape_widget.core.state.BufferState`): what a forward writes (a buffer
    counter, a list it appends to, an attribute it reassigns, a generator it draws from)
    is put back before the next pass and after each step, so a cell's loss does not depend
    on how many passes ran before (the loop path runs one per cell, ``vmap`` one per chunk)
    and :meth:`module_at` copies the state the fit started from.

    Args:
        module: A network of the architecture to fit (used as a template; copied).
    """

    def __init__(self, module: nn.Module):
        self.template = batch_stat_copy(module)
        # The template's tensors for BufferState: the forwards get its buffers as views
        # into flat copies (see _state_versions), which _reset_state puts back.
        self.module = self.template
        self.base = {**parameters_of(self.template), **buffers_of(self.template)}
        self._state_versions()
        self._buffers = {k: self.base[k] for k in buffers_of(self.template)}
        named = list(self.template.named_parameters())  # tied parameters appear once
        if not named:
            raise ValueError("the model has no parameters to fit.")
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.dtype = named[0][1].dtype
        self.device = named[0][1].device
        bn_scales = {
            f"{prefix}.weight" if prefix else "weight"
            for prefix, m in self.template.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
        }
        self.bn_scales = [n for n in self.names if n in bn_scales]
        self.offset = torch.cat([
            torch.full((k,), 1.0 if n in bn_scales else 0.0, dtype=self.dtype)
            for n, k in zip(self.names, self.numels, strict=True)
        ]).to(self.device)

    @property
    def size(self) -> int:
        """P, the number of entries of a flat vector."""
        return int(sum(self.numels))

    def flatten(self, module: nn.Module) -> Tensor:
        """The flat coordinates of ``module``'s parameters (BN scales minus one), detached."""
        params = dict(module.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ValueError(f"model_fn built a network without parameters {missing[:3]}: every "
                             "call of model_fn must build the same architecture.")
        flat = torch.cat([params[n].detach().reshape(-1) for n in self.names])
        if flat.numel() != self.size:
            raise ValueError("model_fn built networks of different sizes; it must build the "
                             "same architecture on every call.")
        return (flat.to(self.device, self.dtype) - self.offset).clone()

    def unflatten(self, flat: Tensor, offset: bool = True) -> Params:
        """``{name: tensor}`` from flat vectors of shape ``(..., P)``.

        With ``offset=False`` the result is a *direction* (no BN ``+1``).

        Returns:
            Parameter name -> tensor of shape ``(..., *param_shape)``, the slices of ``flat`` (plus
            the BatchNorm weight offset when ``offset``).
        """
        if offset:
            flat = flat + self.offset
        lead = flat.shape[:-1]
        parts = torch.split(flat, self.numels, dim=-1)
        return {n: p.reshape(*lead, *s) for n, p, s in zip(self.names, parts, self.shapes,
                                                           strict=True)}

    def forward(self, flats: Tensor, x: Tensor) -> Tensor:
        """Logits of the networks ``flats`` (K, P) on the shared batch ``x``: (K, N, ...).

        The pass starts from the template's state (put back here, not after the pass: the
        backward may still need the buffers it read; :meth:`_reset_state` after it).

        Returns:
            The logits of every network, stacked along a new first dimension.
        """
        params = self.unflatten(flats)
        self._reset_state()

        def one(p):
            # Copies of the batch: a forward writing to its input would change the user's data.
            return _logits(functional_call(self.template, {**p, **self._buffers}, (x.clone(),)))

        with quiet_vmap_fallback():
            return vmap(one)(params)

    def forward_one(self, flat: Tensor, x: Tensor) -> Tensor:
        """Logits of one network (P,) on ``x``: the per-cell path, without ``vmap``."""
        self._reset_state()
        return _logits(functional_call(self.template, {**self.unflatten(flat), **self._buffers},
                                       (x.clone(),)))

    def module_at(self, flat: Tensor) -> nn.Module:
        """A standalone network with the flat parameters ``flat`` (batch-statistics BN)."""
        self._reset_state()  # a copy of the state the fit started from, not the last pass's
        out = module_copy(self.template)
        values = self.unflatten(flat.detach())
        with torch.no_grad():
            for name, p in out.named_parameters():
                p.copy_(values[name])
        return out


class PatternPlane(nn.Module):
    """The trainable state of a pattern fit: ``w0, w1, w2`` (each P entries) and ``s``.

    Args:
        w0, w1, w2: Flat vectors of three independently initialised networks.
        scale: Initial value of the learned scale ``s`` (0.1 in the paper).
        plane: ``"up_orthogonal"`` (every config of the paper): right = w1 - w0 and up is
            w2 made orthogonal to right (Gram-Schmidt of the *raw* w2, in float64) and
            rescaled to ||right||. ``"simple"``: right = w1, up = w2, with
            :meth:`penalty` pushing them to be orthogonal and of equal length.
    """

    def __init__(self, w0: Tensor, w1: Tensor, w2: Tensor, scale: float = 0.1,
                 plane: str = "up_orthogonal"):
        super().__init__()
        if plane not in PLANES:
            raise ValueError(f"plane={plane!r}: choose one of {PLANES}.")
        self.plane = plane
        self.w0 = nn.Parameter(w0.detach().clone())
        self.w1 = nn.Parameter(w1.detach().clone())
        self.w2 = nn.Parameter(w2.detach().clone())
        self.s = nn.Parameter(torch.tensor(float(scale), dtype=w0.dtype, device=w0.device))

    def basis(self) -> tuple[Tensor, Tensor]:
        """``(right, up)``, differentiable in ``w0, w1, w2``."""
        if self.plane == "simple":
            return self.w1, self.w2
        right = (self.w1 - self.w0).double()
        w2 = self.w2.double()
        up = w2 - right * (w2 @ right) / (right @ right)
        up = up * (right.norm() / up.norm())
        return right.to(self.w0.dtype), up.to(self.w0.dtype)

    def penalty(self) -> Tensor:
        """The ``simple`` plane's 10 <up, right>^2 + 10 (||up|| - ||right||)^2; else 0."""
        if self.plane != "simple":
            return self.s.new_zeros(())
        right, up = self.w1, self.w2
        return 10 * (up @ right) ** 2 + 10 * (up.norm() - right.norm()) ** 2

    def cells(self, offsets: Tensor) -> Tensor:
        """Flat vectors (K, P) of the cells at centred offsets ``(di, dj)`` (K, 2)."""
        right, up = self.basis()
        offsets = offsets.to(self.w0.dtype)
        return self.w0 + self.s * (offsets[:, :1] * up + offsets[:, 1:] * right)


def _logits(out) -> Tensor:
    """The logits in a network's outputs (a dict's ``"logits"`` too, as the surfaces read).

    Returns:
        The logits Tensor (see :func:`~landscape_widget.core.metrics.find_logits`).

    Raises:
        TypeError: If the outputs hold no logits the cross-entropy could read (a tuple).
    """
    try:
        return find_logits(out)
    except TypeError as err:  # its message speaks of accuracy and output_fn=
        raise TypeError(f"fit_pattern trains the networks' cross-entropy, but they return "
                        f"{type(out).__name__}, not logits: return the logits Tensor (or a "
                        "dict with a 'logits' entry) from model_fn's networks.") from err


def cell_losses(layout: FlatLayout, flats: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy on ``(x, y)`` of every network in ``flats`` (K, P), batched."""
    return cells_cross_entropy(layout.forward(flats, x), y)


def mpo_loss(ce_good: Tensor, ce_bad: Tensor, n_good: int, n_bad: int, tau: float,
             coef: float) -> Tensor:
    """Sum of this chunk's terms of  mean_g CE - coef * mean_b clamp(CE, 0, tau).

    Chunks of cells add up to the paper's loss: each term is divided by the step's total
    number of good (bad) cells, not the chunk's. The clamp makes a bad cell's gradient
    exactly zero once its CE reaches tau.

    Returns:
        A scalar tensor: ``sum(ce_good) / n_good - coef * sum(clamp(ce_bad, 0, tau)) / n_bad`` (the
        bad term dropped when ``n_bad`` is 0).

    Example:
        >>> # two chunks of a step with 3 good and 2 bad cells add up to the whole step's loss
        >>> good, bad = torch.tensor([1.0, 3.0, 2.0]), torch.tensor([0.5, 9.0])
        >>> parts = (mpo_loss(good[:2], bad[:1], 3, 2, tau=2.0, coef=1.0)
        ...          + mpo_loss(good[2:], bad[1:], 3, 2, tau=2.0, coef=1.0))
        >>> round(float(parts), 6) == (1 + 3 + 2) / 3 - (0.5 + min(9.0, 2.0)) / 2  # float32
        True
    """
    loss = ce_good.sum() / max(n_good, 1)
    if n_bad:
        loss = loss - coef * ce_bad.clamp(0.0, tau).sum() / n_bad
    return loss
