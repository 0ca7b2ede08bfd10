"""Precise BN: the evaluation statistics re-estimated on the current weights, and nothing else touched."""

import numpy as np
import torch
from torch import nn

from edgedistill.data.loading import ImageDataset
from edgedistill.data.sources import Split
from edgedistill.distill import batchnorm
from edgedistill.distill.batchnorm import recalibrate


def _images(n=40, size=8, seed=0):
    rng = np.random.default_rng(seed)
    split = Split(labels=np.zeros(n, np.int64), images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    return ImageDataset(split, size, train=False)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def test_the_statistics_are_the_average_over_the_fixed_images(monkeypatch):
    monkeypatch.setattr(batchnorm, "IMAGES", 24)
    images, net = _images(), _net()
    net[1].running_mean.fill_(50.0)  # stale statistics, far from the data's
    net.train()
    assert recalibrate(net, images, batch_size=8, device=torch.device("cpu")) == 1
    picked = batchnorm.sample(len(images))
    assert len(picked) == 24 and picked == sorted(set(picked))
    x = torch.stack([images[i][0] for i in picked]).float() / 255
    with torch.no_grad():
        feats = net[0](x)
    # the plain average of three batches' means (equal batches: the mean over all 24 images)
    torch.testing.assert_close(net[1].running_mean, feats.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    batch_vars = [feats[i:i + 8].var((0, 2, 3), unbiased=False) * (8 * 64) / (8 * 64 - 1) for i in range(0, 24, 8)]
    torch.testing.assert_close(net[1].running_var, torch.stack(batch_vars).mean(0), rtol=1e-5, atol=1e-5)
    assert net.training and net[1].momentum == 0.1  # mode and momentum as they were


def test_the_pass_draws_nothing_and_repeats_exactly():
    images = _images()
    a, b = _net(), _net()
    torch.manual_seed(7)
    before = torch.get_rng_state()
    recalibrate(a.eval(), images, batch_size=16, device=torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)  # dropout stayed in evaluation mode
    a[1].running_mean.add_(1.0)  # whatever the statistics were, the pass replaces them
    recalibrate(a, images, batch_size=16, device=torch.device("cpu"))
    recalibrate(b, images, batch_size=16, device=torch.device("cpu"))
    assert not a.training and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_model_without_batchnorm_is_left_alone():
    net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten())
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert recalibrate(net, _images(), batch_size=8, device=torch.device("cpu")) == 0
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
