"""VGG-11 / VGG-16 as used by Rathi 2020 (hybrid conversion + STDB), with a width knob.

Rathi's VGGs have no batch norm, average pooling instead of max pooling, dropout, and a
4096-4096-classes classifier. ``spiking=False`` gives the ANN (ReLU) that conversion starts
from; ``spiking=True`` the SNN: IF neurons with reset by subtraction in place of ReLU, the
output layer accumulating its membrane (``Readout("membrane")``), and a direct or signed-Poisson
input encoder.
"""
from __future__ import annotations

from torch import nn

from snnc.ops import IF, DirectEncoder, PoissonEncoder, Readout

CONFIGS = {
    "vgg11": [64, "A", 128, "A", 256, 256, "A", 512, 512, "A", 512, 512, "A"],
    "vgg16": [64, 64, "A", 128, 128, "A", 256, 256, 256, "A", 512, 512, 512, "A", 512, 512, 512, "A"],
}


def _ch(c, width):
    return max(1, int(round(c * width)))


def _vgg(config, width, classes, image_size, in_channels, spiking, poisson, dropout):
    def act():
        return IF() if spiking else nn.ReLU()

    layers = []
    if spiking:
        layers.append(PoissonEncoder(signed=True) if poisson else DirectEncoder())
    cin, size = in_channels, image_size
    for item in CONFIGS[config]:
        if item == "A":
            layers.append(nn.AvgPool2d(2))
            size //= 2
        else:
            cout = _ch(item, width)
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), act()]
            cin = cout
    if size < 1:
        raise ValueError(f"{config}: image_size={image_size} is too small for 5 pooling stages (>= 32)")
    hidden = _ch(4096, width)
    layers += [nn.Flatten(), nn.Linear(cin * size * size, hidden, bias=False), act(), nn.Dropout(dropout),
               nn.Linear(hidden, hidden, bias=False), act(), nn.Dropout(dropout),
               nn.Linear(hidden, classes, bias=False)]
    if spiking:
        layers.append(Readout("membrane"))
    return nn.Sequential(*layers)


def vgg11(width: float = 1.0, classes: int = 10, image_size: int = 32, in_channels: int = 3,
          spiking: bool = True, poisson: bool = False, dropout: float = 0.2) -> nn.Sequential:
    return _vgg("vgg11", width, classes, image_size, in_channels, spiking, poisson, dropout)


def vgg16(width: float = 1.0, classes: int = 10, image_size: int = 32, in_channels: int = 3,
          spiking: bool = True, poisson: bool = False, dropout: float = 0.2) -> nn.Sequential:
    return _vgg("vgg16", width, classes, image_size, in_channels, spiking, poisson, dropout)
