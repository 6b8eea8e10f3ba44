"""``dataset(name, root, split, T, **options)``: the one entry point to every data set snnc reads."""
from __future__ import annotations

import inspect

from ..errors import InputError
from .events import cifar10_dvs, dvs_gesture, nmnist
from .folders import check_split
from .images import cifar10, mnist


def _digits(root=None, split="train", T=None):
    """scikit-learn's 8x8 digits (embedded; ``root`` and ``T`` unused)."""
    from torch.utils.data import TensorDataset

    from .digits import digits
    check_split(split, "digits")
    d = digits()
    return TensorDataset(d.x_train, d.y_train) if split == "train" else TensorDataset(d.x_test, d.y_test)


# name -> loader(root, split, T, **options); each loader's docstring gives the folder layout
DATASETS = {
    "digits": _digits,
    "mnist": mnist,
    "cifar10": cifar10,
    "nmnist": nmnist,
    "cifar10-dvs": cifar10_dvs,
    "dvs-gesture": dvs_gesture,
}


def dataset(name: str, root=None, split: str = "train", T: int | None = None, **options):
    """A ``torch.utils.data.Dataset`` of ``(x, label)`` read from the local folder ``root``.

    * ``"digits"``: embedded 8x8 digits, ``[1, 8, 8]`` in [0, 1] (no ``root``).
    * ``"mnist"``, ``"cifar10"``: ``[C, H, W]`` float32 in [0, 1] (``normalize="standard"``:
      per-channel standardised); options ``normalize``, ``transform``, and ``augment`` (cifar10).
    * ``"nmnist"``, ``"cifar10-dvs"``, ``"dvs-gesture"``: ``[T, 2, H, W]`` float32 event counts,
      equal to ``tonic.transforms.ToFrame(sensor_size, n_time_bins=T)``; ``T=None`` gives the raw
      events. Options ``cache_dir``, ``denoise_us``, ``transform`` (cifar10-dvs: ``train_fraction``).

    Never downloads and never writes into ``root``; a missing or incomplete folder raises one
    ``FileFormatError`` saying what is expected and where the data set is published.
    """
    key = name.lower().replace("_", "-")
    if key not in DATASETS:
        raise InputError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    load = DATASETS[key]
    params = inspect.signature(load).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params))
        if unknown:
            known = [p for p in params if p not in ("root", "split", "T")]
            raise InputError(f"{key}: unknown option(s) {unknown}; known: {known}")
    return load(root, split=split, T=T, **options)


def dataset_loader(ds, batch_size: int = 64, shuffle: bool = False, seed: int = 0, num_workers: int = 0):
    """A DataLoader over ``ds`` whose batches fit snnc graphs: images ``[N, C, H, W]``; event
    frames time-first ``[T, N, 2, H, W]`` (what ``snnc.run`` and unrolled graphs take)."""
    import torch
    from torch.utils.data import DataLoader

    from .events import EventDataset
    from .framing import collate_time_first
    frames = isinstance(ds, EventDataset) and ds.T is not None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed),
                      collate_fn=collate_time_first if frames else None)
