"""Data sets. ``digits()`` is scikit-learn's 8x8 digits, shipped inside scikit-learn (no download)."""
from .digits import DataSplit, digits, loader

__all__ = ["digits", "loader", "DataSplit", "from_spec"]


def from_spec(spec: str, split: str = "test", T=None):
    """A dataset from a CLI-style spec: ``"digits"`` or ``"NAME:ROOT"`` (e.g. ``"nmnist:~/data/NMNIST"``).

    Returns a ``torch.utils.data.Dataset`` of ``(x, label)``.
    """
    from torch.utils.data import TensorDataset

    from ..errors import SnncError
    name, _, root = spec.partition(":")
    if name == "digits" and not root:
        d = digits()
        return TensorDataset(d.x_train, d.y_train) if split == "train" else TensorDataset(d.x_test, d.y_test)
    raise SnncError(f"unknown data set spec {spec!r}: expected 'digits' or NAME:ROOT with a known NAME")
