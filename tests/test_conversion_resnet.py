"""The issue's target on a user's architecture: a torchvision-style ResNet-18 (MaxPool,
AdaptiveAvgPool, identity and projection skips) trained on digits converts with the default
``snnc.convert(model, calib, T=8)`` to within 1 point of the ANN (burst spikes), and does not
lose accuracy from T=8 to T=64. Slow: trains the ANN (AdamW, cosine lr, 40 epochs)."""
import pytest
import torch
from torch import nn

import snnc
from snnc.data import digits
from snnc.demo import accuracy
from snnc.ops import BurstIF
from snnc.zoo.digits_maxpool import digits_resnet18


def _train(data, epochs=40):
    torch.manual_seed(0)
    m = digits_resnet18(16)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=1e-2)
    train, _ = data.loaders(batch_size=64, seed=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(train))
    m.train()
    for _ in range(epochs):
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            sched.step()
    return m.eval()


@pytest.mark.slow
def test_resnet18_default_conversion_within_1_point_at_T8(one_thread):
    data = digits()
    ann = _train(data)
    ann_acc = accuracy(ann, data.x_test, data.y_test)
    assert ann_acc > 95.0   # a trained ANN, else the comparison says nothing
    calib = data.x_train[:512]
    g8 = snnc.convert(ann, calib, T=8)
    acc8 = accuracy(lambda x: snnc.run(g8, x), data.x_test, data.y_test)
    assert ann_acc - acc8 <= 1.0, (ann_acc, acc8, g8.snnc_conversion["method"])
    assert "burst" in g8.snnc_conversion["method"] and any(isinstance(m, BurstIF) for m in g8.modules())
    g64 = snnc.convert(ann, calib, T=64)
    assert accuracy(lambda x: snnc.run(g64, x), data.x_test, data.y_test) >= acc8
