"""Target ``tvm:int``: the integer IR compiled with TVM, as ``llvm`` machine code or ``c`` source.

``snnc.compile(gm, target="tvm:int", codegen="llvm" | "c")`` lowers a ``quantize_integer`` graph
with ``tvm_int_lower`` (one integer TIR kernel per layer, a host plan), builds it with
``tvm.compile`` and loads the library. With ``codegen="c"`` TVM's C code generator writes the
kernels as C (``m.c_source``; a test scans it: no float or double anywhere), and that C file is
compiled by TVM's ``export_library`` (the system C compiler) into the library that runs, so the
outputs checked against the reference come from exactly the exported source.

Outputs are bit-exact against the integer reference (``snnc.run`` on the same graph): same
spikes, same int32 readout sums. Inputs are the integer graph's int8 input
(float inputs are quantized on the host with the graph's input scale: ``m.quantize_input``,
the same as ``snnc.passes.quantize_integer.quantize_input``); any batch size.
A float unrolled graph is quantized first: ``snnc.compile(g, "tvm:int", weight_bits=8,
state_bits=24, leak="shift", ...)`` passes the options to ``quantize_integer``.

``export(path)`` writes one tar: ``manifest.json`` (plan, codegen, integer metadata),
``params/<name>.npy`` (int8 weights, int32 biases and per-channel constants),
``kernels.so`` (the built library), ``kernels.tir.py`` (the TIR module as TVMScript) and, for ``codegen="c"``,
``kernels.c``. ``snnc.load(path)`` needs neither the Python model nor a compiler.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile

import numpy as np
import torch

from snnc.compiled import CompiledModule, output_meaning
from snnc.errors import FileFormatError, SnncError
from snnc.ir import graph_spec

from .tvm_build import build_kernels
from .tvm_int_lower import lower, shape_at

CODEGENS = ("llvm", "c")


def _build(mod, codegen: str, workdir: str):
    """Build the kernels (``tvm_build.build_kernels``, shared with the float targets) and write
    ``kernels.so`` (and ``kernels.c``, the source it was compiled from) into ``workdir``."""
    ex = build_kernels({str(gv.name_hint): f for gv, f in mod.functions.items()}, {"kind": codegen})
    c_source = ex.mod.inspect_source() if codegen == "c" else None
    if c_source is not None:
        with open(os.path.join(workdir, "kernels.c"), "w") as f:
            f.write(c_source)
    ex.export_library(os.path.join(workdir, "kernels.so"))
    return c_source


class IntModule(CompiledModule):
    def __init__(self, spec, plan, params, library_bytes, tir_source, c_source, codegen, meta):
        super().__init__("tvm:int", spec, meta)
        import tvm
        self.plan, self.params, self.codegen = plan, params, codegen
        self.tir_source, self.c_source, self._library = tir_source, c_source, library_bytes
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "kernels.so")
            with open(path, "wb") as f:
                f.write(library_bytes)
            self.lib = tvm.runtime.load_module(path)
        self.kernels = {st["kernel"]: self.lib[st["kernel"]] for st in plan["steps"] if st["op"] == "kernel"}

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Float input -> the int8 input this module takes (``quantize_integer.quantize_input``)."""
        meta = self.meta["integer"]
        q = 2 ** (meta["input_bits"] - 1) - 1
        return torch.round(x.double() / meta["input_scale"]).clamp(-q, q).to(torch.int8)

    def __call__(self, *inputs):
        """Run on int8 inputs; float inputs are quantized first with the graph's input scale
        (host side, ``quantize_input``), so ``snnc run`` can feed data sets as they are."""
        return super().__call__(*(self.quantize_input(x) if isinstance(x, torch.Tensor) and x.is_floating_point()
                                  else x for x in inputs))

    def forward(self, *inputs):
        n = inputs[0].shape[1 if self.plan["layout"] == "seq" else 0]
        env = {name: x.contiguous() for name, x in zip(self.plan["inputs"], inputs)}
        for st in self.plan["steps"]:
            if st["op"] == "view":
                env[st["out"]] = env[st["src"]].reshape(shape_at(st["out_shape"], n))
            elif st["op"] == "cast":
                env[st["out"]] = env[st["src"]].to(getattr(torch, st["dtype"]))
            elif st["op"] == "broadcast":
                src = env[st["src"]]
                env[st["out"]] = src.unsqueeze(0).expand(st["T"], *src.shape).contiguous()
            else:
                args = [env[v].reshape(shape_at(s, n)) for v, s in st["args"]]
                out = torch.empty(shape_at(st["out_kernel_shape"], n), dtype=getattr(torch, st["dtype"]))
                self.kernels[st["kernel"]](*args, *[self.params[p] for p in st["params"]], out)
                env[st["out"]] = out.reshape(shape_at(st["out_shape"], n))
        return env[self.plan["output"]].to(getattr(torch, self.plan["output_dtype"]))  # int32 spikes -> int8

    def _write(self, path):
        manifest = {"format": "snnc-tvm-int", "version": 1, "codegen": self.codegen, "plan": self.plan,
                    "params": sorted(self.params)}
        files = {"manifest.json": json.dumps(manifest, indent=1).encode(), "kernels.so": self._library,
                 "kernels.tir.py": self.tir_source.encode()}
        if self.c_source is not None:
            files["kernels.c"] = self.c_source.encode()
        for name, t in self.params.items():
            buf = io.BytesIO()
            np.save(buf, t.numpy(), allow_pickle=False)
            files[f"params/{name}.npy"] = buf.getvalue()
        with tarfile.open(path, "w") as tar:
            for name, data in files.items():
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))


def compile(gm, target="tvm:int", codegen: str = "llvm", weight_bits: int | None = None, **quantize_options):
    """Compile integer IR ``gm``; a float (unrolled) graph is first quantized with
    ``quantize_integer(gm, weight_bits=weight_bits or 8, **quantize_options)``."""
    if codegen not in CODEGENS:
        raise SnncError(f"tvm:int: codegen={codegen!r}: expected one of {CODEGENS}")
    integer = getattr(gm, "snnc_integer", None)
    if integer is None:
        from snnc.passes.quantize_integer import quantize_integer
        gm = quantize_integer(gm, weight_bits=weight_bits or 8, **quantize_options)
    elif quantize_options or weight_bits not in (None, integer["weight_bits"]):
        raise SnncError(f"tvm:int: the graph is already integer IR ({integer['weight_bits']}-bit weights); "
                        f"quantize options {sorted(quantize_options) or ['weight_bits']} do not apply")
    mod, plan, params = lower(gm, codegen)
    source = mod.script()
    with tempfile.TemporaryDirectory() as d:
        c_source = _build(mod, codegen, d)
        with open(os.path.join(d, "kernels.so"), "rb") as f:
            library = f.read()
    meta = {"output": output_meaning(gm), "codegen": codegen, "integer": dict(gm.snnc_integer)}
    params = {k: v.detach().clone().contiguous() for k, v in params.items()}
    return IntModule(graph_spec(gm), plan, params, library, source, c_source, codegen, meta)


def load(path, meta):
    try:
        with tarfile.open(path, "r:") as tar:  # "r:": never decompress (a gzip bomb grows 300x)
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        manifest = json.loads(files["manifest.json"])
        params = {name: torch.from_numpy(np.load(io.BytesIO(files[f"params/{name}.npy"]), allow_pickle=False))
                  for name in manifest["params"]}
        library, tir = files["kernels.so"], files["kernels.tir.py"].decode()
    except (tarfile.TarError, KeyError, ValueError, json.JSONDecodeError, EOFError, OSError) as e:
        raise FileFormatError(f"{path} is not a readable tvm:int artefact (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None
    if manifest.get("format") != "snnc-tvm-int":
        raise FileFormatError(f"{path}: manifest.json is not a tvm:int manifest")
    c_source = files["kernels.c"].decode() if "kernels.c" in files else None
    return IntModule(CompiledModule.spec_from_meta(meta), manifest["plan"], params, library, tir, c_source,
                     manifest["codegen"], meta)
