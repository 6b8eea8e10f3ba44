"""Per-sample torch transforms (there is no torchvision here)."""
from __future__ import annotations

import torch


class RandomCropFlip:
    """CIFAR training augmentation of the seed papers: zero-pad ``padding`` pixels on each side,
    crop a random window of the original size, flip horizontally with probability ``flip_p``.

    Works on ``[C, H, W]`` images and on frames ``[T, C, H, W]`` (the same crop and flip for every
    time step). Draws from torch's global RNG unless a ``generator`` is given; DataLoader seeds
    each worker's global RNG differently, so workers do not repeat each other's crops.
    """

    def __init__(self, padding: int = 4, flip_p: float = 0.5, generator: torch.Generator | None = None):
        self.padding, self.flip_p, self.generator = padding, flip_p, generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        pad = self.padding
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        i, j = torch.randint(0, 2 * pad + 1, (2,), generator=self.generator).tolist()
        out = padded[..., i:i + H, j:j + W]
        if torch.rand((), generator=self.generator).item() < self.flip_p:
            out = out.flip(-1)
        return out.contiguous()

    def __repr__(self):
        return f"RandomCropFlip(padding={self.padding}, flip_p={self.flip_p})"
