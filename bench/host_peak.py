"""The host's float32 multiply-add peak, measured: the ceiling any float32 GEMM here can reach.

    .venv/bin/python bench/host_peak.py [--threads 1 2]

Why: a GEMM's achieved GFLOP/s only means something against what the cores can do. The vendor
number (cores x FMA units x lanes x clock) assumes a clock the host may not hold (turbo, a VM's
share of the socket); this times it instead. A small C loop (built with the system compiler,
``-march=native``) runs 16 independent chains of 16-lane float32 fused multiply-adds (more chains
than FMA latency x FMA units, so the units never wait), in one thread per core at once (ctypes
releases the GIL); ``peak = 2 * 16 * 16 * iterations * threads / wall seconds``, best of
``rounds``. A GEMM also loads and packs its operands, so ~85-90% of this is a very good GEMM.
Prints one JSON line per thread count; ``fp32_peak_gflops`` is what ``bench/open_neuromorphic.py``
reports as ``host_fp32_peak_gflops``.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

CHAINS, LANES = 16, 16
_SOURCE = r"""
#include <stdint.h>
typedef float v16 __attribute__((vector_size(64)));
float snnc_fma_peak(int64_t iters) {
    v16 a[16], m, c;
    for (int i = 0; i < 16; ++i) { m[i] = 0.999999f; c[i] = 1e-7f; }
    for (int k = 0; k < 16; ++k) for (int i = 0; i < 16; ++i) a[k][i] = 1.0f + k + i;
    for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
        for (int k = 0; k < 16; ++k) a[k] = a[k] * m + c;   /* one FMA each (-ffp-contract=fast) */
    }
    float s = 0.0f;
    for (int k = 0; k < 16; ++k) for (int i = 0; i < 16; ++i) s += a[k][i];
    return s;
}
"""
_lib = {}


def _load():
    if "lib" not in _lib:
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise OSError("no C compiler (cc/gcc) on PATH")
        folder = Path(tempfile.mkdtemp(prefix="snnc-peak-"))   # private (0700), ours only
        (folder / "peak.c").write_text(_SOURCE)
        subprocess.run([compiler, "-O2", "-march=native", "-ffp-contract=fast", "-fPIC", "-shared",
                        str(folder / "peak.c"), "-o", str(folder / "peak.so")], check=True, capture_output=True, timeout=120)
        lib = ctypes.CDLL(str(folder / "peak.so"))
        lib.snnc_fma_peak.argtypes, lib.snnc_fma_peak.restype = [ctypes.c_int64], ctypes.c_float
        shutil.rmtree(folder, ignore_errors=True)   # the library stays mapped
        _lib["lib"] = lib
    return _lib["lib"]


def fp32_peak_gflops(threads: int, iters: int = 20_000_000, rounds: int = 5) -> float:
    """Measured float32 FMA GFLOP/s of ``threads`` threads running at once (best of ``rounds``)."""
    lib = _load()
    best = float("inf")
    for _ in range(rounds):
        workers = [threading.Thread(target=lib.snnc_fma_peak, args=(iters,)) for _ in range(threads)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t0)
    return 2 * CHAINS * LANES * iters * threads / best / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    args = ap.parse_args(argv)
    for t in args.threads:
        if t < 1:
            ap.error(f"--threads: {t} is below 1")
        print(json.dumps({"bench": "host_peak", "threads": t, "fp32_peak_gflops": round(fp32_peak_gflops(t), 1)}), flush=True)


if __name__ == "__main__":
    main()
