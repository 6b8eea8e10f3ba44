"""Missing folders and corrupt files give one clear SnncError naming the folder or file, and the
data folder is byte-for-byte unchanged afterwards (nothing created, moved or deleted)."""
import os
import pickle
import re

import numpy as np
import pytest

from snnc.data import dataset
from snnc.data.writers import (encode_nmnist, folder_digest, write_cifar10, write_cifar10_dvs, write_dvs_gesture,
                               write_mnist, write_nmnist)
from snnc.errors import FileFormatError, InputError

pytest.importorskip("tonic")


def raises_untouched(root, match, fn, error=FileFormatError):
    """``fn()`` raises ``error`` matching ``match`` and leaves every file under ``root`` as it was."""
    before = folder_digest(root) if root.exists() else None
    with pytest.raises(error, match=match) as info:
        fn()
    after = folder_digest(root) if root.exists() else None
    assert before == after
    return str(info.value)


@pytest.mark.parametrize("name,published", [("mnist", "lecun"), ("cifar10", "toronto"),
                                            ("nmnist", "n-mnist"), ("cifar10-dvs", "figshare"),
                                            ("dvs-gesture", "dvsgesture")])
def test_missing_folder_names_folder_layout_and_source(tmp_path, name, published):
    missing = tmp_path / "nothing_here"
    msg = raises_untouched(tmp_path, "does not exist", lambda: dataset(name, missing, T=4))
    assert str(missing) in msg and "Expected:" in msg and published in msg.lower()
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    raises_untouched(empty, "incomplete|Missing", lambda: dataset(name, empty, T=4))


def test_incomplete_folders_list_what_is_missing(tmp_path):
    write_nmnist(tmp_path / "n", per_class=1)
    for f in (tmp_path / "n" / "Test" / "5").iterdir():
        f.unlink()
    msg = raises_untouched(tmp_path, "incomplete", lambda: dataset("nmnist", tmp_path / "n", "test", T=2))
    assert "5/" in msg and "Train/0" in msg

    write_mnist(tmp_path / "m")
    (tmp_path / "m" / "t10k-labels-idx1-ubyte").unlink()
    assert len(dataset("mnist", tmp_path / "m", "train")) == 12         # train split is complete
    raises_untouched(tmp_path, "t10k-labels-idx1-ubyte", lambda: dataset("mnist", tmp_path / "m", "test"))

    write_cifar10(tmp_path / "c")
    (tmp_path / "c" / "cifar-10-batches-py" / "data_batch_3").unlink()
    raises_untouched(tmp_path, "data_batch_3", lambda: dataset("cifar10", tmp_path / "c"))

    write_dvs_gesture(tmp_path / "g")
    (tmp_path / "g" / "user02_lab_labels.csv").unlink()
    raises_untouched(tmp_path, "user02_lab_labels.csv", lambda: dataset("dvs-gesture", tmp_path / "g"))

    write_cifar10_dvs(tmp_path / "d", per_class=1)
    for f in (tmp_path / "d" / "frog").iterdir():
        f.unlink()
    raises_untouched(tmp_path, "frog/", lambda: dataset("cifar10-dvs", tmp_path / "d"))


def test_truncated_event_files_name_the_file(tmp_path):
    written = write_nmnist(tmp_path, per_class=1)
    path = written["test"][4][0]
    path.write_bytes(path.read_bytes()[:-2])
    ds = dataset("nmnist", tmp_path, "test", T=3)
    msg = raises_untouched(tmp_path, "not a multiple of 5", lambda: ds[4])
    assert str(path) in msg

    aedat = write_cifar10_dvs(tmp_path / "dvs", per_class=1)[6][0]
    aedat.write_bytes(aedat.read_bytes()[:-3])
    ds = dataset("cifar10-dvs", tmp_path / "dvs", "test", T=3, train_fraction=0.5)
    raises_untouched(tmp_path, re.escape(str(aedat)) + ".*multiple of 8", lambda: ds[6])

    written = write_dvs_gesture(tmp_path / "g")
    trial = tmp_path / "g" / "user24_led.aedat"
    trial.write_bytes(trial.read_bytes()[:-5])
    ds = dataset("dvs-gesture", tmp_path / "g", "test", T=3)
    raises_untouched(tmp_path, re.escape(str(trial)) + ".*past the end", lambda: ds[0])


def test_file_removed_after_listing(tmp_path):
    written = write_nmnist(tmp_path / "n", per_class=1)
    ds = dataset("nmnist", tmp_path / "n", "test", T=2, cache_dir=tmp_path / "c")
    gone = written["test"][2][0]
    gone.unlink()
    raises_untouched(tmp_path / "n", re.escape(str(gone)) + ": listed when the data set was built", lambda: ds[2])


def test_not_an_aedat_file(tmp_path):
    write_cifar10_dvs(tmp_path, per_class=1)
    victim = tmp_path / "cat" / "cifar10_cat_0.aedat"
    victim.write_bytes(b"\x00\x01" * 40)
    ds = dataset("cifar10-dvs", tmp_path, "test", T=3, train_fraction=0.5)
    raises_untouched(tmp_path, re.escape(str(victim)) + ": not an AEDAT file", lambda: ds[3])


def test_events_outside_the_sensor(tmp_path):
    write_nmnist(tmp_path, per_class=1)
    bad = tmp_path / "Test" / "0" / "00000.bin"
    ev = {"x": np.array([3, 40]), "y": np.array([1, 2]), "t": np.array([0, 9]), "p": np.array([0, 1])}
    bad.write_bytes(encode_nmnist(ev))
    ds = dataset("nmnist", tmp_path, "test", T=2)
    raises_untouched(tmp_path, re.escape(str(bad)) + ".*x=40.*34x34", lambda: ds[0])


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx(tmp_path, gz):
    write_mnist(tmp_path, gz=gz)
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) - 50])
    match = "not a readable gzip" if gz else "truncated"
    msg = raises_untouched(tmp_path, match, lambda: dataset("mnist", tmp_path))
    assert str(path) in msg


def test_idx_with_wrong_magic(tmp_path):
    write_mnist(tmp_path)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    images = tmp_path / "t10k-images-idx3-ubyte"
    labels.write_bytes(images.read_bytes())   # an image file where labels should be
    raises_untouched(tmp_path, re.escape(str(labels)) + ": not an idx file", lambda: dataset("mnist", tmp_path, "test"))


def test_labels_out_of_range(tmp_path):
    write_mnist(tmp_path / "m")
    lab = tmp_path / "m" / "train-labels-idx1-ubyte"
    blob = bytearray(lab.read_bytes())
    blob[8 + 3] = 12
    lab.write_bytes(bytes(blob))
    raises_untouched(tmp_path, re.escape(str(lab)) + ": label 12 of sample 3 is out of range",
                     lambda: dataset("mnist", tmp_path / "m"))

    write_cifar10(tmp_path / "c", binary=True)
    b = tmp_path / "c" / "cifar-10-batches-bin" / "test_batch.bin"
    blob = bytearray(b.read_bytes())
    blob[3073] = 10
    b.write_bytes(bytes(blob))
    raises_untouched(tmp_path, re.escape(str(b)) + ": label 10 of sample 1", lambda: dataset("cifar10", tmp_path / "c", "test"))

    write_nmnist(tmp_path / "n", per_class=1)
    (tmp_path / "n" / "Train" / "10").mkdir()
    raises_untouched(tmp_path, "label 10 is out of range", lambda: dataset("nmnist", tmp_path / "n", T=2))

    write_dvs_gesture(tmp_path / "g")
    csv = tmp_path / "g" / "user01_fluorescent_labels.csv"
    csv.write_text(csv.read_text().replace("\n", "\n12,5,9\n", 1))
    raises_untouched(tmp_path, re.escape(str(csv)) + ", line 2: label 12 is out of range",
                     lambda: dataset("dvs-gesture", tmp_path / "g"))
    csv.write_text("1,5,9\n")
    raises_untouched(tmp_path, re.escape(str(csv)) + ": expected a header", lambda: dataset("dvs-gesture", tmp_path / "g"))
    csv.write_text("class,startTime_usec,endTime_usec\n3,5\n")
    raises_untouched(tmp_path, re.escape(str(csv)) + ", line 2: '3,5' is not", lambda: dataset("dvs-gesture", tmp_path / "g"))


def test_cifar_truncated_or_hostile_batches(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    blob = batch.read_bytes()
    batch.write_bytes(blob[: len(blob) // 2])
    raises_untouched(tmp_path, re.escape(str(batch)) + ": not a readable CIFAR-10 python batch",
                     lambda: dataset("cifar10", tmp_path))
    batch.write_bytes(pickle.dumps({b"data": os.system}))     # a pickle naming a global to call
    raises_untouched(tmp_path, "refusing to load global", lambda: dataset("cifar10", tmp_path))

    write_cifar10(tmp_path / "b", binary=True)
    binb = tmp_path / "b" / "cifar-10-batches-bin" / "data_batch_5.bin"
    binb.write_bytes(binb.read_bytes()[:-1])
    raises_untouched(tmp_path, re.escape(str(binb)) + ".*multiple of 3073", lambda: dataset("cifar10", tmp_path / "b"))


def test_bad_arguments(tmp_path):
    write_nmnist(tmp_path / "n", per_class=1)
    raises_untouched(tmp_path, "inside the data folder",
                     lambda: dataset("nmnist", tmp_path / "n", T=2, cache_dir=tmp_path / "n" / "cache"), InputError)
    raises_untouched(tmp_path, "split must be", lambda: dataset("nmnist", tmp_path / "n", "val"), InputError)
    raises_untouched(tmp_path, "unknown option", lambda: dataset("nmnist", tmp_path / "n", T=2, bins=3), InputError)
    raises_untouched(tmp_path, r"mnist: unknown option\(s\) \['cache_dir'\]; known: \['normalize', 'transform'\]",
                     lambda: dataset("mnist", tmp_path, cache_dir=tmp_path / "c"), InputError)
    raises_untouched(tmp_path, "T must be", lambda: dataset("nmnist", tmp_path / "n", T=0), InputError)
    raises_untouched(tmp_path, "unknown data set", lambda: dataset("imagenet", tmp_path), InputError)
    raises_untouched(tmp_path, "needs root", lambda: dataset("mnist", None), InputError)
