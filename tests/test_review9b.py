"""Review 9b: the user-facing surface of the performance features (samples=, precision=,
compile=, evaluator_options=) in the headless API and in files.

Each test names the defect it guards against. loss-landscape's own scripts are not
imported: their reading steps (commit 64ef4d5) are re-done here with h5py.
"""

from __future__ import annotations

import cases
import h5py
import numpy as np
import pytest
import torch
from cases import mlp, mlp_data
from oracle import naive_eval

import landscape_widget as lw


def plot_1d_reads(path) -> dict:
    """What loss-landscape's ``plot_1D.plot_1d_loss_err`` reads from a curve file, read as
    it reads it (``f['test_acc']`` whenever there is a ``test_loss``)."""
    with h5py.File(path, "r") as f:
        out = {"x": f["xcoordinates"][:]}
        assert "train_loss" in f.keys(), "'train_loss' does not exist"
        out["train_loss"], out["train_acc"] = f["train_loss"][:], f["train_acc"][:]
        if "test_loss" in f.keys():
            out["test_loss"], out["test_acc"] = f["test_loss"][:], f["test_acc"][:]
    return out


def test_a_loss_only_curve_with_test_data_is_read_by_plot_1d(tmp_path):
    # A curve of metrics=("loss",) with test_data= was saved with test_loss but no test_acc:
    # plot_1D.py reads test_acc whenever test_loss is there and stopped with a KeyError.
    model = mlp(seed=3).eval()
    x, y = mlp_data()
    xt, yt = x[:20] * 1.5, y[:20].flip(0)
    d = lw.random_direction(model, seed=1)
    c = lw.compute_curve(model, (x, y), direction=d, x=(-1, 1, 5), test_data=(xt, yt),
                         metrics=("loss",), progress=False)
    c.save(tmp_path / "c.h5")
    read = plot_1d_reads(tmp_path / "c.h5")
    coords = np.linspace(-1, 1, 5)[:, None]
    np.testing.assert_allclose(read["test_loss"], naive_eval(model, xt, yt, [d], coords)[0],
                               rtol=1e-5)
    assert np.isnan(read["test_acc"]).all()  # "not computed", as train_acc
    back = lw.Curve.load(tmp_path / "c.h5")
    assert back.test_accuracy is None and back.accuracy is None
    np.testing.assert_array_equal(back.test_loss, c.test_loss)
    back.save(tmp_path / "again.h5")  # a load-and-save keeps the layout
    with h5py.File(tmp_path / "again.h5", "r") as f:
        assert sorted(k for k in f if not k.startswith("landscape_widget")) == [
            "test_acc", "test_loss", "train_acc", "train_loss", "xcoordinates"]


def test_triangle_surface_refuses_options_it_would_ignore():
    # triangle_surface(..., samples=10) computed on all data and compile=True ran eagerly,
    # both without a word (options it does not know were left unread).
    ms = [mlp(seed=s).eval() for s in (1, 2, 3)]
    data = mlp_data()
    for option, fix in (({"samples": 10}, "computed on all data"),
                        ({"compile": True}, "evaluator_options"),
                        ({"tile_point": 4}, "tile_points")):
        with pytest.raises(TypeError, match=fix):
            lw.triangle_surface(*ms, data, resolution=2, progress=False, **option)
    tri = lw.triangle_surface(*ms, data, resolution=2, progress=False, tile_points=4,
                              evaluator_options={"compile": False})
    with torch.no_grad():
        want = float(torch.nn.functional.cross_entropy(ms[0](data[0]), data[1]))
    assert tri.loss_at_model(0) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize(("option", "error"), [
    ({"batch_size": -4}, ValueError), ({"batch_size": 0}, ValueError),
    ({"batch_size": 2.5}, TypeError), ({"batch_size": True}, TypeError),
    ({"memory_budget": -1}, ValueError), ({"memory_budget": float("nan")}, ValueError),
    ({"memory_budget": "1GB"}, TypeError), ({"memory_budget": 0}, ValueError),
])
def test_size_options_are_checked_before_any_pass(option, error):
    # batch_size=-4 stopped the first pass with "'int' object is not subscriptable",
    # batch_size=0 meant automatic, 2.5 became 2, and a negative or NaN memory_budget
    # gave one-sample passes, all without saying so.
    model = mlp(seed=1).eval()
    name = next(iter(option))
    with pytest.raises(error, match=f"{name}.*positive") as info:
        lw.compute_surface(model, mlp_data(), x=(-1, 1, 3), y=(-1, 1, 3), progress=False,
                           evaluator_options=option)
    assert "None" in str(info.value)  # the way back to the automatic choice


def test_valid_size_options_still_compute_the_oracle_values():
    model = mlp(seed=1).eval()
    x, y = mlp_data()
    d1, d2 = lw.random_directions(model, 2, seed=2)
    s = lw.compute_surface(model, (x, y), directions=(d1, d2), x=(-1, 1, 3), y=(-1, 1, 3),
                           progress=False, evaluator_options={
                               "batch_size": np.int64(7), "memory_budget": 2e8})
    assert "B=7" in s.spec["plan"]["label"]
    xs = np.linspace(-1, 1, 3)
    coords = np.array([(a, b) for b in xs for a in xs])
    want = naive_eval(model, x, y, [d1, d2], coords)[0]
    np.testing.assert_allclose(s.loss.ravel(), want, rtol=1e-5)


@pytest.mark.parametrize(("options", "names"), [
    ([("strategy", "loop")], "must be a dict"),
    ({"stratgy": "loop"}, r"unknown key\(s\) \['stratgy'\].*'strategy'"),
    ({"loss_fn": None}, "loss_fn: pass as an argument of its own"),
])
def test_evaluator_options_name_a_wrong_key_and_the_keys_there_are(options, names):
    # A list gave "cannot convert dictionary update sequence element #0 to a sequence", a
    # misspelt key "Evaluator.__init__() got an unexpected keyword argument", and loss_fn
    # "got multiple values for keyword argument": none named the option or the fix.
    with pytest.raises(TypeError, match=names):
        lw.compute_surface(mlp(seed=1).eval(), mlp_data(), x=(-1, 1, 3), y=(-1, 1, 3),
                           progress=False, evaluator_options=options)


def test_precision_error_says_when_bf16_is_not_finite_where_fp32_is():
    # A point whose bf16 loss overflowed (NaN) while its fp32 loss was finite gave
    # |nan - x| = nan, which max() skipped unless it came first: precision_error read 0.0
    # on a grid where bf16 had lost a point. fp16 on CUDA overflows at 65504, often.
    model = torch.nn.Linear(1, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0], [0.0], [0.0]]))
    x, y = torch.ones(1, 1), torch.ones(1, dtype=torch.long)
    # At a = 1 the first logit is 3.4e38: finite in float32, inf once rounded to bf16.
    d = {"weight": torch.tensor([[3.4e38], [0.0], [0.0]])}
    def curve(precision):
        return lw.compute_curve(model, (x, y), direction=d, x=(-1, 1, 3), precision=precision,
                                progress=False)

    curves = {"fp32": curve("fp32")}
    with pytest.warns(RuntimeWarning, match="non-finite"):
        curves["bf16"] = curve("bf16")
    with torch.no_grad():
        want = [float(torch.nn.functional.cross_entropy(
            torch.tensor([[1 + a * 3.4e38, 0.0, 0.0]]), y)) for a in (-1, 0, 1)]
    np.testing.assert_allclose(curves["fp32"].loss, want, rtol=1e-6)
    bf16 = curves["bf16"]
    assert np.isnan(bf16.loss[2]) and np.isfinite(bf16.loss[:2]).all()
    assert bf16.spec["precision_error"] == float("inf")


def test_samples_of_a_drop_last_loader_are_drawn_from_the_samples_it_visits():
    # The exact pass reads the loader, which drops its last partial batch (32 of 40
    # samples), but the subset was drawn from all 40: samples=40 gave loss_se 0 ("exact")
    # and values that differ from the exact surface.
    from torch.utils.data import DataLoader, TensorDataset
    model = mlp(seed=1).eval()
    x, y = mlp_data()  # 40 samples
    ds = TensorDataset(x, y)
    loader = DataLoader(ds, batch_size=16, drop_last=True)  # visits the first 32
    d1, d2 = lw.random_directions(model, 2, seed=2)
    kw = dict(directions=(d1, d2), x=(-1, 1, 3), y=(-1, 1, 3), progress=False)
    xs = np.linspace(-1, 1, 3)
    coords = np.array([(a, b) for b in xs for a in xs])
    exact = lw.compute_surface(model, loader, **kw)
    np.testing.assert_allclose(exact.loss.ravel(),
                               naive_eval(model, x[:32], y[:32], [d1, d2], coords)[0], rtol=1e-5)
    every = lw.compute_surface(model, loader, samples=32, **kw)
    assert every.spec["samples"]["of"] == 32
    np.testing.assert_allclose(every.loss, exact.loss, rtol=1e-6)
    assert (every.loss_se == 0).all()
    with pytest.raises(ValueError, match="exceeds the 32 samples"):
        lw.compute_surface(model, loader, samples=40, **kw)
    shuffled = DataLoader(ds, batch_size=16, drop_last=True, shuffle=True)
    with pytest.raises(lw.core.subset.SubsetError, match="drop_last=False"):
        lw.compute_surface(model, shuffled, samples=20, **kw)


class Float32Only(torch.nn.Module):
    """Refuses bfloat16 activations, as a model with a float32-only custom op does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        if h.dtype != torch.float32:
            raise RuntimeError("float32 only")
        return self.b(h)


def test_the_widget_says_when_its_precision_fell_back_to_fp32():
    # The engine computes in fp32 when the model fails under autocast; the widget's status
    # line said nothing (the warning went to the worker thread's stderr) while its
    # precision control still read bf16.
    model = Float32Only().eval()
    x, y = mlp_data()
    w = lw.LandscapeWidget(model, (x[:, :6], y % 3), resolution=3, precision="bf16",
                           autostart=False)
    try:
        with pytest.warns(RuntimeWarning, match="precision='bf16' failed"):
            w.compute()
            surface = w.wait(60)
        assert surface.spec["precision"] == "fp32"
        assert w.status["state"] == "done"
        assert "bf16 failed (RuntimeError: float32 only): computed in fp32" in w.status["message"]
        # A finer grid reuses the fp32 points (it computed them all again, after a failing
        # bf16 try, as the engine refused them as of another precision), and says so.
        w.resolution = 5
        finer = w.wait(60)
        assert finer.spec["reused"] == 9 and finer.spec["precision"] == "fp32"
        assert "bf16 failed" in w.status["message"]
        w.precision = "fp32"
        w.wait(60)
        assert w.status["state"] == "done" and "failed" not in w.status["message"]
    finally:
        w.close()


@pytest.mark.parametrize("loss", ["default", "class weights", "ignore_index"])
def test_loss_se_is_honest_where_the_loss_varies_a_lot_between_samples(loss):
    # Not a defect found: the guard for the standard error on data whose per-sample losses
    # are spread (5 % of the labels wrong: losses of ~10 among ~0.01), for the plain mean
    # and the ratio estimator (class weights, ignored targets), on several draws.
    model, (x, y) = lw.demo.trained_mlp()
    g = torch.Generator().manual_seed(5)
    y = y.clone()
    wrong = torch.rand(len(y), generator=g) < 0.05
    y[wrong] = (y[wrong] + torch.randint(1, 10, (int(wrong.sum()),), generator=g)) % 10
    loss_fn = None
    if loss != "default":
        loss_fn = torch.nn.CrossEntropyLoss(weight=torch.linspace(0.2, 3.0, 10))
    if loss == "ignore_index":
        y[torch.rand(len(y), generator=g) < 0.4] = -100
    kw = dict(directions=lw.random_directions(model, 2, seed=3), x=(-0.5, 0.5, 7),
              y=(-0.5, 0.5, 7), loss_fn=loss_fn, progress=False)
    exact = lw.compute_surface(model, (x, y), **kw)
    with torch.no_grad():
        each = torch.nn.functional.cross_entropy(model(x), y, reduction="none")[y >= 0]
    assert each.std() > 3 * each.mean()  # the spread the standard error has to cover
    for seed in range(4):
        s = lw.compute_surface(model, (x, y), samples=400, sample_seed=seed, **kw)
        covered = np.abs(s.loss - exact.loss) <= 3 * s.loss_se
        assert covered.mean() >= 0.99, (seed, covered.mean())


def test_reuse_of_a_result_whose_precision_fell_back_says_what_to_pass():
    # A bf16 call on a model that fails under autocast gives fp32 values (spec["precision"]
    # == "fp32"); reusing that result in the same bf16 call again was refused as "computed
    # with a different precision", naming neither the fallback nor the fix.
    model = Float32Only().eval()
    x, y = mlp_data()
    data = (x[:, :6], y % 3)
    kw = dict(directions=lw.random_directions(model, 2, seed=1), progress=False)
    with pytest.warns(RuntimeWarning, match="failed"):
        first = lw.compute_surface(model, data, x=(-1, 1, 3), y=(-1, 1, 3), precision="bf16",
                                   **kw)
    assert first.spec["precision"] == "fp32"
    with pytest.raises(lw.ReuseMismatch, match=r"bf16 failed \(RuntimeError: float32 only\)"
                       r".*pass precision='fp32' to reuse"):
        lw.compute_surface(model, data, x=(-1, 1, 5), y=(-1, 1, 5), precision="bf16",
                           reuse=first, **kw)
    finer = lw.compute_surface(model, data, x=(-1, 1, 5), y=(-1, 1, 5), precision="fp32",
                               reuse=first, **kw)
    assert finer.spec["reused"] == 9
    np.testing.assert_array_equal(finer.loss[::2, ::2], first.loss)


def test_the_plan_report_of_an_executor_has_the_local_fields():
    # spec["plan"]["label"] (the README's first example of the plan report) was a KeyError
    # for a surface computed with executor=: its plan dict had no label.
    from concurrent.futures import ThreadPoolExecutor
    model = mlp(seed=1).eval()
    kw = dict(x=(-1, 1, 3), y=(-1, 1, 3), progress=False, precision="bf16", samples=30)
    local = lw.compute_surface(model, mlp_data(), **kw)
    with ThreadPoolExecutor(1) as pool:
        remote = lw.compute_surface(model, mlp_data(), executor=pool, **kw)
    assert set(local.spec["plan"]) <= set(remote.spec["plan"])
    plan = remote.spec["plan"]
    assert plan["label"].startswith(f"{plan['strategy']}") and f"B={plan['batch']}" in plan["label"]
    assert remote.spec["precision"] == "bf16" and remote.spec["samples"] == local.spec["samples"]
    np.testing.assert_allclose(remote.loss_se, local.loss_se, rtol=1e-4)


def test_a_reused_bf16_grid_keeps_its_measured_precision_error():
    # precision_error is measured on points this call evaluates; a bf16 grid reused whole
    # (evaluated == 0) read None, the value of an exact fp32 grid, and a finer grid kept
    # only the error of its new points.
    model = mlp(seed=1).eval()
    kw = dict(directions=lw.random_directions(model, 2, seed=2), precision="bf16",
              progress=False)
    first = lw.compute_surface(model, mlp_data(), x=(-1, 1, 3), y=(-1, 1, 3), **kw)
    assert first.spec["precision_error"] > 0
    again = lw.compute_surface(model, mlp_data(), x=(-1, 1, 3), y=(-1, 1, 3), reuse=first, **kw)
    assert again.spec["evaluated"] == 0
    assert again.spec["precision_error"] == first.spec["precision_error"]
    finer = lw.compute_surface(model, mlp_data(), x=(-1, 1, 5), y=(-1, 1, 5), reuse=first, **kw)
    assert finer.spec["reused"] == 9 and finer.spec["precision_error"] >= first.spec[
        "precision_error"]
    exact = lw.compute_surface(model, mlp_data(), x=(-1, 1, 3), y=(-1, 1, 3),
                               directions=kw["directions"], progress=False)
    assert exact.spec["precision_error"] is None


@pytest.mark.parametrize(("tile_points", "error"), [
    (0, ValueError), (-3, ValueError), (2.5, TypeError), ("a", TypeError), (True, TypeError)])
def test_tile_points_is_checked(tile_points, error):
    # tile_points=0 meant adaptive, 2.5 became 2, True one point, and "a" raised
    # "invalid literal for int() with base 10".
    with pytest.raises(error, match="tile_points"):
        lw.compute_surface(mlp(seed=1).eval(), mlp_data(), x=(-1, 1, 3), y=(-1, 1, 3),
                           progress=False, tile_points=tile_points)


def test_reusing_a_loss_landscape_file_on_a_subset_says_why_not(tmp_path):
    # A loss-landscape file (exact values, no standard errors) reused by a samples= call was
    # refused as "computed with a different set of metrics", which named neither cause.
    model = mlp(seed=1).eval()
    x, y = mlp_data()
    d = lw.random_direction(model, seed=1)
    c = lw.compute_curve(model, (x, y), direction=d, x=(-1, 1, 5), progress=False)
    with h5py.File(tmp_path / "ll.h5", "w") as f:  # as plot_surface.py writes a 1D file
        f["xcoordinates"], f["train_loss"], f["train_acc"] = c.x, c.loss, c.accuracy * 100
    old = lw.Curve.load(tmp_path / "ll.h5")
    with pytest.raises(lw.ReuseMismatch, match="all data.*drop samples="):
        lw.compute_curve(model, (x, y), direction=d, x=(-1, 1, 9), progress=False, reuse=old,
                         samples=39)
    finer = lw.compute_curve(model, (x, y), direction=d, x=(-1, 1, 9), progress=False,
                             reuse=old)
    assert finer.spec["reused"] == 5


def test_the_test_pass_records_its_own_precision_error():
    # test_loss at bf16 came with no measured error: spec["precision_error"] is the
    # training pass's, and spec["test"] had none.
    model = mlp(seed=1).eval()
    x, y = mlp_data()
    kw = dict(direction=lw.random_direction(model, seed=1), x=(-1, 1, 5), progress=False,
              test_data=(x[:20] * 2, y[:20]))
    c = lw.compute_curve(model, (x, y), precision="bf16", **kw)
    exact = lw.compute_curve(model, (x, y), **kw)
    err = c.spec["test"]["precision_error"]
    assert 0 < err < 0.05 and err <= np.nanmax(np.abs(c.test_loss - exact.test_loss)) + 1e-6
    assert exact.spec["test"]["precision_error"] is None


def test_an_unbatched_dataloader_is_refused_with_the_fix():
    # DataLoader(batch_size=None) yields single samples; collecting them stopped with
    # "zero-dimensional tensor (at position 0) cannot be concatenated".
    from torch.utils.data import DataLoader, TensorDataset
    x, y = mlp_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=None)
    with pytest.raises(ValueError, match="batch_size=None.*Give it a batch_size"):
        lw.compute_surface(mlp(seed=1).eval(), loader, x=(-1, 1, 3), y=(-1, 1, 3),
                           progress=False)


# --- follow-ups of review 9b's "not fixed" list (lead) -------------------------------------
def test_a_grid_reused_whole_describes_that_no_plan_ran():
    """spec["plan"] of a grid whose every point came from reuse= was None (a TypeError on
    spec["plan"]["label"]); it now says no point was computed, and why."""
    model = cases.mlp()
    data = cases.mlp_data()
    d1, d2 = (cases.gaussian_direction(model, s) for s in (1, 2))
    kw = dict(directions=(d1, d2), x=(-1, 1, 3), y=(-1, 1, 3), progress=False)
    first = lw.compute_surface(model, data, **kw)
    again = lw.compute_surface(model, data, reuse=first, **kw)
    assert again.spec["evaluated"] == 0 and again.spec["reused"] == 9
    assert again.spec["plan"]["label"] == "none"
    assert "all 9 came from reuse=" in again.spec["plan"]["reason"]
    np.testing.assert_array_equal(again.loss, first.loss)


@pytest.mark.parametrize("bad", [1, 0, "yes"])
def test_compile_takes_bools_and_auto_only(bad):
    """compile=1 and compile=0 were taken as True and False (``1 in (True, False)``)."""
    model = cases.mlp()
    with pytest.raises(ValueError, match="choose True, False or 'auto'"):
        lw.compute_surface(model, cases.mlp_data(), x=(-1, 1, 2), y=(-1, 1, 2),
                           compile=bad, progress=False)


def test_a_reused_result_with_a_nan_precision_error_counts_as_not_finite():
    # Results saved before non-finite points counted as inf could hold NaN; max() with a
    # NaN depends on the order of its arguments.
    model, data = mlp(), mlp_data()
    kw = dict(x=(-1, 1, 3), y=(-1, 1, 3), progress=False, precision="bf16")
    dirs = lw.random_directions(model, 2, seed=0)
    first = lw.compute_surface(model, data, directions=dirs, **kw)
    first.spec["precision_error"] = float("nan")
    finer = lw.compute_surface(model, data, directions=dirs, reuse=first,
                               **{**kw, "x": (-1, 1, 5), "y": (-1, 1, 5)})
    assert finer.spec["reused"] == 9 and finer.spec["precision_error"] == float("inf")
