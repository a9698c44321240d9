"""Failing tests for bugs found in review (see /work/notes/rev-findings.md).

Each asserts the correct behaviour against an independent oracle: ``lw.compute_surface``
at the asked precision, and a float64 per-point computation by hand.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscape_widget as lw
from landscape_widget import LandscapeWidget


def _two_architectures():
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    a = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    b = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(),
                      nn.Linear(5, 3)).eval()
    return {"a": a, "b": b}, (x, y)


def test_compare_panel_computes_at_the_widgets_precision():
    """The compare panel must use the widget's ``precision`` (here bf16) like the main view,
    and its surfaces must say so; today it always computes (and labels) fp32."""
    models, data = _two_architectures()
    w = LandscapeWidget(models=models, data=data, autostart=False, resolution=3,
                        precision="bf16", seed=5)
    try:
        w.compare(wait=True, timeout=120)
        for name, model in models.items():
            dirs = lw.random_directions(model, 2, norm="filter", ignore="biasbn", seed=5)
            grid = dict(directions=dirs, x=(*w.x_range, 3), y=(*w.y_range, 3),
                        metrics=("loss",), progress=False, seed=None)
            oracle = lw.compute_surface(model, data, precision="bf16", **grid)
            got = w.compared[name]
            assert got.spec.get("precision") == "bf16", name
            np.testing.assert_allclose(got.loss, oracle.loss, rtol=1e-6, atol=1e-7)
    finally:
        w.close()


def test_partial_cross_entropy_with_class_weights_is_accepted():
    """``functools.partial(F.cross_entropy, weight=w)`` is the same loss as
    ``nn.CrossEntropyLoss(weight=w)`` (accepted); it must give the same surface, not be
    refused as "not a mean over samples"."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    w = torch.tensor([1.0, 3.0, 0.5])
    loss_fn = functools.partial(F.cross_entropy, weight=w)
    s = lw.compute_surface(model, (x, y), loss_fn=loss_fn, x=(-1, 1, 3), y=(-1, 1, 3),
                           metrics=("loss",), progress=False)
    with torch.no_grad():  # the centre point (a = b = 0) is the model itself, in float64
        want = float(F.cross_entropy(model.double()(x.double()), y, weight=w.double()))
    assert s.loss[1, 1] == pytest.approx(want, rel=1e-5)


def _subset_with_test_data(samples):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    train = torch.randn(40, 5), torch.randint(0, 3, (40,))
    test = torch.randn(30, 5), torch.randint(0, 3, (30,))
    s = lw.compute_surface(model, train, samples=samples, test_data=test, x=(-1, 1, 3),
                           y=(-1, 1, 3), progress=False)
    return model, test, s


def test_subset_test_loss_is_exact_or_carries_its_standard_error():
    """With ``samples=10, test_data=...`` the test pass silently runs on a 10-sample subset
    of the test set too, and its standard error is dropped (no ``test_loss_se``, nothing in
    the HDF5 file): ``test_loss`` then reads as the test loss but is off by its sampling
    error with nothing saying how much. Either the exact test loss or its standard error."""
    from landscape_widget.core.subset import subset_indices

    model, (xt, yt), s = _subset_with_test_data(10)
    with torch.no_grad():  # centre point = the model itself; float64 per-sample losses
        per = F.cross_entropy(model.double()(xt.double()), yt, reduction="none")
    exact = float(per.mean())
    if abs(s.test_loss[1, 1] - exact) <= 1e-5 * exact:
        return  # exact on all test data: fine
    sub = per[subset_indices(30, 10)]
    se = float(sub.std() / 10 ** 0.5 * (20 / 29) ** 0.5)
    assert s.test_loss[1, 1] == pytest.approx(float(sub.mean()), rel=1e-5)
    got = getattr(s, "test_loss_se", None)
    assert got is not None, "subset test_loss without its standard error"
    assert got[1, 1] == pytest.approx(se, rel=1e-4)


def test_samples_larger_than_the_test_set_is_not_blamed_on_the_data():
    """``samples=35`` on 40 training and 30 test samples: refused with "exceeds the 30
    samples of the data", which contradicts the 40 the user passed as data. It must work
    (test values exact) or name test_data in the error."""
    try:
        _subset_with_test_data(35)
    except ValueError as err:
        assert "test" in str(err), str(err)


def test_subset_of_a_loader_with_a_subset_sampler_stays_inside_the_sampled_samples():
    """A DataLoader whose sampler selects samples (SubsetRandomSampler: a train split of a
    dataset) gives the exact surface over those samples only, but ``samples=10`` draws
    from the whole dataset, the excluded half included: 1.52 +- 0.075 against 1.18 exact,
    ``spec["samples"]["of"] == 40``. The subset must come from the sampler's samples (or be
    refused with a SubsetError), never silently from others."""
    from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

    from landscape_widget.core.subset import SubsetError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    x[20:] += 5  # the samples the sampler leaves out are very different
    loader = DataLoader(TensorDataset(x, y), batch_size=8,
                        sampler=SubsetRandomSampler(list(range(20))))
    grid = dict(x=(-1, 1, 3), y=(-1, 1, 3), metrics=("loss",), progress=False)
    try:
        s = lw.compute_surface(model, loader, samples=10, **grid)
    except SubsetError:
        return  # refused with the fix: acceptable
    assert s.spec["samples"]["of"] == 20
    with torch.no_grad():
        per = F.cross_entropy(model.double()(x[:20].double()), y[:20], reduction="none")
    # Whatever 10 of the first 20 were drawn, the value lies within their range.
    assert float(per.min()) <= s.loss[1, 1] <= float(per.max())
    assert abs(s.loss[1, 1] - float(per.mean())) < 4 * s.loss_se[1, 1]


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_user_code_can_read_torchs_float32_flags_while_a_cuda_computation_runs(device):
    """While ``precision_flags`` is active (a widget computing in its worker thread, the
    notebook free), torch's legacy readers raised RuntimeError ("PyTorch is checking whether
    allow_tf32 is enabled for cuDNN without a specific operator name ...") because only
    the per-backend ``fp32_precision`` values were written. Libraries read them (Lightning's
    Trainer reads ``get_float32_matmul_precision()``); the user's cell must not crash.
    The CUDA flags live in the process, so a CUDA build of torch checks this without a GPU
    (tests/test_fp32_flags.py checks the arithmetic on a GPU, and many more user states)."""
    from landscape_widget.core.precision import precision_flags

    readers = {"cuda.matmul.allow_tf32": lambda: torch.backends.cuda.matmul.allow_tf32,
               "cudnn.allow_tf32": lambda: torch.backends.cudnn.allow_tf32,
               "get_float32_matmul_precision": torch.get_float32_matmul_precision}
    nodes = {"cuda": (torch.backends.cuda.matmul, torch.backends.cudnn.conv,
                      torch.backends.cudnn.rnn),
             "cpu": (torch.backends.mkldnn.matmul, torch.backends.mkldnn.conv,
                     torch.backends.mkldnn.rnn)}[device]
    before = {k: f() for k, f in readers.items()}
    for precision in ("fp32", "tf32"):
        with precision_flags(precision, torch.device(device)):
            got = {}
            for name, read in readers.items():
                try:
                    got[name] = read()
                except RuntimeError as err:
                    pytest.fail(f"{name} raised under precision={precision!r}: {err}")
            tf32 = precision == "tf32" and device == "cuda"
            assert {n.fp32_precision for n in nodes} == {"tf32" if tf32 else "ieee"}
            if device == "cuda":  # and the legacy readers say what is in force
                assert got["cudnn.allow_tf32"] is tf32 and got["cuda.matmul.allow_tf32"] is tf32
                assert got["get_float32_matmul_precision"] == ("high" if tf32 else "highest")
        assert {k: f() for k, f in readers.items()} == before, precision
