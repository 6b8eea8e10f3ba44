"""Event-camera data sets from local folders: N-MNIST, CIFAR10-DVS, DVS128 Gesture.

Each sample is framed to ``[T, 2, H, W]`` float32 event counts, equal to
``tonic.transforms.ToFrame(sensor_size, n_time_bins=T)`` (see ``framing.py``); with ``T=None`` a
sample is the raw event array in tonic's layout (fields x, y, t, p) for your own tonic transforms.
Folders are walked here (tonic's data set classes download when a folder looks incomplete);
files are read with tonic's readers. Nothing is ever written into the data folder.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ..errors import FileFormatError, InputError
from .aedat import _tonic_io, read_aedat2_dvs128, read_aedat3_polarity
from .cache import cache_key, cache_load, cache_store, events_load, events_store
from .folders import check_cache_dir, check_split, data_root, incomplete, sorted_entries
from .framing import EVENT_DTYPE, to_frames
from .images import CIFAR10_CLASSES

NMNIST_URL = "https://www.garrickorchard.com/datasets/n-mnist (Mendeley Data 468j46mzdv)"
CIFAR10_DVS_URL = "https://figshare.com/articles/dataset/CIFAR10-DVS_New/4724671 (Li et al. 2017)"
DVS_GESTURE_URL = "https://research.ibm.com/interactive/dvsgesture/ (DvsGesture.tar.gz, Amir et al. 2017)"
GESTURE_CLASSES = ("hand clapping", "right hand wave", "left hand wave", "right arm clockwise",
                   "right arm counter-clockwise", "left arm clockwise", "left arm counter-clockwise",
                   "arm roll", "air drums", "air guitar", "other gestures")


def read_nmnist(path: Path) -> np.ndarray:
    """N-MNIST ``.bin``: 5 bytes per event (x 8 bits, y 8 bits, polarity 1 bit, time 23 bits in us),
    read by ``tonic.io.read_mnist_file`` after checking the length."""
    size = path.stat().st_size
    if size % 5:
        raise FileFormatError(f"{path}: {size} bytes is not a multiple of 5: N-MNIST events are "
                              "40 bits each (x, y, polarity + 23-bit timestamp); the file is truncated")
    return _tonic_io().read_mnist_file(str(path), dtype=EVENT_DTYPE)


READERS = {"nmnist": read_nmnist, "aedat2": read_aedat2_dvs128, "aedat3": read_aedat3_polarity}


class EventDataset(Dataset):
    """``(frames [T, 2, H, W] float32, label)`` per sample; picklable for DataLoader workers.

    ``samples``: ``(file, label, window)`` with ``window = (t_start, t_end)`` in us or None (the
    whole file). ``denoise_us``: tonic's ``Denoise(filter_time)`` before framing (a Python loop per
    event inside tonic: slow, use ``cache_dir``). ``transform``: applied to the frames last.
    """

    def __init__(self, name, samples, reader, sensor_size, classes, T=None, denoise_us=None,
                 cache_dir=None, transform=None):
        self.name, self.samples, self.reader = name, samples, reader
        self.sensor_size, self.classes, self.T = tuple(sensor_size), tuple(classes), T
        self.denoise_us, self.cache_dir, self.transform = denoise_us, cache_dir, transform
        self.targets = [label for _, label, _ in samples]
        self._last = (None, None)   # (file, events): DVS Gesture holds many samples per file

    def __len__(self):
        return len(self.samples)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_last"] = (None, None)
        return state

    def events(self, index) -> np.ndarray:
        """The raw events of sample ``index`` (tonic layout), denoised when asked."""
        path, _, window = self.samples[index]
        stamp = (path, *_stat(path))
        if self._last[0] != stamp:
            self._last = (stamp, self._read(path, stamp, shared=window is not None))
        ev = self._last[1]
        if window is not None:
            ev = ev[(ev["t"] >= window[0]) & (ev["t"] < window[1])]
        if self.denoise_us and len(ev):
            from tonic.functional import denoise_numpy
            ev = denoise_numpy(ev, filter_time=self.denoise_us)
        return ev

    def _read(self, path, stamp, shared):
        """Decode ``path``; a file shared by several samples goes through the events cache."""
        entry = None
        if shared and self.cache_dir is not None:
            key = cache_key(path, *stamp[1:], reader=self.reader)
            entry = self.cache_dir / self.name / f"events-{key}.npy"
            cached = events_load(entry)
            if cached is not None:
                return cached
        try:
            events = READERS[self.reader](path)
        except OSError as e:
            raise FileFormatError(f"{path}: cannot be read: {e}") from None
        if entry is not None:
            events_store(entry, events)
        return events

    def frames(self, index):
        path, _, window = self.samples[index]
        entry = None
        if self.cache_dir is not None:
            key = cache_key(path, *_stat(path), window=window, T=self.T, denoise_us=self.denoise_us,
                            sensor=self.sensor_size)
            entry = self.cache_dir / self.name / f"{key}.npy"
            W, H, P = self.sensor_size
            cached = cache_load(entry, (self.T, P, H, W))
            if cached is not None:
                return cached
        frames = to_frames(self.events(index), self.sensor_size, self.T, source=path)
        if entry is not None:
            cache_store(entry, frames)
        return frames

    def __getitem__(self, index):
        label = self.samples[index][1]
        x = self.events(index) if self.T is None else self.frames(index)
        return (self.transform(x) if self.transform else x), label


def _stat(path: Path):
    """(size, mtime) of a sample's file; an error naming it when it went away since listing."""
    try:
        st = path.stat()
    except OSError as e:
        raise FileFormatError(f"{path}: listed when the data set was built, now unreadable: {e}") from None
    return st.st_size, st.st_mtime_ns


def _label_folders(name, split_dir: Path, labels, expected, url):
    """``{label: sorted event files}`` of a folder of per-class folders, every class present."""
    if not split_dir.is_dir():
        raise incomplete(name, split_dir, expected, url)
    found = {p.name: p for p in sorted_entries(split_dir, files=False)}
    missing = [c for c in labels if c not in found or not sorted_entries(found[c], True, labels[c])]
    if missing:
        raise incomplete(name, split_dir, expected, url,
                         missing=[f"{c}/ (with {'/'.join(labels[c])} files)" for c in missing])
    return {c: sorted_entries(found[c], True, labels[c]) for c in labels}


def nmnist(root, split="train", T=None, **options) -> EventDataset:
    """N-MNIST: ``ROOT/Train/<digit>/*.bin`` and ``ROOT/Test/<digit>/*.bin``; 34x34, 2 polarities."""
    root = data_root(root, "nmnist")
    check_split(split, "nmnist")
    expected = ["Train/0 .. Train/9 and Test/0 .. Test/9, each holding N-MNIST .bin event files"]
    split_dir = root / ("Train" if split == "train" else "Test")
    if not split_dir.is_dir():
        raise incomplete("nmnist", root, expected, NMNIST_URL, missing=[f"{split_dir.name}/"])
    for d in sorted_entries(split_dir, files=False):
        if d.name.isdigit() and int(d.name) > 9:
            raise FileFormatError(f"{d}: label {d.name} is out of range for N-MNIST (0-9)")
    files = _label_folders("nmnist", split_dir, {str(d): (".bin",) for d in range(10)}, expected, NMNIST_URL)
    samples = [(f, int(c), None) for c, fs in files.items() for f in fs]
    return _event_dataset("nmnist", root, samples, "nmnist", (34, 34, 2), [str(d) for d in range(10)],
                          T, options)


def cifar10_dvs(root, split="train", T=None, train_fraction=0.9, **options) -> EventDataset:
    """CIFAR10-DVS: ``ROOT/<class>/*.aedat`` (AEDAT 2.0, 128x128) for the ten CIFAR-10 classes.

    There is no official split: per class, the files sorted by name, the first
    ``int(train_fraction * n)`` are "train" and the rest "test" (the usual 9:1 split)."""
    root = data_root(root, "cifar10-dvs")
    check_split(split, "cifar10-dvs")
    if not 0 < train_fraction < 1:
        raise InputError(f"cifar10-dvs: train_fraction must be in (0, 1), got {train_fraction}")
    expected = ["one folder per class (" + ", ".join(CIFAR10_CLASSES) + ") holding AEDAT 2.0 .aedat files "
                "(the original release; .aedat4 re-encodings are not read)"]
    files = _label_folders("cifar10-dvs", root, {c: (".aedat",) for c in CIFAR10_CLASSES}, expected,
                           CIFAR10_DVS_URL)
    samples = []
    for label, c in enumerate(CIFAR10_CLASSES):
        cut = int(train_fraction * len(files[c]))
        chosen = files[c][:cut] if split == "train" else files[c][cut:]
        samples += [(f, label, None) for f in chosen]
    return _event_dataset("cifar10-dvs", root, samples, "aedat2", (128, 128, 2), CIFAR10_CLASSES, T, options)


def dvs_gesture(root, split="train", T=None, **options) -> EventDataset:
    """DVS128 Gesture as published: ``ROOT/trials_to_train.txt``, ``trials_to_test.txt``, and per
    trial ``userNN_<lighting>.aedat`` (AEDAT 3.1) + ``userNN_<lighting>_labels.csv`` (rows
    ``class,startTime_usec,endTime_usec``, classes 1-11). One sample per csv row: the events with
    ``start <= t < end``. ``ROOT`` may also be the folder holding ``DvsGesture/``."""
    given = root = data_root(root, "dvs-gesture")
    check_split(split, "dvs-gesture")
    if (root / "DvsGesture").is_dir():
        root = root / "DvsGesture"
    expected = ["trials_to_train.txt and trials_to_test.txt listing the trials",
                "each trial's <name>.aedat (AEDAT 3.1) and <name>_labels.csv"]
    listing = root / f"trials_to_{split}.txt"
    if not listing.is_file():
        raise incomplete("dvs-gesture", root, expected, DVS_GESTURE_URL, missing=[listing.name])
    trials = [ln.strip() for ln in listing.read_text(errors="replace").splitlines() if ln.strip()]
    bad = [t for t in trials if not t.endswith(".aedat")]
    if bad:
        raise FileFormatError(f"{listing}: {bad[0]!r} is not an .aedat file name (one trial per line)")
    missing = [p for t in trials for p in (t, t[:-len(".aedat")] + "_labels.csv")
               if not (root / p).is_file()]
    if missing or not trials:
        raise incomplete("dvs-gesture", root, expected, DVS_GESTURE_URL, missing=missing or [f"trials in {listing.name}"])
    samples = []
    for trial in trials:
        samples += [(root / trial, label, window)
                    for label, window in _gesture_labels(root / (trial[:-len(".aedat")] + "_labels.csv"))]
    return _event_dataset("dvs-gesture", given, samples, "aedat3", (128, 128, 2), GESTURE_CLASSES, T, options)


def _gesture_labels(csv: Path):
    rows = [ln.strip() for ln in csv.read_text(errors="replace").splitlines() if ln.strip()]
    if not rows or not rows[0].lower().startswith("class"):
        raise FileFormatError(f"{csv}: expected a header 'class,startTime_usec,endTime_usec'")
    out = []
    for n, row in enumerate(rows[1:], start=2):
        try:
            cls, start, end = (int(v) for v in row.split(","))
        except ValueError:
            raise FileFormatError(f"{csv}, line {n}: {row!r} is not 'class,startTime_usec,endTime_usec'") from None
        if not 1 <= cls <= len(GESTURE_CLASSES):
            raise FileFormatError(f"{csv}, line {n}: label {cls} is out of range (classes are 1-11)")
        out.append((cls - 1, (start, end)))
    return out


def _event_dataset(name, root, samples, reader, sensor_size, classes, T, options):
    known = {"denoise_us", "cache_dir", "transform"}
    unknown = set(options) - known
    if unknown:
        raise InputError(f"{name}: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
    if T is not None and (not isinstance(T, int) or T < 1):
        raise InputError(f"{name}: T must be a positive int (frames per sample), got {T!r}")
    cache = check_cache_dir(options.get("cache_dir"), root)
    return EventDataset(name, samples, reader, sensor_size, classes, T=T,
                        denoise_us=options.get("denoise_us"), cache_dir=cache,
                        transform=options.get("transform"))
