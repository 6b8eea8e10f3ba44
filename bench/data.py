"""Do the data loaders keep up with training? One JSON line per data set.

Writes synthetic folders in the published formats to a temp dir (N-MNIST: ~4000 events per
sample over 300 ms, like the real recordings; CIFAR-10 binary batches), then measures in one run:
  * loader samples/s (DataLoader, batch 64, main process, median of 3 passes): N-MNIST framed to
    T bins, cold and from the on-disk cache, plain and with tonic's Denoise; CIFAR-10 with
    crop+flip augmentation;
  * one training step of a matching net on the same batch (median of 3): the NIR paper's N-MNIST
    CNN as an snnc LIF SNN, and the zoo ``bench_net`` + linear head for CIFAR, each unrolled over
    T with atan surrogate gradients (``insert_surrogate``), SGD;
  * peer: framing time of tonic's ToFrame vs snnc's vectorised framing on the same events.
``loader_vs_train`` > 1 means the loader produces samples faster than one training step uses them.

    .venv/bin/python bench/data.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import snnc
from snnc.data import dataset, time_first, to_frames
from snnc.data.writers import write_cifar10, write_nmnist
from snnc.ops import LIF, DirectEncoder, Readout
from snnc.passes import insert_surrogate, unroll_timesteps
from snnc.zoo import bench_net


def nmnist_cnn():
    """The NIR paper's N-MNIST CNN shape (Conv 2-16 5x5/2, 16-16, pool, 16-8, pool, 128-256-10), LIF."""
    return nn.Sequential(
        nn.Conv2d(2, 16, 5, stride=2, padding=1), LIF(tau=2.0), nn.Conv2d(16, 16, 3, padding=1), LIF(tau=2.0),
        nn.AvgPool2d(2), nn.Conv2d(16, 8, 3, padding=1), LIF(tau=2.0), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(128, 256), LIF(tau=2.0), nn.Linear(256, 10), Readout("membrane"))


def cifar_snn(channels):
    """zoo.bench_net (3x3 conv + LIF layers) with direct encoding and a pooled linear head."""
    return nn.Sequential(DirectEncoder(), *bench_net(channels), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels[-1], 10), Readout("membrane"))


def trainable(net, example, T):
    """The training graph: traced, unrolled over T, atan surrogate gradients (Fang 2021)."""
    return insert_surrogate(unroll_timesteps(snnc.trace(net, example), T=T), "atan")


def train_step_seconds(graph, x, y, repeats=3):
    opt = torch.optim.SGD(graph.parameters(), lr=1e-3)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        snnc.reset(graph)
        nn.functional.cross_entropy(graph(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def loader_rate(ds, batch, repeats=3):
    """Median samples/s of ``repeats`` shuffled passes over ``ds``."""
    ds[0]   # imports (tonic: ~3 s) and first-file costs stay out of the rate
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = sum(len(y) for _, y in DataLoader(ds, batch_size=batch, shuffle=True))
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def bench_nmnist(tmp: Path, n_per_class: int, T: int, batch: int):
    written = write_nmnist(tmp / "nmnist", per_class=n_per_class, events=4000)
    train = dataset("nmnist", tmp / "nmnist", "train", T=T)
    cold = loader_rate(train, batch)
    cached = dataset("nmnist", tmp / "nmnist", "train", T=T, cache_dir=tmp / "cache")
    loader_rate(cached, batch, repeats=1)           # fills the cache
    warm = loader_rate(cached, batch)
    # tonic's Denoise loops over events in Python: the case the cache is for
    denoised = dataset("nmnist", tmp / "nmnist", "train", T=T, denoise_us=5000, cache_dir=tmp / "cache")
    denoise_cold = loader_rate(denoised, batch, repeats=1)
    denoise_warm = loader_rate(denoised, batch)
    x, y = next(iter(DataLoader(train, batch_size=batch)))
    g = trainable(nmnist_cnn(), torch.zeros(batch, 2, 34, 34), T)
    step = train_step_seconds(g, time_first(x), y)
    # peer: tonic's ToFrame on the same events (numpy structured array, tonic's layout)
    from tonic.transforms import ToFrame
    events = [train.events(i) for i in range(min(len(train), 64))]
    to_frame = ToFrame(sensor_size=(34, 34, 2), n_time_bins=T)
    t0 = time.perf_counter()
    ref = [to_frame(e) for e in events]
    t_tonic = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = [to_frames(e, (34, 34, 2), T) for e in events]
    t_snnc = time.perf_counter() - t0
    assert all(np.array_equal(r, o.numpy()) for r, o in zip(ref, ours))
    return {"bench": "data", "dataset": "nmnist", "samples": len(written["train"]), "T": T, "batch": batch,
            "events_per_sample": 4000, "loader_samples_per_s": round(cold, 1),
            "loader_cached_samples_per_s": round(warm, 1), "train_step_s": round(step, 4),
            "train_samples_per_s": round(batch / step, 1), "loader_vs_train": round(cold * step / batch, 2),
            "cached_loader_vs_train": round(warm * step / batch, 2),
            "denoise_loader_samples_per_s": round(denoise_cold, 1),
            "denoise_cached_samples_per_s": round(denoise_warm, 1),
            "framing_speedup_vs_tonic_ToFrame": round(t_tonic / t_snnc, 2)}


def bench_cifar(tmp: Path, per_batch: int, T: int, batch: int, channels):
    write_cifar10(tmp / "cifar", per_batch=per_batch, binary=True)
    train = dataset("cifar10", tmp / "cifar", "train", augment=True)
    rate = loader_rate(train, batch)
    x, y = next(iter(DataLoader(train, batch_size=batch)))
    g = trainable(cifar_snn(channels), torch.zeros(batch, 3, 32, 32), T)
    step = train_step_seconds(g, x, y)
    return {"bench": "data", "dataset": "cifar10", "samples": len(train), "T": T, "batch": batch,
            "net": f"bench_net{tuple(channels)}+head", "augment": "crop4+flip",
            "loader_samples_per_s": round(rate, 1), "train_step_s": round(step, 4),
            "train_samples_per_s": round(batch / step, 1), "loader_vs_train": round(rate * step / batch, 2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer samples and a narrower CIFAR net")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_per_class, per_batch = (13, 100) if args.quick else (64, 1000)
        channels = (3, 16, 32, 32) if args.quick else (3, 64, 128, 128)
        print(json.dumps(bench_nmnist(tmp, n_per_class, T=8 if args.quick else 16, batch=64)), flush=True)
        print(json.dumps(bench_cifar(tmp, per_batch, T=4, batch=64, channels=channels)), flush=True)


if __name__ == "__main__":
    main()
