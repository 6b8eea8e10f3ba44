"""Static image data sets from local folders: MNIST (idx files) and CIFAR-10 (python or binary batches).

Images are kept as uint8 ``[N, C, H, W]`` and become float32 per sample: ``normalize="unit"``
(default) divides by 255 (pixels in [0, 1], like ``digits()``); ``normalize="standard"`` then
subtracts the per-channel mean and divides by the std of the training set (constants below).
"""
from __future__ import annotations

import gzip
import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import FileFormatError, InputError
from .folders import check_split, data_root, incomplete

MNIST_URL = "http://yann.lecun.com/exdb/mnist/ (mirror: https://ossci-datasets.s3.amazonaws.com/mnist/)"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html (cifar-10-python.tar.gz or cifar-10-binary.tar.gz)"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# per-channel mean/std of the training pixels in [0, 1]
MEAN_STD = {"mnist": ((0.1307,), (0.3081,)),
            "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}


class ImageDataset(Dataset):
    """``(image [C, H, W] float32, label int)`` per sample; ``transform`` runs on the float image."""

    def __init__(self, name, images: torch.Tensor, labels: torch.Tensor, classes, normalize="unit",
                 transform=None):
        if normalize not in ("unit", "standard"):
            raise InputError(f"{name}: normalize must be 'unit' or 'standard', got {normalize!r}")
        self.name, self.images, self.labels, self.classes = name, images, labels, tuple(classes)
        self.normalize, self.transform = normalize, transform
        mean, std = MEAN_STD[name]
        self._mean = torch.tensor(mean).view(-1, 1, 1)
        self._std = torch.tensor(std).view(-1, 1, 1)

    @property
    def targets(self):
        return self.labels.tolist()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        x = self.images[index].float() / 255.0
        if self.normalize == "standard":
            x = (x - self._mean) / self._std
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[index])


def _read_maybe_gz(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (EOFError, OSError, zlib.error) as e:
        raise FileFormatError(f"{path}: not a readable gzip file (truncated?): {e}") from None


def read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """An idx file (LeCun's MNIST format: big-endian magic, dims x uint32 sizes, uint8 data)."""
    data = _read_maybe_gz(path)
    head = 4 + 4 * dims
    if len(data) < head or struct.unpack(">I", data[:4])[0] != magic:
        raise FileFormatError(f"{path}: not an idx file with magic {magic:#010x} "
                              f"(uint8, {dims} dimension{'s' if dims > 1 else ''})")
    shape = struct.unpack(f">{dims}I", data[4:head])
    need = int(np.prod(shape))
    if len(data) - head != need:
        raise FileFormatError(f"{path}: header says {shape} = {need} bytes of data, the file holds "
                              f"{len(data) - head} (truncated?)")
    return np.frombuffer(data, np.uint8, offset=head).reshape(shape)


def _check_labels(labels: np.ndarray, classes: int, path) -> np.ndarray:
    if labels.size and int(labels.max()) >= classes:
        i = int(np.argmax(labels >= classes))
        raise FileFormatError(f"{path}: label {int(labels[i])} of sample {i} is out of range "
                              f"(0-{classes - 1})")
    return labels


def mnist(root, split="train", T=None, normalize="unit", transform=None) -> ImageDataset:
    """MNIST from ``ROOT`` (or ``ROOT/MNIST/raw``, torchvision's layout): the four idx files
    ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, each raw or ``.gz``. ``T`` is not used
    (static images; the graph's encoder repeats them over time)."""
    root = data_root(root, "mnist")
    check_split(split, "mnist")
    prefix = "train" if split == "train" else "t10k"
    wanted = {"images": f"{prefix}-images-idx3-ubyte", "labels": f"{prefix}-labels-idx1-ubyte"}
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        found = {k: next((folder / (n + s) for s in ("", ".gz") if (folder / (n + s)).is_file()), None)
                 for k, n in wanted.items()}
        if all(found.values()):
            break
    else:
        expected = ["train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                    "t10k-labels-idx1-ubyte (each raw or .gz) in ROOT or ROOT/MNIST/raw"]
        raise incomplete("mnist", root, expected, MNIST_URL,
                         missing=[n + "[.gz]" for n in wanted.values()])
    images = read_idx(found["images"], 0x00000803, 3)
    labels = _check_labels(read_idx(found["labels"], 0x00000801, 1), 10, found["labels"])
    if len(images) != len(labels):
        raise FileFormatError(f"{found['images']} holds {len(images)} images but {found['labels']} "
                              f"holds {len(labels)} labels")
    return ImageDataset("mnist", torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)),
                        [str(d) for d in range(10)], normalize, transform)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds (dict, list, bytes, numpy uint8 arrays): a data
    file is not trusted code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            if module == "numpy.core.multiarray" and hasattr(np, "_core"):
                module = "numpy._core.multiarray"    # numpy 2 renamed it; the old name warns
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _read_python_batch(path: Path):
    try:
        batch = _BatchUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        batch = {k.encode() if isinstance(k, str) else k: v for k, v in batch.items()}
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, IndexError,
            AttributeError, struct.error) as e:
        raise FileFormatError(f"{path}: not a readable CIFAR-10 python batch (a pickled dict with "
                              f"b'data' [N, 3072] uint8 and b'labels'; truncated?): {type(e).__name__}: {e}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise FileFormatError(f"{path}: b'data' has shape {list(data.shape)} and {len(labels)} labels; "
                              "expected [N, 3072] and N labels")
    return data.reshape(-1, 3, 32, 32), labels


def _read_binary_batch(path: Path):
    raw = path.read_bytes()
    if len(raw) % 3073:
        raise FileFormatError(f"{path}: {len(raw)} bytes is not a multiple of 3073 (1 label byte + "
                              "3072 pixel bytes per CIFAR-10 record): truncated?")
    rec = np.frombuffer(raw, np.uint8).reshape(-1, 3073)
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)


CIFAR10_LAYOUTS = {   # folder -> (file names of each split, reader)
    "cifar-10-batches-py": ({"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                            _read_python_batch),
    "cifar-10-batches-bin": ({"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]},
                             _read_binary_batch),
}


def cifar10(root, split="train", T=None, normalize="unit", augment=False, transform=None) -> ImageDataset:
    """CIFAR-10 from ``ROOT`` holding ``cifar-10-batches-py/`` (pickled ``data_batch_1..5``,
    ``test_batch``) or ``cifar-10-batches-bin/`` (``data_batch_1..5.bin``, ``test_batch.bin``,
    3073-byte records), or ``ROOT`` being one of those folders. ``augment=True``: random crop
    with 4-pixel zero padding + horizontal flip (``transforms.RandomCropFlip``). ``T`` is unused."""
    from .transforms import RandomCropFlip
    root = data_root(root, "cifar10")
    check_split(split, "cifar10")
    candidates = [(root / folder, names[split], reader) for folder, (names, reader) in CIFAR10_LAYOUTS.items()]
    candidates += [(root, names[split], reader) for folder, (names, reader) in CIFAR10_LAYOUTS.items()]
    for folder, names, reader in candidates:
        if all((folder / n).is_file() for n in names):
            break
    else:
        expected = [f"{folder}/ with {', '.join(n['train'] + n['test'])}"
                    for folder, (n, _) in CIFAR10_LAYOUTS.items()]
        raise incomplete("cifar10", root, expected, CIFAR10_URL)
    parts = [reader(folder / n) for n in names]
    for n, (_, labels) in zip(names, parts):
        _check_labels(labels, 10, folder / n)
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    if augment:
        transform = RandomCropFlip() if transform is None else _Chain(RandomCropFlip(), transform)
    return ImageDataset("cifar10", images, labels, CIFAR10_CLASSES, normalize, transform)


class _Chain:
    def __init__(self, *fns):
        self.fns = fns

    def __call__(self, x):
        for fn in self.fns:
            x = fn(x)
        return x
