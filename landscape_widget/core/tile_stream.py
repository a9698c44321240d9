"""A grid's computation as an iterable of tiles, and the loop that drives it.

:class:`TileStream` is what :func:`~landscape_widget.iter_tiles` returns (and what
:func:`~landscape_widget.compute_surface` and :func:`~landscape_widget.compute_curve`
run with a progress bar, :func:`run_stream`); :func:`check_foreign_reuse` checks a
loss-landscape file's reused values against this model before they are taken.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Iterator

import numpy as np

from .compute import GridJob, LocalRunner
from .errors import ReuseMismatch
from .grid import Tile
from .plans import check_positive
from .surface import Curve, Surface


class TileStream:
    """The computation of one grid as an iterable of :class:`Tile` in coarse-to-fine order.

    Iterating computes the tiles; :meth:`result` gives the grid so far (NaN where not yet
    computed). Stop iterating to cancel: the work ends after the current tile. Or set
    ``cancel``: on this process the tile in progress stops at its next batch (dropped),
    once the first tile has chosen the plan; on an executor, after the current tiles.

    Attributes:
        axes: ``[x]`` for a curve, ``[y, x]`` for a surface.
        shape: ``(nx,)`` or ``(ny, nx)``.
        spec: How the grid is computed (ranges, loss, bn, seed, fingerprints, device).
        evaluator: The job's runner doing the work (:class:`~.compute.TileRunner`: the
            local :class:`~landscape_widget.core.evaluate.Evaluator`, or an executor's).
    """

    def __init__(self, job: GridJob, tile_points: int | None,
                 cancel: threading.Event | None):
        self._job = job
        # tile_points=0 meant adaptive, 2.5 became 2 and "a" raised int()'s own error.
        self._tile_points = check_positive("tile_points", tile_points,
                                           "adaptive, ~0.3 s per tile")
        self._cancel = cancel
        self.axes = job.axes
        self.shape = tuple(a.size for a in job.axes)
        self.spec = job.spec
        self.evaluator = job.runner
        self.arrays = {m: np.full(self.shape, np.nan) for m in self.evaluator.metrics}
        self.evaluated = 0
        self.reused = 0

    @property
    def total(self) -> int:
        """Number of grid points."""
        return int(np.prod(self.shape))

    def __iter__(self) -> Iterator[Tile]:
        for tile in self._job.runner.run_tiles(self._job, self._tile_points, self._cancel):
            for m, v in tile.values.items():
                self.arrays[m].reshape(-1)[tile.flat] = v
            self.evaluated += tile.evaluated
            self.reused += tile.flat.size - tile.evaluated
            yield tile

    def result(self) -> Surface | Curve:
        """The grid as computed so far, as a :class:`Surface` or :class:`Curve`."""
        spec = dict(self.spec)
        plan = self.evaluator.describe()["plan"]
        if plan is None:  # no point computed here: say so where a plan would be described
            why = (f"no point computed: all {self.reused} came from reuse=" if self.reused
                   else "no point computed (stopped before the first tile)")
            plan = {"label": "none", "strategy": None, "reason": why}
        # The measured max |loss - fp32 loss| (see core/precision.py), of this call's points
        # and of the reused ones' result: a grid reused whole had measured nothing here and
        # read None, as an exact fp32 grid does.
        errors = [(plan or {}).get("precision_error"),
                  self._job.reused_error if self.reused else None]
        # A NaN (a result saved before non-finite points counted as inf) is inf here: max()
        # with a NaN depends on the order.
        errors = [math.inf if e != e else e for e in errors if e is not None]
        spec.update(
            evaluated=self.evaluated,
            reused=self.reused,
            plan=plan,
            precision=(plan or {}).get("precision", getattr(self.evaluator, "precision", "fp32")),
            precision_error=max(errors) if errors else None,
        )
        keep = spec.pop("keep_directions", True)
        dirs = (
            [{k: v.detach().cpu() for k, v in d.items()} for d in self._job.directions]
            if keep
            else None
        )
        loss = self.arrays.get("loss")
        acc = self.arrays.get("accuracy")
        loss = None if loss is None else loss.copy()
        acc = None if acc is None else acc.copy()
        extra = {m: a.copy() for m, a in self.arrays.items()
                 if m not in ("loss", "accuracy", "loss_se")}
        se = self.arrays.get("loss_se")
        se = None if se is None else se.copy()
        if len(self.axes) == 1:
            return Curve(self.axes[0].copy(), loss, acc, spec, dirs, extra_metrics=extra,
                         loss_se=se)
        return Surface(self.axes[1].copy(), self.axes[0].copy(), loss, acc, spec, dirs,
                       extra_metrics=extra, loss_se=se)


def check_foreign_reuse(job: GridJob) -> None:
    """Recompute two reused values of a loss-landscape file and refuse it unless they agree.

    Its files record no model, data or directions to compare fingerprints with.

    Raises:
        ReuseMismatch: (a ``ValueError``) If a recomputed loss at the file's innermost or
            outermost reused point differs from the file's (rtol 1e-3), or an accuracy by
            more than one sample; the message names the point and both values.
    """
    idx = np.flatnonzero(job.known_mask) if job.known_mask is not None else np.zeros(0, int)
    if idx.size == 0:
        return
    ev = job.runner
    if not isinstance(ev, LocalRunner):  # an executor's runner evaluates whole tiles only
        warnings.warn("reuse= of a loss-landscape file with an executor: its values were not "
                      "checked against this model, data and directions.", stacklevel=3)
        return
    radius = np.linalg.norm(job.coords(idx), axis=1)
    pick = np.unique(idx[[int(np.argmin(radius)), int(np.argmax(radius))]])
    coords = job.coords(pick)
    got = ev.evaluate(coords)
    # accuracy: one sample may flip on float noise between the two tools' arithmetic
    n = max(int(job.spec.get("n_samples") or 1), 1)
    for m, tol in (("loss", {"rtol": 1e-3, "atol": 1e-6}), ("accuracy", {"atol": 1.01 / n})):
        if m not in got:
            continue
        want = job.known[m][pick]
        bad = ~np.isclose(got[m], want, **tol)
        if bad.any():
            i = int(np.argmax(bad))
            raise ReuseMismatch(
                f"reuse=: the file's {m} at ({coords[i][0]:.4g}, {coords[i][-1]:.4g}) is "
                f"{want[i]:.6g}, but this model, data and directions give {got[m][i]:.6g}. "
                "The file was computed with another model, data, directions or loss; pass the "
                "ones it was made with (lw.load_directions reads its directions file).")


def run_stream(stream: TileStream, progress: bool, desc: str) -> Surface | Curve:
    """Iterate ``stream`` to its end (a tqdm bar when ``progress``); its result.

    Returns:
        ``stream.result()``, after the one warning about non-finite losses, if any.
    """
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=stream.total, desc=desc, unit="pt")
    try:
        for tile in stream:
            if bar is not None:
                bar.update(tile.flat.size)
                plan = stream.evaluator.plan
                if plan is not None:
                    bar.set_postfix_str(f"{plan.strategy} K={plan.points}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    warn_nonfinite(stream.evaluator.nonfinite_points, stream.evaluator)
    return stream.result()


def warn_nonfinite(count: int, evaluator=None) -> None:
    """Emit the single warning about non-finite losses of one computation.

    With running BatchNorm statistics in the directions (interpolations, planes through
    models, permutations) the usual cause is not divergence: past the models the combined
    running variances turn negative, so the hint says so.
    """
    if not count:
        return
    why = "the model diverges there: shrink the range to look closer"
    if getattr(evaluator, "bn", None) == "eval" and any(
            k.endswith("running_var") for k in getattr(evaluator, "keys", ())):
        why = ("the directions move BatchNorm running variances, which turn negative away "
               "from the models: stay between them, or pass bn='batch' to use batch statistics")
    warnings.warn(
        f"{count} grid point(s) gave a non-finite loss; they are kept as NaN in the result "
        f"({why}).",
        RuntimeWarning,
        stacklevel=3,
    )
