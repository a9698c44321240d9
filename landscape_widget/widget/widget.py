"""The live widget: :class:`LandscapeWidget`, an anywidget with a worker thread.

Traits hold the controls, the status line and the finished result; custom messages carry
only the live stream of tiles (see :mod:`.protocol`). A compute trait changed from Python
(``w.resolution = 41``) or from the front end schedules a new computation after
``DEBOUNCE_S`` and cancels the running one at once. All the maths is in ``core/``.

The compute traits are made from the fields of :class:`.spec.Spec` (the one list of them;
enumerations are ``Enum`` traits), and the front end reads the field names, enumerations
and limits from the read-only ``_spec_schema`` trait. Direction types are entries of
:data:`.directions.TYPES` (what the select lists, how the directions are made); the names a
compute message may ask for are :data:`.spec.DIRECTION_TYPES`.

Changes from the front end are debounced once, in the kernel (:mod:`.debounce`, a mixin).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import anywidget
import traitlets as t

from ..core.directions import interpolation_direction
from ..core.precision import precision_problem
from ..core.state import bn_batch_size_for
from ..core.surface import Curve, Surface
from ..experiments.triangle import TriangleSurface
from . import protocol
from .compare import ComparePanel, is_compare_message, same_architecture
from .debounce import DEBOUNCE_S, DebouncedControls  # noqa: F401 - DEBOUNCE_S: tests read it here
from .directions import offered
from .encode import encode_result, snapshot_messages
from .export import static_page
from .fit_spec import fit_schema
from .jobs import STATUS_DEFAULTS, Job, new_id
from .models import as_triangle, compute_device, resolve_models
from .pattern_panel import PatternPanel
from .protocol import ProtocolError, parse_message
from .shapes import check_steps
from .spec import COMPUTE_TRAITS, SPEC_FIELDS, VERTEX_COUNTS, Spec, parse_spec, schema, spec_traits
from .worker import Worker

STATIC = Path(__file__).resolve().parent.parent / "static"
DISPLAY_TRAITS = ("metric", "log_scale", "view")
_CONSTRUCTOR_TRAITS = COMPUTE_TRAITS + DISPLAY_TRAITS + ("layout", "pattern", "show_pattern")

SpecTraits = type("SpecTraits", (t.HasTraits,), spec_traits())
"""The compute traits, one per field of :class:`.spec.Spec` (mixed into the widget)."""
_INT_TRAITS = tuple(k for k, typ in SPEC_FIELDS.items() if typ is int)


class LandscapeWidget(DebouncedControls, PatternPanel, ComparePanel, SpecTraits,
                      anywidget.AnyWidget):
    """Loss landscape of a PyTorch model, computed live in a worker thread.

    Args:
        model: The model (never modified); optional with ``models``, whose first model is
            then the centre of the random, PCA and Hessian directions.
        data: ``(inputs, targets)`` tensors, a ``Dataset`` or a ``DataLoader``.
        models: ``{name: model}`` (e.g. one per optimizer; never modified); of one
            architecture, offers "interpolate between two models" and, with three or more,
            "plane through three models", which the ``vertices`` control names (see
            :mod:`.models`); of any architectures, the compare panel (:mod:`.compare`).
        model_b: A second model of the same architecture; offers interpolation directions.
        trajectory: A :class:`~landscape_widget.Trajectory` of the training run; offers
            "PCA of trajectory" directions, with the path drawn on the plot.
        model_fn: For the pattern editor: builds a fresh network (three calls give the
            plane's w0, w1, w2). By default re-initialised copies of ``model``.
        test_data: For the pattern editor's test heatmaps (optional).
        loss_fn: ``loss_fn(outputs, targets)``, mean over the batch; cross-entropy by default.
        device: Where to compute (the model's device by default; with an executor, the
            workers' device, by default their GPU if they have one).
        executor: A ``dask.distributed.Client`` (e.g. on ``lw.local_gpu_executor()``) or a
            ``concurrent.futures.Executor``: grid tiles are computed by its workers and
            stream in as they finish; cancel cancels their futures. ``data`` may then be a
            ``data_fn``, a picklable zero-argument function returning the data on a worker.
        mining_steps: Adam steps of the mined direction types ("mined: w-peak",
            "mined: vvv-basin", the saddle and wine-bottle planes); ``None`` keeps the
            library's defaults (500 to 800, seconds to minutes; see :mod:`.shapes`).
        bn_batch_size: Samples per BatchNorm batch when the ``bn`` control is ``"batch"``
            (default 128; see :func:`~landscape_widget.core.state.bn_batch_size_for`).
        autostart: Start computing the default grid at once.
        **traits: Initial control values (``mode``, ``direction``, ``norm``,
            ``ignore_biasbn``, ``x_range``, ``y_range``, ``resolution``, ``seed``, ``bn``,
            ``quantity`` (``"loss"`` or ``"curvature"``: the Hessian's ``|λmin/λmax|`` map),
            ``vertices``, ``metric``, ``log_scale``, ``view``, ``precision`` (the choices
            possible on the widget's device), ``samples`` (``"auto"``: a data subset
            first on large data, ``"exact"``, or a fixed subset ``"1k"``/``"5k"``/``"10k"``))
            or ``layout``.

    Raises:
        TypeError: For an unknown keyword, no model or data, or a ``model`` (or an entry of
            ``models``) that is not an ``nn.Module``, or a ``mining_steps`` not an int.
        ValueError: For invalid control values (e.g. ``resolution=1000`` in 2D),
            ``models`` of different dtypes or devices, or a negative ``mining_steps``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 3)
        >>> data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
        >>> w = LandscapeWidget(model, data, resolution=5)  # computes at once, in a thread
        >>> w.resolution = 9  # cancels, then recomputes (reusing the 25 points in common)
        >>> w.wait().loss.shape
        (9, 9)
        >>> w.close()
    """

    _esm = STATIC / "widget.js"
    _css = STATIC / "widget.css"

    # The compute traits (mode, direction, ..., vertices) come from SpecTraits.
    _spec_schema = t.Dict(default_value={**schema(), "fit": fit_schema()},
                          read_only=True).tag(sync=True)
    """The spec's fields, enumerations and limits, and the fit's, for the front end (see
    :func:`.spec.schema` and :func:`.fit_spec.fit_schema`)."""
    metric = t.Unicode("loss").tag(sync=True)
    log_scale = t.Bool(False).tag(sync=True)
    view = t.Unicode("contour").tag(sync=True)
    direction_types = t.List(t.Dict()).tag(sync=True)
    status = t.Dict().tag(sync=True)
    result = t.Dict(allow_none=True, default_value=None).tag(sync=True)

    @t.validate(*_INT_TRAITS)
    def _no_bools(self, proposal):
        # traitlets' Int takes True as 1; a bool here is a front-end or typing mistake.
        if isinstance(proposal["value"], bool):
            raise t.TraitError(f"{proposal['trait'].name} must be an int, got "
                               f"{proposal['value']!r}.")
        return proposal["value"]

    @t.validate("precision")
    def _precision_for_device(self, proposal):
        # One rule (core.precision): no fp16 on a CPU, from Python or the front end.
        device = getattr(self, "_device", None)  # None: constructing, or an executor's
        problem = None if device is None else precision_problem(proposal["value"], device)
        if problem is not None:
            raise t.TraitError(problem)
        return proposal["value"]

    def __init__(self, model=None, data=None, *, models=None, model_b=None, trajectory=None,
                 model_fn=None,
                 test_data=None, loss_fn=None, device=None, executor=None,
                 mining_steps: int | None = None, bn_batch_size: int | None = None,
                 autostart: bool = True, **traits):
        unknown = sorted(set(traits) - set(_CONSTRUCTOR_TRAITS))
        if unknown:
            raise TypeError(
                f"LandscapeWidget() got unexpected keyword argument(s) {unknown}; the controls "
                f"are {list(COMPUTE_TRAITS + DISPLAY_TRAITS)}."
            )
        model, named = resolve_models(model, models)
        if data is None:
            raise TypeError("LandscapeWidget needs data: (inputs, targets), a Dataset or a "
                            "DataLoader.")
        if model_b is not None:
            interpolation_direction(model, model_b)  # same architecture, else a clear error
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(outputs, targets).")
        if trajectory is not None and not hasattr(trajectory, "pca_directions"):
            raise TypeError("trajectory must be a landscape_widget.Trajectory.")
        # "interpolate" and "plane" only between models of one architecture; models of
        # different architectures are compared side by side (.compare) instead.
        same = named if same_architecture(named) else {}
        types = offered(SimpleNamespace(model_b=model_b, models=same, trajectory=trajectory))
        check_steps(mining_steps)  # before the comm opens, like the checks above
        bn_batch_size_for("batch", bn_batch_size)
        try:
            super().__init__(direction_types=[dict(d) for d in types], **traits)
        except t.TraitError as err:  # e.g. mode="3d": not one of the Enum's values
            raise ValueError(f"invalid control value: {err}") from None
        self._direction_names = tuple(dict.fromkeys(d["direction"] for d in types))
        self._model_names = tuple(named)
        # The precisions offered are those possible where the grids compute.
        self._device = compute_device(model, device, executor)
        self.set_trait("_spec_schema", {**schema(self._device), "fit": fit_schema()})
        try:
            self.spec()  # invalid initial values raise here, in the caller's hands
        except ProtocolError:
            super().close()
            raise
        self._init_debounce()
        self._last_done: dict = {}  # the last `done` message: its summary joins the status
        self._worker = Worker(model, data, send=self._send_message, model_b=model_b,
                              trajectory=trajectory, models=named,
                              loss_fn=loss_fn, device=device, on_status=self._on_status,
                              on_result=self._on_result, executor=executor,
                              mining_steps=mining_steps, bn_batch_size=bn_batch_size)
        # The pattern editor runs here: a data_fn is loaded (once) by the worker's cache.
        self._init_patterns(model, self._worker.data, model_fn=model_fn, test_data=test_data,
                            device=device)
        self._init_compare(named, self._worker)  # models of any architectures (.compare)
        self.status = dict(STATUS_DEFAULTS)
        self._last_error: dict | None = None
        self.observe(self._on_compute_trait, names=list(COMPUTE_TRAITS))
        self.on_msg(self._handle_custom_msg_safely)
        if autostart:
            self.compute()

    # --- public API -------------------------------------------------------------------
    def spec(self) -> Spec:
        """The compute spec of the current controls (raises ``ProtocolError`` if invalid)."""
        raw = {k: list(v) if isinstance(v, (list, tuple)) else v
               for k, v in ((k, getattr(self, k)) for k in COMPUTE_TRAITS)}
        need = VERTEX_COUNTS.get(raw["direction"])
        if need is not None and len(raw["vertices"]) > need:
            # Left from the other type (a plane's three after switching to interpolate),
            # as the front end's pickers do: the first ones stay.
            raw["vertices"] = raw["vertices"][:need]
        return parse_spec(raw, directions=self._direction_names, models=self._model_names,
                          device=self._device)

    def compute(self) -> str:
        """Start computing the current controls now (cancels the running job).

        Returns:
            The job id.
        """
        self._cancel_timer()
        return self._submit(new_id(), self.spec())

    def cancel(self) -> None:
        """Cancel the running computation (and one scheduled by a control change)."""
        self._cancel_timer()
        self._worker.cancel()

    def wait(self, timeout: float | None = None) -> Surface | Curve | None:
        """Block until the scheduled and running computations are finished.

        Returns:
            :attr:`surface`.

        Raises:
            TimeoutError: If still computing after ``timeout`` seconds.
        """
        if self._cancel_timer():
            self._fire()
        if not self._worker.wait(timeout):
            raise TimeoutError(f"still computing after {timeout} s.")
        return self.surface

    @property
    def surface(self) -> Surface | Curve | TriangleSurface | None:
        """The latest result: a :class:`Surface` (2D) or :class:`Curve` (1D), or ``None``.

        The plane through three models gives a :class:`~landscape_widget.TriangleSurface`.
        A cancelled computation leaves a partial result (NaN where not computed);
        ``status["state"]`` says ``"done"`` or ``"cancelled"``.
        """
        return as_triangle(self._worker.latest)

    @property
    def last_error(self) -> dict | None:
        """The last failed computation: ``{"id", "message", "traceback"}``, or ``None``.

        The status line shows ``Type: message``; ``traceback`` is the formatted traceback
        of the exception (raised in the worker thread, e.g. by ``loss_fn``), to find where.
        """
        return self._last_error

    @property
    def busy(self) -> bool:
        """Whether a computation is running or scheduled."""
        return self._timer is not None or self._worker.busy

    def close(self) -> None:
        """Stop the worker and close the widget."""
        if hasattr(self, "_lock"):
            self._cancel_timer()
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.close()
        self._close_patterns()
        self._close_compare()
        super().close()

    def handle_message(self, content, buffers=None) -> None:
        """Handle one custom message from the front end; never raises.

        Malformed messages are answered with an ``error`` message (and the status line);
        well-formed ones start, cancel or replay a computation.
        """
        job_id = None
        try:
            if isinstance(content, dict):
                cid = content.get("id")
                if isinstance(cid, str) and len(cid) <= protocol.MAX_ID_LENGTH:
                    job_id = cid
            if is_compare_message(content):
                self._handle_compare_message(content)
                return
            kind, mid, spec = parse_message(content, directions=self._direction_names,
                                            models=self._model_names, device=self._device)
            if kind in ("fit", "fit_stop"):
                self._handle_fit_message(kind, mid, spec)
            elif kind == "compute":
                self._cancel_timer()
                with self._silently():
                    self._set_controls(spec)
                self._submit(mid, spec)
            elif kind == "cancel":
                self.cancel()
            else:  # sync: a new view joins (a running job's grid so far, if any)
                # "ready" tells the view a kernel is behind it (a view restored from saved
                # widget state hears nothing and disables its compute controls).
                self._send_message(protocol.ready_message(mid), [])
                snap = self._worker.snapshot()
                if snap is not None:
                    for msg, bufs in snapshot_messages(*snap):
                        self._send_message(msg, bufs)
        except ProtocolError as err:
            self._report(job_id, f"Refused a message from the front end: {err}")
        except Exception as err:  # noqa: BLE001 - nothing may escape into the kernel
            self._report(job_id, f"Internal error ({type(err).__name__}): {err}")

    def to_html(self, path: str | Path | None = None, *, title: str = "Loss landscape") -> str:
        """A standalone HTML page of the widget with its latest result (no kernel needed).

        The page inlines the widget's bundle (with its plotly.js build) and the ``result``
        trait; metric, log scale and view still work, computing does not. For the
        ipywidgets route, ``ipywidgets.embed.embed_minimal_html`` also carries the result
        (it loads the widget manager from a CDN).

        Args:
            path: Where to write the page (optional).
            title: The page title.

        Returns:
            The HTML text.
        """
        page = static_page(self, COMPUTE_TRAITS + DISPLAY_TRAITS, title)
        if path is not None:
            Path(path).write_text(page, encoding="utf-8")
        return page

    def set_state(self, sync_data) -> None:
        """Apply a state update from the front end; a value of the wrong type is reported.

        ipywidgets calls this for every trait update coming from the browser. A trait that
        refuses its value (``resolution="many"``) becomes an ``error`` message instead of an
        exception in the kernel, like a malformed custom message.
        """
        if isinstance(sync_data, dict) and "_spec_schema" in sync_data:
            # ipywidgets sets traits with set_trait, which a read_only trait does not stop.
            sync_data = {k: v for k, v in sync_data.items() if k != "_spec_schema"}
            self._report(None, "Refused a state update from the front end: _spec_schema is "
                               "read-only (the kernel's spec fields and limits).")
        try:
            super().set_state(sync_data)
        except t.TraitError as err:
            self._report(None, f"Refused a control value from the front end: {err}")
        except Exception as err:  # noqa: BLE001 - a malformed update must not raise here
            self._report(None, f"Refused a state update from the front end "
                               f"({type(err).__name__}: {err}).")

    # --- internals --------------------------------------------------------------------
    def _handle_custom_msg_safely(self, _widget, content, buffers) -> None:
        self.handle_message(content, buffers)

    def _send_message(self, message: dict, buffers: list) -> None:
        if message.get("kind") == "done":
            self._last_done = message
        self.send(message, buffers)

    def _report(self, job_id: str | None, message: str) -> None:
        try:
            self._send_message(protocol.error_message(job_id, message), [])
            self.status = {**self.status, "state": "error", "message": message}
        except Exception:  # noqa: BLE001 - a closed comm: nothing left to tell
            pass

    def _submit(self, job_id: str, spec: Spec) -> str:
        self._worker.submit(job_id, spec)
        return job_id

    def _on_status(self, status: dict) -> None:
        done = self._last_done
        if status.get("state") == "done" and done.get("id") == status.get("id"):
            # The summary of the `done` message, so a re-rendered view shows it too.
            status = {**status, **{k: done[k] for k in ("evaluated", "reused", "seconds",
                                                         "nonfinite", "stats") if k in done}}
        if status.get("state") == "error" and "traceback" in status:
            self._last_error = {k: status[k] for k in ("id", "message", "traceback")}
        self.status = {**STATUS_DEFAULTS, **status}

    def _on_result(self, job: Job, result: Surface | Curve, complete: bool) -> None:
        self.result = encode_result(job, result, complete, str(result.spec.get("device", "")))
        if self.metric == "accuracy" and getattr(result, "accuracy", 1) is None:
            self.metric = "loss"  # accuracy is undefined for this task (status says why)
