"""Events -> frames, vectorised, equal to ``tonic.transforms.ToFrame(sensor_size, n_time_bins=T)``.

tonic's ToFrame (n_time_bins, overlap 0) cuts ``[t0, t0 + T*w)`` into T windows of width
``w = (t_last - t0) // T`` (floor division, so the last events can fall past the last window and
are dropped, and a recording shorter than T time units gives T empty frames), finds each window's
events with ``searchsorted`` on the (sorted) timestamps, and counts events per (polarity, y, x).
tonic then loops over windows with ``np.add.at``; here one ``bincount`` over the flat index
(bin, p, y, x) does all windows at once. The window bounds are computed with tonic's own
expressions so the result is equal, not just close. (One deliberate difference: for a sample
with no events tonic returns zeros shaped ``[T, P, W, H]``; here it is ``[T, P, H, W]`` always.)
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import FileFormatError

# tonic's event layout (tonic.io.events_struct): every reader here returns this dtype
EVENT_DTYPE = np.dtype([("x", np.int16), ("y", np.int16), ("t", np.int64), ("p", bool)])


def make_events(x, y, t, p) -> np.ndarray:
    """A structured event array in tonic's layout from four equal-length arrays."""
    ev = np.empty(len(t), dtype=EVENT_DTYPE)
    ev["x"], ev["y"], ev["t"], ev["p"] = x, y, t, p
    return ev


def _bin_edges(t: np.ndarray, n_bins: int):
    # tonic.slicers.SliceByTimeBins.get_slice_metadata with overlap=0, same expressions
    time_window = (t[-1] - t[0]) // n_bins * (1 + 0)
    stride = time_window * (1 - 0)
    starts = np.arange(n_bins) * stride + t[0]
    ends = starts + time_window
    return np.searchsorted(t, starts), np.searchsorted(t, ends)


def to_frames(events: np.ndarray, sensor_size, T: int, source="events") -> torch.Tensor:
    """Frames ``[T, P, H, W]`` float32 of event counts; ``sensor_size`` is tonic's ``(W, H, P)``.

    ``source`` (a file name) is only used in the error for events outside the sensor.
    """
    W, H, P = sensor_size
    if T is None or int(T) < 1:
        raise ValueError(f"T must be a positive number of frames, got {T!r}")
    T = int(T)
    if len(events) == 0:
        return torch.zeros(T, P, H, W)
    x = events["x"].astype(np.int64)
    y = events["y"].astype(np.int64)
    p = events["p"].astype(np.int64) if P > 1 else np.zeros(len(events), np.int64)
    bad = (x < 0) | (x >= W) | (y < 0) | (y >= H) | (p < 0) | (p >= P)
    if bad.any():
        i = int(np.argmax(bad))
        raise FileFormatError(f"{source}: event {i} at x={x[i]}, y={y[i]}, p={p[i]} lies outside the "
                              f"{W}x{H} sensor with {P} polarities")
    start, end = _bin_edges(events["t"], T)
    lengths = np.maximum(end - start, 0)
    # event indices of every window, concatenated: window b holds start[b] .. end[b]-1
    offsets = np.repeat(start - (np.cumsum(lengths) - lengths), lengths)
    idx = np.arange(int(lengths.sum())) + offsets
    b = np.repeat(np.arange(T), lengths)
    flat = ((b * P + p[idx]) * H + y[idx]) * W + x[idx]
    counts = np.bincount(flat, minlength=T * P * H * W)
    # tonic accumulates in int16; counts above 32767 per pixel and window would wrap there
    return torch.from_numpy(counts.astype(np.float32).reshape(T, P, H, W))


def collate_time_first(batch):
    """DataLoader ``collate_fn`` for frame samples: ``(x [T, N, ...], labels [N])``."""
    from torch.utils.data import default_collate
    x, y = default_collate(batch)
    return time_first(x), y


def time_first(x: torch.Tensor) -> torch.Tensor:
    """A batch of frames ``[N, T, ...]`` (what a DataLoader stacks) as ``[T, N, ...]`` (what
    ``snnc.run`` and unrolled graphs take)."""
    return x.transpose(0, 1).contiguous()
