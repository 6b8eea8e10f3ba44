"""snnc's vectorised framing equals tonic.transforms.ToFrame(sensor_size, n_time_bins=T) exactly,
including its edge cases (events past the last window, recordings shorter than T us, one event)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from snnc.data import time_first, to_frames
from snnc.data.framing import make_events
from snnc.errors import FileFormatError

tonic = pytest.importorskip("tonic")
from tonic.transforms import ToFrame  # noqa: E402


def reference(ev, sensor_size, T):
    return torch.from_numpy(ToFrame(sensor_size=sensor_size, n_time_bins=T)(ev.copy()).astype(np.float32))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 200), T=st.integers(1, 9), t_max=st.sampled_from([1, 5, 17, 1000, 300_000]),
       seed=st.integers(0, 2 ** 16))
def test_equals_tonic_to_frame(n, T, t_max, seed):
    rng = np.random.default_rng(seed)
    ev = make_events(rng.integers(0, 6, n), rng.integers(0, 5, n), np.sort(rng.integers(0, t_max, n)),
                     rng.integers(0, 2, n))
    got = to_frames(ev, (6, 5, 2), T)
    assert got.shape == (T, 2, 5, 6) and got.dtype == torch.float32
    ref = reference(ev, (6, 5, 2), T)
    if n == 0:   # tonic returns zeros of shape [T, P, W, H] for no events; snnc keeps [T, P, H, W]
        assert ref.shape == (T, 2, 6, 5) and not ref.any() and not got.any()
    else:
        assert torch.equal(got, ref)


def test_counts_and_bins_by_hand():
    # t0 = 0, t_last = 10, T = 2: window = 10 // 2 = 5, bins [0, 5) and [5, 10); t = 10 is dropped
    ev = make_events([0, 1, 1, 2], [0, 0, 0, 1], [0, 4, 5, 10], [1, 0, 0, 1])
    f = to_frames(ev, (3, 2, 2), 2)
    assert f[0, 1, 0, 0] == 1 and f[0, 0, 0, 1] == 1 and f[1, 0, 0, 1] == 1
    assert f.sum() == 3


def test_outside_sensor_and_bad_T():
    ev = make_events([0, 7], [0, 0], [0, 1], [0, 0])
    with pytest.raises(FileFormatError, match="rec.bin: event 1 at x=7"):
        to_frames(ev, (7, 7, 2), 2, source="rec.bin")
    with pytest.raises(ValueError, match="positive"):
        to_frames(ev, (8, 8, 2), 0)


def test_time_first():
    x = torch.arange(24.).view(2, 3, 4)
    assert torch.equal(time_first(x)[1, 0], x[0, 1])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 80), T=st.integers(1, 6), seed=st.integers(0, 2 ** 16))
def test_unsorted_timestamps_follow_tonic_too(n, T, seed):
    # tonic assumes sorted timestamps and bins with searchsorted; snnc uses the same index ranges,
    # so even a file with out-of-order events frames identically
    rng = np.random.default_rng(seed)
    ev = make_events(rng.integers(0, 4, n), rng.integers(0, 4, n), rng.integers(0, 50, n), rng.integers(0, 2, n))
    assert torch.equal(to_frames(ev, (4, 4, 2), T), reference(ev, (4, 4, 2), T))
