"""A pattern fit's files: :meth:`save` and :meth:`load` of :class:`PatternFit` (a mixin).

The file holds the plane's weights, the mask, config, history, optimizer and sampler
states, and the pickled architecture, which :meth:`load` unpickles only when trusted.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..core.copies import module_copy
from ..core.h5files import check_target
from .plane import FlatLayout, PatternPlane

FORMAT = "landscape_widget.PatternFit"


class PatternFiles:
    """Saving and loading for :class:`~landscape_widget.experiments.pattern_fit.PatternFit`.

    Uses the fit's ``layout``, ``plane``, ``binary``, ``mask``, ``config``, ``history``,
    ``step``, ``optimizer`` and samplers (``_cells_rng``, ``_batch_gen``, ``_order``,
    ``_cursor``).
    """

    def save(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Save weights, mask, config, history and optimizer state (``torch.save``).

        The architecture is stored as a pickle blob beside the tensors, so
        :meth:`load` with ``trusted=True`` can rebuild cells without ``model_fn`` when its
        classes are importable. The file is written beside ``path`` and renamed over it
        once complete, so a failed save leaves an existing file as it was.

        Args:
            path: The file.
            overwrite: Replace an existing file (default False: it is the user's).

        Raises:
            FileExistsError: If ``path`` exists and ``overwrite`` is false.
        """
        path = check_target(path, overwrite)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.layout._reset_state()  # the architecture as the fit started from it
        try:
            arch = pickle.dumps(self.layout.template)
        except Exception:  # e.g. a model class defined in a closure
            arch = None
        blob = {
            "format": FORMAT, "version": 1,
            "weights": {k: v.cpu() for k, v in self.weights.items()},
            "binary": torch.from_numpy(self.binary.copy()),
            "mask": torch.from_numpy(self.mask.copy()),
            "config": self.config, "history": self.history, "step": self.step,
            "optimizer": self.optimizer.state_dict(), "architecture": arch,
            # The samplers' states, so that a loaded fit resumes exactly where it stopped.
            "cells_rng": json.dumps(self._cells_rng.bit_generator.state),
            "batch_gen": self._batch_gen.get_state(),
            "order": self._order, "cursor": self._cursor,
        }
        try:
            torch.save(blob, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path, model_fn: Callable[[], nn.Module] | None = None,
             device=None, *, trusted: bool = False) -> PatternFiles:
        """Load a fit saved by :meth:`save`.

        Loading runs no code from the file: tensors are read with ``weights_only=True`` and
        the pickled architecture is only unpickled with ``trusted=True``.

        Args:
            path: The file.
            model_fn: Builds the architecture (the function given to :func:`fit_pattern`).
            device: Where to put the weights (default CPU).
            trusted: Without ``model_fn``, rebuild the architecture from the pickle in the
                file. Unpickling runs whatever code the file names: only for files you
                wrote yourself.

        Returns:
            A :class:`PatternFit` that resumes where the saved one stopped: the same plane
            weights, mask, config, history, step, optimizer state and sampler states.

        Raises:
            ValueError: If the file was not written by :meth:`save`; without ``model_fn``
                unless ``trusted`` (or when the file holds no pickled architecture); if
                ``model_fn`` builds a network with another number of parameters than the
                file holds, or one without parameters.
            TypeError: If ``trusted`` is not a bool.
        """
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise ValueError(f"{path} is not a file written by PatternFit.save.")
        if not isinstance(trusted, bool):
            raise TypeError(f"trusted must be True or False, got {trusted!r}.")
        if model_fn is not None:
            template = model_fn() if not isinstance(model_fn, nn.Module) else model_fn
        elif not trusted:
            raise ValueError(
                f"pass model_fn=, the function that builds the network, to load {path}. "
                "The file's pickled architecture is not unpickled by default, since unpickling "
                "runs code named in the file; trusted=True does it for files you wrote.")
        elif blob["architecture"] is not None:
            template = pickle.loads(blob["architecture"])
        else:
            raise ValueError("this file holds no architecture (its model class could not be "
                             "pickled); pass model_fn=, the function that builds the network.")
        # A copy is moved: nn.Module.to moves in place, and model_fn may be the user's model.
        layout = FlatLayout(module_copy(template).to(device) if device is not None else template)
        wts = {k: v.to(layout.device) for k, v in blob["weights"].items()}
        if wts["w0"].numel() != layout.size:
            raise ValueError(f"model_fn builds {layout.size} parameters but the file holds "
                             f"{wts['w0'].numel()}; pass the architecture that was fitted.")
        plane = PatternPlane(wts["w0"], wts["w1"], wts["w2"], float(wts["s"]),
                             plane=blob["config"]["plane"])
        fit = cls(layout, plane, blob["binary"].numpy(), blob["mask"].numpy(), blob["config"])
        fit.history, fit.step = list(blob["history"]), int(blob["step"])
        fit.optimizer.load_state_dict(blob["optimizer"])
        fit._cells_rng.bit_generator.state = json.loads(blob["cells_rng"])
        fit._batch_gen.set_state(blob["batch_gen"])
        fit._order, fit._cursor = blob["order"], int(blob["cursor"])
        return fit
