"""Review 12d: valid inputs the day's up-front checks, directions and caches got wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import linspace, naive_surface
from review12c_cases import data, mlp
from torch import nn

import landscape_widget as lw


class CallsWithExtra(nn.Module):
    """forward(a, b) with b supplied by an overridden __call__: model(x) runs."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, a, b):
        return self.net(a) + b

    def __call__(self, x):
        return super().__call__(x, 0.5)


def test_a_call_override_supplying_forwards_arguments_is_not_refused():
    model, (x, y) = CallsWithExtra().eval(), data()
    d1, d2 = lw.random_directions(model, 2, seed=0)
    surf = lw.compute_surface(model, (x, y), directions=[d1, d2], x=(-1, 1, 3), y=(-1, 1, 3),
                              progress=False)
    want, _ = naive_surface(model, x, y, d1, d2, linspace((-1, 1, 3)), linspace((-1, 1, 3)))
    np.testing.assert_allclose(surf.loss, want, rtol=1e-5)
    lw.hessian_trace(model, (x, y), samples=2)  # refused before the fix


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, a, b):
        return self.net(a) + b


def test_a_global_pre_hook_supplying_the_arguments_is_not_refused():
    def second(module, args):
        return (args[0], 0.5) if isinstance(module, TwoInputs) and len(args) == 1 else None

    model, (x, y) = TwoInputs().eval(), data()
    d1, d2 = lw.random_directions(model, 2, seed=0)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(second)
    try:
        surf = lw.compute_surface(model, (x, y), directions=[d1, d2], x=(-1, 1, 3),
                                  y=(-1, 1, 3), progress=False)
        want, _ = naive_surface(model, x, y, d1, d2, linspace((-1, 1, 3)),
                                linspace((-1, 1, 3)))
    finally:
        handle.remove()
    np.testing.assert_allclose(surf.loss, want, rtol=1e-5)
    with pytest.raises(TypeError, match="cannot be called with one input"):
        lw.compute_surface(model, (x, y), directions=[d1, d2], x=(-1, 1, 3), y=(-1, 1, 3),
                           progress=False)  # without the hook: refused, as it should be


class ScriptedPart(nn.Module):
    """An eager model whose hidden block is scripted (or not: its eager twin)."""

    def __init__(self, scripted: bool = True, parallel: bool = False):
        super().__init__()
        body = mlp()
        self.body = (torch.jit.script(body) if scripted else
                     nn.DataParallel(body, device_ids=[]) if parallel else body)
        self.head = nn.Linear(3, 3)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(3) + 0.1 * torch.arange(9.0).reshape(3, 3))
            self.head.bias.fill_(0.2)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")
def test_a_scripted_part_of_an_eager_model_runs_where_no_hook_is_needed():
    from review12c_cases import dense_hessian

    model, eager, (x, y) = ScriptedPart().eval(), ScriptedPart(False).eval(), data()
    vals, _ = lw.hessian_eigenpairs(model, (x, y), k=1)
    keys, dense = dense_hessian(eager, x, y)
    np.testing.assert_allclose(vals, torch.linalg.eigvalsh(dense).numpy()[-1:], rtol=1e-4)
    lw.side_direction(model, (x, y))  # refused before the fix, as the rest
    with pytest.raises(TypeError, match="Replace model.body by the eager nn.Module"):
        lw.compute_surface(model, (x, y), x=(-1, 1, 3), y=(-1, 1, 3), progress=False)


def test_a_dataparallel_part_on_no_device_list_runs():
    model, (x, y) = ScriptedPart(False, parallel=True).eval(), data()
    d1, d2 = lw.random_directions(model, 2, seed=0)
    surf = lw.compute_surface(model, (x, y), directions=[d1, d2], x=(-1, 1, 3), y=(-1, 1, 3),
                              progress=False)
    want, _ = naive_surface(model, x, y, d1, d2, linspace((-1, 1, 3)), linspace((-1, 1, 3)))
    np.testing.assert_allclose(surf.loss, want, rtol=1e-5)


def _denied(monkeypatch, denied: Path) -> None:
    """os.access as for a user without write permission on ``denied`` (root has it all)."""
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == denied
                        and mode & os.W_OK else real(p, mode, **kw))


def test_saving_over_a_file_this_user_may_not_write_is_refused(tmp_path, monkeypatch):
    # Another user's 0644 file in a folder we may write: the rename replaced it (and it
    # became ours), where writing it would have been refused.
    from test_review12b import _small_surface

    model, dirs, s = _small_surface()
    theirs = tmp_path / "theirs.h5"
    s.save(theirs)
    before = theirs.read_bytes()
    _denied(monkeypatch, theirs)
    for write in (lambda: s.save(theirs, overwrite=True),
                  lambda: lw.save_directions(theirs, dirs, model, overwrite=True)):
        with pytest.raises(PermissionError, match="read-only \\(for you\\)"):
            write()
    assert theirs.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs.h5"]


def test_saving_into_a_folder_this_user_may_not_write_names_the_folder(tmp_path, monkeypatch):
    from test_review12b import _small_surface

    _, _, s = _small_surface()
    _denied(monkeypatch, tmp_path)
    with pytest.raises(PermissionError, match=f"folder {tmp_path} is not writable"):
        s.save(tmp_path / "new.h5")  # was h5py's error naming our '.new.h5.<hex>.tmp'


def test_a_replaced_file_keeps_its_owner(tmp_path):
    import os

    from test_review12b import _small_surface

    _, _, s = _small_surface()
    target = tmp_path / "theirs.h5"
    s.save(target)
    if os.geteuid() == 0:  # root saving over a user's file left it root's
        os.chown(target, 4321, 4321)
    owner = (target.stat().st_uid, target.stat().st_gid)
    s.save(target, overwrite=True)
    assert (target.stat().st_uid, target.stat().st_gid) == owner


def _default_shift(forward):
    """A decorator (functools.wraps) that supplies forward's second argument itself."""
    import functools

    @functools.wraps(forward)
    def wrapper(self, x, shift=None):
        return forward(self, x, 0.25 if shift is None else shift)

    return wrapper


class DecoratedDefault(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()

    @_default_shift
    def forward(self, x, shift):
        return self.net(x) + shift


class NoGradTwoInputs(TwoInputs):
    @torch.no_grad()
    def forward(self, a, b):
        return super().forward(a, b)


def test_a_decorator_supplying_an_argument_is_not_refused():
    # inspect.signature followed functools.wraps to forward(x, shift): refused.
    model, (x, y) = DecoratedDefault().eval(), data()
    d1, d2 = lw.random_directions(model, 2, seed=0)
    surf = lw.compute_surface(model, (x, y), directions=[d1, d2], x=(-1, 1, 3), y=(-1, 1, 3),
                              progress=False)
    want, _ = naive_surface(model, x, y, d1, d2, linspace((-1, 1, 3)), linspace((-1, 1, 3)))
    np.testing.assert_allclose(surf.loss, want, rtol=1e-5)
    # A pass-through decorator (torch.no_grad's *args, **kwargs) is still seen through.
    with pytest.raises(TypeError, match=r"forward\(a, b\) cannot be called with one input"):
        lw.core.model_kinds.check_runnable(NoGradTwoInputs())


def _masked_loss(out, t):
    """Summed over labelled samples (t != -1) / batch size; a batch with none: a constant."""
    keep = t != -1
    if not keep.any():
        return torch.zeros((), dtype=out.dtype)
    return torch.nn.functional.cross_entropy(out[keep], t[keep], reduction="sum") / len(t)


@pytest.mark.parametrize("method", ["jvp", "backward"])
def test_a_loss_constant_on_one_batch_is_not_refused_by_the_hessian(method):
    # A masked loss with nothing to count on a batch returns a constant: that batch adds
    # nothing. Refused as 'a forward without autograd'; jvp gave the right value before.
    import copy

    from torch.func import functional_call

    model, (x, y) = mlp(), data()
    y = y.clone()
    y[:8] = -1  # the first batch of 8 has no labelled sample
    vals, _ = lw.hessian_eigenpairs(model, (x, y), k=1, loss_fn=_masked_loss, method=method,
                                    batch_size=8)
    ref = copy.deepcopy(model).double()
    theta = {k: p.detach().double() for k, p in ref.named_parameters()}
    keys = [k for k, v in theta.items() if v.dim() > 1]
    sizes = [theta[k].numel() for k in keys]

    def loss(flat):  # the mean loss over all data, float64
        point = dict(theta)
        for k, part in zip(keys, torch.split(flat, sizes), strict=True):
            point[k] = theta[k] + part.reshape(theta[k].shape)
        return _masked_loss(functional_call(ref, point, (x.double(),)), y) * 1.0

    dense = torch.autograd.functional.hessian(loss, torch.zeros(sum(sizes),
                                                                dtype=torch.float64))
    np.testing.assert_allclose(vals, torch.linalg.eigvalsh(dense).numpy()[-1:], rtol=1e-4)


@pytest.mark.parametrize("batch_size", [8, None])
def test_a_loss_fn_that_detaches_on_every_batch_is_still_refused(batch_size):
    model, data_ = mlp(), data()
    with pytest.raises(ValueError, match="through autograd"):
        lw.hessian_trace(model, data_, samples=2, batch_size=batch_size,
                         loss_fn=lambda out, t: torch.nn.functional.cross_entropy(
                             out.detach(), t))


def test_a_link_in_a_folder_we_may_not_write_is_written_through(tmp_path, monkeypatch):
    from test_review12b import _small_surface

    _, _, s = _small_surface()
    (tmp_path / "links").mkdir()
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "s.h5"
    s.save(target)
    link = tmp_path / "links" / "s.h5"
    link.symlink_to(target)
    _denied(monkeypatch, tmp_path / "links")  # only the link's folder is read-only
    s.save(link, overwrite=True)
    assert link.is_symlink()
    np.testing.assert_array_equal(lw.Surface.load(target).loss, s.loss)
    _denied(monkeypatch, tmp_path / "data")  # the target's folder: the new file goes there
    with pytest.raises(PermissionError, match="data is not writable"):
        s.save(link, overwrite=True)


def test_each_lane_keeps_a_stem_row_only_while_the_memory_allows(monkeypatch):
    # Every lane keeps its own copy of the stem's outputs: decided once for the first,
    # 4 lanes took 4 x ROW_SHARE of the memory. Now each lane's first row checks again.
    from oracle import naive_eval

    from landscape_widget.core import stem_terms

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3)).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 1, 6, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
    dirs = lw.random_directions(model, 2, seed=0)
    size = 24 * 4 * 6 * 6 * 4  # one copy of the stem's outputs, bytes
    asked = []

    def free(device):  # room for one copy at ROW_SHARE, and the copy then taken from it
        asked.append(device)
        return 10 * size * (1.5 if len(asked) == 1 else 0.5)

    monkeypatch.setattr(stem_terms, "free_memory", free)
    ev = lw.Evaluator(model, (x, y), dirs, stem=True, strategy="loop", batch_size=8, lanes=2)
    coords = np.array([(a, b) for b in (-1.0, 0.0, 1.0) for a in (-1.0, 0.0, 0.5, 1.0)])
    ev.expected_points = len(coords)
    got = ev.evaluate(coords)["loss"]
    assert ev.plan.stem and ev.plan.lanes == 2
    kept = [lane.stem_row for lane in [ev._home_lane, *ev._lanes] if lane.stem_row]
    assert len(kept) == 1
    want, _ = naive_eval(model, x, y, dirs, coords)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_each_lane_keeps_a_parameter_row_only_while_the_memory_allows(monkeypatch):
    # The same for the point's parameters (passes._row_sum): decided once for the first
    # lane's first row, every later lane kept its own copy unchecked.
    from oracle import naive_eval

    from landscape_widget.core import passes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
    dirs = lw.random_directions(model, 2, seed=0)
    size = (6 * 16 + 16 * 3) * 4  # one row: the moved weights (dim > 1), bytes
    asked = []

    def free(device):  # room for one row at ROW_SHARE, then the row taken from it
        asked.append(device)
        return 10 * size * (1.5 if len(asked) == 1 else 0.5)

    monkeypatch.setattr(passes, "free_memory", free)
    ev = lw.Evaluator(model, (x, y), dirs, stem=False, strategy="loop", batch_size=8,
                      lanes=2)
    coords = np.array([(a, b) for b in (-1.0, 0.0, 1.0) for a in (-1.0, 0.0, 0.5, 1.0)])
    ev.expected_points = len(coords)
    got = ev.evaluate(coords)["loss"]
    assert ev.plan.lanes == 2 and not ev.plan.stem
    assert len(asked) >= 2 and ev._row_fits is False  # asked again after the first row
    kept = [lane.row for lane in [ev._home_lane, *ev._lanes] if lane.row is not None]
    assert len(kept) <= 1
    want, _ = naive_eval(model, x, y, dirs, coords)
    np.testing.assert_allclose(got, want, rtol=1e-5)
