"""Review 6: models and inputs the other tests do not cover.

Each test failed before its fix (see the commit that added it).
"""

from __future__ import annotations

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
