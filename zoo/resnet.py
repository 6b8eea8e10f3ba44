"""ResNet-style ANN for 1x8x8 digits (conversion source with residual adds and identity skips)."""
from __future__ import annotations

from torch import nn


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the identity (or a 1x1 conv-BN when the width changes), ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if cin == cout else \
            nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x):
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + self.shortcut(x))


def digits_resnet(width: int = 16, classes: int = 10) -> nn.Sequential:
    """stem conv-BN-ReLU, two basic blocks (identity skip, then 1x1 projection to 2*width),
    avg-pool, linear."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        BasicBlock(width, width), BasicBlock(width, 2 * width), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(2 * width * 16, classes))
