"""AEDAT event files: 2.0 (jAER, CIFAR10-DVS) and 3.1 (cAER, DVS128 Gesture), 128x128 DVS.

The ASCII header is parsed by ``tonic.io.read_aedat_header_from_file`` and 2.0 data by
``tonic.io.get_aer_events_from_file`` (pairs of big-endian uint32 address, timestamp), decoded
with the bit layout of ``tonic.io.read_dvs_128`` (x bits 8-14, y bits 1-7, polarity bit 0).
tonic's ``read_dvs_128``/``read_dvs_ibm`` themselves cannot be called in tonic 1.7 (they unpack
two of the header reader's three values), and its 3.x reader takes every packet to be 8-byte
polarity events; DVS Gesture files also hold special-event packets, so 3.1 packets are walked
here: 28-byte header (int16 type, int16 source, int32 event size, int32 timestamp offset, int32
timestamp overflow, int32 capacity, int32 number, int32 valid), then ``capacity * size`` bytes.
Only type-1 (polarity) packets are kept; a polarity event is uint32 data (bit 0 valid, bit 1
polarity, y bits 2-16, x bits 17-31) and int32 timestamp, extended by ``overflow << 31``.
One loop step per packet (thousands per file), vectorised within a packet.
"""
from __future__ import annotations

import struct

import numpy as np

from ..errors import FileFormatError
from .framing import make_events

_PACKET_HEADER = struct.Struct("<hhiiiiii")
_POLARITY_EVENT = 1


def _tonic_io():
    try:
        import tonic.io
    except ImportError:
        raise FileFormatError("reading event files needs tonic: `pip install tonic` (the plain "
                              "package; tonic[torch] pulls torchvision and another torch)") from None
    return tonic.io


def aedat_header(path):
    """``(version, data_start)`` of an .aedat file, via tonic's header reader."""
    io = _tonic_io()
    try:
        version, start, _ = io.read_aedat_header_from_file(str(path))
    except (UnboundLocalError, ValueError, IndexError, OSError) as e:
        raise FileFormatError(f"{path}: not an AEDAT file: its ASCII header lacks a readable "
                              f"'#!AER-DAT<version>' line ({type(e).__name__}: {e})") from None
    return version, start


def read_aedat2_dvs128(path) -> np.ndarray:
    """Events of an AEDAT 2.0 DVS128 recording (CIFAR10-DVS) in tonic's layout."""
    version, start = aedat_header(path)
    if not 2 <= version < 3:
        raise FileFormatError(f"{path}: AEDAT version {version}, expected 2.0 (jAER DVS128 recording)")
    size = path.stat().st_size - start
    if size % 8:
        raise FileFormatError(f"{path}: AEDAT 2.0 data is {size} bytes, not a multiple of 8 "
                              "(address, timestamp pairs): the file is truncated")
    raw = _tonic_io().get_aer_events_from_file(str(path), version, start)
    addr, t = raw["address"], raw["timeStamp"]
    return make_events((addr >> 8) & 0x7F, (addr >> 1) & 0x7F, t.astype(np.int64), addr & 1)


def read_aedat3_polarity(path) -> np.ndarray:
    """Polarity events of an AEDAT 3.x recording (DVS128 Gesture) in tonic's layout."""
    version, start = aedat_header(path)
    if not 3 <= version < 4:
        raise FileFormatError(f"{path}: AEDAT version {version}, expected 3.x (cAER recording)")
    blob = path.read_bytes()
    pos, chunks = start, []
    while pos < len(blob):
        if pos + _PACKET_HEADER.size > len(blob):
            raise FileFormatError(f"{path}: truncated AEDAT 3 packet header at byte {pos}")
        kind, _, size, _, overflow, capacity, _, _ = _PACKET_HEADER.unpack_from(blob, pos)
        pos += _PACKET_HEADER.size
        end = pos + capacity * size
        if size <= 0 or capacity < 0 or end > len(blob):
            raise FileFormatError(f"{path}: AEDAT 3 packet at byte {pos - 28} claims {capacity} "
                                  f"events of {size} bytes, past the end of the file or impossible "
                                  "(truncated or corrupt)")
        if kind == _POLARITY_EVENT:
            if size != 8:
                raise FileFormatError(f"{path}: polarity packet with {size}-byte events, expected 8")
            ev = np.frombuffer(blob, dtype="<u4", count=2 * capacity, offset=pos).reshape(-1, 2)
            data = ev[:, 0][ev[:, 0] & 1 == 1]
            ts = ev[:, 1][ev[:, 0] & 1 == 1].astype(np.int64) | (np.int64(overflow) << 31)
            chunks.append((data, ts))
        pos = end
    if not chunks:
        return make_events(*(np.zeros(0, np.int64),) * 4)
    data = np.concatenate([c[0] for c in chunks])
    t = np.concatenate([c[1] for c in chunks])
    return make_events((data >> 17) & 0x7FFF, (data >> 2) & 0x7FFF, t, (data >> 1) & 1)
