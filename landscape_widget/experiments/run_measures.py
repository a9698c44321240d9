"""The maths behind two analyses of :class:`~.runs.OptimizerRuns`, on plain models and tensors.

:func:`basin_radii` (B7: how far the loss stays near a solution along random directions, with
quantiles that allow ``inf``) and :func:`prediction_differences` (B6: how differently two
models predict). :class:`~.runs.OptimizerRuns` picks the runs and the data, checks the
arguments and calls these; they live apart to keep ``runs.py`` short.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from torch import Tensor, nn

from ..core.directions import random_directions
from ..core.evaluate import Evaluator
from ._objective import _norm


def inf_quantiles(values: np.ndarray, qs: Sequence[float]) -> list[float]:
    """Linear-interpolation quantiles (numpy's default) that allow ``inf`` values.

    A radius is ``inf`` when the loss never left the basin in range; numpy interpolates
    ``inf - inf`` to NaN, while any quantile that leans on an ``inf`` is ``inf``.

    Returns:
        One value per ``qs``.

    Example:
        >>> inf_quantiles(np.array([1.0, 2.0, np.inf]), (0.25, 0.5, 0.75))
        [1.5, 2.0, inf]
    """
    v = np.sort(np.asarray(values, dtype=float))
    out = []
    for q in qs:
        pos = q * (v.size - 1)
        lo, hi = int(np.floor(pos)), int(np.ceil(pos))
        w = pos - lo
        out.append(float(v[lo]) if w == 0 or v[lo] == v[hi] else
                   float(np.inf) if np.isinf(v[hi]) else float(v[lo] + w * (v[hi] - v[lo])))
    return out


def basin_radii(model: nn.Module, data: tuple[Tensor, Tensor], r: np.ndarray, k: int, *,
                delta: float, norm: str | None, seed: int,
                loss_fn: Callable[[Tensor, Tensor], Tensor], bn: str) -> dict:
    """The basin radius of ``model`` along ``k`` random directions, in one engine call.

    ``r*`` is the first radius of ``r`` (which starts at 0) with
    ``L(theta* + r d) > L(theta*) + delta``, or ``inf`` if the loss never rises that much.
    See :meth:`~.runs.OptimizerRuns.basin_size` for the arguments.

    Returns:
        ``{"r": (k,) array, "median": float, "iqr": (q25, q75)}``.
    """
    coeffs = np.zeros((k * r.size, k))
    for j in range(k):
        coeffs[j * r.size : (j + 1) * r.size, j] = r
    if norm == "unit":  # PAPERS B7's variant: Gaussian directions of norm 1
        dirs = [{n: v / float(_norm(d)) for n, v in d.items()}
                for d in random_directions(model, k, norm=None, seed=seed)]
    else:
        dirs = random_directions(model, k, norm=norm, seed=seed)
    loss = Evaluator(model, data, dirs, loss_fn=loss_fn, metrics=("loss",),
                     bn=bn).evaluate(coeffs)["loss"].reshape(k, r.size)
    above = loss > loss[:, :1] + delta
    first = np.where(above.any(1), r[np.argmax(above, 1)], np.inf)
    q25, med, q75 = inf_quantiles(first, (0.25, 0.5, 0.75))
    return {"r": first, "median": float(med), "iqr": (float(q25), float(q75))}


def prediction_differences(logp: dict[str, Tensor], y: Tensor, names: Sequence[str]
                           ) -> dict[tuple[str, str], dict[str, float]]:
    """How differently pairs of models predict, from their log-softmax outputs ``logp``.

    See :meth:`~.runs.OptimizerRuns.functional_difference` for what each number is.

    Returns:
        ``{(a, b): {"disagreement", "symmetric_kl", "ensemble_accuracy", "accuracy_a",
        "accuracy_b"}}`` for every pair ``a`` before ``b`` in ``names``.
    """
    result = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            la, lb = logp[a], logp[b]
            pa, pb = la.exp(), lb.exp()
            kl = ((pa * (la - lb)).sum(1) + (pb * (lb - la)).sum(1)).mean()
            ens = ((pa + pb) / 2).argmax(1)
            result[(a, b)] = {
                "disagreement": float((la.argmax(1) != lb.argmax(1)).double().mean()),
                "symmetric_kl": float(kl),
                "ensemble_accuracy": float((ens == y).double().mean()),
                "accuracy_a": float((la.argmax(1) == y).double().mean()),
                "accuracy_b": float((lb.argmax(1) == y).double().mean()),
            }
    return result
