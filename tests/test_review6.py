"""Review 6: models and inputs the other tests do not cover.

Each test failed before its fix (see the commit that added it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import landscape_widget as lw


def _mlp(inputs: int = 6, outputs: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, 8), nn.ReLU(), nn.Linear(8, outputs))


class _DictInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, d: dict) -> torch.Tensor:
        return self.lin(d["a"])


class _DictItems(Dataset):
    """Items ``({"a": x_i}, y_i)``: a model input that is a dict."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return {"a": self.x[i]}, self.y[i]


def _xy(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("form", ["dict", "tuple", "dataset_dict", "per_sample_list"])
def test_inputs_that_are_not_one_tensor_raise_a_type_error_naming_the_fix(form):
    # Before: torch.as_tensor's RuntimeError 'Could not infer dtype of dict' or ValueError
    # 'only one element tensors can be converted to Python scalars'.
    x, y = _xy()
    data = {"dict": ({"a": x}, y), "tuple": ((x, x), y),
            "dataset_dict": _DictItems(x, y), "per_sample_list": (list(x), y)}[form]
    with pytest.raises(TypeError, match=r"not one tensor.*torch\.stack.*wrapper"):
        lw.compute_surface(_DictInput(), data, x=(-1, 1, 3), y=(-1, 1, 3))


def test_array_like_inputs_and_targets_still_become_tensors():
    x, y = _xy()
    model = _mlp()
    ref = lw.compute_curve(model, (x, y), x=(-1, 1, 3)).loss
    lists = lw.compute_curve(model, (x.tolist(), [torch.tensor(int(t)) for t in y]),
                             x=(-1, 1, 3)).loss
    assert (lists == ref).all()


def test_a_loss_that_broadcasts_outputs_against_targets_is_named():
    # MSELoss on (N, 1) outputs and (N,) targets gives an (N, N) mean; before, the error
    # said 'not a mean over samples' and suggested one batch of all data, which keeps the
    # wrong value.
    x, _ = _xy()
    y = torch.randn(12)
    with pytest.raises(ValueError, match=r"broadcasts the outputs \((\d+), 1\) against the "
                                         r"targets \(\1,\) to \(\1, \1\).*"
                                         r"y\.reshape\(-1, 1\)"):
        lw.compute_curve(_mlp(outputs=1), (x, y), x=(-1, 1, 3), loss_fn=nn.MSELoss())
    curve = lw.compute_curve(_mlp(outputs=1), (x, y[:, None]), x=(-1, 1, 3),
                             loss_fn=nn.MSELoss())
    assert curve.loss.shape == (3,)


def _weight_norm_mlp(legacy: bool) -> nn.Module:
    model = _mlp()
    if legacy:
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(model[0])
    else:
        torch.nn.utils.parametrizations.weight_norm(model[0])
    return model.double()


@pytest.mark.parametrize("legacy", [False, True], ids=["parametrization", "legacy"])
@pytest.mark.parametrize("method", ["auto", "graph", "backward"])
def test_a_wrong_second_derivative_in_torch_is_refused_not_returned(legacy, method):
    # torch's double backward of weight_norm (_weight_norm_interface) is wrong: the
    # Hessian it gives differs from the true one (weight_norm written out, float64) and is
    # not symmetric. Before, the top eigenvalue came out 1.3511 where the true one is
    # 1.3552, with no sign of it; now the products' asymmetry is caught at the first one.
    model = _weight_norm_mlp(legacy)
    x, y = _xy(16)
    x = x.double()
    with pytest.raises(RuntimeError, match=r"not symmetric.*weight_norm"):
        lw.hessian_eigenpairs(model, (x, y), k=1, ignore=None, method=method)


def test_the_symmetry_check_passes_a_true_hessian_written_out_weight_norm():
    # The same function with weight_norm written out: torch differentiates it correctly, and
    # the operator's eigenvalue equals the dense float64 Hessian's.
    class Scaled(nn.Module):
        def __init__(self, lin: nn.Linear):
            super().__init__()
            self.g = nn.Parameter(lin.weight.detach().norm(dim=1, keepdim=True).clone())
            self.v = nn.Parameter(lin.weight.detach().clone())
            self.b = nn.Parameter(lin.bias.detach().clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.g * self.v / self.v.norm(dim=1, keepdim=True)
            return x @ w.T + self.b

    base = _mlp()
    model = nn.Sequential(Scaled(base[0]), base[1], base[2]).double()
    x, y = _xy(16)
    x = x.double()
    params = dict(model.named_parameters())
    names = list(params)
    flat0 = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, [p.numel() for p in params.values()])
        values = {k: t.view(params[k].shape) for k, t in zip(names, parts, strict=True)}
        out = torch.func.functional_call(model, values, (x,))
        return nn.functional.cross_entropy(out, y)

    top = float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat0))[-1])
    res = lw.hessian_eigenpairs(model, (x, y), k=1, ignore=None, tol=1e-8)
    assert abs(float(res.values[0]) - top) <= 1e-6 * abs(top)


def _parametrized_deep(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 3))
    if kind == "weight_norm":
        torch.nn.utils.parametrizations.weight_norm(model[4])
    elif kind == "orthogonal":
        torch.nn.utils.parametrizations.orthogonal(model[4])
    else:
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(model[4])
    return model


@pytest.mark.parametrize("kind", ["weight_norm", "orthogonal", "legacy_weight_norm"])
def test_permutation_direction_keeps_a_parametrized_layer_in_place(kind):
    # Before: KeyError (the id of the computed weight) from the permutation analysis.
    from snapshots import assert_same_snapshot, snapshot

    model = _parametrized_deep(kind)
    x, _ = _xy()
    before = snapshot(model)
    d = lw.permutation_direction(model, check_inputs=x)
    assert_same_snapshot(before, snapshot(model))
    # The hidden units between the plain layers 0 and 2 move; the parametrized layer 4 and
    # the units it reads stay.
    assert {k for k, v in d.items() if v.abs().max() > 0} == {"0.weight", "0.bias", "2.weight"}
    # The permuted model computes the same function (float64 oracle: load_state_dict).
    twin = _parametrized_deep(kind).double()
    state = {k: v.double() for k, v in model.state_dict().items()}
    twin.load_state_dict({k: v + d[k].double() if k in d else v for k, v in state.items()})
    reference = _parametrized_deep(kind).double()
    reference.load_state_dict(state)
    assert torch.allclose(twin(x.double()), reference(x.double()), atol=1e-6)


class _LogitsDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.lin(x)}


@pytest.mark.parametrize("case", ["bool_targets_bce", "dict_outputs_torch_loss"])
def test_a_failing_loss_gets_the_hint_that_fits(case):
    # Before: 'nothing in the error points at the outputs or the targets' for both, though
    # the bool targets (BCE: "Subtraction ... with two bool tensors") and the dict outputs
    # (cross_entropy: "must be Tensor, not dict") are what the errors are about.
    x, y = _xy()
    if case == "bool_targets_bce":
        model, data, loss = _mlp(outputs=2), (x, torch.rand(12, 2) > 0.5), nn.BCEWithLogitsLoss()
        match = r"targets are bool: pass y\.float\(\)"
    else:
        model, data, loss = _LogitsDict(), (x, y), nn.functional.cross_entropy
        match = r"pick the tensor in it, e\.g\. loss_fn=lambda out, y: "
    with pytest.raises(ValueError, match=match):
        lw.compute_curve(model, data, x=(-1, 1, 3), loss_fn=loss)
    if case == "bool_targets_bce":  # the fix it names works
        lw.compute_curve(model, (x, data[1].float()), x=(-1, 1, 3), loss_fn=loss)


def test_an_axis_of_three_coordinates_is_not_read_as_one_point():
    # x=[-1, 0, 1] (coordinates) read as (start=-1, stop=0, num=1): before, a one-point
    # curve at -1 came back without a word.
    x, y = _xy()
    with pytest.raises(ValueError, match=r"num=1: one point.*pass \(-1, 1, 3\)"):
        lw.compute_curve(_mlp(), (x, y), x=[-1, 0, 1])
    assert lw.compute_curve(_mlp(), (x, y), x=(0.5, 0.5, 1)).loss.shape == (1,)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_parametrize_cached_context_changes_nothing(strategy):
    # Under torch.nn.utils.parametrize.cached() a parametrized weight is cached globally by
    # the id of the module it was registered on, which the engine's copy shares. Before, every
    # point got the first point's weight (a flat surface), and the user's own forward in the
    # same context could get a moved point's weight.
    from torch.nn.utils import parametrize

    model = _mlp()
    torch.nn.utils.parametrizations.orthogonal(model[0])
    x, y = _xy()
    d = lw.random_directions(model, 2, seed=1)
    opts = {"x": (-1, 1, 3), "y": (-1, 1, 3), "directions": d,
            "evaluator_options": {"strategy": strategy}}
    plain = lw.compute_surface(model, (x, y), **opts).loss
    with torch.no_grad():
        expected = model(x)
    with parametrize.cached():
        with torch.no_grad():
            model(x)  # the user's forward fills the cache first
        cached = lw.compute_surface(model, (x, y), **opts).loss
        with torch.no_grad():
            after = model(x)
    with parametrize.cached():
        first = lw.compute_surface(model, (x, y), **opts).loss  # the engine fills it first
        with torch.no_grad():
            user = model(x)
    np.testing.assert_array_equal(cached, plain)
    np.testing.assert_array_equal(first, plain)
    assert torch.equal(after, expected) and torch.equal(user, expected)
    # And the Hessian at theta (the function of the parameters, not of a cached weight).
    with parametrize.cached():
        inside = lw.hessian_trace(model, (x, y), samples=4, ignore=None)
    outside = lw.hessian_trace(model, (x, y), samples=4, ignore=None)
    assert inside.value == pytest.approx(outside.value, rel=1e-6)


def _bn_cnn() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                          nn.Linear(96, 3))
    g = torch.Generator().manual_seed(0)
    return model, (torch.randn(12, 4, 6, 6, generator=g), torch.randint(0, 3, (12,), generator=g))


@pytest.mark.parametrize("mode", ["inference_mode", "autocast"])
@pytest.mark.parametrize("strategy", ["auto", "vmap", "loop"])
def test_the_callers_inference_mode_and_autocast_change_nothing(mode, strategy):
    # Before: under torch.inference_mode() the engine raised 'Inference tensors do not track
    # version counter' (set-up) or 'Inplace update to inference tensor outside
    # InferenceMode'; under torch.autocast('cpu', bfloat16) the surface silently came out
    # in bf16 (2.4e-3 off) while spec['precision'] said fp32.
    model, (x, y) = _bn_cnn()
    opts = {"x": (-1, 1, 3), "y": (-1, 1, 3), "evaluator_options": {"strategy": strategy}}
    plain = lw.compute_surface(model, (x, y), **opts)
    context = (torch.inference_mode() if mode == "inference_mode"
               else torch.autocast("cpu", dtype=torch.bfloat16))
    with context:
        if mode == "inference_mode":  # data made inside the block are inference tensors
            x, y = x.clone(), y.clone()
        inside = lw.compute_surface(model, (x, y), **opts)
    np.testing.assert_array_equal(inside.loss, plain.loss)
    assert inside.spec["precision"] == "fp32"


@pytest.mark.parametrize("mode", ["inference_mode", "autocast"])
def test_hessian_and_side_direction_ignore_the_callers_modes(mode):
    # Before: hessian_trace under autocast took bf16 products (44.214 vs 44.126);
    # side_direction under inference_mode raised 'element 0 of tensors does not require
    # grad'.
    model, data = _bn_cnn()
    trace = lw.hessian_trace(model, data, samples=3).value
    side = lw.side_direction(model, data, warn=False)
    context = (torch.inference_mode() if mode == "inference_mode"
               else torch.autocast("cpu", dtype=torch.bfloat16))
    with context:
        assert lw.hessian_trace(model, data, samples=3).value == trace
        inside = lw.side_direction(model, data, warn=False)
    assert all(torch.equal(inside[k], side[k]) for k in side)


def test_training_and_mining_methods_leave_the_callers_inference_mode():
    """fit_pattern, compare_optimizers, triangle_surface and mine_direction under the
    caller's torch.inference_mode() give what they give outside it. Before, the first two
    raised 'element 0 of tensors does not require grad', mine_direction 'Setting
    requires_grad=True on inference tensor', and triangle_surface claimed the forward
    wrote into a parameter in place."""
    torch.manual_seed(0)

    def make():
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    m1, m2, m3 = make(), make(), make()
    sgd = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1)}

    def run_all():
        fit = lw.fit_pattern(m1, (x, y), lw.checkerboard(2), steps=3, progress=False)
        runs = lw.compare_optimizers(make, (x, y), sgd, epochs=1, batch_size=8,
                                     progress=False)
        tri = lw.triangle_surface(m1, m2, m3, (x, y), resolution=3, progress=False)
        mined = lw.mine_direction(m1, (x, y), "w-peak", steps=2, warn=False)
        trained = runs.model("sgd").state_dict()
        return (fit.evaluate((x, y))["loss"], torch.cat([v.flatten() for v in trained.values()]),
                tri.values("loss"), dict(mined))

    outside = run_all()
    with torch.inference_mode():
        inside = run_all()
    for a, b in zip(outside[:3], inside[:3], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(torch.equal(outside[3][k], inside[3][k]) for k in outside[3])
