"""The ``%landscape`` IPython magic: the notebook extension.

Load it with ``%load_ext landscape_widget``, then::

    %landscape model data
    %landscape model data --model-b model_end --device cuda --resolution 51
    %landscape sgd data --models sgd,adam,rmsprop

``model`` and ``data`` (and ``--model-b``, ``--models``) are names in the notebook's
namespace; ``--models`` names the widget's models by their variables' names; data is
anything :class:`~landscape_widget.LandscapeWidget` accepts (``(inputs, targets)``, a
``Dataset``, a ``DataLoader``). ``%landscape?`` shows this help.
"""

from __future__ import annotations

import argparse
import shlex

USAGE = ("%landscape MODEL DATA [--model-b NAME] [--models A,B,C] [--trajectory NAME] "
         "[--test-data NAME] [--loss-fn NAME] [--device D] [--resolution N]")


class MagicError(ValueError):
    """A ``%landscape`` line that cannot be run (shown to the user without a traceback)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser that raises instead of printing and exiting."""

    def error(self, message: str):
        raise MagicError(f"%landscape: {message}; usage: {USAGE}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="landscape", add_help=False, usage=USAGE.replace("%", "%%"))
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--model-b", dest="model_b", default=None)
    p.add_argument("--models", default=None)
    p.add_argument("--trajectory", default=None)
    p.add_argument("--test-data", dest="test_data", default=None)
    p.add_argument("--loss-fn", dest="loss_fn", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--resolution", type=int, default=None)
    return p


def _lookup(namespace: dict, name: str, what: str):
    """``namespace[name]``, also for dotted names (``trainer.model``)."""
    head, *rest = name.split(".")
    if head not in namespace:
        raise MagicError(
            f"%landscape: no variable named {head!r} in the notebook for {what}; define it "
            f"first or pass another name ({USAGE})."
        )
    obj = namespace[head]
    for part in rest:
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise MagicError(f"%landscape: {name!r} ({what}) has no attribute {part!r}.") from None
    return obj


def widget_from_line(line: str, namespace: dict):
    """Parse a ``%landscape`` line and build the widget (without displaying it).

    Args:
        line: The text after ``%landscape``.
        namespace: Where names are looked up (the user namespace in IPython).

    Returns:
        A :class:`~landscape_widget.LandscapeWidget`.

    Raises:
        MagicError: For a bad line or a missing name.
    """
    try:
        words = shlex.split(line)
    except ValueError as err:  # unbalanced quotes
        raise MagicError(f"%landscape: {err}; usage: {USAGE}") from None
    args = _parser().parse_args(words)
    from .widget import LandscapeWidget

    kwargs = {}
    if args.resolution is not None:
        kwargs["resolution"] = args.resolution
    if args.models is not None:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise MagicError(f"%landscape: --models names {repeated} more than once; name "
                             f"each model once. {USAGE}")
        if not names:
            raise MagicError(f"%landscape: --models needs names separated by commas; {USAGE}")
        kwargs["models"] = {n: _lookup(namespace, n, "--models") for n in names}
    return LandscapeWidget(
        _lookup(namespace, args.model, "the model"),
        _lookup(namespace, args.data, "the data"),
        model_b=None if args.model_b is None else _lookup(namespace, args.model_b, "--model-b"),
        trajectory=(None if args.trajectory is None
                    else _lookup(namespace, args.trajectory, "--trajectory")),
        test_data=(None if args.test_data is None
                   else _lookup(namespace, args.test_data, "--test-data")),
        loss_fn=None if args.loss_fn is None else _lookup(namespace, args.loss_fn, "--loss-fn"),
        device=args.device,
        **kwargs,
    )


def landscape(line: str = ""):
    """Show the live loss-landscape widget of a model.

    Usage::

        %landscape MODEL DATA [--model-b NAME] [--models A,B,C] [--trajectory NAME]
                   [--test-data NAME] [--loss-fn NAME] [--device D] [--resolution N]

    MODEL, DATA and the names given to ``--model-b``, ``--models`` and ``--loss-fn`` are
    variables of the notebook. ``--models sgd,adam,rmsprop`` offers the interpolation
    between two of them and the plane through three, named as the variables. DATA is
    ``(inputs, targets)``, a ``Dataset`` or a ``DataLoader``. The widget
    is displayed and starts computing at once; it is also stored in the notebook as
    ``_landscape``, so ``w = _landscape`` keeps a handle (``w.surface``, ``w.resolution``).

    Raises:
        UsageError: If the line cannot be parsed, names a variable the notebook lacks, or building
            the widget fails with a ``MagicError``, ``TypeError`` or ``ValueError``; it carries that
            error's message, so IPython shows one line instead of a traceback.

    Example::

        %load_ext landscape_widget
        data = (x_train, y_train)
        %landscape model data --resolution 51
        %landscape model data --model-b model_final --device cuda
        %landscape sgd data --models sgd,adam,rmsprop
    """
    from IPython import get_ipython
    from IPython.core.error import UsageError
    from IPython.display import display

    ip = get_ipython()
    namespace = ip.user_ns if ip is not None else {}
    try:
        widget = widget_from_line(line, namespace)
    except (MagicError, TypeError, ValueError) as err:
        raise UsageError(str(err)) from None  # IPython shows one red line, no traceback
    namespace["_landscape"] = widget
    display(widget)


def load_ipython_extension(ip) -> None:
    """Register ``%landscape`` (called by ``%load_ext landscape_widget``)."""
    ip.register_magic_function(landscape, magic_kind="line", magic_name="landscape")
