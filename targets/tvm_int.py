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

Instruction set: with ``codegen="llvm"`` on a CPU with AVX-512 VNNI (``isa="auto"``, the default)
conv / linear layers whose input fits a byte run as int8 x uint8 -> int32 ``vpdpbusd`` kernels
(``tvm_int_vnni.py``) built for the host CPU; ``isa="portable"`` forces the plain integer loops
(any x86-64, and the only choice for ``codegen="c"``). ``m.meta["int8_isa"]`` says which ran.

``export(path)`` writes one tar: ``manifest.json`` (plan, codegen, ISA, integer metadata),
``params/<name>.npy`` (int8 weights, int32 biases and per-channel constants),
``kernels.so`` (the built library), ``kernels.tir.py`` (the TIR module as TVMScript) and, for ``codegen="c"``,
``kernels.c``. A VNNI module also writes the portable build under ``portable/`` (its manifest,
library and TIR; the parameters are shared), and ``snnc.load`` picks the VNNI library only when
the loading CPU has VNNI, so an artefact moved to an older CPU still runs (bit-identical).
``snnc.load(path)`` needs neither the Python model nor a compiler.
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
from snnc.errors import FileFormatError, SnncError, one_of
from snnc.ir import graph_spec

from .tvm_build import build_kernels, host_isa
from .tvm_int_vnni import ISA_FLAG, int8_isa
from .tvm_int_lower import lower, shape_at

CODEGENS = ("llvm", "c")


ISAS = ("auto", "portable", ISA_FLAG)


def _build(mod, codegen: str, workdir: str, isa: str | None = None):
    """Build the kernels (``tvm_build.build_kernels``, shared with the float targets) and write
    ``kernels.so`` (and ``kernels.c``, the source it was compiled from) into ``workdir``. VNNI
    kernels need the host CPU's features enabled in LLVM (``mcpu``)."""
    target = {"kind": codegen}
    if isa:
        target["mcpu"] = host_isa()["cpu"]
    ex = build_kernels({str(gv.name_hint): f for gv, f in mod.functions.items()}, target)
    c_source = ex.mod.inspect_source() if codegen == "c" else None
    if c_source is not None:
        with open(os.path.join(workdir, "kernels.c"), "w") as f:
            f.write(c_source)
    ex.export_library(os.path.join(workdir, "kernels.so"))
    return c_source


def _variant(gm, codegen: str, isa: str | None) -> dict:
    """Lower and build ``gm`` for one instruction set: plan, params, library bytes, sources."""
    mod, plan, params = lower(gm, codegen, isa)
    with tempfile.TemporaryDirectory() as d:
        c_source = _build(mod, codegen, d, isa)
        with open(os.path.join(d, "kernels.so"), "rb") as f:
            library = f.read()
    params = {k: v.detach().clone().contiguous() for k, v in params.items()}
    return {"plan": plan, "params": params, "library": library, "tir": mod.script(), "c": c_source}


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """``x`` contiguous at a 64-byte boundary: TIR buffers default to ``data_alignment=64``, so the
    VNNI kernels use aligned 64-byte vector loads, and tvm-ffi passes a torch pointer unchecked. An
    ``np.load``-ed parameter or a batch slice like ``x[3:]`` can start mid-line (SIGSEGV)."""
    x = x.contiguous()
    if x.data_ptr() % 64:
        x = x.clone(memory_format=torch.contiguous_format)
        if x.data_ptr() % 64:  # tiny tensors may come from a small-object pool
            buf = torch.empty(x.numel() * x.element_size() + 64, dtype=torch.uint8)
            off = (-buf.data_ptr()) % 64
            x = buf[off:off + x.numel() * x.element_size()].view(x.dtype).reshape(x.shape).copy_(x)
    return x


def _load_library(library_bytes):
    import tvm
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernels.so")
        with open(path, "wb") as f:
            f.write(library_bytes)
        return tvm.runtime.load_module(path)


class IntModule(CompiledModule):
    def __init__(self, spec, variant: dict, codegen, meta, portable=None):
        """``variant``: what runs here (``_variant``); ``portable``: the portable variant of a
        VNNI build, or a function making it (exported beside it so any CPU can load the file)."""
        super().__init__("tvm:int", spec, meta)
        self.plan, self.codegen = variant["plan"], codegen
        self.params = {k: _aligned(v) for k, v in variant["params"].items()}
        self.tir_source, self.c_source, self._library = variant["tir"], variant["c"], variant["library"]
        self._portable = portable
        self.lib = _load_library(self._library)
        self.kernels = {st["kernel"]: self.lib[st["kernel"]] for st in self.plan["steps"] if st["op"] == "kernel"}

    @property
    def isa(self) -> str:
        return self.plan.get("isa", "portable")

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
        env = {name: _aligned(x) for name, x in zip(self.plan["inputs"], inputs)}
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
                    "isa": self.isa, "params": sorted(self.params)}
        files = {"kernels.so": self._library, "kernels.tir.py": self.tir_source.encode()}
        params = dict(self.params)
        if self._portable is not None:
            if callable(self._portable):
                self._portable = self._portable()
            port = self._portable
            params.update(port["params"])
            manifest["portable"] = {"plan": port["plan"], "params": sorted(port["params"])}
            files.update({"portable/kernels.so": port["library"], "portable/kernels.tir.py": port["tir"].encode()})
        manifest["params"] = sorted(params)
        files["manifest.json"] = json.dumps(manifest, indent=1).encode()
        if self.c_source is not None:
            files["kernels.c"] = self.c_source.encode()
        for name, t in params.items():
            buf = io.BytesIO()
            np.save(buf, t.numpy(), allow_pickle=False)
            files[f"params/{name}.npy"] = buf.getvalue()
        with tarfile.open(path, "w") as tar:
            for name, data in files.items():
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))


def compile(gm, target="tvm:int", codegen: str = "llvm", weight_bits: int | None = None, isa: str = "auto",
            **quantize_options):
    """Compile integer IR ``gm``; a float (unrolled) graph is first quantized with
    ``quantize_integer(gm, weight_bits=weight_bits or 8, **quantize_options)``. ``isa``: "auto"
    (VNNI kernels where this CPU has them, llvm codegen), "portable", or "avx512_vnni" (an error
    on a CPU without it)."""
    one_of("tvm:int", "codegen", codegen, CODEGENS, SnncError)
    one_of("tvm:int", "isa", isa, ISAS, SnncError)
    if isa == ISA_FLAG and (codegen != "llvm" or int8_isa() is None):
        raise SnncError(f"tvm:int: isa={isa!r} needs codegen='llvm' on a CPU with {ISA_FLAG} "
                        f"(this one has: {', '.join(host_isa()['features']) or 'none of the AVX-512 features'})")
    integer = getattr(gm, "snnc_integer", None)
    if integer is None:
        from snnc.passes.quantize_integer import quantize_integer
        gm = quantize_integer(gm, weight_bits=weight_bits or 8, **quantize_options)
    elif quantize_options or weight_bits not in (None, integer["weight_bits"]):
        raise SnncError(f"tvm:int: the graph is already integer IR ({integer['weight_bits']}-bit weights); "
                        f"quantize options {sorted(quantize_options) or ['weight_bits']} do not apply")
    chosen = int8_isa() if isa == "auto" and codegen == "llvm" else (None if isa == "portable" else isa)
    variant = _variant(gm, codegen, chosen)
    meta = {"output": output_meaning(gm), "codegen": codegen, "integer": dict(gm.snnc_integer),
            "int8_isa": variant["plan"]["isa"]}
    portable = (lambda: _variant(gm, codegen, None)) if variant["plan"]["isa"] != "portable" else None
    return IntModule(graph_spec(gm), variant, codegen, meta, portable)


def load(path, meta):
    try:
        with tarfile.open(path, "r:") as tar:  # "r:": never decompress (a gzip bomb grows 300x)
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        manifest = json.loads(files["manifest.json"])
        params = {name: torch.from_numpy(np.load(io.BytesIO(files[f"params/{name}.npy"]), allow_pickle=False))
                  for name in manifest["params"]}
        variant = {"plan": manifest["plan"], "library": files["kernels.so"], "tir": files["kernels.tir.py"].decode()}
        portable = None
        if "portable" in manifest:
            portable = {"plan": manifest["portable"]["plan"], "library": files["portable/kernels.so"],
                        "tir": files["portable/kernels.tir.py"].decode(), "c": None,
                        "params": {k: params[k] for k in manifest["portable"]["params"]}}
    except (tarfile.TarError, KeyError, ValueError, json.JSONDecodeError, EOFError, OSError, TypeError) as e:
        raise FileFormatError(f"{path} is not a readable tvm:int artefact (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None
    if manifest.get("format") != "snnc-tvm-int":
        raise FileFormatError(f"{path}: manifest.json is not a tvm:int manifest")
    isa = variant["plan"].get("isa", "portable")
    if isa != "portable" and int8_isa() != isa:  # run-time ISA check: this CPU lacks VNNI
        if portable is None:
            raise FileFormatError(f"{path} was built for {isa}, which this CPU lacks, and holds no portable build")
        variant, portable = portable, None
        meta = {**meta, "int8_isa": "portable"}
    try:
        variant["params"] = {k: params[k] for k in _plan_params(variant["plan"])}
    except (KeyError, TypeError) as e:
        raise FileFormatError(f"{path}: the plan names a parameter the file does not hold ({e})") from None
    variant["c"] = files["kernels.c"].decode() if "kernels.c" in files else None
    return IntModule(CompiledModule.spec_from_meta(meta), variant, manifest["codegen"], meta, portable)


def _plan_params(plan) -> set:
    return {p for st in plan["steps"] if st["op"] == "kernel" for p in st["params"]}
