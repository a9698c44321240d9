"""Training paths: record checkpoints, PCA directions of the path, projection (Li et al. 2018).

PAPERS.md (a) step 5, after loss-landscape's ``projection.py``: the rows of
``M = [theta_i - theta_n]`` (all recorded checkpoints, the last one included, with 1-D
tensors zeroed under ``ignore="biasbn"``) are centred and decomposed; the first ``k`` right
singular vectors are the directions (unit norm, orthogonal, not filter-normalised), and their
explained-variance ratios label the axes ("1st PC: 91.2 %"). Projections are
``x_i = <theta_i - theta_n, d> / ||d||`` ("cos"), or least squares ("lstsq").
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .model_kinds import prefix_hint
from .params import Params, check_module

ORDINALS = ("1st", "2nd", "3rd")
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


class PCADirections(list):
    """A list of direction dicts that also carries the path it came from.

    Attributes:
        evr: Explained-variance ratio of each direction.
        path: ``(n, k)`` projection of the recorded checkpoints ("cos").
        axis_labels: ``["1st PC: 91.2 %", ...]`` for plots.
    """

    def __init__(self, dirs: Iterable[Params], evr: np.ndarray, path: np.ndarray):
        super().__init__(dirs)
        self.evr = np.asarray(evr, dtype=np.float64)
        self.path = np.asarray(path, dtype=np.float64)
        self.singular_values: np.ndarray | None = None  # set by Trajectory.pca_directions
        self.n_checkpoints: int | None = None
        self.axis_labels = [
            f"{ORDINALS[i] if i < 3 else f'{i + 1}th'} PC: {100 * r:.1f} %"
            for i, r in enumerate(self.evr)
        ]

    def covering_range(self, axis: int, margin: float = 0.15, num: int = 31) -> tuple:
        """``(start, stop, num)`` covering the path along ``axis`` with a relative margin.

        The grid has a point at 0 (the path's end, the model).

        Returns:
            ``(start, stop, num)`` for ``np.linspace``: an evenly spaced range that includes every
            path coordinate along ``axis`` widened by ``margin`` of its span on each side and has
            ``0`` as one of its ``num`` points.
        """
        lo, hi = float(self.path[:, axis].min()), float(self.path[:, axis].max())
        span = max(hi - lo, 1e-3)
        lo, hi = lo - margin * span, hi + margin * span
        # Put 0 (the model itself, the path's end) on the grid: align the start to a
        # multiple of the step, widening the step until the range still fits.
        step = (hi - lo) / (num - 1)
        while True:
            start = np.floor(lo / step) * step
            if start + (num - 1) * step >= hi:
                return (float(start), float(start + (num - 1) * step), num)
            step *= 1.02


class Trajectory:
    """Checkpoints of a training run, as flat parameter vectors on the CPU.

    The vectors are float32, or float64 for a float64 model.

    Args:
        ignore: ``"biasbn"`` (default, as loss-landscape's scripts) zeroes the 1-D tensors
            (biases, BatchNorm) of the PCA rows; ``None`` keeps them.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> traj = Trajectory()
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> handle = traj.attach(opt, model, every=1)
        >>> for _ in range(3):
        ...     opt.zero_grad(); model(torch.randn(4, 3)).square().sum().backward(); opt.step()
        >>> len(traj), traj.steps
        (4, [0, 1, 2, 3])
        >>> # the last checkpoint is the model's parameters after the third step, flattened
        >>> torch.equal(traj.points[-1], torch.cat([model.weight.detach().reshape(-1),
        ...                                         model.bias.detach()]))
        True
    """

    def __init__(self, ignore: str | None = "biasbn"):
        if ignore not in ("biasbn", None):
            raise ValueError("ignore must be 'biasbn' or None.")
        self.ignore = ignore
        self.names: list[str] | None = None
        self.shapes: list[tuple] = []
        self.points: list[Tensor] = []
        self.steps: list[int] = []
        # float64 for a float64 model, else float32: set by the first checkpoint.
        self.dtype = torch.float32
        self._handle = None
        self._count = 0

    def __len__(self) -> int:
        return len(self.points)

    # --- recording -----------------------------------------------------------------------
    def record(self, model: nn.Module | dict, step: int | None = None) -> None:
        """Append the current parameters of ``model`` (a module or a parameter dict)."""
        params = _parameters(model)
        if self.names is None:
            self.names = list(params)
            self.shapes = [tuple(v.shape) for v in params.values()]
            # A float64 model's path is kept in float64: its steps are often far below
            # float32's spacing at its weights (2.4e-7 near 3), and the PCA of float32
            # checkpoints' differences was then mostly rounding noise.
            self.dtype = (torch.float64 if any(v.dtype == torch.float64 for v in
                                               params.values()) else torch.float32)
        elif list(params) != self.names or any(
            tuple(v.shape) != s for v, s in zip(params.values(), self.shapes, strict=True)
        ):
            raise ValueError("this checkpoint's parameters differ from the first one's; a "
                             "trajectory follows one architecture.")
        flat = torch.cat([v.detach().reshape(-1).to("cpu", self.dtype) for v in
                          params.values()])
        self.points.append(flat)
        self.steps.append(len(self.steps) if step is None else int(step))

    def attach(self, optimizer: torch.optim.Optimizer, model: nn.Module, every: int = 10):
        """Record ``model`` now and after every ``every``-th ``optimizer.step()``.

        Uses ``optimizer.register_step_post_hook``; returns its handle (also kept:
        :meth:`detach` removes it).

        Returns:
            The ``RemovableHandle`` of the optimizer step hook.

        Raises:
            TypeError: If ``model`` is not an ``nn.Module``.
            ValueError: If ``every`` is not an int >= 1.
        """
        check_module(model)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}.")
        self.detach()
        self._count = 0
        self.record(model, step=0)

        def hook(_opt, _args, _kwargs):
            self._count += 1
            if self._count % every == 0:
                self.record(model, step=self._count)

        self._handle = optimizer.register_step_post_hook(hook)
        return self._handle

    def detach(self) -> None:
        """Stop recording (remove the optimizer hook)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @classmethod
    def from_checkpoints(cls, paths: Iterable[str | Path | dict], model: nn.Module | None = None,
                         ignore: str | None = "biasbn") -> Trajectory:
        """A trajectory from saved ``state_dict`` files (or dicts), in the given order.

        Files are read with ``torch.load(weights_only=True)``; a dict holding a
        ``"state_dict"`` or ``"model"`` entry is unwrapped. With ``model`` only its
        parameter names are kept; without it, every floating-point entry except BatchNorm
        running statistics (a tied tensor under its first name only).

        Returns:
            A :class:`Trajectory` with one checkpoint per entry of ``paths`` (steps ``0, 1, ...``).

        Raises:
            ValueError: If a checkpoint lacks one of ``model``'s parameters.
        """
        traj = cls(ignore=ignore)
        names = None if model is None else [n for n, _ in model.named_parameters()]
        for i, p in enumerate(paths):
            state = p if isinstance(p, dict) else torch.load(p, map_location="cpu",
                                                             weights_only=True)
            for key in ("state_dict", "model"):
                if isinstance(state, dict) and isinstance(state.get(key), dict):
                    state = state[key]
            if names is not None:
                missing = [n for n in names if n not in state]
                if missing:  # a wrapper's checkpoint ('module.', '_orig_mod.'): say so
                    raise ValueError(f"checkpoint {i} lacks parameters {missing[:3]}; pass "
                                     "checkpoints of this model's state_dict()." + prefix_hint(
                                         missing, [k for k in state if k not in names]))
                params = {n: state[n] for n in names}
            else:
                params = _untied({k: v for k, v in state.items() if torch.is_tensor(v)
                                  and torch.is_floating_point(v)
                                  and not k.endswith(BUFFER_SUFFIXES)})
            traj.record(params, step=i)
        return traj

    # --- PCA -----------------------------------------------------------------------------
    def _matrix(self) -> Tensor:
        if len(self.points) < 3:
            raise ValueError(f"PCA of a path needs at least 3 checkpoints, got {len(self)}; "
                             "record more (e.g. attach(..., every=1)).")
        last = self.points[-1].double()
        rows = torch.stack([p.double() - last for p in self.points])
        if self.ignore == "biasbn":
            rows = rows * self._weight_mask()
        return rows

    def _weight_mask(self) -> Tensor:
        parts = [torch.full((int(np.prod(s)),), 1.0 if len(s) > 1 else 0.0, dtype=torch.float64)
                 for s in self.shapes]
        return torch.cat(parts)

    def unflatten(self, flat: Tensor) -> Params:
        """A direction dict (parameter name -> tensor) from a flat vector.

        Returns:
            ``{name: tensor}`` in the checkpoints' dtype (float64 for a float64 model, else
            float32).
        """
        out, at = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            k = int(np.prod(shape))
            out[name] = flat[at:at + k].reshape(shape).to(self.dtype).clone()
            at += k
        return out

    def flatten(self, direction: Params) -> Tensor:
        """Inverse of :meth:`unflatten` (float64)."""
        return torch.cat([direction[n].detach().reshape(-1).double().cpu() for n in self.names])

    def pca_directions(self, k: int = 2) -> tuple[PCADirections, np.ndarray]:
        """The first ``k`` principal directions of the path and their explained variance.

        Returns:
            ``(dirs, evr)``: ``dirs`` is a :class:`PCADirections` (a list of ``k`` direction
            dicts, unit norm and orthogonal; it also carries the projected path and axis
            labels), ``evr`` the explained-variance ratios. The sign of each direction is
            fixed so that the first checkpoint has a non-positive coordinate (the path
            runs towards +).

        Raises:
            ValueError: If ``k`` is not in ``[1, min(checkpoints, parameters)]``, or the trajectory
                has fewer than 3 checkpoints.

        Example:
            >>> traj = Trajectory(ignore=None)  # a straight path theta_t = t * (1, 2)
            >>> for t in range(4):
            ...     traj.record({"w": torch.tensor([1.0, 2.0]) * t})
            >>> dirs, evr = traj.pca_directions(k=1)
            >>> evr.tolist(), torch.allclose(dirs[0]["w"], torch.tensor([1.0, 2.0]) / 5 ** 0.5)
            ([1.0], True)
            >>> # coordinates relative to the last checkpoint: (t - 3) * ||(1, 2)||
            >>> np.allclose(traj.project(dirs)[:, 0], (np.arange(4) - 3) * 5 ** 0.5)
            True
        """
        m = self._matrix()
        if not 1 <= k <= min(m.shape):
            raise ValueError(f"k={k} must be in [1, {min(m.shape)}] for {len(self)} "
                             "checkpoints.")
        centred = m - m.mean(0, keepdim=True)
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        var = s ** 2
        evr = (var[:k] / var.sum()).numpy()
        comps = vh[:k].clone()
        for i in range(k):
            if float(m[0] @ comps[i]) > 0:
                comps[i] = -comps[i]
        path = (m @ comps.T).numpy()
        dirs = PCADirections([self.unflatten(c) for c in comps], evr, path)
        dirs.singular_values, dirs.n_checkpoints = s[:k].numpy(), m.shape[0]
        return dirs, evr

    def project(self, dirs, method: str = "cos") -> np.ndarray:
        """Coordinates ``(n, len(dirs))`` of every checkpoint relative to the last one.

        Args:
            dirs: Direction dicts (e.g. from :meth:`pca_directions`, or random ones).
            method: ``"cos"``: ``<theta_i - theta_n, d> / ||d||^2`` per direction, the
                coordinate in units of ``d`` (for unit-norm PCA directions this is
                loss-landscape's ``<theta_i - theta_n, d> / ||d||``; exact for orthogonal
                directions); ``"lstsq"``: least squares in the span of ``dirs``.

        Returns:
            Coordinates in the units of the directions, so they can be drawn on a surface
            computed along ``dirs`` (``surface.to_plotly(path=...)``).

        Raises:
            ValueError: If ``method`` is neither ``"cos"`` nor ``"lstsq"``, or the trajectory has
                fewer than 3 checkpoints.
        """
        if method not in ("cos", "lstsq"):
            raise ValueError("method must be 'cos' or 'lstsq'.")
        m = self._matrix()
        basis = torch.stack([self.flatten(d) for d in dirs])
        if self.ignore == "biasbn":
            basis = basis * self._weight_mask()
        if method == "cos":
            return (m @ basis.T / basis.norm(dim=1) ** 2).numpy()
        sol = torch.linalg.lstsq(basis.T, m.T).solution
        return sol.T.numpy()

    def save_projection(self, proj_path: str | Path, dir_path: str | Path, dirs, *,
                        model: nn.Module | None = None, method: str = "cos",
                        overwrite: bool = False) -> np.ndarray:
        """Write loss-landscape's projection file and directions file of the path.

        ``proj_path`` gets ``proj_xcoord``/``proj_ycoord`` (:meth:`project`, the last
        checkpoint at 0); ``dir_path`` the two directions in its ``weights`` layout (in
        ``model.parameters()`` order: pass the model when the trajectory was read from files
        without one) with ``explained_variance_ratio_``, ``singular_values_`` and
        ``explained_variance_`` for PCA directions. Its ``plot_2D.py --proj_file --dir_file``
        (``plot_trajectory``, and with ``--surf_file`` ``plot_contour_trajectory``, which
        needs PCA directions) draws them.

        Returns:
            The ``(n, 2)`` coordinates written.

        Raises:
            ValueError: If ``dirs`` are not two directions of this trajectory.
            FileExistsError: If either file exists and ``overwrite`` is false.
        """
        from .dirfile import save_directions, write_directions, write_projection
        from .h5files import check_target

        if len(dirs) != 2:
            raise ValueError(f"a projection file needs two directions, got {len(dirs)}.")
        coords = self.project(dirs, method)
        check_target(proj_path, overwrite)
        check_target(dir_path, overwrite)
        pca = {"explained_variance_ratio": getattr(dirs, "evr", None),
               "singular_values": getattr(dirs, "singular_values", None),
               "n_samples": getattr(dirs, "n_checkpoints", None)}
        if model is not None:
            save_directions(dir_path, list(dirs), model, dir_type="weights",
                            overwrite=overwrite, **pca)
        else:
            order = [(n, torch.empty(s)) for n, s in zip(self.names, self.shapes, strict=True)]
            write_directions(dir_path, [{n: d[n] for n in self.names} for d in dirs], order,
                             "weights", overwrite=overwrite, **pca)
        write_projection(proj_path, coords, overwrite=overwrite)
        return coords


def _untied(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with each tensor under its first name only, as ``named_parameters()`` has it.

    A tied weight (an output layer sharing the embedding's) is saved under both names,
    one storage (``torch.save`` keeps the sharing); kept twice it would weigh double in the
    PCA and give directions with a name the model's parameters do not have.

    Returns:
        The entries of ``state`` whose tensor (storage, offset, shape, strides) no earlier
        entry holds.
    """
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride())
        if not v.numel() or key not in seen:  # empty tensors share no data
            seen.add(key)
            out[k] = v
    return out


def _parameters(model) -> dict[str, Tensor]:
    if isinstance(model, nn.Module):
        return {n: p for n, p in model.named_parameters()}
    if isinstance(model, dict) and all(torch.is_tensor(v) for v in model.values()):
        return dict(model)
    raise TypeError("record() takes an nn.Module or a dict of tensors, got "
                    f"{type(model).__name__}.")
