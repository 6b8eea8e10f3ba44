"""Each format loads from a folder written in that format: pixels and labels equal to what was
written; event frames equal to tonic's ToFrame on the same events."""
import numpy as np
import pytest
import torch

import snnc
from snnc.data import dataset, from_spec
from snnc.data.writers import write_cifar10, write_cifar10_dvs, write_dvs_gesture, write_mnist, write_nmnist

tonic = pytest.importorskip("tonic")
from tonic.io import read_mnist_file  # noqa: E402
from tonic.transforms import ToFrame  # noqa: E402


def tonic_frames(ev, sensor_size, T):
    """tonic's ToFrame on the events as written (dict of arrays) in tonic's own dtype."""
    arr = np.empty(len(ev["t"]), dtype=tonic.io.events_struct)
    for k in "xytp":
        arr[k] = ev[k]
    return torch.from_numpy(ToFrame(sensor_size=sensor_size, n_time_bins=T)(arr).astype(np.float32))


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_pixels_and_labels(tmp_path, gz):
    written = write_mnist(tmp_path, gz=gz)
    for split in ("train", "test"):
        ds = dataset("mnist", tmp_path, split)
        images, labels = written[split]
        assert len(ds) == len(labels)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        assert x.shape == (len(labels), 1, 28, 28) and x.dtype == torch.float32
        assert torch.equal(x, torch.from_numpy(images).float()[:, None] / 255)
        assert [ds[i][1] for i in range(len(ds))] == labels.tolist()


def test_mnist_torchvision_layout_and_standard_normalisation(tmp_path):
    written = write_mnist(tmp_path / "MNIST" / "raw")
    ds = dataset("mnist", tmp_path, "test", normalize="standard")
    images = torch.from_numpy(written["test"][0]).float()[:, None] / 255
    assert torch.allclose(ds[0][0], (images[0] - 0.1307) / 0.3081)


@pytest.mark.parametrize("binary,protocol", [(False, "py2"), (False, 2), (False, 4), (True, None)])
def test_cifar10_batches_pixels_and_labels(tmp_path, binary, protocol):
    written = write_cifar10(tmp_path, binary=binary, protocol=protocol)
    for split, n in (("train", 20), ("test", 4)):
        ds = dataset("cifar10", tmp_path, split)
        images, labels = written[split]
        assert len(ds) == n
        x = torch.stack([ds[i][0] for i in range(n)])
        assert x.shape == (n, 3, 32, 32)
        assert torch.equal(x, torch.from_numpy(images).float() / 255)
        assert [ds[i][1] for i in range(n)] == labels.tolist()
    # ROOT may also be the batches folder itself
    inner = tmp_path / ("cifar-10-batches-bin" if binary else "cifar-10-batches-py")
    assert len(dataset("cifar10", inner, "test")) == 4


def test_nmnist_frames_equal_tonic(tmp_path):
    written = write_nmnist(tmp_path)
    for split in ("train", "test"):
        ds = dataset("nmnist", tmp_path, split, T=7)
        assert len(ds) == 20 and ds.targets == [label for _, label, _ in written[split]]
        for i, (path, label, ev) in enumerate(written[split]):
            x, y = ds[i]
            assert y == label and x.shape == (7, 2, 34, 34) and x.dtype == torch.float32
            assert torch.equal(x, tonic_frames(ev, (34, 34, 2), 7))
            # ... and tonic's own reader then ToFrame agree too
            tonic_ev = read_mnist_file(str(path), dtype=tonic.datasets.NMNIST.dtype)
            ref = ToFrame(sensor_size=(34, 34, 2), n_time_bins=7)(tonic_ev)
            assert torch.equal(x, torch.from_numpy(ref.astype(np.float32)))
            assert x.sum() < len(ev["t"]) + 1   # the last events can fall past the last bin, as in tonic


def test_nmnist_raw_events_when_T_is_none(tmp_path):
    written = write_nmnist(tmp_path, per_class=1)
    ev, label = dataset("nmnist", tmp_path, "test")[3]
    assert label == 3
    for k in "xytp":
        assert np.array_equal(ev[k].astype(np.int64), written["test"][3][2][k])


def test_cifar10_dvs_split_and_frames(tmp_path):
    written = write_cifar10_dvs(tmp_path, per_class=3)
    train = dataset("cifar10-dvs", tmp_path, "train", T=5, train_fraction=0.7)   # int(0.7*3) = 2
    test = dataset("cifar10-dvs", tmp_path, "test", T=5, train_fraction=0.7)
    assert len(train) == 20 and len(test) == 10
    assert [str(p) for p, _, _ in test.samples] == [str(p) for p, _, _ in written[2::3]]
    for i, (_, label, ev) in enumerate(written[2::3]):
        x, y = test[i]
        assert y == label and x.shape == (5, 2, 128, 128)
        assert torch.equal(x, tonic_frames(ev, (128, 128, 2), 5))


def test_dvs_gesture_windows_labels_and_frames(tmp_path):
    written = write_dvs_gesture(tmp_path / "DvsGesture")
    for split in ("train", "test"):
        ds = dataset("dvs-gesture", tmp_path, split, T=4)    # parent of DvsGesture/ works too
        assert len(ds) == len(written[split])
        for i, (label, ev) in enumerate(written[split]):
            x, y = ds[i]
            assert y == label and x.shape == (4, 2, 128, 128)
            assert torch.equal(x, tonic_frames(ev, (128, 128, 2), 4))
            assert x.sum() > 0


def test_aedat3_timestamp_overflow(tmp_path):
    from snnc.data.writers import write_aedat3
    from snnc.data.aedat import read_aedat3_polarity
    ev = {"x": np.array([1, 2, 3]), "y": np.array([4, 5, 6]), "p": np.array([0, 1, 1]),
          "t": np.array([5, 2 ** 31 + 7, 2 ** 31 + 9])}
    write_aedat3(tmp_path / "a.aedat", ev, per_packet=1)
    got = read_aedat3_polarity(tmp_path / "a.aedat")
    for k in "xytp":
        assert got[k].astype(np.int64).tolist() == ev[k].tolist()


def test_from_spec_names_a_folder(tmp_path):
    write_nmnist(tmp_path, per_class=1)
    ds = from_spec(f"NMNIST:{tmp_path}", split="test", T=3)
    assert len(ds) == 10 and ds[0][0].shape == (3, 2, 34, 34)
    assert len(from_spec("digits", "train")) > len(from_spec("digits", "test"))
    with pytest.raises(snnc.SnncError, match="NAME:ROOT"):
        from_spec("imagenet:/x")
    with pytest.raises(snnc.SnncError, match="give T"):
        from_spec(f"nmnist:{tmp_path}", "test")
