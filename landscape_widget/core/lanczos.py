"""Lanczos for symmetric operators given as ``v -> A v`` on flat torch vectors.

The basis lives where the products do (the model's device and dtype: no host round trip,
no float64 copies of parameter-sized vectors); the small projected problem is float64 numpy.
Every step takes ONE product, then the three-term recurrence and one classical Gram-Schmidt
pass against the whole basis (a second pass only when the first removed much, the DGKS test),
so the basis stays orthonormal to rounding and no ghost eigenvalues appear. The Gram-Schmidt
coefficients are kept: with them ``A Q_m = Q_{m+1} Hbar_m`` holds to rounding, so every Ritz
pair's residual ``||A y - theta y||`` is measured without extra products.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

BASIS_BYTES = 2 << 30
"""Memory the Lanczos basis may take; it caps the number of steps of one run."""

STALL_STEPS = 200
"""Steps without the wanted pairs' worst residual halving after which a run stops: float32
products leave a floor (1-4e-6 of ``max|theta|`` on a small MaxVit) that no number of
further steps passes (review 11b: ``tol=1e-6`` ran on for 16 CPU-minutes, then ARPACK)."""

STALL_FLOOR_EPS = 1e3
"""A run only stalls with its worst wanted relative residual below this many machine
epsilons of the basis's dtype (1.2e-4 in float32, 2.2e-13 in float64): above, no rounding
floor explains the wait, and a slowly converging run (a dense top of the spectrum, k > 1)
goes on. A float64 Hessian whose top is dense (1 - t**2 on 1,500 points, k=2, tol=1e-7)
stalled at 1.7e-4 after 455 products and lost its converged answer at 1,500."""

_DGKS = 0.7  # a second Gram-Schmidt pass when a pass leaves less than this share of the norm


def max_steps(size: int, dtype: torch.dtype, k: int = 1) -> int:
    """Lanczos steps whose basis fits in :data:`BASIS_BYTES` (at least ``2 k + 2``)."""
    per = torch.finfo(dtype).bits // 8 * max(size, 1)
    return int(min(size, max(2 * k + 2, BASIS_BYTES // per)))


@dataclass
class LanczosState:
    """The Lanczos decomposition after ``m`` steps: ``A Q_m = Q_{m+1} Hbar_m``.

    Attributes:
        basis: ``(steps, n)`` storage; rows ``0..m-1`` are ``Q_m`` (orthonormal), row ``m``
            the next vector once ``beta`` > 0.
        hbar: ``(m + 1, m)`` float64 coefficients (upper Hessenberg; tridiagonal up to
            rounding).
        beta: Norm of the remainder after step ``m`` (``hbar[m, m - 1]``).
    """

    basis: Tensor
    hbar: np.ndarray
    beta: float

    @property
    def m(self) -> int:
        """Steps (products) taken."""
        return self.hbar.shape[1]

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), their coefficient vectors and measured residuals.

        The Rayleigh-Ritz matrix is the symmetric part of ``Hbar_m``'s square block; the
        residual of ``y = Q_m s`` is ``||Hbar_m s - theta [s; 0]||`` (``Q_{m+1}`` is
        orthonormal), the same as ``||A y - theta y||`` up to rounding.

        Returns:
            ``(theta, s, residuals)``: the ``m`` Ritz values in ascending order, the ``(m, m)``
            matrix whose columns are their coefficient vectors in the basis, and the residual norm
            ``||A y - theta y||`` of each Ritz vector ``y``.
        """
        m = self.m
        square = self.hbar[:m]
        theta, s = np.linalg.eigh(0.5 * (square + square.T))
        res = self.hbar @ s
        res[:m] -= theta * s
        return theta, s, np.linalg.norm(res, axis=0)

    def vectors(self, coef: np.ndarray) -> Tensor:
        """``Q_m @ coef`` as float64 columns on the basis' device."""
        q = self.basis[:self.m]
        return q.T.double() @ torch.as_tensor(coef, dtype=torch.float64, device=q.device)


def lanczos(matvec: Callable[[Tensor], Tensor], v0: Tensor, steps: int) -> Iterator[LanczosState]:
    """Lanczos with full reorthogonalisation; yields the state after every step.

    Args:
        matvec: ``v -> A v`` for a flat vector (same dtype and device in and out).
        v0: Start vector; its dtype and device are the basis'.
        steps: Most steps (the basis is allocated for this many rows).

    Yields:
        :class:`LanczosState` after each product; it is updated in place, so a consumer
        that keeps one must copy what it needs. Stops early at an invariant subspace
        (``beta`` about 0).

    Example:
        >>> a = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> for state in lanczos(lambda v: a @ v, torch.ones(5, dtype=torch.float64), 5):
        ...     pass
        >>> theta, _, residuals = state.ritz()  # 5 steps span R^5: the exact spectrum
        >>> np.allclose(theta, np.linalg.eigvalsh(a.numpy())), bool(residuals.max() < 1e-10)
        (True, True)

    Raises:
        ValueError: If ``v0`` is zero or has a NaN entry, when the generator is first advanced.
    """
    n = v0.numel()
    steps = int(min(steps, n))
    basis = torch.empty((steps + 1, n), dtype=v0.dtype, device=v0.device)
    nrm = float(v0.double().norm())
    if not nrm > 0:
        raise ValueError("the Lanczos start vector is zero.")
    basis[0] = v0.reshape(-1) / nrm
    hbar = np.zeros((steps + 1, steps))
    for m in range(steps):
        q = basis[m]
        w = matvec(q)
        if m:
            w.sub_(basis[m - 1], alpha=hbar[m, m - 1])
            hbar[m - 1, m] = hbar[m, m - 1]
        alpha = float(torch.dot(w, q))
        w.sub_(q, alpha=alpha)
        hbar[m, m] += alpha
        before = float(w.norm())
        for _ in range(2):
            coef = basis[:m + 1] @ w
            w.sub_(basis[:m + 1].T @ coef)
            hbar[:m + 1, m] += coef.double().cpu().numpy()
            after = float(w.norm())
            if after > _DGKS * before:
                break
            before = after
        hbar[m + 1, m] = after
        state = LanczosState(basis, hbar[:m + 2, :m + 1], after)
        scale = float(np.abs(np.diag(hbar)[:m + 1]).max()) + float(np.abs(hbar[m + 1, m]))
        if after <= 1e-10 * max(scale, 1e-300) or m + 1 == steps:
            yield state
            return
        basis[m + 1] = w / after
        yield state


def extreme_pairs(matvec: Callable[[Tensor], Tensor], v0: Tensor, *, k: int = 1,
                  ends: tuple[str, ...] = ("largest",), tol: float = 1e-4,
                  steps: int | None = None) -> dict:
    """Extreme eigenpairs by Lanczos, stopping once every wanted pair is converged.

    A pair is converged when its measured residual ``||A y - theta y||`` is at most
    ``tol * max|theta|``. One run serves both ends (``ends=("largest", "smallest")``).

    Args:
        matvec: ``v -> A v`` on flat vectors of ``v0``'s dtype and device.
        v0: Start vector.
        k: Pairs wanted at each end.
        ends: ``"largest"`` and/or ``"smallest"`` (algebraic).
        tol: Relative residual tolerance.
        steps: Most steps (products); default :func:`max_steps`.

    Returns:
        ``{"converged": bool, "stalled": bool, "products": int, "state": LanczosState,
        "scale": float (the largest |Ritz value|), end: (values, coefficients,
        residuals)}`` with values ordered outward (largest first for ``"largest"``,
        smallest first for ``"smallest"``); when not converged, the best pairs so far.
        ``stalled``: stopped because the worst wanted residual had not halved in
        :data:`STALL_STEPS` steps while below :data:`STALL_FLOOR_EPS` epsilons (the
        products' rounding floor is above ``tol``).
    """
    if steps is None:
        steps = max_steps(v0.numel(), v0.dtype, k)
    out: dict = {}
    best, best_at = math.inf, 0  # the worst wanted relative residual, and its step
    floor = STALL_FLOOR_EPS * torch.finfo(v0.dtype).eps
    for state in lanczos(matvec, v0, steps):
        theta, s, res = state.ritz()
        scale = max(abs(theta[0]), abs(theta[-1]), 1e-300)
        picks = {"largest": np.arange(len(theta) - 1, max(len(theta) - 1 - k, -1), -1),
                 "smallest": np.arange(0, min(k, len(theta)))}
        out = {e: (theta[picks[e]], s[:, picks[e]], res[picks[e]]) for e in ends}
        out["converged"] = len(theta) >= k and all(
            np.all(res[picks[e]] <= tol * scale) for e in ends)
        out["products"], out["state"], out["scale"] = state.m, state, scale
        worst = max(float(np.max(res[picks[e]], initial=0.0)) for e in ends) / scale
        if worst <= best / 2:
            best, best_at = worst, state.m
        out["stalled"] = not out["converged"] and state.m - best_at >= STALL_STEPS and (
            worst <= floor)
        if out["converged"] or out["stalled"]:
            break
    return out


def scipy_operator(matvec: Callable[[Tensor], Tensor], size: int):
    """``matvec`` on torch tensors as a scipy ``LinearOperator`` on float64 numpy vectors."""
    from scipy.sparse.linalg import LinearOperator

    def mv(v):
        flat = np.ascontiguousarray(v, dtype=np.float64).reshape(-1)
        return matvec(torch.from_numpy(flat)).cpu().numpy()

    return LinearOperator((size, size), matvec=mv, dtype=np.float64)
