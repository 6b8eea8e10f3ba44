"""Writers for each on-disk format snnc reads, in the published folder layouts: the tests, the
bench and the demo build small synthetic folders with them (no download), and users can write
their own recordings in a format the loaders read. Each writer returns what it wrote."""
from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np

from .images import CIFAR10_CLASSES


def random_events(rng, n, width, height, t_max=300_000):
    """Sorted random events as a dict of int64 arrays x, y, t, p."""
    return {"x": rng.integers(0, width, n), "y": rng.integers(0, height, n),
            "t": np.sort(rng.integers(0, t_max, n)), "p": rng.integers(0, 2, n)}


# ---- MNIST idx

def write_idx(path: Path, array: np.ndarray, gz=False):
    magic = 0x0800 | array.ndim   # 0x00000803 (images) / 0x00000801 (labels): uint8 data
    blob = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(blob) if gz else blob)


def write_mnist(root: Path, n_train=12, n_test=7, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        sfx = ".gz" if gz else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{sfx}", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{sfx}", labels, gz)
        out["train" if prefix == "train" else "test"] = (images, labels)
    return out


# ---- CIFAR-10 python pickles and binary batches

def write_cifar10(root: Path, per_batch=4, binary=False, seed=0, protocol=2):
    """``root/cifar-10-batches-{py,bin}/``; returns {"train": (images [N,3,32,32], labels), "test": ...}."""
    rng = np.random.default_rng(seed)
    folder = root / ("cifar-10-batches-bin" if binary else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    out = {"train": [], "test": []}
    names = [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "test")]
    for name, split in names:
        images = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch)
        if binary:
            rec = np.concatenate([labels[:, None].astype(np.uint8), images.reshape(per_batch, -1)], axis=1)
            (folder / f"{name}.bin").write_bytes(rec.tobytes())
        elif protocol == "py2":
            (folder / name).write_bytes(python2_pickle_batch(images.reshape(per_batch, 3072), labels, name.encode()))
        else:
            batch = {b"batch_label": name.encode(), b"labels": labels.tolist(),
                     b"data": images.reshape(per_batch, 3072), b"filenames": [b"x.png"] * per_batch}
            (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        out[split].append((images, labels))
    return {k: (np.concatenate([i for i, _ in v]), np.concatenate([lab for _, lab in v])) for k, v in out.items()}


def python2_pickle_batch(data: np.ndarray, labels, batch_label: bytes) -> bytes:
    """A CIFAR-10 batch pickled the way the published files are: Python 2 cPickle, protocol 2,
    keys and pixel bytes as py2 ``str`` (SHORT_BINSTRING/BINSTRING opcodes), the array through
    ``numpy.core.multiarray._reconstruct``. Python 3's pickle cannot write py2 strings, so the
    opcodes are spelled out."""
    def pystr(b):
        return b"U" + bytes([len(b)]) + b
    raw = data.astype(np.uint8).tobytes()
    dtype = (b"cnumpy\ndtype\n" + pystr(b"u1") + b"K\x00K\x01\x87R"            # dtype('u1', 0, 1)
             + b"(K\x03" + pystr(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + b"K\x00\x85" + pystr(b"b")
             + b"\x87R" + b"(K\x01J" + struct.pack("<i", len(data)) + b"M" + struct.pack("<H", 3072) + b"\x86"
             + dtype + b"\x89T" + struct.pack("<I", len(raw)) + raw + b"tb")   # __setstate__
    label_list = b"](" + b"".join(b"K" + bytes([int(v)]) for v in labels) + b"e"
    return (b"\x80\x02}(" + pystr(b"data") + array + pystr(b"labels") + label_list
            + pystr(b"batch_label") + pystr(batch_label) + b"u.")


# ---- N-MNIST .bin: 40 bits per event

def encode_nmnist(ev) -> bytes:
    t = ev["t"].astype(np.int64)
    rec = np.stack([ev["x"], ev["y"], (ev["p"] << 7) | ((t >> 16) & 0x7F), (t >> 8) & 0xFF, t & 0xFF], axis=1)
    return rec.astype(np.uint8).tobytes()


def write_nmnist(root: Path, per_class=2, events=60, seed=0):
    """``root/{Train,Test}/<digit>/<k>.bin``; returns {split: [(path, label, events)]}."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, folder in (("train", "Train"), ("test", "Test")):
        out[split] = []
        for digit in range(10):
            d = root / folder / str(digit)
            d.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                ev = random_events(rng, events + k, 34, 34, t_max=2 ** 23 - 1)
                path = d / f"{k:05d}.bin"
                path.write_bytes(encode_nmnist(ev))
                out[split].append((path, digit, ev))
    return out


# ---- AEDAT 2.0 (jAER DVS128: CIFAR10-DVS) and 3.1 (cAER: DVS Gesture)

def write_aedat2(path: Path, ev):
    header = b"#!AER-DAT2.0\r\n# This is a raw AE data file - do not edit\r\n#End Of ASCII Header\r\n"
    addr = (ev["x"] << 8) | (ev["y"] << 1) | ev["p"]          # tonic.io.read_dvs_128 bit layout
    pairs = np.stack([addr, ev["t"]], axis=1).astype(">u4")
    path.write_bytes(header + pairs.tobytes())


def write_cifar10_dvs(root: Path, per_class=3, events=80, seed=0):
    """``root/<class>/cifar10_<class>_<k>.aedat``; returns [(path, label, events)]."""
    rng = np.random.default_rng(seed)
    out = []
    for label, c in enumerate(CIFAR10_CLASSES):
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            ev = random_events(rng, events, 128, 128, t_max=1_300_000)
            path = root / c / f"cifar10_{c}_{k}.aedat"
            write_aedat2(path, ev)
            out.append((path, label, ev))
    return out


def _packet(kind, events_bytes, size, count, overflow=0):
    return struct.pack("<hhiiiiii", kind, 1, size, 4, overflow, count, count, count) + events_bytes


def write_aedat3(path: Path, ev, per_packet=50):
    """Polarity packets of ``per_packet`` events, with a special-event packet (type 0) between
    them, as cAER writes; timestamps above 2**31 go into the packet's overflow counter."""
    header = b"#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 1: DVS128\r\n#!END-HEADER\r\n"
    blobs = [header]
    for s in range(0, len(ev["t"]), per_packet):
        sl = slice(s, s + per_packet)
        t = ev["t"][sl].astype(np.int64)
        data = (ev["x"][sl] << 17) | (ev["y"][sl] << 2) | (ev["p"][sl] << 1) | 1   # bit 0: valid
        rec = np.stack([data, t & 0x7FFFFFFF], axis=1).astype("<u4")
        overflow = int(t[0] >> 31)
        blobs.append(_packet(1, rec.tobytes(), 8, len(t), overflow))
        special = np.array([[0x00000A01, int(t[-1]) & 0x7FFFFFFF]], dtype="<u4")
        blobs.append(_packet(0, special.tobytes(), 8, 1))
    path.write_bytes(b"".join(blobs))


def write_dvs_gesture(root: Path, trials=None, events=400, seed=0):
    """``root/{trials_to_train,trials_to_test}.txt``, ``userNN_<light>.aedat`` + ``_labels.csv``;
    returns {split: [(label 0-10, events of that gesture window)]}."""
    rng = np.random.default_rng(seed)
    trials = trials or {"train": ["user01_fluorescent", "user02_lab"], "test": ["user24_led"]}
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, names in trials.items():
        (root / f"trials_to_{split}.txt").write_text("".join(f"{n}.aedat\n" for n in names))
        out[split] = []
        for name in names:
            ev = random_events(rng, events, 128, 128, t_max=6_000_000)
            write_aedat3(root / f"{name}.aedat", ev)
            rows, start = ["class,startTime_usec,endTime_usec"], 100_000
            for cls in rng.choice(np.arange(1, 12), 3, replace=False):
                end = start + 1_500_000
                rows.append(f"{cls},{start},{end}")
                keep = (ev["t"] >= start) & (ev["t"] < end)
                out[split].append((int(cls) - 1, {k: v[keep] for k, v in ev.items()}))
                start = end + 200_000
            (root / f"{name}_labels.csv").write_text("\n".join(rows) + "\n")
    return out


def folder_digest(root: Path) -> dict:
    """{relative path: sha256} of every file under ``root`` (and every folder, as None)."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}
