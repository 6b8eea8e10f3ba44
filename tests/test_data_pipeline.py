"""The loaders in a training/inference pipeline: on-disk frame cache, DataLoader workers,
CIFAR augmentation, and N-MNIST-format events run through an snnc SNN."""
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import snnc
from snnc.data import RandomCropFlip, dataset, dataset_loader
from snnc.data.writers import folder_digest, write_cifar10, write_dvs_gesture, write_nmnist
from snnc.ops import IF, Readout
from snnc.passes import unroll_timesteps

pytest.importorskip("tonic")


def test_cache_written_outside_data_folder_and_reused(tmp_path):
    data, cache = tmp_path / "nmnist", tmp_path / "cache"
    write_nmnist(data, per_class=1)
    before = folder_digest(data)
    ds = dataset("nmnist", data, "test", T=4, cache_dir=cache)
    first = [ds[i][0] for i in range(len(ds))]
    entries = sorted((cache / "nmnist").glob("*.npy"))
    assert len(entries) == 10 and not list(cache.rglob("*.tmp"))
    assert folder_digest(data) == before
    # a second dataset reads the cache (entries not rewritten) and gives equal frames
    mtimes = {p: p.stat().st_mtime_ns for p in entries}
    again = dataset("nmnist", data, "test", T=4, cache_dir=cache)
    assert all(torch.equal(a, again[i][0]) for i, a in enumerate(first))
    assert {p: p.stat().st_mtime_ns for p in entries} == mtimes
    # another T is another key; a damaged entry is recomputed, not fatal
    dataset("nmnist", data, "test", T=5, cache_dir=cache)[0]
    assert len(list((cache / "nmnist").glob("*.npy"))) == 11
    entries[0].write_bytes(b"garbage")
    assert all(torch.equal(again[i][0], first[i]) for i in range(10))
    assert entries[0].read_bytes() != b"garbage"     # ... and its entry rewritten


def test_cache_key_follows_the_source_file(tmp_path):
    data = tmp_path / "nmnist"
    written = write_nmnist(data, per_class=1)
    ds = dataset("nmnist", data, "test", T=2, cache_dir=tmp_path / "c")
    old = ds[0][0]
    path = written["test"][0][0]
    path.write_bytes(path.read_bytes()[:5 * 10])   # the user replaces the file: new size, new key
    assert ds[0][0].sum() <= 10 < old.sum()


def test_shared_recordings_decoded_once_into_the_cache(tmp_path):
    write_dvs_gesture(tmp_path / "g")
    plain = dataset("dvs-gesture", tmp_path / "g", "train", T=3)
    cached = dataset("dvs-gesture", tmp_path / "g", "train", T=3, cache_dir=tmp_path / "c")
    order = [4, 0, 5, 1, 3, 2]                    # shuffled: alternates between the two files
    assert all(torch.equal(cached[i][0], plain[i][0]) for i in order)
    events = sorted((tmp_path / "c" / "dvs-gesture").glob("events-*.npy"))
    assert len(events) == 2                        # one per trial file, not per gesture
    fresh = dataset("dvs-gesture", tmp_path / "g", "train", T=None, cache_dir=tmp_path / "c")
    for i in order:                                # raw events come from the cache, same values
        assert np.array_equal(fresh[i][0], plain.events(i))


def test_dataloader_workers_and_pickling(tmp_path):
    write_dvs_gesture(tmp_path / "g")
    ds = dataset("dvs-gesture", tmp_path / "g", "train", T=3, cache_dir=tmp_path / "c")
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._last == (None, None) and torch.equal(clone[1][0], ds[1][0])
    loader = dataset_loader(ds, batch_size=4, num_workers=2)
    xs, ys = zip(*loader)
    assert xs[0].shape == (3, 4, 2, 128, 128)     # time-first batches
    assert torch.equal(torch.cat(xs, dim=1), torch.stack([ds[i][0] for i in range(len(ds))], dim=1))
    assert torch.cat(ys).tolist() == ds.targets


def test_image_batches_stay_batch_first(tmp_path):
    write_cifar10(tmp_path)
    x, y = next(iter(dataset_loader(dataset("cifar10", tmp_path, "test"), batch_size=3)))
    assert x.shape == (3, 3, 32, 32) and y.shape == (3,)
    x, y = next(iter(dataset_loader(dataset("digits", split="test"), batch_size=3)))
    assert x.shape == (3, 1, 8, 8)


def test_random_crop_flip():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)   # also [T, C, H, W]
    flip = RandomCropFlip(padding=0, flip_p=1.0)
    assert torch.equal(flip(x), x.flip(-1))
    g = torch.Generator().manual_seed(3)
    aug = RandomCropFlip(padding=4, generator=g)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    seen = set()
    for _ in range(30):
        y = aug(x)
        assert y.shape == x.shape
        windows = [(i, j, f) for i in range(9) for j in range(9) for f in (0, 1)
                   if torch.equal(y, padded[..., i:i + 5, j:j + 5].flip(-1) if f else padded[..., i:i + 5, j:j + 5])]
        assert windows, "output is not a crop (maybe flipped) of the padded input"
        seen.update(w[2] for w in windows)
    assert seen == {0, 1}


def test_cifar_augment_option_only_changes_train_images(tmp_path):
    write_cifar10(tmp_path)
    plain = dataset("cifar10", tmp_path, "train")
    aug = dataset("cifar10", tmp_path, "train", augment=True)
    torch.manual_seed(1)
    changed = sum(not torch.equal(aug[i][0], plain[i][0]) for i in range(len(plain)))
    assert changed > len(plain) // 2 and aug[0][0].shape == (3, 32, 32)


def nmnist_snn():
    """A per-step conv SNN for 2x34x34 frames (the NIR paper's N-MNIST CNN, narrower)."""
    return nn.Sequential(nn.Conv2d(2, 4, 5, stride=2, padding=1), IF(), nn.Conv2d(4, 4, 3, padding=1), IF(),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 8 * 8, 10), IF(), Readout("spike_count"))


def test_nmnist_frames_through_an_snnc_snn(tmp_path):
    write_nmnist(tmp_path, per_class=1, events=2000)
    T = 6
    loader = dataset_loader(dataset("nmnist", tmp_path, "test", T=T), batch_size=5)
    torch.manual_seed(0)
    net = nmnist_snn()
    with torch.no_grad():
        for m in net:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(4.0)
    g = snnc.trace(net, torch.zeros(5, 2, 34, 34))
    u = unroll_timesteps(g, T=T)
    compiled = snnc.compile(u, target="torch")
    outs = []
    for seq, _ in loader:
        assert seq.shape == (T, 5, 2, 34, 34)
        ref = snnc.run(g, seq, T=T)
        assert torch.equal(snnc.run(u, seq), ref)
        assert torch.equal(compiled(seq), ref)
        outs.append(ref)
    rates = torch.cat(outs)
    assert rates.shape == (10, 10) and 0 < rates.mean() < 1
