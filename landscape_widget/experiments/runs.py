"""A set of optimizer runs from one start: how it is made and what to do with it.

Im, Tao & Branson 2016, PAPERS (b) B1–B7: :func:`compare_optimizers` trains the runs (each
with :mod:`.optimizers`) into an :class:`OptimizerRuns`, whose methods switch optimizers
mid-run and measure distances, functional differences, basins and planes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.copies import module_copy
from ..core.directions import interpolation_direction
from ..core.heap import holding_heap
from ..core.landscape import compute_curve
from ..core.losses import check_cross_entropy_targets
from ..core.params import outside_inference_mode
from ..core.surface import Curve
from .optimizers import (
    OptimizerFactory,
    Run,
    Schedule,
    class_targets,
    held_data,
    initial_model,
    make_optimizer,
    model_at,
    start_run,
    train_run,
)
from .run_measures import basin_radii, prediction_differences
from .triangle import TriangleSurface, triangle_surface


@outside_inference_mode
@holding_heap
def compare_optimizers(model_fn, train_data, optimizers: Mapping[str, OptimizerFactory], *,
                       epochs: int = 10, batch_size: int = 128, seed: int = 0, test_data=None,
                       loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                       progress: bool = True) -> OptimizerRuns:
    """Train one architecture with each optimizer from a shared start and batch order.

    PAPERS (b) B1. Each run trains its own copy of ``theta_0`` (made once, from ``seed``),
    visits the same mini-batches in the same order and draws the same dropout masks, and
    keeps a checkpoint after every epoch. Re-run with another ``seed`` for another
    initialisation (and batch order).

    Args:
        model_fn: Zero-argument callable returning a freshly initialised network (called
            once, with the RNG seeded from ``seed``), or an ``nn.Module`` to start from
            (copied, never modified).
        train_data: ``(inputs, targets)`` tensors, a ``Dataset`` or a ``DataLoader``; held in
            memory on the model's device.
        optimizers: ``{name: factory}``, each ``factory(params)`` returning an optimizer,
            e.g. ``{"sgd": functools.partial(torch.optim.SGD, lr=0.1)}``.
        epochs: Epochs per run.
        batch_size: Samples per step (the last, smaller batch of an epoch is used too).
        seed: Seed of ``theta_0``, of the batch order and of the dropout masks.
        test_data: Optional held-out data, evaluated after every epoch.
        loss_fn: ``loss_fn(outputs, targets)``, mean over the batch; cross-entropy by default.
        progress: Show a tqdm bar over all steps.

    Returns:
        An :class:`~landscape_widget.experiments.runs.OptimizerRuns`.

    Raises:
        TypeError: If ``optimizers`` is not a non-empty dict of named factories, or a
            factory or ``model_fn`` is not what it must be.
        ValueError: If ``epochs`` or ``batch_size`` is not an int >= 1.
    """
    if not isinstance(optimizers, Mapping) or not optimizers:
        raise TypeError("optimizers must be a non-empty dict {name: factory(params)}.")
    for name in optimizers:
        if not isinstance(name, str) or not name:
            raise TypeError(f"optimizer names must be non-empty strings, got {name!r}.")
    for what, v in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be an int >= 1, got {v!r}.")
    init = initial_model(model_fn, seed)
    x, y = held_data(train_data, init, seed)
    if loss_fn is None:
        check_cross_entropy_targets(y)
    loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
    test = None if test_data is None else held_data(test_data, init, seed)
    schedule = Schedule(int(x.shape[0]), batch_size, epochs, seed)
    runs = OptimizerRuns(init, (x, y), test, dict(optimizers), schedule, loss_fn, epochs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(optimizers) * epochs * schedule.steps_per_epoch, unit="step",
                   desc="training")
    try:
        for name, factory in optimizers.items():
            runs.train(name, factory, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    return runs


class OptimizerRuns:
    """Runs of several optimizers from one ``theta_0`` (see :func:`compare_optimizers`).

    ``runs["adam"]`` is the final model of the Adam run (a fresh copy each time, in eval
    mode); :attr:`runs` holds the :class:`~landscape_widget.experiments.optimizers.Run`
    records (checkpoints and per-epoch logs).

    Attributes:
        runs: ``{name: Run}`` in training order; switched runs are added by :meth:`switch`.
        epochs: Epochs per run.
        schedule: The shared batch order and dropout seeds.
    """

    def __init__(self, init: nn.Module, data: tuple[Tensor, Tensor], test, factories: dict,
                 schedule: Schedule, loss_fn, epochs: int):
        self._init = init
        self.data = data
        self.test = test
        self.factories = factories
        self.schedule = schedule
        self.loss_fn = loss_fn
        self.epochs = epochs
        self.runs: dict[str, Run] = {}

    # --- training ---------------------------------------------------------------------
    @outside_inference_mode
    @holding_heap
    def train(self, name: str, factory, bar=None) -> Run:
        """Train (or re-train) the run ``name`` from ``theta_0`` with ``factory``."""
        run = start_run(name, factory, self._init, self.schedule, self.epochs, self.data,
                        self.test, self.loss_fn, bar)
        self.runs[name] = run
        return run

    @outside_inference_mode
    @holding_heap
    def switch(self, a: str, b: str, at_epoch: int, *, optimizer=None,
               progress: bool = False) -> Run:
        """Run ``a`` for ``at_epoch`` epochs, then a fresh optimizer ``b`` to the end (B4).

        The weights at the switch are run ``a``'s checkpoint, bit for bit; the new optimizer
        has no state (no momentum, no moment estimates). The remaining epochs use the same
        batches and dropout masks as every other run. The run is named
        ``f"{a}{k}-{b}{T - k}"`` (PROPOSAL for the paper's "A200-S...").

        Args:
            a: The first run's name.
            b: The second optimizer: a name in ``optimizers``.
            at_epoch: ``k``, with ``1 <= k < epochs``.
            optimizer: A factory to use instead of ``optimizers[b]``.
            progress: Show a tqdm bar.

        Returns:
            The new :class:`Run` (also in :attr:`runs`).

        Raises:
            KeyError: If there is no optimizer ``b`` and no ``optimizer`` is given.
            ValueError: If the runs are too short to switch, ``at_epoch`` is out of range, or
                run ``a`` diverged before it.
        """
        run_a = self._run(a)
        factory = optimizer if optimizer is not None else self.factories.get(b)
        if factory is None:
            raise KeyError(f"No optimizer named {b!r}; choose one of {list(self.factories)} or "
                           "pass optimizer=factory.")
        if self.epochs < 2:
            raise ValueError("switching needs runs of at least 2 epochs (A for k, B for the "
                             "rest); these ran 1. Re-run compare_optimizers with epochs >= 2.")
        if isinstance(at_epoch, bool) or not isinstance(at_epoch, int) or not (
                1 <= at_epoch < self.epochs):
            raise ValueError(f"at_epoch must be an int in [1, {self.epochs - 1}], got "
                             f"{at_epoch!r}.")
        if at_epoch >= len(run_a.checkpoints):
            raise ValueError(f"run {a!r} stopped (diverged) before epoch {at_epoch}.")
        name = f"{a}{at_epoch}-{b}{self.epochs - at_epoch}"
        model = model_at(self._init, run_a.checkpoints[at_epoch]).train()
        opt = make_optimizer(b, factory, model)
        run = Run(name, list(run_a.checkpoints[: at_epoch + 1]),
                  {k: list(v[: at_epoch + 1]) for k, v in run_a.history.items()},
                  init=run_a.init, switched=(a, at_epoch), optimizer=repr(factory))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=(self.epochs - at_epoch) * self.schedule.steps_per_epoch,
                       unit="step", desc=name)
        try:
            train_run(run, model, opt, self.schedule, range(at_epoch, self.epochs), self.data,
                      self.test, self.loss_fn, bar)
        finally:
            if bar is not None:
                bar.close()
        self.runs[name] = run
        return run

    # --- access -----------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The runs' names, in training order."""
        return list(self.runs)

    def _run(self, name: str) -> Run:
        if name not in self.runs:
            raise KeyError(f"No run named {name!r}; the runs are {self.names}.")
        return self.runs[name]

    def __getitem__(self, name: str) -> nn.Module:
        return self.model(name)

    def model(self, name: str, epoch: int = -1) -> nn.Module:
        """A copy of the network of run ``name`` after ``epoch`` (default: the last one)."""
        return model_at(self._init, self._run(name).checkpoints[epoch])

    def initial_model(self) -> nn.Module:
        """A copy of ``theta_0``, the shared start."""
        return module_copy(self._init).eval()

    def __repr__(self) -> str:
        rows = []
        for name, run in self.runs.items():
            last = run.history.get("test_accuracy") or [float("nan")]
            rows.append(f"{name}: train loss {run.history['train_loss'][-1]:.4f}, "
                        f"test acc {last[-1]:.4f}")
        return f"OptimizerRuns({self.epochs} epochs; " + "; ".join(rows) + ")"

    # --- analyses ---------------------------------------------------------------------
    def distance_from_init(self) -> dict[str, dict[str, np.ndarray]]:
        """Per run, per epoch: ``||theta_e - theta_0||`` and ``||theta_e||`` (B5, PROPOSAL).

        Parameters only (buffers such as BatchNorm statistics are not weights); float64.

        Returns:
            ``{name: {"epoch": (E+1,), "distance": (E+1,), "norm": (E+1,)}}``; distance
            starts at 0.
        """
        keys = [k for k, _ in self._init.named_parameters()]
        out = {}
        for name, run in self.runs.items():
            start = run.checkpoints[0]
            dist, norm = [], []
            for state in run.checkpoints:
                dist.append(np.sqrt(sum(float(((state[k].double() - start[k].double()) ** 2)
                                              .sum()) for k in keys)))
                norm.append(np.sqrt(sum(float((state[k].double() ** 2).sum()) for k in keys)))
            out[name] = {"epoch": np.arange(len(run.checkpoints)),
                         "distance": np.array(dist), "norm": np.array(norm)}
        return out

    def _data(self, data):
        if data is None:
            return self.test if self.test is not None else self.data
        return held_data(data, self._init, self.schedule.seed)

    @outside_inference_mode
    def functional_difference(self, data=None, names: Sequence[str] | None = None
                              ) -> dict[tuple[str, str], dict[str, float]]:
        """How differently pairs of final models predict (B6, PROPOSAL).

        Args:
            data: Where to compare; the test data by default (else the training data).
            names: Runs to compare (all by default).

        Returns:
            ``{(a, b): {...}}`` for every pair ``a`` before ``b``, with ``"disagreement"``
            (fraction of samples whose argmax differs), ``"symmetric_kl"`` (mean over
            samples of ``KL(p_a||p_b) + KL(p_b||p_a)`` of the softmax outputs, nats),
            ``"ensemble_accuracy"`` (argmax of the averaged probabilities), and each model's
            own ``"accuracy_a"``, ``"accuracy_b"``.
        """
        x, y = self._data(data)
        names = list(names) if names is not None else self.names
        logp = {}
        for n in names:
            with torch.no_grad():
                out = torch.cat([self.model(n)(x[s : s + 1024]) for s in range(0, len(x), 1024)])
            y = class_targets(out, y, "functional_difference")
            logp[n] = F.log_softmax(out.double(), dim=1)
        return prediction_differences(logp, y, names)

    @outside_inference_mode
    @holding_heap
    def basin_size(self, directions: int = 20, *, radii=(0.0, 2.0, 41), delta: float = 0.1,
                   norm: str | None = "filter", data=None, seed: int = 0,
                   names: Sequence[str] | None = None, bn: str = "eval") -> dict[str, dict]:
        """How far the loss stays within ``delta`` of the minimum (B7, PROPOSAL).

        For each final model ``theta*`` and each of ``directions`` random directions ``d``
        (filter-normalised by default; ``norm="unit"`` (norm 1 over the weights, PAPERS
        B7's variant), ``"weight"`` or ``None`` as variants), ``r*`` is the
        first ``r`` of ``numpy.linspace(*radii)`` with ``L(theta* + r d) > L(theta*) + delta``,
        or ``inf`` if the loss never rises that much in range. All points of one model go
        through one engine call.

        Args:
            directions: ``K``, the number of random directions per model.
            radii: ``(start, stop, num)``; must start at 0.
            delta: The loss rise that ends the basin.
            norm: Direction normalisation (see :func:`~landscape_widget.random_direction`).
            data: Where to measure the loss; the training data by default.
            seed: Seed of the directions (the same seeds for every model).
            names: Runs to measure (all by default).
            bn: ``"eval"`` or ``"batch"`` (BatchNorm batches of 128, as in
                :func:`~landscape_widget.compute_surface`; needed for BatchNorm layers
                without running statistics).

        Returns:
            ``{name: {"r": (K,) array, "median": float, "iqr": (q25, q75)}}``.

        Raises:
            ValueError: If ``radii`` or ``directions`` is invalid.
        """
        r = np.linspace(*radii)
        if r.size < 2 or r[0] != 0:
            raise ValueError(f"radii must be (0, stop, num) with num >= 2, got {radii!r}.")
        if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
            raise ValueError(f"directions must be an int >= 1, got {directions!r}.")
        data = self.data if data is None else self._data(data)
        k = directions
        out = {}
        for name in names if names is not None else self.names:
            if self._run(name).diverged:
                warnings.warn(f"{name}: the run diverged, so it has no basin; its radii are NaN.",
                              RuntimeWarning, stacklevel=2)
                out[name] = {"r": np.full(k, np.nan), "median": float("nan"),
                             "iqr": (float("nan"), float("nan"))}
                continue
            out[name] = basin_radii(self.model(name), data, r, k, delta=delta, norm=norm,
                                    seed=seed, loss_fn=self.loss_fn, bn=bn)
        return out

    @outside_inference_mode
    def interpolate(self, a: str, b: str, *, x=(-0.5, 1.5, 81), progress: bool = False,
                    bn: str = "eval") -> dict[str, Curve]:
        """Loss along ``(1 - alpha) theta_a + alpha theta_b`` (B2), train and test.

        ``bn``: as in :func:`~landscape_widget.compute_curve` (``"batch"`` for BatchNorm
        layers without running statistics).

        Returns:
            ``{"train": Curve, "test": Curve}`` (``"test"`` only with test data).
        """
        ma, mb = self.model(a), self.model(b)
        d = interpolation_direction(ma, mb)
        out = {"train": compute_curve(ma, self.data, direction=d, x=x, loss_fn=self.loss_fn,
                                      progress=progress, bn=bn)}
        if self.test is not None:
            out["test"] = compute_curve(ma, self.test, direction=d, x=x, bn=bn,
                                        loss_fn=self.loss_fn, progress=progress)
        return out

    @outside_inference_mode
    def triangle(self, a: str, b: str, c: str | None = None, *, data=None, **options
                 ) -> TriangleSurface:
        """The plane through runs ``a``, ``b`` and ``c`` (B3); ``c=None`` is ``theta_0``.

        ``options`` go to :func:`~landscape_widget.triangle_surface` (``resolution``,
        ``margin``, ``progress``...). The training data by default.

        Returns:
            The :class:`~landscape_widget.experiments.triangle.TriangleSurface`.
        """
        third = self.initial_model() if c is None else self.model(c)
        data = self.data if data is None else self._data(data)
        options.setdefault("loss_fn", self.loss_fn)
        return triangle_surface(self.model(a), self.model(b), third, data,
                                names=[a, b, "init" if c is None else c], **options)

    def figure(self, names: Sequence[str] | None = None, **options):
        """The comparison table (see :func:`~landscape_widget.experiments.runs_figure.table`)."""
        from .runs_figure import table

        return table(self, names=names, **options)
