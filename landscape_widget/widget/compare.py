"""Side-by-side surfaces of several named models, of any architectures, on one colour scale.

``LandscapeWidget(models={"resnet56": a, "resnet56-noshort": b}, data=...)`` may name models
of *different* architectures (Li et al. 2018's figure: a network with and without skip
connections). The compare panel computes one 2D surface per model, each around its own
weights along its **own** random directions (each architecture gets its own
filter-normalised directions, drawn from the same ``seed``: a direction of one network is
not a direction of another), on the **same** axes (the widget's ``x_range``, ``y_range``,
``resolution``) and shows them on one colour scale, whose range is the union over the
computed surfaces, toggled or side by side, with the landscape statistics of each
(:func:`~landscape_widget.core.stats.landscape_stats`).

Traits (kept in the widget, so a re-render shows them): ``compare_models`` (the names the
panel offers), ``compare_result`` (axes, per-model float32 loss bytes, ``zmin``/``zmax``,
stats), ``compare_status`` and the two view controls ``compare_layout`` (``"toggle"`` or
``"side"``) and ``compare_shown`` (the model shown when toggling). The front end starts a
computation with ``{"kind": "compare", "id", "names"}`` and stops it with
``{"kind": "compare_stop", "id"}``; both are validated by :func:`parse_compare_message`.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Mapping

import traitlets as t
from torch import nn

from ..core.directions import interpolation_direction, random_directions
from ..core.landscape import compute_surface
from ..core.progressive import SUBSET_CHOICES, sample_stages
from ..core.subset import data_size
from ..core.surface import Surface
from .compare_result import encode_compare, nonfinite_note, nonfinite_tensors, shared_range
from .protocol import MAX_ID_LENGTH, ProtocolError, Spec, short

COMPARE_KINDS = ("compare", "compare_stop")
LAYOUTS = ("toggle", "side")
TRAITS = ("compare_models", "compare_result", "compare_status", "compare_layout",
          "compare_shown")


def same_architecture(named: Mapping[str, nn.Module]) -> bool:
    """Whether all named models have the same parameter names and shapes.

    Only then do the "interpolate" and "plane" types, which mix the models' weights, apply.

    Returns:
        ``True`` for one architecture (or fewer than two models), ``False`` otherwise.
    """
    first, *others = list(named.values()) or [None]
    for other in others:
        try:
            interpolation_direction(first, other)
        except ValueError:
            return False
    return True


def is_compare_message(content) -> bool:
    """Whether a front-end message is for the compare panel (then validated here)."""
    return isinstance(content, dict) and content.get("kind") in COMPARE_KINDS


def parse_compare_message(msg, models: tuple[str, ...]) -> tuple[str, str, tuple[str, ...]]:
    """Validate a compare message from the front end.

    Args:
        msg: ``{"kind": "compare", "id": str, "names": [str, ...]}`` or
            ``{"kind": "compare_stop", "id": str}``.
        models: The widget's model names.

    Returns:
        ``(kind, id, names)``; ``names`` is ``()`` for ``"compare_stop"``.

    Raises:
        ProtocolError: For an unknown kind or field, a bad id, or names that are not a
            list of distinct known model names (at least one).
    """
    if not isinstance(msg, dict) or msg.get("kind") not in COMPARE_KINDS:
        raise ProtocolError(f"not a compare message: {short(msg)}.")
    kind = msg["kind"]
    allowed = {"kind", "id", "names"} if kind == "compare" else {"kind", "id"}
    extra = sorted(str(k) for k in msg if k not in allowed)
    if extra:
        raise ProtocolError(f"{kind} message has unknown fields {extra}.")
    mid = msg.get("id")
    if not isinstance(mid, str) or not 0 < len(mid) <= MAX_ID_LENGTH:
        raise ProtocolError(f"{kind} message needs an id string of 1..{MAX_ID_LENGTH} characters.")
    if kind == "compare_stop":
        return kind, mid, ()
    return kind, mid, check_names(msg.get("names"), models)


def check_names(names, models: tuple[str, ...]) -> tuple[str, ...]:
    """``names`` as a tuple if it is a non-empty list of distinct names among ``models``.

    Returns:
        The names, in the order given.

    Raises:
        ProtocolError: Otherwise, naming the widget's models.
    """
    if not isinstance(names, list | tuple) or not names or len(names) > len(models):
        raise ProtocolError(f"names must be a list of 1..{len(models)} model names from "
                            f"{list(models)}, got {short(names)}.")
    for name in names:
        if not isinstance(name, str) or name not in models:
            raise ProtocolError(f"no model named {short(name)}; the widget's models are "
                                f"{list(models)}.")
    if len(set(names)) != len(names):
        raise ProtocolError(f"names must be distinct, got {short(names)}.")
    return tuple(names)


def compare_directions(model: nn.Module, spec: Spec) -> list:
    """The two directions of ``model`` for a comparison under ``spec``.

    Random, drawn from ``spec.seed`` in the model's own parameter space, normalised as
    ``spec.norm`` says when the widget shows random directions, else filter-normalised
    (the other types are defined for one model, not for several architectures).

    Returns:
        Two direction dicts in ``model``'s parameter space.
    """
    norm = spec.norm if spec.direction == "random" else "filter"
    return random_directions(model, 2, norm=None if norm == "none" else norm,
                             ignore="biasbn" if spec.ignore_biasbn else None, seed=spec.seed)


def compare_samples(data, mode: str) -> tuple[int | None, str]:
    """``samples=`` of the compare panel's surfaces for the samples control ``mode``.

    Returns:
        ``(samples, note)``: the subset size of a fixed-subset mode when the data holds
        more samples, else ``None`` (exact); the note for the status line ("" for
        ``"auto"`` and ``"exact"``).

    Raises:
        SubsetError: For a fixed subset of data that cannot be subset (the error names
            the fix), as the plane's.

    Example:
        >>> import torch
        >>> data = (torch.zeros(3000, 2), torch.zeros(3000, dtype=torch.long))
        >>> compare_samples(data, "1k"), compare_samples(data, "auto")
        ((1000, 'on a random subset of 1,000 of 3,000 samples (the samples control)'), (None, ''))
        >>> compare_samples(data, "5k")
        (None, 'samples 5k: the data holds at most 5,000 samples, so all of them were used (exact)')
    """
    if mode not in SUBSET_CHOICES:
        return None, ""
    population = data_size(data)
    (n,) = sample_stages(mode, population)
    if n is None:  # no more samples than the subset: all of them, as the plane says
        return None, (f"samples {mode}: the data holds at most {SUBSET_CHOICES[mode]:,} "
                      "samples, so all of them were used (exact)")
    return n, f"on a random subset of {n:,} of {population:,} samples (the samples control)"


def export_state(widget) -> dict:
    """The compare traits for the static HTML export (arrays as base64 text)."""
    state = {k: getattr(widget, k) for k in TRAITS}
    result = state["compare_result"]
    if result:
        text = lambda b: None if b is None else base64.b64encode(b).decode()  # noqa: E731
        state["compare_result"] = {**result, "x": text(result["x"]), "y": text(result["y"]),
                                   "loss": {n: text(b) for n, b in result["loss"].items()}}
    return state


class CompareRunner:
    """Computes the surfaces of a comparison in a thread of its own (one job at a time)."""

    def __init__(self, models: Mapping[str, nn.Module], data, *, loss_fn=None, device=None,
                 bn_batch_size: int | None = None, on_update=None):
        self.models = dict(models)
        self.data, self.loss_fn, self.device = data, loss_fn, device
        self.bn_batch_size = bn_batch_size
        self.on_update = on_update
        self.surfaces: dict[str, Surface] = {}
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(self, job_id: str, names: tuple[str, ...], spec: Spec) -> None:
        """Stop the running comparison, then compute ``names`` under ``spec``."""
        self.stop()
        self._cancel = cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(job_id, names, spec, cancel),
                                        name="landscape-compare", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Cancel the running comparison and wait for its thread."""
        self._cancel.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the running comparison ends; ``False`` on timeout."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def _run(self, job_id: str, names: tuple[str, ...], spec: Spec,
             cancel: threading.Event) -> None:
        surfaces: dict[str, Surface] = {}
        notes: dict[str, str] = {}
        notify = self.on_update or (lambda *_: None)
        x = (spec.x_range[0], spec.x_range[1], spec.resolution)
        y = (spec.y_range[0], spec.y_range[1], spec.resolution)
        name = ""  # the model being computed: errors before the first name none
        try:
            # The samples control: a fixed subset ("1k", "5k", "10k") is computed on that
            # subset, and the status says so (the panel computed on all data and said
            # nothing while the plane said "subset"). "auto" ends exact: exact here.
            samples, subset_note = compare_samples(self.data, spec.samples)
            for k, name in enumerate(names):
                notify({"state": "running", "id": job_id, "model": name, "done": k,
                        "total": len(names)}, None)
                model = self.models[name]
                broken = nonfinite_tensors(model)
                if broken:  # its random directions cannot even be normalised
                    raise ValueError(f"the model's own {broken} holds NaN/inf, so its loss is "
                                     "NaN everywhere; pass a model with finite weights")
                surface = compute_surface(
                    model, self.data, directions=compare_directions(model, spec), x=x, y=y,
                    loss_fn=self.loss_fn, metrics=("loss",), bn=spec.bn, device=self.device,
                    progress=False, seed=None, cancel=cancel, precision=spec.precision,
                    samples=samples,
                    bn_batch_size=self.bn_batch_size if spec.bn == "batch" else None)
                if cancel.is_set():
                    break
                surfaces[name] = surface
                notes[name] = nonfinite_note(name, model, surface)
                self.surfaces = dict(surfaces)
                notify(None, encode_compare(job_id, names, surfaces, spec,
                                            len(surfaces) == len(names), notes))
        except Exception as err:  # noqa: BLE001 - a thread: the status carries the error
            notify({"state": "error", "id": job_id, "done": len(surfaces),
                    "total": len(names), "model": name,
                    "message": f"{name + ': ' if name else ''}{type(err).__name__}: {err}"},
                   None)
            return
        state = "cancelled" if len(surfaces) < len(names) else "done"
        # A model without finite losses still ends "done", but the status says so.
        message = "; ".join(n for n in (subset_note, *notes.values()) if n)
        notify({"state": state, "id": job_id, "done": len(surfaces), "total": len(names),
                **({"message": message} if message else {})}, None)


class ComparePanel(t.HasTraits):
    """Traits and methods of the compare panel (mixed into the widget)."""

    compare_models = t.List(t.Unicode()).tag(sync=True)
    compare_result = t.Dict(allow_none=True, default_value=None).tag(sync=True)
    compare_status = t.Dict().tag(sync=True)
    compare_layout = t.Unicode("toggle").tag(sync=True)
    compare_shown = t.Unicode("").tag(sync=True)

    @t.validate("compare_layout")
    def _check_layout(self, proposal):
        if proposal["value"] not in LAYOUTS:
            raise t.TraitError(f"compare_layout must be one of {list(LAYOUTS)}, got "
                               f"{short(proposal['value'])}.")
        return proposal["value"]

    @t.validate("compare_shown")
    def _check_shown(self, proposal):
        value = proposal["value"]
        if value and value not in self.compare_models:
            raise t.TraitError(f"compare_shown must be one of {list(self.compare_models)}, "
                               f"got {short(value)}.")
        return value

    def _init_compare(self, named: Mapping[str, nn.Module], worker) -> None:
        self._compare_names = tuple(named)
        self.compare_models = list(named) if len(named) >= 2 else []
        self.compare_shown = self.compare_models[0] if self.compare_models else ""
        self.compare_status = {"state": "idle", "done": 0, "total": 0}
        self._comparer = CompareRunner(named, worker.data, loss_fn=worker.loss_fn,
                                       device=worker.device,
                                       bn_batch_size=worker.bn_batch_size,
                                       on_update=self._on_compare_update)

    # --- public API -------------------------------------------------------------------
    def compare(self, names=None, *, wait: bool = False, timeout: float | None = None) -> str:
        """Compute the surfaces of ``names`` (default: every named model) for the panel.

        Each model gets its own random directions from the widget's ``seed`` (``norm`` and
        ``ignore_biasbn`` as the controls say for the "random" type, else filter
        normalisation) on the widget's ``x_range`` x ``y_range`` at ``resolution``.

        Args:
            names: Model names (from ``models=``).
            wait: Block until done (see :meth:`wait_compare`).
            timeout: With ``wait``, seconds before a ``TimeoutError``.

        Returns:
            The job id.

        Raises:
            ValueError: For names that are not the widget's models, or a widget without
                ``models=``.
        """
        from .worker import new_id

        if not self._compare_names:
            raise ValueError("compare() needs named models: LandscapeWidget(models={'a': "
                             "model_a, 'b': model_b}, data=data).")
        names = self._compare_names if names is None else names
        try:
            names = check_names(list(names) if isinstance(names, tuple) else names,
                                self._compare_names)
        except ProtocolError as err:
            raise ValueError(str(err)) from None
        job_id = new_id("compare")
        self._start_compare(job_id, names)
        if wait:
            self.wait_compare(timeout)
        return job_id

    def stop_compare(self) -> None:
        """Cancel the running comparison (the models done so far stay)."""
        self._comparer.stop()

    def wait_compare(self, timeout: float | None = None) -> dict[str, Surface]:
        """Block until the comparison ends; returns :attr:`compared`."""
        if not self._comparer.wait(timeout):
            raise TimeoutError(f"still comparing after {timeout} s.")
        return self.compared

    @property
    def compared(self) -> dict[str, Surface]:
        """``{name: Surface}`` of the last comparison (models computed so far)."""
        return dict(self._comparer.surfaces)

    # --- internals --------------------------------------------------------------------
    def _start_compare(self, job_id: str, names: tuple[str, ...]) -> None:
        spec = self.spec()
        self.compare_status = {"state": "running", "id": job_id, "done": 0,
                               "total": len(names)}
        self._comparer.surfaces = {}
        self._comparer.submit(job_id, names, spec)

    def _handle_compare_message(self, content) -> None:
        kind, job_id, names = parse_compare_message(content, self._compare_names)
        if kind == "compare":
            self._start_compare(job_id, names)
        else:
            self._comparer.stop()

    def _on_compare_update(self, status: dict | None, result: dict | None) -> None:
        if result is not None:
            self.compare_result = result
        if status is not None:
            self.compare_status = status

    def _close_compare(self) -> None:
        comparer = getattr(self, "_comparer", None)
        if comparer is not None:
            comparer.stop()


__all__ = ["ComparePanel", "CompareRunner", "is_compare_message", "parse_compare_message",
           "same_architecture", "shared_range", "encode_compare", "compare_directions",
           "nonfinite_note", "export_state"]
