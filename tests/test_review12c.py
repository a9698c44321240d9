"""Review 12c: model kinds researchers bring beyond the suite's cases.

- TorchScript (``torch.jit.script`` / ``torch.jit.trace``, a scripted submodule of an eager
  model): every public function failed with torch's words ("register_forward_hook is not
  supported on ScriptModules", or "The stateless API can't be used with Jitted modules"
  dressed as a double-backward problem with a wrong fix). Now a ``TypeError`` naming the
  scripted module and the fix (the eager module), before anything runs; the model is
  untouched.
- Complex parameters: ``random_directions`` made complex directions that
  ``compute_surface`` then refused, and the Hessian tools failed with "value cannot be
  converted to type double without overflow". Now a ``TypeError`` naming the parameter
  and the fix (a real parameter viewed as complex in forward).
- Forwards that cannot take one input (``forward(x1, x2)``, keyword-only
  ``forward(*, input_ids)``): every computation failed inside the user's forward with
  Python's "missing 1 required positional argument". Now a ``TypeError`` naming the
  signature and the wrapper that fixes it. Forwards with optional extra arguments
  (HuggingFace's ``forward(input_ids, attention_mask=None, labels=None)`` returning a
  ``ModelOutput``-like object), ``*args`` or a pre-hook building the arguments still run,
  checked against a float64 ``functional_call`` loop.
- HuggingFace-style data (a dict batch ``{"input_ids": ..., "labels": ...}``, a list of
  per-example dicts): "data must be an (inputs, targets) pair ...; got dict" said nothing
  of what to do with it. The message now names the form and the fix.
- torch's ``orthogonal`` parametrization with its Householder map (the default for a
  non-square weight) reads the diagonal of ``original`` as signs, through ``.int()``:
  random directions moved it, so every default surface and curve had a spike at the model
  itself (``int(-0.99) == 0`` zeroes a column). Random directions are now zero there;
  the curve is continuous at theta, checked on a float64 ``functional_call`` loop.
  Hessian eigenvectors kept ~1e-5 of their random Lanczos start there, enough for the same
  spike along them: the start vector is zero there now (no product moves those entries).
- ``torch.compile``d models work (checked against a float64 loop on the eager module), but
  their parameters are named ``_orig_mod.<name>`` (DDP's ``module.<name>``): directions
  made for the eager model were refused with "make it ... for this very model" only. The
  message now names the prefix and the fix, as does ``Trajectory.from_checkpoints`` for
  checkpoints saved from such a wrapper ("checkpoint 0 lacks parameters [...]" only).
- ``nn.DataParallel``: torch's "The stateless API can't be used with nn.DataParallel
  module" came dressed as a problem of the data ("Check that the data are what the model
  takes: the input size ..."). Now a ``TypeError`` naming the fix (``model.module``).
- A forward decorated with ``@torch.no_grad()``: ``hessian_eigenpairs`` returned 0 and
  ``hessian_trace`` 0 (the ``jvp`` fallback differentiated a loss with no graph), mining
  and ``side_direction`` failed with "element 0 of tensors does not require grad". Now a
  ``ValueError`` naming the decorator and the fix. With ``@torch.inference_mode()``
  surfaces failed ("Inference tensors do not track version counter", reading the
  outputs' version counters); they now run (checked against the float64 loop).
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import classification_data, reinit
from public_cases import Untouched
from torch import nn
from torch.func import functional_call

import landscape_widget as lw


def _mlp() -> nn.Module:
    return reinit(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), 0).eval()


def _data():
    return classification_data(16, (6,), 3, 1)


class _Outer(nn.Module):
    """An eager model with a scripted block, as code that scripts its hot layer has."""

    def __init__(self):
        super().__init__()
        self.body = torch.jit.script(_mlp())
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _calls(data):
    """Every public entry point on ``model``, as ``name -> fn(model)``."""
    grid = {"x": (-1, 1, 3), "y": (-1, 1, 3), "progress": False}
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    return {
        "random_directions": lambda m: lw.random_directions(m, 2, seed=0),
        "compute_surface": lambda m: lw.compute_surface(m, data, **grid),
        "compute_curve": lambda m: lw.compute_curve(m, data, x=(-1, 1, 3), progress=False),
        "iter_tiles": lambda m: list(lw.iter_tiles(m, data, x=(-1, 1, 3), y=(-1, 1, 3))),
        "hessian_eigenpairs": lambda m: lw.hessian_eigenpairs(m, data, k=1),
        "hessian_trace": lambda m: lw.hessian_trace(m, data, samples=2),
        "hessian_density": lambda m: lw.hessian_density(m, data, steps=3, runs=1),
        "mine_direction": lambda m: lw.mine_direction(m, data, "w-peak"),
        "side_direction": lambda m: lw.side_direction(m, data),
        "permutation_direction": lambda m: lw.permutation_direction(m, data=data),
        "compare_optimizers": lambda m: lw.compare_optimizers(m, data, {"sgd": sgd},
                                                              epochs=1, progress=False),
        "triangle_surface": lambda m: lw.triangle_surface(m, m, m, data, resolution=2,
                                                          progress=False),
    }


_KINDS = {
    "script": lambda: torch.jit.script(_mlp()),
    "trace": lambda: torch.jit.trace(_mlp(), _data()[0][:2]),
    "scripted-submodule": _Outer,
}


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")
@pytest.mark.parametrize("kind", list(_KINDS))
@pytest.mark.parametrize("call", list(_calls(None)))
def test_torchscript_is_refused_naming_the_fix(kind, call):
    model = _KINDS[kind]()
    with Untouched(model), pytest.raises(TypeError, match="TorchScript") as err:
        _calls(_data())[call](model)
    assert "eager nn.Module" in str(err.value)
    if kind == "scripted-submodule":
        assert "model.body" in str(err.value)  # names the scripted block


class _ComplexNet(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(0.3 * torch.randn(6, 8, dtype=torch.cfloat, generator=g))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out((x.to(torch.cfloat) @ self.w).abs())


@pytest.mark.parametrize("call", ["random_directions", "compute_surface",
                                  "hessian_eigenpairs", "hessian_trace", "mine_direction"])
def test_complex_parameter_is_refused_naming_the_fix(call):
    model = _ComplexNet()
    with Untouched(model), pytest.raises(TypeError, match="'w' is complex") as err:
        _calls(_data())[call](model)
    assert "view_as_complex" in str(err.value)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x1, x2):
        return self.a(x1) + self.b(x2)


class _KeywordOnly(_TwoInputs):
    def forward(self, *, x):
        return self.a(x[:, :3]) + self.b(x[:, 3:])


@pytest.mark.parametrize("kind", [_TwoInputs, _KeywordOnly])
@pytest.mark.parametrize("call", [c for c in _calls(None) if c != "random_directions"])
def test_forward_needing_more_than_one_input_is_refused_naming_the_fix(kind, call):
    model = reinit(kind(), 0)
    with Untouched(model), pytest.raises(TypeError, match="cannot be called with one input"
                                         ) as err:
        _calls(_data())[call](model)
    assert "Wrap the model" in str(err.value) and "forward(" in str(err.value)


class _Output(OrderedDict):
    """HuggingFace's ModelOutput in small: a dict whose entries are attributes too."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(key) from err


class _TinyEncoder(nn.Module):
    """A HuggingFace-style classifier in pure torch: optional mask and labels, padding
    masked with ``finfo.min``, a ``ModelOutput``-like result with ``.logits``."""

    def __init__(self, vocab: int = 11, width: int = 8, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids, attention_mask=None, labels=None):
        if attention_mask is None:
            attention_mask = (input_ids != 0).long()
        h = self.emb(input_ids)
        q, k, v = self.qkv(h).chunk(3, -1)
        keep = attention_mask[:, None, :].to(h.dtype)
        scores = q @ k.transpose(-1, -2) + (1 - keep) * torch.finfo(h.dtype).min
        h = h + scores.softmax(-1) @ v
        logits = self.head((h * keep.transpose(1, 2)).sum(1) / keep.sum(-1))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return _Output(logits=logits, loss=loss)


class _StarArgs(_TinyEncoder):
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


class _PreHookBuilds(_TwoInputs):
    """forward(x1, x2) whose pre-hook splits the one input: callable as model(x)."""

    def __init__(self):
        super().__init__()
        self.register_forward_pre_hook(lambda _m, args: (args[0][:, :3], args[0][:, 3:]))


def _token_data():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 11, (12, 5), generator=g)
    ids[torch.arange(5)[None] >= torch.randint(2, 6, (12, 1), generator=g)] = 0  # padding
    return ids, torch.randint(0, 3, (12,), generator=g)


def _oracle_surface(model, x, y, d1, d2, xs, ys) -> np.ndarray:
    """Float64 loop: ``functional_call`` on a copy at ``theta + a d1 + b d2``."""
    ref = copy.deepcopy(model).double().eval()
    theta = {k: p.detach().double() for k, p in ref.named_parameters()}
    out = np.zeros((len(ys), len(xs)))
    for i, b in enumerate(ys):
        for j, a in enumerate(xs):
            point = {k: v + a * d1[k].double() + b * d2[k].double() for k, v in theta.items()}
            with torch.no_grad():
                logits = functional_call(ref, point, (x.double() if x.is_floating_point()
                                                      else x,))
            logits = getattr(logits, "logits", logits)
            out[i, j] = float(F.cross_entropy(logits, y))
    return out


@pytest.mark.parametrize("kind", [_TinyEncoder, _StarArgs, _PreHookBuilds])
def test_forwards_callable_with_one_input_still_run(kind):
    model = reinit(kind(), 4).eval()
    x, y = _token_data() if kind is not _PreHookBuilds else _data()
    d1, d2 = lw.random_directions(model, 2, seed=1)
    with Untouched(model):
        surf = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-1, 1, 3),
                                  y=(-1, 1, 3), progress=False)
    ref = _oracle_surface(model, x, y, d1, d2, surf.x, surf.y)
    np.testing.assert_allclose(surf.loss, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["dict", "list-of-dicts"])
def test_huggingface_style_batches_name_the_fix(form):
    ids, y = _token_data()
    batch = {"input_ids": ids, "labels": y}
    data = batch if form == "dict" else [
        {"input_ids": i, "labels": t} for i, t in zip(ids, y, strict=True)]
    model = reinit(_TinyEncoder(), 4)
    for call in (lambda: lw.compute_surface(model, data, x=(-1, 1, 3), y=(-1, 1, 3),
                                            progress=False),
                 lambda: lw.hessian_eigenpairs(model, data, k=1)):
        with pytest.raises(TypeError, match="HuggingFace-style batch") as err:
            call()
        assert "(batch['input_ids'], batch['labels'])" in str(err.value)
        assert "input_ids" in str(err.value).split("HuggingFace")[0]  # names its keys


def _orthogonal_net() -> nn.Module:
    from torch.nn.utils.parametrizations import orthogonal

    model = reinit(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), 5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        orthogonal(model[2])  # 3 x 8: Householder, signs on the diagonal of original
    return model.eval()


def _oracle_curve(model, x, y, d, ts) -> np.ndarray:
    ref = copy.deepcopy(model).double().eval()
    theta = {k: p.detach().double() for k, p in ref.named_parameters()}
    out = []
    for t in ts:
        with torch.no_grad():
            logits = functional_call(ref, {k: v + t * d[k].double() for k, v in theta.items()},
                                     (x.double(),))
        out.append(float(F.cross_entropy(logits, y)))
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_directions_leave_householder_signs_alone(seed):
    model = _orthogonal_net()
    x, y = _data()
    original = model[2].parametrizations.weight.original
    with Untouched(model):
        d1, d2 = lw.random_directions(model, 2, seed=seed)
        curve = lw.compute_curve(model, (x, y), direction=d1, x=(-0.02, 0.02, 5),
                                 progress=False, metrics=("loss",))
        surf = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-1, 1, 3),
                                  y=(-1, 1, 3), progress=False, metrics=("loss",))
    key = "2.parametrizations.weight.original"
    assert torch.count_nonzero(d1[key].diagonal()) == 0 and d1[key].abs().sum() > 0
    assert torch.equal(original.detach().diagonal().abs(), torch.ones(3))  # signs
    ref = _oracle_curve(model, x, y, d1, curve.x)
    np.testing.assert_allclose(curve.loss, ref, rtol=1e-5, atol=1e-6)
    # Continuous at theta: a step of 0.01 changes the loss by about slope * 0.01 (a
    # moved sign changed it by ~0.04 whatever the step).
    slope = abs(ref[3] - ref[1]) / 0.02
    assert max(abs(ref[1] - ref[2]), abs(ref[3] - ref[2])) < 0.01 * slope + 1e-3
    np.testing.assert_allclose(surf.loss, _oracle_surface(model, x, y, d1, d2, surf.x,
                                                          surf.y), rtol=1e-5, atol=1e-6)


def _dense_hessian(model, x, y) -> tuple[list[str], torch.Tensor]:
    """torch's dense float64 Hessian of the mean loss over the parameters of dim > 1."""
    ref = copy.deepcopy(model).double().eval()
    theta = {k: p.detach().double() for k, p in ref.named_parameters()}
    keys = [k for k, v in theta.items() if v.dim() > 1]
    sizes = [theta[k].numel() for k in keys]

    def loss(flat):
        point = dict(theta)
        for k, part in zip(keys, torch.split(flat, sizes), strict=True):
            point[k] = theta[k] + part.reshape(theta[k].shape)
        return F.cross_entropy(functional_call(ref, point, (x.double(),)), y)

    return keys, torch.autograd.functional.hessian(loss, torch.zeros(sum(sizes),
                                                                     dtype=torch.float64))


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_hessian_eigenvectors_leave_householder_signs_alone(which):
    model = _orthogonal_net()
    x, y = _data()
    with Untouched(model):
        vals, vecs = lw.hessian_eigenpairs(model, (x, y), k=2, which=which)
    keys, dense = _dense_hessian(model, x, y)
    key = "2.parametrizations.weight.original"
    # The dense Hessian's eigenvalues without the sign entries' rows and columns (zero).
    sizes = [model.get_parameter(k).numel() for k in keys]
    at = sum(sizes[:keys.index(key)])
    diagonal = [at + i * 8 + i for i in range(3)]  # (3, 8): entries (i, i)
    assert float(dense[diagonal].abs().max()) == 0.0
    keep = [i for i in range(len(dense)) if i not in diagonal]
    spectrum = torch.linalg.eigvalsh(dense[keep][:, keep]).numpy()
    want = spectrum[::-1][:2] if which == "largest" else spectrum[:2]
    np.testing.assert_allclose(vals, want, rtol=1e-4, atol=1e-6)
    for v in vecs:
        assert torch.count_nonzero(v[key].diagonal()) == 0
        ref = _oracle_curve(model, x, y, v, [-0.01, 0.0, 0.01])
        curvature = abs(ref[0] - 2 * ref[1] + ref[2]) / 1e-4  # ~ |lambda| along v
        assert curvature < 10 * max(abs(float(vals[0])), abs(float(vals[-1]))) + 1.0


class _Wrapper(nn.Module):
    """Names its parameters module.<name>, as DistributedDataParallel does."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


@pytest.mark.parametrize("wrapper", ["compile", "module-prefix"])
def test_wrapped_model_surfaces_and_the_prefix_in_key_errors(wrapper):
    eager = _mlp()
    x, y = _data()
    if wrapper == "compile":
        model, prefix = torch.compile(eager, backend="eager"), "_orig_mod."
    else:  # DDP (no process group here), named like DataParallel, which is refused
        model, prefix = _Wrapper(eager), "module."
    plain = lw.random_directions(eager, 2, seed=0)
    with Untouched(eager):  # the wrapped module is the user's eager one
        d1, d2 = lw.random_directions(model, 2, seed=0)
        surf = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-1, 1, 3),
                                  y=(-1, 1, 3), progress=False, metrics=("loss",))
        with pytest.raises(ValueError, match="differ by a prefix") as err:
            lw.compute_surface(model, (x, y), directions=plain, x=(-1, 1, 3), y=(-1, 1, 3),
                               progress=False)
        assert repr(prefix) in str(err.value)
        wrapped = [{prefix + k: v for k, v in d.items()} for d in (d1, d2)]
        with pytest.raises(ValueError, match="differ by a prefix"):  # and the reverse
            lw.compute_curve(eager, (x, y), direction=wrapped[0], x=(-1, 1, 3),
                             progress=False)
    assert all(torch.equal(d1[prefix + k], plain[0][k]) for k in plain[0])
    ref = _oracle_surface(eager, x, y, plain[0], plain[1], surf.x, surf.y)
    np.testing.assert_allclose(surf.loss, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call", list(_calls(None)))
def test_dataparallel_is_refused_naming_the_fix(call):
    model = nn.DataParallel(_mlp())
    with Untouched(model), pytest.raises(TypeError, match="nn.DataParallel") as err:
        _calls(_data())[call](model)
    assert "model.module" in str(err.value)


class _NoGradForward(nn.Module):
    def __init__(self, inference: bool = False):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        self.mode = torch.inference_mode if inference else torch.no_grad

    def forward(self, x):
        with self.mode():
            return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("inference", [False, True], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("call", ["hessian_eigenpairs", "hessian_trace", "hessian_density",
                                  "mine_direction", "side_direction", "compare_optimizers"])
def test_forward_without_autograd_is_refused_by_derivative_tools(inference, call):
    model = reinit(_NoGradForward(inference), 6).eval()
    with Untouched(model), pytest.raises(ValueError, match="through autograd") as err:
        _calls(_data())[call](model)
    assert "Remove the decorator" in str(err.value)


@pytest.mark.parametrize("method", ["jvp", "backward"])
def test_derivative_check_passes_differentiable_batched_products(method):
    """The check holds inside torch.func transforms and batch by batch (no false alarm)."""
    model = _mlp()
    x, y = _data()
    vals, _ = lw.hessian_eigenpairs(model, (x, y), k=1, method=method, batch_size=4)
    keys, dense = _dense_hessian(model, x, y)
    np.testing.assert_allclose(vals, torch.linalg.eigvalsh(dense).numpy()[-1:], rtol=1e-4)


@pytest.mark.parametrize("inference", [False, True], ids=["no_grad", "inference_mode"])
def test_surfaces_of_a_forward_without_autograd(inference):
    model = reinit(_NoGradForward(inference), 6).eval()
    x, y = _data()
    d1, d2 = lw.random_directions(model, 2, seed=0)
    with Untouched(model):
        surf = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-1, 1, 3),
                                  y=(-1, 1, 3), progress=False)
    ref = _oracle_surface(model, x, y, d1, d2, surf.x, surf.y)
    np.testing.assert_allclose(surf.loss, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_trajectory_from_wrapped_checkpoints_names_the_prefix(prefix):
    model = _mlp()
    states = [{prefix + k: v + i for k, v in model.state_dict().items()} for i in range(3)]
    with pytest.raises(ValueError, match="differ by a prefix") as err:
        lw.Trajectory.from_checkpoints(states, model)
    assert repr(prefix) in str(err.value)
    # Stripped of the prefix, as the message says, the same checkpoints load.
    plain = [{k[len(prefix):]: v for k, v in s.items()} for s in states]
    traj = lw.Trajectory.from_checkpoints(plain, model)
    assert len(traj) == 3
