"""Data sets. ``digits()`` is scikit-learn's 8x8 digits, shipped inside scikit-learn (no download)."""
from .digits import DataSplit, digits, loader

__all__ = ["digits", "loader", "DataSplit"]
