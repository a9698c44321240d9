"""A loss or metric must leave the model's outputs as they are: the check that says so.

The engine passes each point's outputs to the loss, then to accuracy, the metrics and the
per-sample losses of ``loss_se``, and its set-up calls the loss several times on one output,
so an in-place change (``out += prior``) would reach all of these. The set-up
(:meth:`~landscape_widget.core.batch_stats.LossStats._check_outputs`) records every output
tensor's identity and version counter (:func:`output_versions`) before calling the loss and
each metric, and :func:`check_untouched` refuses one that changed them. Nothing is copied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from torch import Tensor


def output_versions(out, path: str = "outputs") -> dict[str, tuple[int, int]]:
    """Identity and version counter of every tensor in a model's outputs, by path.

    An in-place operation on a tensor bumps its version counter; replacing a dict entry
    or a field changes the identity found there. Nothing is copied.

    Returns:
        ``{path: (id, version)}`` over tensors in dicts, tuples, lists and dataclasses.

    Example:
        >>> import torch
        >>> out = {"logits": torch.zeros(2)}
        >>> before = output_versions(out)
        >>> _ = out["logits"].add_(1)
        >>> output_versions(out) == before
        False
    """
    if isinstance(out, Tensor):  # an inference tensor (inference_mode forward): no counter,
        return {path: (id(out), -1 if out.is_inference() else out._version)}  # no writes
    if isinstance(out, Mapping):
        items = [(f"{path}[{k!r}]", v) for k, v in out.items()]
    elif isinstance(out, (tuple, list)):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(out)]
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        items = [(f"{path}.{f.name}", getattr(out, f.name)) for f in dataclasses.fields(out)]
    else:
        return {}
    return {k: v for p, item in items for k, v in output_versions(item, p).items()}


def check_untouched(out, before: dict[str, tuple[int, int]], who: str) -> None:
    """Refuse a loss or metric that changed the model's outputs (see :func:`output_versions`).

    The engine passes each point's outputs to the loss, then to accuracy, the metrics and
    the per-sample losses of ``loss_se``, and its set-up checks call the loss several times
    on one output: an in-place change would reach all of these.

    Raises:
        ValueError: If a tensor of ``out`` was changed in place, replaced or removed since
            ``before``.
    """
    after = output_versions(out)
    # Entries added (a loss caching a value in the dict) change nothing the engine reads.
    changed = [p for p in before if before[p] != after.get(p)]
    if changed:
        raise ValueError(
            f"{who} changed the model's outputs ({sorted(changed)[0]} was modified in place "
            "or replaced); the engine passes the same outputs on to accuracy, the other "
            "metrics and the set-up checks, which would see the changed values. Leave them "
            "as they are and compute out of place into a new variable, e.g. "
            "logits = out + prior, not out += prior (or clone the outputs first)."
        )
