"""Helpers shared by the hostile tests: a tiny SNN compiled for every target, a malicious
pickle and a malicious shared library whose only effect is to write a marker file."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading

import torch
from torch import nn

import snnc
from snnc.fileio import bundle_bytes, read_bundle
from snnc.ops import LIF, DirectEncoder, Readout
from snnc.passes import quantize_integer, unroll_timesteps

TARGETS = ("torch", "onnx", "tvm:llvm", "tvm:int")


def net(width=16):
    torch.manual_seed(0)
    return nn.Sequential(DirectEncoder(), nn.Linear(8, width), LIF(tau=2.0), nn.Linear(width, width), LIF(tau=2.0),
                         nn.Linear(width, 4), Readout()).eval()


def graph(batch=4, T=3, width=16):
    return unroll_timesteps(snnc.trace(net(width), torch.zeros(batch, 8)), T=T)


def compiled(target, batch=4, width=16, **options):
    g = graph(batch, width=width)
    if target == "tvm:int":
        g = quantize_integer(g, weight_bits=8)
    return snnc.compile(g, target=target, **options)


def inputs(n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 8, generator=gen) * 2


class Payload:
    """Unpickling this writes ``marker``: what a crafted model file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def evil_so(path, marker) -> bytes:
    """A shared library whose constructor writes ``marker`` when it is dlopen'ed."""
    src = path.with_suffix(".c")
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void pwn(void) {\n'
                   f'  FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("pwned", f); fclose(f); }}\n}}\n')
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(path), str(src)], check=True)
    return path.read_bytes()


def raw_bundle(meta: dict, files: dict) -> bytes:
    """A bundle written as-is: ``meta`` (with whatever ``files`` hashes it claims) and members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, blob in [("snnc.json", json.dumps(meta).encode()), *files.items()]:
            ti = tarfile.TarInfo(name)
            ti.size = len(blob)
            tar.addfile(ti, io.BytesIO(blob))
    return buf.getvalue()


def rebundle(path, edit_meta=None, artefact=None, keep_hashes=False):
    """Rewrite an export: new metadata and/or artefact bytes, hashes recomputed unless
    ``keep_hashes`` (then the old hashes describe bytes that are no longer there)."""
    meta, files = read_bundle(path)
    old = meta.pop("files")
    if edit_meta:
        edit_meta(meta)
    if artefact is not None:
        files = {meta.get("artefact", next(iter(files))): artefact}
    path.write_bytes(raw_bundle({**meta, "files": old}, files) if keep_hashes else bundle_bytes(meta, files))


def run_python(code: str, cwd=None, env_extra=None):
    env = None if env_extra is None else {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env)


def assert_threads_get_their_own_results(module, inputs, repeats=3):
    """``module`` called from one thread per input (``repeats`` times each, all at once) returns
    what it returns for that input alone: no shared buffer leaks one caller's result to another."""
    alone = [module(x) for x in inputs]
    got, errors = [None] * len(inputs), []

    def work(i):
        try:
            for _ in range(repeats):
                got[i] = module(inputs[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for a, b in zip(alone, got):
        assert torch.equal(a, b)
