"""ResNets of the direct-training papers, per-step, with a width knob.

``resnet19`` (Zheng 2021, tdBN): stem conv3x3 -> 3 blocks @128, 3 @256 (stride 2), 2 @512
(stride 2) -> global average pool -> FC256 -> FC classes. Every conv is followed by tdBN; the
last tdBN of each residual branch and of the projection shortcut uses ``alpha = 1/sqrt(2)``
(two branches meet at the add), and the LIF fires after the add. LIF: Zheng's
``u = decay * u * (1 - o) + x``, ``o = 1[u > v_th]``.

``preact_resnet18`` (Meng 2022, DSR): pre-activation ResNet-18 (BN -> neuron -> conv, stages of
2 blocks @64/128/256/512) with DSR neurons (``DSRIF`` or ``DSRLIF``, trainable thresholds).
"""
from __future__ import annotations

import math

from torch import nn

from snnc.ops import DSRIF, DSRLIF, LIF, DirectEncoder, Readout, TDBatchNorm


def _ch(c, width):
    return max(1, int(round(c * width)))


class TdBNBlock(nn.Module):
    """Zheng 2021 basic block: LIF(tdBN(conv(LIF(tdBN(conv(x))))) + shortcut(x))."""

    def __init__(self, cin, cout, stride, make_lif, v_th):
        super().__init__()
        branch_alpha = 1 / math.sqrt(2)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1, self.lif1 = TDBatchNorm(cout, v_th=v_th), make_lif()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = TDBatchNorm(cout, alpha=branch_alpha, v_th=v_th)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          TDBatchNorm(cout, alpha=branch_alpha, v_th=v_th))
        self.lif2 = make_lif()

    def forward(self, x):
        out = self.lif1(self.bn1(self.conv1(x)))
        return self.lif2(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet19(width: float = 1.0, classes: int = 10, in_channels: int = 3, decay: float = 0.5,
             v_th: float = 0.5) -> nn.Sequential:
    def make_lif():
        return LIF(decay=decay, v_th=v_th, reset="zero", compare=">")

    stem = _ch(128, width)
    layers = [DirectEncoder(), nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), TDBatchNorm(stem, v_th=v_th),
              make_lif()]
    cin = stem
    for channels, blocks, stride in ((128, 3, 1), (256, 3, 2), (512, 2, 2)):
        for i in range(blocks):
            cout = _ch(channels, width)
            layers.append(TdBNBlock(cin, cout, stride if i == 0 else 1, make_lif, v_th))
            cin = cout
    hidden = _ch(256, width)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, hidden), make_lif(),
               nn.Linear(hidden, classes), Readout("membrane")]
    return nn.Sequential(*layers)


class PreActBlock(nn.Module):
    """He 2016 pre-activation block with spiking activations (Meng 2022's PreAct-ResNet)."""

    def __init__(self, cin, cout, stride, make_neuron):
        super().__init__()
        self.bn1, self.act1 = nn.BatchNorm2d(cin), make_neuron()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(cout), make_neuron()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = self.act1(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.conv2(self.act2(self.bn2(out))) + skip


def preact_resnet18(width: float = 1.0, classes: int = 10, in_channels: int = 3, neuron: str = "if",
                    alpha: float = 0.5, tau: float = 2.0) -> nn.Sequential:
    if neuron not in ("if", "lif"):
        raise ValueError(f"preact_resnet18: neuron={neuron!r}, expected 'if' or 'lif'")

    def make_neuron():
        return DSRIF(alpha=alpha) if neuron == "if" else DSRLIF(tau=tau, alpha=alpha)

    stem = _ch(64, width)
    layers, cin = [DirectEncoder(), nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)], stem
    for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        cout = _ch(channels, width)
        layers += [PreActBlock(cin, cout, stride, make_neuron), PreActBlock(cout, cout, 1, make_neuron)]
        cin = cout
    layers += [nn.BatchNorm2d(cin), make_neuron(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(cin, classes), Readout("membrane")]
    return nn.Sequential(*layers)
