"""Shared by test_reach.py and test_review13a.py: a net whose first layer can run without
autograd, and torch's dense float64 gradient and Hessian of the loss it stands for."""

from __future__ import annotations

import copy

import torch
from review12c_cases import flat_loss
from torch import nn


class PartNet(nn.Module):
    """6 -> 8 -> 3, with an auxiliary head the forward never uses; ``part`` says how the
    first layer runs: with autograd, under no_grad, or detached."""

    def __init__(self, part: str = "autograd"):
        super().__init__()
        self.a, self.b, self.aux = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 5)
        self.part = part

    def forward(self, x):
        if self.part == "no_grad":
            with torch.no_grad():
                h = torch.tanh(self.a(x))
        elif self.part == "detach":
            h = torch.tanh(self.a(x)).detach()
        else:
            h = torch.tanh(self.a(x))
        return self.b(h)


def dense(model: PartNet, x, y, keys=None):
    """``(keys, gradient, Hessian)`` in float64 over ``keys`` (default: the weights of dim
    > 1) of the mean cross-entropy, with autograd on everywhere: the loss as a function of
    the parameters, whatever ``model.part`` hides from autograd."""
    ref = copy.deepcopy(model).double().eval()
    ref.part = "autograd"
    keys = keys or [k for k, v in ref.named_parameters() if v.dim() > 1]
    loss, size = flat_loss(ref, keys, x, y)
    zero = torch.zeros(size, dtype=torch.float64)
    return (keys, torch.autograd.functional.jacobian(loss, zero),
            torch.autograd.functional.hessian(loss, zero))
