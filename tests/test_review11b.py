"""Review 11b: the public API on torchvision's classification zoo (small inputs).

- ``compare_optimizers`` on MNASNet: ``OptimizerRuns.model`` and ``switch`` rebuilt the
  network with ``load_state_dict`` from a checkpoint without the state dict's module
  versions (``_metadata``), which MNASNet's ``_load_from_state_dict`` requires ("version
  should be set to 1 or 2 instead of None"). Checked against torch's own state dict of
  the trained copy.
"""

from __future__ import annotations

import functools

import torch
import torchvision
from cases import classification_data, reinit

import landscape_widget as lw


def test_compare_optimizers_mnasnet_checkpoints_load():
    model = reinit(torchvision.models.mnasnet0_5(num_classes=10), 0)
    x, y = classification_data(8, (3, 32, 32), 10, 1)
    sgd = functools.partial(torch.optim.SGD, lr=0.01)
    runs = lw.compare_optimizers(model, (x, y), {"sgd": sgd}, epochs=2, batch_size=8,
                                 progress=False)
    run = runs.runs["sgd"]
    for epoch, state in enumerate(run.checkpoints):
        net = runs.model("sgd", epoch)
        assert isinstance(net, torchvision.models.MNASNet) and not net.training
        got = net.state_dict()
        assert got.keys() == state.keys()
        for k, v in state.items():
            assert torch.equal(got[k], v), (epoch, k)
    switched = runs.switch("sgd", "sgd", at_epoch=1, progress=False)
    assert len(switched.checkpoints) == 3
    # The switch's epoch 1 is the run's epoch 1, so the copy it trained on loaded it.
    for k, v in run.checkpoints[1].items():
        assert torch.equal(switched.checkpoints[1][k], v), k
