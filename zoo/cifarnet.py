"""CIFARNet of Wu 2019 (STBP + NeuNorm), per-step, with a width knob.

    128C3-256C3-AP2-512C3-AP2-1024C3-512C3-1024FC-512FC-100FC, voting over groups of 10.

Neurons follow the paper's iterative LIF: ``u[t] = decay * u[t-1] * (1 - o[t-1]) + x[t]``,
``o = 1[u > v_th]`` - snnc's ``LIF(decay, reset="zero", compare=">")``; CIFAR defaults from the
released code: ``decay = 0.25``, ``v_th = 0.75``. The image drives the first conv directly
(``DirectEncoder``); the output is the firing rate of the 100 output neurons, averaged per class
(``Voting``). ``neunorm=True`` puts a NeuNorm after each spiking conv layer.
"""
from __future__ import annotations

from torch import nn

from snnc.ops import LIF, DirectEncoder, NeuNorm, Readout, Voting


def _ch(c, width):
    return max(1, int(round(c * width)))


def cifarnet(width: float = 1.0, classes: int = 10, image_size: int = 32, in_channels: int = 3,
             decay: float = 0.25, v_th: float = 0.75, neunorm: bool = False, voters: int = 10) -> nn.Sequential:
    def lif():
        return LIF(decay=decay, v_th=v_th, reset="zero", compare=">")

    layers, cin, size = [DirectEncoder()], in_channels, image_size
    for item in (128, 256, "AP", 512, "AP", 1024, 512):
        if item == "AP":
            layers.append(nn.AvgPool2d(2))
            size //= 2
            continue
        cout = _ch(item, width)
        layers += [nn.Conv2d(cin, cout, 3, padding=1), lif()]
        if neunorm:
            layers.append(NeuNorm(cout, size, size))
        cin = cout
    layers.append(nn.Flatten())
    fin = cin * size * size
    for f in (1024, 512):
        layers += [nn.Linear(fin, _ch(f, width)), lif()]
        fin = _ch(f, width)
    layers += [nn.Linear(fin, classes * voters), lif(), Readout("spike_count"), Voting(classes, voters)]
    return nn.Sequential(*layers)
