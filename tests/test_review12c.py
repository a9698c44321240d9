"""Review 12c: model kinds researchers bring beyond the suite's cases.

- TorchScript (``torch.jit.script`` / ``torch.jit.trace``, a scripted submodule of an eager
  model for the surfaces and curves): every public function failed with torch's words
  ("register_forward_hook is not supported on ScriptModules", or "The stateless API
  can't be used with Jitted modules" dressed as a double-backward problem with a wrong
  fix). Now a ``TypeError`` naming the scripted module and the fix (the eager module),
  before anything runs; the model is untouched.
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
- ``torch.compile``d models work (checked against a float64 loop on the eager module), but
  their parameters are named ``_orig_mod.<name>`` (DDP's ``module.<name>``): directions
  made for the eager model were refused with "make it ... for this very model" only. The
  message now names the prefix and the fix, as does ``Trajectory.from_checkpoints`` for
  checkpoints saved from such a wrapper ("checkpoint 0 lacks parameters [...]" only).
- ``nn.DataParallel``: torch's "The stateless API can't be used with nn.DataParallel
  module" came dressed as a problem of the data ("Check that the data are what the model
  takes: the input size ..."). Now a ``TypeError`` naming the fix (``model.module``).

Derivatives and directions: test_review12c_grad.py.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import reinit
from public_cases import Untouched
from review12c_cases import calls, data, mlp, oracle_surface
from torch import nn

import landscape_widget as lw


class _Outer(nn.Module):
    """An eager model with a scripted block, as code that scripts its hot layer has."""

    def __init__(self):
        super().__init__()
        self.body = torch.jit.script(mlp())
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.body(x))


# The entry points whose set-up hooks every layer (forward hooks refuse a scripted part).
_HOOKED = {"compute_surface", "compute_curve", "iter_tiles", "triangle_surface"}
_KINDS = {
    "script": lambda: torch.jit.script(mlp()),
    "trace": lambda: torch.jit.trace(mlp(), data()[0][:2]),
    "scripted-submodule": _Outer,
}


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")
@pytest.mark.parametrize("kind", list(_KINDS))
@pytest.mark.parametrize("call", list(calls(None)))
def test_torchscript_is_refused_naming_the_fix(kind, call):
    if kind == "scripted-submodule" and call not in _HOOKED:
        return  # runs (test_review12d: a scripted part inside an eager model)
    model = _KINDS[kind]()
    with Untouched(model), pytest.raises(TypeError, match="TorchScript") as err:
        calls(data())[call](model)
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
        calls(data())[call](model)
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
@pytest.mark.parametrize("call", [c for c in calls(None) if c != "random_directions"])
def test_forward_needing_more_than_one_input_is_refused_naming_the_fix(kind, call):
    model = reinit(kind(), 0)
    with Untouched(model), pytest.raises(TypeError, match="cannot be called with one input"
                                         ) as err:
        calls(data())[call](model)
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


@pytest.mark.parametrize("kind", [_TinyEncoder, _StarArgs, _PreHookBuilds])
def test_forwards_callable_with_one_input_still_run(kind):
    model = reinit(kind(), 4).eval()
    x, y = _token_data() if kind is not _PreHookBuilds else data()
    d1, d2 = lw.random_directions(model, 2, seed=1)
    with Untouched(model):
        surf = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-1, 1, 3),
                                  y=(-1, 1, 3), progress=False)
    ref = oracle_surface(model, x, y, d1, d2, surf.x, surf.y)
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


class _Wrapper(nn.Module):
    """Names its parameters module.<name>, as DistributedDataParallel does."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


@pytest.mark.parametrize("wrapper", ["compile", "module-prefix"])
def test_wrapped_model_surfaces_and_the_prefix_in_key_errors(wrapper):
    eager = mlp()
    x, y = data()
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
    ref = oracle_surface(eager, x, y, plain[0], plain[1], surf.x, surf.y)
    np.testing.assert_allclose(surf.loss, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call", list(calls(None)))
def test_dataparallel_is_refused_naming_the_fix(call):
    model = nn.DataParallel(mlp())
    with Untouched(model), pytest.raises(TypeError, match="nn.DataParallel") as err:
        calls(data())[call](model)
    assert "model.module" in str(err.value)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_trajectory_from_wrapped_checkpoints_names_the_prefix(prefix):
    model = mlp()
    states = [{prefix + k: v + i for k, v in model.state_dict().items()} for i in range(3)]
    with pytest.raises(ValueError, match="differ by a prefix") as err:
        lw.Trajectory.from_checkpoints(states, model)
    assert repr(prefix) in str(err.value)
    # Stripped of the prefix, as the message says, the same checkpoints load.
    plain = [{k[len(prefix):]: v for k, v in s.items()} for s in states]
    traj = lw.Trajectory.from_checkpoints(plain, model)
    assert len(traj) == 3


@pytest.mark.parametrize("entry", ["directions", "surface", "hessian", "widget"])
def test_an_uninitialised_lazy_layer_is_named_with_the_fix(entry):
    # torch's own words ("Attempted to use an uninitialized parameter in <method>") named
    # neither the layer nor where the model failed.
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.LazyLinear(3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    calls = {
        "directions": lambda: lw.random_directions(model, 2),
        "surface": lambda: lw.compute_surface(model, (x, y), x=(-1, 1, 3), y=(-1, 1, 3),
                                              progress=False),
        "hessian": lambda: lw.hessian_eigenpairs(model, (x, y), k=1),
        "widget": lambda: lw.LandscapeWidget(model, (x, y)),
    }
    with pytest.raises(TypeError, match=r"'2.weight' is not initialised yet.*model\(x\[:1\]\)"):
        calls[entry]()
    assert isinstance(model[2].weight, nn.parameter.UninitializedParameter)  # left as it was
