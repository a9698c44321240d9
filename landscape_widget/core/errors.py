"""Typed errors that callers tell apart by their class, never by their text.

Each subclasses the builtin its raisers raised before (``RuntimeError``, ``ValueError``), so
``except ValueError`` around an old call still catches it. The widget's worker catches
:class:`ReuseMismatch` (then computes everything again) and :class:`AccuracyUndefined`
(then computes the loss alone), and treats :class:`Cancelled` as a cancelled job.
:class:`IsolationError` is raised before any work when the model cannot be copied.
:func:`~landscape_widget.iter_tiles` turns :class:`NoCountedTargets` of a drawn subset
(``samples=``) into an error that names the draw.

Example:
    >>> issubclass(ReuseMismatch, ValueError), issubclass(Cancelled, RuntimeError)
    (True, True)
"""

from __future__ import annotations

__all__ = ["AccuracyUndefined", "Cancelled", "InputChanged", "IsolationError",
           "NoCountedTargets", "ReuseMismatch"]


class Cancelled(RuntimeError):
    """A computation stopped by its cancel event (Hessian, curvature map, mining)."""


class ReuseMismatch(ValueError):
    """``reuse=`` cannot be used: its points are of another setting, or that cannot be checked.

    Another model, data, loss, metrics or directions; or a value with no fingerprint. The
    message starts with ``"reuse="`` and names what differs or cannot be checked.
    """


class AccuracyUndefined(ValueError):
    """Accuracy was asked for explicitly, but it is undefined for this model and data.

    Raised when the outputs hold no logits of a classification task (regression targets,
    one logit per target, class indices out of range...); the message says why and how to
    pass ``metrics=``.
    """


class IsolationError(TypeError):
    """The model cannot be copied, so it cannot be evaluated without risk to it.

    Raised before any work; the message names the attribute that refuses to be copied (e.g.
    ``model.body.guard (lock)``) and how to make the model copyable.
    """


class InputChanged(ValueError):
    """The model's forward changed its input in place on samples the set-up did not check.

    The set-up runs the forward on a copy of the first samples; a forward that writes to
    its input there gets a copy of every batch. One that writes only to later samples (a
    data-dependent branch) has changed the data by the time this is raised: the message
    says so and how to compute out of place. Never taken for a failure of a plan (the
    engine does not fall back on it).
    """


class NoCountedTargets(ValueError):
    """Every target of the data equals the loss's ``ignore_index``: its mean is over nothing.

    Or every other target is of a class the loss's ``weight=`` weighs 0 (``zero_weight``).

    Attributes:
        ignore_index: The ignored target value.
        zero_weight: Whether there are counted targets, all of classes of weight 0.
    """

    def __init__(self, message: str, ignore_index=None, zero_weight: bool = False):
        super().__init__(message)
        self.ignore_index = ignore_index
        self.zero_weight = zero_weight

    def __reduce__(self):  # crosses process boundaries (an executor's workers) intact
        return type(self), (str(self), self.ignore_index, self.zero_weight)
