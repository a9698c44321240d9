"""The widget's PCA-of-trajectory and Hessian directions, and its curvature view."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from snapshots import assert_same_snapshot, snapshot
from widget_cases import FakeFrontEnd, assemble
from widget_cases import worker_data as _data
from widget_cases import worker_model as _model

import landscape_widget as lw
from landscape_widget import LandscapeWidget
from landscape_widget.widget.protocol import Spec


def _trajectory(model, data, steps=40):
    """A short SGD run of a copy of ``model`` (the copy ends where the widget's model is)."""
    import copy

    net = copy.deepcopy(model)
    traj = lw.Trajectory()
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    traj.attach(opt, net, every=4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(data[0]), data[1]).backward()
        opt.step()
    traj.detach()
    return net, traj


def test_pca_directions_with_the_path(worker_factory):  # noqa: F811
    data = _data()
    final, traj = _trajectory(_model(), data)
    worker, rec = worker_factory(final, data, trajectory=traj)
    spec = Spec(direction="pca", norm="none", resolution=5, x_range=(-2.0, 2.0),
                y_range=(-1.0, 1.0))
    worker.submit("p", spec)
    assert worker.wait(60)
    (start, _), = rec.of("p", "start")
    dirs, _ = traj.pca_directions(k=2)
    np.testing.assert_allclose(start["path"], dirs.path, atol=1e-7)
    assert start["labels"][0].startswith("1st PC: ")
    _, loss, _, _ = assemble(rec, "p")
    ref = lw.compute_surface(final, data, directions=dirs, x=(-2, 2, 5), y=(-1, 1, 5),
                             progress=False)
    np.testing.assert_allclose(loss, ref.loss, rtol=1e-5)
    assert worker.latest.spec["labels"] == dirs.axis_labels


def test_hessian_directions_are_the_top_eigenvectors(worker_factory):  # noqa: F811
    model, data = _model(), _data()
    before = snapshot(model)
    statuses = []
    worker, rec = worker_factory(model, data, on_status=statuses.append)
    worker.submit("h", Spec(direction="hessian", norm="none", resolution=3))
    assert worker.wait(120) and rec.of("h", "done")
    assert any("Hessian-vector products" in s.get("message", "") for s in statuses)
    dirs = worker.directions_for(Spec(direction="hessian", norm="none", resolution=3))
    _, vecs = lw.hessian_eigenpairs(model, data, k=2, tol=1e-8)
    for d, v in zip(dirs, vecs, strict=True):
        cos = sum(float((d[k] * v[k]).sum()) for k in v)
        assert abs(cos) > 0.999
    assert_same_snapshot(before, snapshot(model))


def test_curvature_map_streams_the_ratio(worker_factory):  # noqa: F811
    model, data = _model(), _data()
    worker, rec = worker_factory(model, data)
    spec = Spec(quantity="curvature", resolution=3, seed=2)
    worker.submit("c", spec)
    assert worker.wait(120)
    (start, _), = rec.of("c", "start")
    assert start["label"] == "|λmin/λmax|" and start["shape"] == [3, 3]
    seen, ratio, _, _ = assemble(rec, "c")
    assert (seen == 1).all()
    dirs = lw.random_directions(model, 2, seed=2)
    ref = lw.curvature_map(model, data, dirs, x=(-1, 1, 3), y=(-1, 1, 3), seed=2,
                           progress=False)
    np.testing.assert_allclose(ratio, ref.ratio.astype(np.float32), rtol=1e-5)
    assert worker.latest.spec["quantity"] == "curvature"
    np.testing.assert_allclose(worker.latest.loss, ref.ratio, rtol=1e-6)


def test_a_fixed_subset_of_the_samples_control_computes_the_map_on_it(worker_factory):  # noqa: F811
    """samples="1k" on 1,500 samples: the map of lw.curvature_map(samples=1000), labelled."""
    model = _model()
    g = torch.Generator().manual_seed(7)
    data = (torch.randn(1500, 6, generator=g), torch.randint(0, 3, (1500,), generator=g))
    worker, rec = worker_factory(model, data)
    worker.submit("c", Spec(quantity="curvature", resolution=3, seed=2, samples="1k"))
    assert worker.wait(120)
    (start, _), = rec.of("c", "start")
    assert start["label"] == "|λmin/λmax| on 1,000 of 1,500 samples"
    _, ratio, _, _ = assemble(rec, "c")
    dirs = lw.random_directions(model, 2, seed=2)
    ref = lw.curvature_map(model, data, dirs, x=(-1, 1, 3), y=(-1, 1, 3), seed=2,
                           progress=False, samples=1000)
    full = lw.curvature_map(model, data, dirs, x=(-1, 1, 3), y=(-1, 1, 3), seed=2,
                            progress=False)
    np.testing.assert_allclose(ratio, ref.ratio.astype(np.float32), rtol=1e-5)
    assert not np.allclose(ref.ratio, full.ratio, rtol=1e-3)  # the subset made a difference
    assert worker.latest.spec["samples"] == {"n": 1000, "of": 1500, "seed": 0}


def test_curvature_map_cancels(worker_factory):  # noqa: F811
    first = threading.Event()
    worker, rec = worker_factory(hook=lambda m: m["kind"] == "tile" and first.set())
    worker.submit("c", Spec(quantity="curvature", resolution=21))
    assert first.wait(60)
    worker.cancel()
    assert worker.wait(60)
    assert rec.of("c", "cancelled") and not rec.of("c", "done")
    assert np.isnan(worker.latest.loss).sum() > 0


def test_widget_offers_the_new_types_and_refuses_bad_curvature_specs():
    model, data = _model(), _data()
    final, traj = _trajectory(model, data)
    w = LandscapeWidget(final, data, trajectory=traj, autostart=False, resolution=5)
    try:
        labels = [d["label"] for d in w.direction_types]
        assert "PCA of trajectory" in labels and "Hessian top-2 eigenvectors" in labels
        front = FakeFrontEnd(w)
        for bad in ({"quantity": "curvature", "mode": "1d"},
                    {"quantity": "curvature", "resolution": 33}, {"quantity": "hessian"}):
            w.handle_message({"kind": "compute", "id": "x",
                              "spec": {**w.spec().to_dict(), **bad}})
        assert front.kinds() == ["error"] * 3
        w.direction, w.norm = "pca", "none"
        surf = w.wait(60)
        assert w.result["labels"][0].startswith("1st PC") and len(w.result["path"]) == len(traj)
        assert surf.loss.shape == (5, 5)
    finally:
        w.close()
    plain = LandscapeWidget(model, data, autostart=False)
    try:
        assert "PCA of trajectory" not in [d["label"] for d in plain.direction_types]
        with pytest.raises(Exception, match="pca"):
            plain.direction = "pca"
            plain.spec()
    finally:
        plain.close()
