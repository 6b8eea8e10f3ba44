"""scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), the embedded default data."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


@dataclasses.dataclass
class DataSplit:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def loaders(self, batch_size=64, shuffle=True, seed=0):
        return (loader(self.x_train, self.y_train, batch_size, shuffle, seed),
                loader(self.x_test, self.y_test, batch_size, False, seed))


def loader(x, y, batch_size=64, shuffle=False, seed=0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=g)


def digits(test_fraction: float = 0.25, seed: int = 0, flat: bool = False) -> DataSplit:
    """Train/test split of the digits, pixels scaled to [0, 1] (raw values are 0..16).

    Images are ``[N, 1, 8, 8]`` float32 (``flat=True``: ``[N, 64]``); labels int64. The split is
    stratified and fixed by ``seed``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)
    x = x.reshape(len(x), 64) if flat else x[:, None]
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=test_fraction, random_state=seed,
                                          stratify=d.target)
    t = torch.from_numpy
    return DataSplit(t(xtr), t(ytr).long(), t(xte), t(yte).long())
