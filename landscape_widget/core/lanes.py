"""Points in lanes: several grid points at once on a multi-core CPU, each on a few cores.

One forward pass spread over all cores of a CPU scales poorly on the small spatial sizes
of a network's late layers and on small matrices; running several independent instances
side by side (a CPU's "throughput mode") uses the cores better. A plan with ``lanes = L``
runs L points at once in L threads, each with ``torch.get_num_threads() // L`` intra-op
threads. The gain depends on the machine: on a 2-core VM a bare ResNet-50 forward (32
images of 64 px) took 170 ms per point in one pass and 138 ms as two side by side, but
inside the engine, measured point for point beside one pass, lanes were within noise of it
(ResNet-50, ResNet-18, a Transformer). So the tuner times lanes side by side with the
best one-pass plan on real grid points (kept whichever wins) and keeps them only if
faster.

Each lane has its own state, so that points in lanes never share anything a pass writes:

- a structural copy of the evaluator's private module (and of the stem's suffix), since
  ``functional_call`` swaps tensors on the module it runs; the copies share the evaluator's
  parameter and buffer tensors, which every pass replaces with its own anyway;
- its own copy of the buffers, put back after each pass as the evaluator's are;
- its own kept row sums and stem-input buffer (``_row``, ``_stem_row``, ``_stem_buf``).

Random draws cannot be given a generator per thread (the forward draws from torch's global
one), so lanes run only for models whose forward draws nothing: the whole lane run is
seeded once, and if the generator moved, or the
first point of an evaluator's first lane run called a random op (a draw inside
``fork_rng`` leaves the generator as it was), the values are discarded, the points are
computed again one pass at a time, and the plan drops its lanes (``rejected`` says why).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .copies import structural_copy
from .fx_trace import release
from .lane_pool import Lane, _submit, openmp_backend
from .plans import LANE_ROUNDS, TRIAL_PASSES, _is_oom, _remember, copy_plan, is_user_error
from .rng import DrawSpy, batch_draws


class PointLanes:
    """Lanes for :class:`~landscape_widget.core.evaluate.Evaluator` (a mixin).

    Uses the evaluator's ``module``, ``stem``, ``device``, ``_flats``, ``_sparse``,
    ``_buffer_slots``, ``rejected``, ``plan`` and its pass methods.
    """

    def _lane_setup(self) -> None:
        """The home lane (the calling thread's state) and no lane threads yet."""
        self._lane_tls = threading.local()
        self._home_lane = Lane()
        self._lanes: list[Lane] = []
        self._lanes_off = ""  # why this evaluator runs no lanes any more
        self._draws_checked = False  # a probe forward was watched for random draws
        # Whether the forward draws random numbers (None: not probed yet), see _forward_draws.
        self._draws: bool | None = None

    def _here(self) -> Lane:
        """The lane of the calling thread (the home lane outside lane threads)."""
        lane = getattr(self._lane_tls, "lane", None)
        return self._home_lane if lane is None else lane

    def _in_lane(self) -> Lane | None:
        return getattr(self._lane_tls, "lane", None)

    # The point build's kept row (and whether its memory was checked) and the stem inputs'
    # buffer are the calling lane's.
    @property
    def _row(self) -> tuple | None:
        return self._here().row

    @_row.setter
    def _row(self, value: tuple | None) -> None:
        self._here().row = value

    @property
    def _row_checked(self) -> bool:
        return self._here().row_checked

    @_row_checked.setter
    def _row_checked(self, value: bool) -> None:
        self._here().row_checked = value

    @property
    def _stem_buf(self) -> Tensor | None:
        return self._here().stem_buf

    @_stem_buf.setter
    def _stem_buf(self, value: Tensor | None) -> None:
        self._here().stem_buf = value

    @property
    def _stem_row(self) -> list | None:
        return self._here().stem_row

    @_stem_row.setter
    def _stem_row(self, value: list | None) -> None:
        self._here().stem_row = value

    def _lane_module(self, stem: bool) -> nn.Module:
        """The module a pass of the calling lane runs (the suffix after the stem if ``stem``)."""
        lane = self._in_lane()
        if stem:
            return self.stem.suffix if lane is None else lane.suffix
        return self.module if lane is None else lane.module

    def _lanes_refusal(self, lanes: int) -> str:
        """Why ``lanes`` lanes cannot run here, or ``""``."""
        if self._lanes_off:
            return self._lanes_off
        if self.device.type != "cpu":
            return "lanes are for CPUs (a GPU runs one pass at a time)"
        if not openmp_backend():
            return ("torch's intra-op backend is not OpenMP, so a lane cannot have threads "
                    "of its own")
        if self.lanes_choice == "auto" and torch.get_num_threads() < lanes:
            return (f"torch.get_num_threads() is {torch.get_num_threads()}, fewer than "
                    f"{lanes} lanes")
        if self._sparse:
            return "a sparse buffer cannot be given to each lane"
        if self._generators:  # draws the probe of the global generator does not see
            return "the model holds a torch.Generator, whose draws lanes cannot seed per point"
        return ""

    def _lanes_for(self, count: int) -> list[Lane]:
        """``count`` lanes, made on first use (structural copies of the module)."""
        while len(self._lanes) < count:
            suffix = None
            if self.stem is not None:
                suffix = structural_copy(self.stem.suffix)
                # A graph module is a reference cycle: freed with the evaluator, as the
                # stem's own (see core/fx_trace.py, release).
                weakref.finalize(self, release, suffix)
            moved = set(self.keys)  # moved buffers are built fresh at each point
            slots = {k: v for k, v in self._buffer_slots.items() if k not in moved}
            self._lanes.append(Lane(structural_copy(self.module), suffix, self._flats, slots))
        return self._lanes[:count]

    def _lanes_failed(self, plan, why: str) -> None:
        """Drop lanes for this evaluator (and its cached plan), recording ``why``."""
        self._lanes_off = why
        self._lanes = []  # their module copies, buffers and row sums are not needed any more
        self.rejected.append(f"lanes={plan.lanes}: {why}")
        if self.plan is not None and (self.plan is plan or self.plan.lanes > 1):
            self.plan.lanes = 1
            self.plan.reason += f"; lanes dropped ({why})"
            _remember(self._plan_key(), self.plan)  # the next call does not try again
        plan.lanes = 1

    def _run_lanes(self, plan, coeffs: Tensor) -> Tensor | None:
        """Values of the rows of ``coeffs`` computed in ``plan.lanes`` lanes at once.

        The rows are cut into ``plan.lanes`` consecutive blocks (a grid row's points stay
        together and share their row sum), one per lane thread; even a single row runs in
        a lane, with the lane's thread count, so a point's value does not depend on the
        other points of the call.

        Returns:
            The float64 values as :meth:`_run_chunk` gives them, in the order of
            ``coeffs``; or ``None`` if lanes cannot run (the reason is recorded, ``plan``
            and the evaluator's plan fall back to one pass at a time).

        Raises:
            Exception: An exception of the user's own class raised in a lane, as it is.
            BaseException: A ``KeyboardInterrupt`` or ``SystemExit`` raised in a lane.
        """
        why = self._lanes_refusal(plan.lanes)
        if plan.compiled:  # one compiled function is not run from several threads
            why = why or "a compiled plan runs one point at a time"
        lanes = []
        if not why:
            try:
                lanes = self._lanes_for(plan.lanes)
            except Exception as err:  # noqa: BLE001 - any failure: one pass at a time
                why = f"the module could not be copied for a lane ({type(err).__name__}: {err})"
        if why:
            self._lanes_failed(plan, why)
            return None
        # What the passes make lazily and share, made here before any lane starts.
        self._inputs(plan.layout)
        self._point_terms(plan.layout)
        self._denominators(plan.batch)
        if plan.stem:
            self._stem_pack(plan.layout)
        threads = torch.get_num_threads()
        blocks = [b for b in torch.tensor_split(coeffs, len(lanes)) if b.shape[0]]
        results: list[Tensor | None] = [None] * len(blocks)
        errors: list[BaseException | None] = [None] * len(blocks)
        per = max(1, threads // len(lanes))
        if not self._draws_checked:
            self._draws_checked = True
            if self._forward_draws():
                self._lanes_failed(plan, "the model's forward draws random numbers, which "
                                         "lanes cannot seed per point")
                return None
        try:
            # One seeding for all lanes: a forward that draws moves the generator. (Other
            # threads' seeded passes wait for the lock batch_draws holds meanwhile.)
            with batch_draws(self.device, 0):
                seeded = torch.default_generator.get_state()
                # Lane 0 is the calling thread (its heap and kernels are warm); the others
                # run on the process's lane threads, which live on for the next call.
                futures = [_submit(len(lanes) - 1, self._lane_work, lanes[i], blocks[i], i,
                                   plan, per, results, errors) for i in range(1, len(blocks))]
                try:
                    self._lane_work(lanes[0], blocks[0], 0, plan, per, results, errors)
                    for f in futures:
                        f.result()
                except BaseException as err:  # Ctrl-C while waiting: the others stop too
                    errors[0] = errors[0] or err
                    raise
                drew = not torch.equal(torch.default_generator.get_state(), seeded)
        finally:
            torch.set_num_threads(threads)  # the calling thread's own, as it was
        for err in errors:
            # Ctrl-C (KeyboardInterrupt) or SystemExit in a lane stops the computation, as
            # in one pass at a time: not a lane's failure to recover from.
            if err is not None and not isinstance(err, Exception):
                raise err
        if drew:
            self._lanes_failed(plan, "the model's forward draws random numbers, which lanes "
                                     "cannot seed per point")
            return None
        for err in errors:
            if err is not None:
                if is_user_error(err) and not _is_oom(err):
                    raise err
                self._lanes_failed(plan, f"a lane failed ({type(err).__name__}: {err})"[:300])
                return None
        return torch.cat(results)

    def _lane_work(self, lane: Lane, coeffs: Tensor, index: int, plan, threads: int,
                   results: list, errors: list) -> None:
        """Lane ``index``: the points ``coeffs`` one after the other, on ``threads`` threads.

        Errors are stored in ``errors[index]`` for the calling thread to handle; once
        another lane has stored one, this lane stops at its next point (the error decides
        what the call does: the user's Ctrl-C waits for no more than a point per lane).
        """
        self._lane_tls.lane = lane
        try:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            values = []
            with torch.no_grad():
                for i in range(coeffs.shape[0]):
                    if any(e is not None for e in errors):
                        return
                    values.append(self._run_chunk(plan, coeffs[i : i + 1]))
            results[index] = torch.cat(values)
        except BaseException as err:  # noqa: BLE001 - handed to the calling thread
            errors[index] = err
        finally:
            self._lane_tls.lane = None

    def _forward_draws(self) -> bool:
        """Whether the model's forward draws random numbers (probed once, then cached).

        Known from the set-up's coupling check when it ran (core/coupling.py), else from
        :meth:`_probe_draws`; a generator the model holds counts as drawing.

        Returns:
            True if the forward draws (its values then depend on the batching and layout).
        """
        if self._draws is None:
            self._draws = bool(self._generators) or self._probe_draws()
        return self._draws

    def _probe_draws(self) -> bool:
        """Whether the model's forward draws random numbers, from a probe on 2 samples.

        The probe runs at the base point under :class:`~.rng.DrawSpy` (seeded, the caller's
        generators put back, the buffers too); its values are thrown away. A probe that
        fails counts as no draw: the lane run's own check of the generator remains.

        Returns:
            True if a torch call of the forward moved the global CPU generator.
        """
        spy = DrawSpy()
        try:
            with torch.no_grad(), batch_draws(self.device, 0), spy:
                functional_call(self.module, dict(self.base),
                                (self.x[: min(self.n, 2)].clone(),))  # see input_writes
        except Exception:  # noqa: BLE001 - e.g. a model needing its full batch
            pass
        finally:
            self._reset_state()
        return spy.drew

    def _end_pass(self) -> None:
        """Put back what a pass wrote: the lane's buffers, or the evaluator's."""
        lane = self._in_lane()
        if lane is None:
            self._reset_state()
        else:
            lane.reset()
            self._check_parameters()

    # --- tuning ------------------------------------------------------------------------
    def _time_lanes(self, plan, base, c: Tensor, rounds: int) -> float:
        """Seconds per point of ``plan`` (lanes), measured against ``base`` side by side.

        Each of ``rounds`` rounds computes ``plan.lanes`` rows of ``c`` in lanes, then one
        row with ``base`` (one point at a time), all real grid points no trial computed yet
        (kept in ``_trial_values`` whichever plan wins). Interleaved, so that a machine
        whose speed drifts between trials (10-40 % within minutes on a shared VM) does not
        decide: the lanes' time is the base's measured seconds per point times the ratio
        of the two fastest rounds (the first lanes round makes the lanes and warms them).

        Returns:
            Seconds per point, on the scale of ``base.seconds_per_point``; NaN if lanes
            could not run (recorded in ``rejected``).
        """
        lane_times, base_times = [], []
        kept, base_kept = {}, self._trial_values.setdefault(base.label, {})
        for _ in range(rounds):
            rows = [self._next_trial_row(c) for _ in range(plan.lanes)]
            t0 = time.perf_counter()
            values = self._run_lanes(plan, c[rows])
            if values is None:
                return float("nan")
            lane_times.append((time.perf_counter() - t0) / plan.lanes)
            kept.update({r: values[i : i + 1] for i, r in enumerate(rows)})
            row = self._next_trial_row(c)
            t0 = time.perf_counter()
            base_kept.setdefault(row, self._run(base, c[row : row + 1]))
            base_times.append(time.perf_counter() - t0)
        self._trial_values[plan.label] = kept
        return base.seconds_per_point * min(lane_times) / min(base_times)

    def _lane_counts(self) -> Iterator[int]:
        """Lane counts worth timing: 2, 4, ... up to the intra-op threads."""
        lanes = 2
        while lanes <= torch.get_num_threads():
            yield lanes
            lanes *= 2

    def _try_lanes(self, c: Tensor, allowance: float) -> bool:
        """Time the fastest loop plan found in lanes, if the grid's rows allow real trials.

        Each count of lanes (2, 4, ...) is timed while the rows of ``c`` hold enough
        untimed points for its rounds, the previous count gained at least 10 % and its
        cost fits ``allowance`` (seconds the tuning may still spend); the timed plans join
        ``_results``, where the fastest plan wins as any other. Its points are real, so
        a trial costs what its first round spends on warming the lanes up (new kernels
        for the lanes' thread count, their heaps): about ``lanes`` x the first-pass
        overhead measured so far (a CPU ResNet-50: 0.14-0.21 s, 5 % of a 5 x 5 grid).

        Returns:
            True if a count of lanes was skipped for the allowance (the search is then
            incomplete).
        """
        loops = [p for p in self._results if p.strategy == "loop" and not p.compiled]
        if (not loops or self.compile_only_loops or self.strategy == "vmap"
                or self.lanes_choice != "auto"):
            return False
        base = min(loops, key=lambda p: p.seconds_per_point)
        if min(p.seconds_per_point for p in self._results) < base.seconds_per_point:
            return False  # a vmap plan is faster: the model is small, lanes would not help
        last = base.seconds_per_point
        for lanes in self._lane_counts():
            rows_left = min(c.shape[0], self.expected_points) - self._trial_row
            rounds = min(LANE_ROUNDS, rows_left // (lanes + 1))
            if self._lanes_refusal(lanes) or rounds < TRIAL_PASSES:
                return False
            if lanes * getattr(self, "_warmup", 0.0) > allowance:
                return True
            t0 = time.perf_counter()
            # The lanes' passes run at once: together they keep to the memory budget.
            plan = copy_plan(base, lanes=lanes, batch=min(base.batch, self._batch_for(lanes)),
                             candidates=[], pinned=[], reason="")
            plan.seconds_per_point = self._time_lanes(plan, base, c, rounds)
            allowance -= time.perf_counter() - t0
            if plan.seconds_per_point != plan.seconds_per_point:  # NaN: lanes refused
                return False
            self._results.append(plan)
            if plan.seconds_per_point > 0.9 * last:
                return False
            last = plan.seconds_per_point
        return False
