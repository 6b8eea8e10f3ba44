"""Small nets used by the demo, the tests and the benches."""
from __future__ import annotations

from torch import nn

from snnc.ops import LIF, DirectEncoder, Readout


def digits_cnn(width: int = 16, classes: int = 10, bn: bool = True) -> nn.Sequential:
    """ANN for 1x8x8 digits: conv-BN-ReLU x2, avg-pool, linear-ReLU, linear (conversion source)."""
    def block(cin, cout):
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=not bn)]
        if bn:
            layers.append(nn.BatchNorm2d(cout))
        return layers + [nn.ReLU()]
    return nn.Sequential(
        *block(1, width), *block(width, 2 * width), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, classes))


def digits_snn(width: int = 16, classes: int = 10, tau: float = 2.0, v_th: float = 1.0) -> nn.Sequential:
    """Per-step conv SNN for digits: direct encoding, conv-BN-LIF x2, avg-pool, linear-LIF, readout."""
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), LIF(tau=tau, v_th=v_th)]
    return nn.Sequential(
        DirectEncoder(), *block(1, width), *block(width, 2 * width), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(2 * width * 16, 128), LIF(tau=tau, v_th=v_th), nn.Linear(128, classes),
        Readout("membrane"))


def bench_net(channels=(3, 64, 128, 128), tau: float = 2.0) -> nn.Sequential:
    """The bench net of the TVM/ONNX/training benches: 3x3 conv + LIF layers (3->64->128->128),
    per-step; unroll it with T=4 and feed ``[T, N, 3, 32, 32]``."""
    layers = []
    for cin, cout in zip(channels[:-1], channels[1:]):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), LIF(tau=tau)]
    return nn.Sequential(*layers)
