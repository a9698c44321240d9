"""When a Hessian-vector product of :class:`~.hvp.HessianOperator` fails, or is wrong.

A mixin of the operator (it uses its ``method``, ``_plan``, ``fallback``, ``products``,
``_graph``, ``_math_attention``, ``size``, ``dtype``, ``device`` and ``unflatten``):

- ``_failed``: after a first product failed, the math attention kernel for a fused one
  without a double backward, or the next method of ``method="auto"``'s plan (``"graph"``
  -> ``"jvp"``, ``"jvp"`` -> ``"backward"``); otherwise an error naming what failed and
  the fix;
- ``_check_reached``: once, that the loss depends on no parameter autograd cannot reach
  (a part of forward under ``torch.no_grad()``: :mod:`.reach`);
- ``_check_symmetric``: once, ``u . Hw == w . Hu`` on two seeded vectors, since torch's
  double backward of a few layers is silently wrong;
- ``_attention``: the attention-kernel context the products run under.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._pytree import tree_map

from .reach import check_reached, unreached


class ProductFallbacks:
    """The checks and fallbacks of the products (a mixin of the operator)."""

    def _check_reached(self) -> None:
        """Once: refuse parameters the loss depends on but autograd cannot reach.

        A part of the forward run under ``torch.no_grad()`` (a frozen backbone) gave no
        gradient to its parameters, read as a zero Hessian row (:mod:`.reach`). Checked on
        the first batch with counted targets, with one backward (``graph``: from the
        products' own graph over all data); the parameters it does not reach are moved,
        and refused if the loss moves with them (an unused head leaves it as it was).

        Raises:
            ValueError: Naming the parameters and the fix (:func:`~.reach.check_reached`).
        """
        # The first batch with counted targets: one with none has a NaN mean (or a constant
        # loss), which the probe cannot compare, and the check passed without a look.
        start = next((i * self.batch for i, w in enumerate(self._weights) if w), 0)
        xb, yb = self.x[start:start + self.batch], self.y[start:start + self.batch]
        if self.method == "graph":  # all data in one batch: the products' own graph says it
            names = [k for k, g in zip(self.params, self._build_graph()[1], strict=True)
                     if g is None]
        else:
            leaves = {k: v.detach().clone().requires_grad_(True)
                      for k, v in self.params.items()}
            with torch.enable_grad():
                names = unreached(self._loss(leaves, xb, yb, start), leaves)
        if names:
            check_reached(lambda p: self._probe_loss(p, xb, yb, start), self.params, names,
                          "the Hessian (its eigenvalues, trace and curvature maps)")
        self._reached = True

    def _probe_loss(self, params: dict[str, torch.Tensor], xb: torch.Tensor,
                    yb: torch.Tensor, start: int) -> torch.Tensor:
        """The loss for :func:`~.reach.check_reached`: of half-precision outputs widened.

        A bfloat16 loss rounds to 0.8 % near 1, and moving a no-grad part changed it by
        less (passed as unused); the outputs themselves moved. The loss of the outputs in
        float64 shows it; an unused parameter leaves them, hence it, as they were. A loss_fn
        that cannot take float64 outputs gets them as they are.

        Returns:
            The user's loss (or the default) of the outputs at ``params`` on ``xb``.
        """
        out = self._outputs(params, xb, start)
        wide = tree_map(lambda t: t.double() if isinstance(t, torch.Tensor)
                        and t.dtype in (torch.bfloat16, torch.float16) else t, out)
        if wide is not out:
            try:
                loss = self.loss_fn(wide, yb)
                if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                    return loss
            except (RuntimeError, TypeError, ValueError):
                pass
        return self.loss_fn(out, yb)

    def _check_symmetric(self) -> None:
        """Check ``u . Hw == w . Hu`` once, on two seeded vectors (not counted as products).

        torch's double backward of a few layers is silently wrong: weight_norm's fused
        ``_weight_norm_interface`` (torch 2.x, both parametrizations and the legacy hook)
        gives a Hessian off by ~10 % and not symmetric, and eigenvalues, traces and
        curvature maps from it would be wrong with no sign of it. A correct Hessian is
        symmetric, so asymmetry beyond rounding (1e-3 of the Cauchy-Schwarz bound) shows it.

        Raises:
            RuntimeError: If the products are not symmetric (``_failed`` then tries the
                next method or explains).
        """
        g = torch.Generator().manual_seed(12345)
        u, w = (torch.randn(self.size, generator=g, dtype=torch.float64) for _ in range(2))
        product = getattr(self, f"_{self.method}_product")
        hu, hw = (product([t.contiguous() for t in self.unflatten(
            v.to(self.device, self.dtype)).values()]).double().cpu() for v in (u, w))
        a, b = float(u @ hw), float(w @ hu)
        bound = float(max(u.norm() * hw.norm(), w.norm() * hu.norm()))
        if abs(a - b) > 1e-3 * bound:
            raise RuntimeError(
                f"Hessian-vector products are not symmetric (u.Hw = {a:.6g}, w.Hu = {b:.6g}): "
                "torch's second derivative of a layer of this model is wrong (known: "
                "weight_norm, whose _weight_norm_interface double backward is incorrect; "
                "compute such a weight from plain operations, g * v / v.norm(dim=1, "
                "keepdim=True), in a custom parametrization; and F.embedding(..., "
                "scale_grad_by_freq=True) called in forward, whose backward rescales the "
                "gradient: drop that flag for the analysis)")
        self._symmetric = True

    def _attention(self):
        """The math attention kernel once a fused one proved not twice differentiable."""
        if not self._math_attention:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)

    def _failed(self, err: Exception) -> None:
        """Switch to the next method after a first product failed, or explain and raise."""
        msg = f"{self.method}: {type(err).__name__}: {str(err).splitlines()[0]}"
        if (self.products == 0 and not self._math_attention
                and "scaled_dot_product" in str(err)):
            # Fused attention kernels (flash, memory-efficient) have no double backward;
            # the math kernel computes the same function from differentiable operations.
            self._math_attention = True
            self.fallback = msg + " -> math attention kernel"
            self._graph = None
            return
        tried = [self.fallback, msg] if self.fallback else [msg]
        if self.products == 0 and self.method != self._plan[-1]:
            self.method = self._plan[self._plan.index(self.method) + 1]
            self.fallback = msg
            self._graph = None
            return
        hint = ("on CUDA a cuDNN RNN has no double backward: run the call inside "
                "`with torch.backends.cudnn.flags(enabled=False):`" if self.device.type == "cuda"
                else "replace that layer by a twice-differentiable one")
        text, failed = "; ".join(tried), {t.split(":", 1)[0] for t in tried}
        ways = {"backward": "method='backward' (double backward batch by batch)",
                "jvp": "method='jvp' (forward-over-reverse)"}
        if "derivative for" in text and failed & {"graph", "backward"}:
            ways.pop("backward")  # the same double backward as 'graph': fails alike
        if "hardsigmoid" in text:  # neither derivative exists; the clamp form has both
            hint, ways = ("compute F.hardsigmoid(x) as (x + 3).clamp(0, 6) / 6, the same "
                          "function (nn.Hardsigmoid layers are swapped for it here)"), {}
        ways = [w for m, w in ways.items() if m not in failed]
        others = f", or pass {' or '.join(ways)} to try the other way" if ways else ""
        if "modified by an inplace operation" in str(err):
            # No method helps: the forward itself is not differentiable (as in training).
            raise RuntimeError(
                f"Hessian-vector products need the loss's gradient, and torch cannot take it "
                f"({msg}): the model's forward changes a tensor in place after using it "
                "(e.g. a buffer: self.scale.mul_(1.5) after out = h * self.scale), so "
                "loss.backward() fails on it too. Fix: move that update out of forward, or "
                "compute out of place (self.scale = self.scale * 1.5).") from err
        raise RuntimeError(
            "Hessian-vector products need the loss differentiated twice, and torch could not ("
            + text + f"). Fix: {hint}{others}.") from err
