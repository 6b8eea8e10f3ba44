"""Data sets. ``digits()`` is scikit-learn's 8x8 digits, shipped inside scikit-learn (no download);
``dataset(name, root, ...)`` reads MNIST, CIFAR-10, N-MNIST, CIFAR10-DVS and DVS Gesture from
local folders (see ``registry.DATASETS`` and each loader's docstring for the folder layouts)."""
from .digits import DataSplit, digits, loader
from .framing import time_first, to_frames
from .registry import DATASETS, dataset, dataset_loader
from .transforms import RandomCropFlip

__all__ = ["digits", "loader", "DataSplit", "from_spec", "dataset", "dataset_loader", "DATASETS", "to_frames",
           "time_first", "RandomCropFlip"]


def from_spec(spec: str, split: str = "test", T=None, **options):
    """A dataset from a CLI-style spec: ``"digits"`` or ``"NAME:ROOT"`` (e.g. ``"nmnist:~/data/NMNIST"``).

    Returns a ``torch.utils.data.Dataset`` of ``(x, label)``; ``options`` go to ``dataset``. Event
    data sets need ``T`` here (a spec names tensors to feed a graph, not raw events).
    """
    from ..errors import InputError
    name, sep, root = spec.partition(":")
    name = name.lower().replace("_", "-")
    if name == "digits" and not root:
        return dataset("digits", None, split)
    if not sep or not root or name not in DATASETS:
        raise InputError(f"unknown data set spec {spec!r}: expected 'digits' or NAME:ROOT with NAME "
                         f"one of {', '.join(n for n in DATASETS if n != 'digits')}")
    if T is None and name in ("nmnist", "cifar10-dvs", "dvs-gesture"):
        raise InputError(f"{name} is event data: give T, the number of frames per sample (CLI: --T), "
                         "to frame its events")
    return dataset(name, root, split=split, T=T, **options)


def nir_paper_dir():
    """The NIR paper's graphs (``shared/data/nir-paper`` beside the repository, or the folder in
    ``$SNNC_NIR_PAPER``); used by tests and the demo when present."""
    import os
    from pathlib import Path
    default = Path(__file__).resolve().parents[3] / "shared" / "data" / "nir-paper"
    return Path(os.environ.get("SNNC_NIR_PAPER", default))
