"""TVM build plumbing shared by the tvm targets: target dicts, host ISA detection, building a Relax
module or a kernel library, and the compiled-module cache (in-process + on disk).

Cache: the key hashes the graph's IR dump, every parameter and buffer, the input spec, the
target dict, the build mode, the TVM version and the source of snnc's lowering files, so any
change to the model or to the compiler misses. Entries are shared libraries in
``$SNNC_CACHE_DIR`` (default ``~/.cache/snnc``) under ``tvm/``, written atomically as verified
bundles (``fileio.write_cache_entry``); a second
compile of the same graph loads the library instead of building it (tens of ms).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import tvm
from tvm import relax

from snnc.errors import SnncError
from snnc.fileio import atomic_write



def _threads_follow_torch():
    """TVM sizes its thread pool once, at the first parallel kernel, from ``TVM_NUM_THREADS``, else
    ``OMP_NUM_THREADS``, else half the logical CPUs on x86 (it assumes two hyper-threads per core).
    On a host without SMT (a 2-core VM) that is one thread: every parallel TVM kernel ran on one
    core (fused spike blocks, bench net N=16: 151 ms wall for 159 ms CPU; 82 ms with two threads).
    Unless the user chose a count, TVM uses as many threads as torch (one per physical core)."""
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        import torch
        os.environ["TVM_NUM_THREADS"] = str(torch.get_num_threads())


_threads_follow_torch()
_MEMORY_CACHE: dict[str, tuple] = {}  # key -> (runtime module, library path or None)
_LOWERING_FILES = ("tvm_kernels.py", "tvm_lower.py", "tvm_build.py", "tvm_hybrid.py", "tvm_schedule.py", "tvm_tune.py",
                   "tvm_spike_conv.py", "spike_digits.py")
DEFAULT_CUDA_ARCH = "sm_80"


def host_isa() -> dict:
    """What LLVM sees on this CPU: its name (e.g. ``znver4``, ``sapphirerapids``) and the vector
    extensions that matter for the kernels."""
    from tvm.target import codegen
    cpu = codegen.llvm_get_system_cpu()
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    return {"cpu": cpu, "features": [f for f in wanted if f in flags]}


def llvm_target(mcpu: str | None = "host", num_cores: int | None = None) -> dict:
    """The ``tvm:llvm`` target dict. ``mcpu="host"`` (default) uses the detected CPU, e.g.
    ``znver4`` with AVX-512: the hand-scheduled convolutions need its vector width (bench net,
    standalone Relax module: 2.6x faster than without ``mcpu``; the naive code of TVM-NOTES.md (a)
    was the opposite). ``mcpu=None`` builds for any x86-64 (a portable export)."""
    d = {"kind": "llvm", "num-cores": int(num_cores or os.cpu_count() or 1)}
    if mcpu == "host":
        mcpu = host_isa()["cpu"]
    if mcpu:
        d["mcpu"] = mcpu
    return d


def llvm_threads(d: dict) -> int:
    return int(d.get("num-cores") or os.cpu_count() or 1)


def cuda_target(arch: str | None = None) -> dict:
    arch = arch or DEFAULT_CUDA_ARCH
    if not (arch.startswith("sm_") and arch[3:].isdigit()):
        raise SnncError(f"tvm:cuda: arch={arch!r} is not a CUDA architecture like 'sm_80' or 'sm_90'")
    return {"kind": "cuda", "arch": arch, "host": {"kind": "llvm"}}


def make_target(d: dict) -> tvm.target.Target:
    return tvm.target.Target(d)


def cache_dir() -> Path:
    root = os.environ.get("SNNC_CACHE_DIR") or Path.home() / ".cache" / "snnc"
    return Path(root) / "tvm"


def graph_key(gm, *parts) -> str:
    """A hash of everything the built code depends on (see the module docstring)."""
    from snnc.printer import dump
    h = hashlib.sha256()
    h.update(dump(gm).encode())
    h.update(repr(gm.snnc_spec).encode())
    for name, t in sorted(gm.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode() + repr(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    h.update(tvm.__version__.encode())
    here = Path(__file__).parent
    for f in _LOWERING_FILES:
        p = here / f
        if p.exists():
            h.update(p.read_bytes())
    for p in parts:
        h.update(repr(p).encode())
    return h.hexdigest()[:32]


def export_so(module, path) -> None:
    """``export_library`` to ``path`` whatever its suffix (it picks the format from the suffix)."""
    with tempfile.TemporaryDirectory() as d:
        so = os.path.join(d, "lib.so")
        module.export_library(so)
        shutil.copyfile(so, path)


class Built:
    """A built TVM library: the loaded runtime module and, once written, its ``.so`` file (a
    library loaded from a file cannot be re-exported, so exports copy the file)."""

    def __init__(self, module, path=None):
        self.module, self.path = module, path

    def write(self, dest) -> None:
        if self.path is not None:
            shutil.copyfile(self.path, dest)
        else:
            export_so(self.module, dest)


def cached(key: str, build, use_cache: bool = True) -> tuple[Built, bool]:
    """``(built, hit)``: the library for ``key``, from memory, disk, or ``build()``. Disk entries
    are snnc bundles: verified (sha256) before dlopen, rebuilt when damaged, and only read from a
    cache folder nobody else can write into (``fileio.read_cache_entry``)."""
    from snnc.fileio import read_cache_entry, write_cache_entry
    if use_cache and key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key], True
    path = cache_dir() / f"{key}.so.snnc"
    lib_path = read_cache_entry(path, "lib.so") if use_cache else None
    if lib_path is not None:
        try:
            _MEMORY_CACHE[key] = Built(tvm.runtime.load_module(str(lib_path)), lib_path)
            return _MEMORY_CACHE[key], True
        except Exception:  # a library of another TVM build: rebuild it below
            pass
    built = Built(build())
    if use_cache:
        built.path = write_cache_entry(path, "lib.so", built.write) or built.path
        _MEMORY_CACHE[key] = built
    return built, False


def cached_json(key: str, compute, use_cache: bool = True):
    """A small JSON-able result (e.g. the hybrid's per-conv choices) cached like the libraries."""
    import json
    path = cache_dir() / f"{key}.json"
    if use_cache and key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]
    if use_cache and path.exists():
        try:
            _MEMORY_CACHE[key] = json.loads(path.read_text())
            return _MEMORY_CACHE[key]
        except (OSError, ValueError):
            pass
    value = compute()
    if use_cache:
        try:
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value)), overwrite=True)
        except OSError:
            pass
        _MEMORY_CACHE[key] = value
    return value


def _noalias(mod: tvm.IRModule) -> tvm.IRModule:
    """Spell every PrimFunc's no-alias promise ``tirx.noalias`` (TVM 0.27's name). A kernel still
    carrying the old ``tir.noalias`` key makes LLVM drop the promise for EVERY function of the
    library: the conv accumulators then go back to memory after each FMA (bench net 128->128 conv
    alone 540 ms, in one library with a ``tir.noalias`` LIF kernel 920-1000 ms, same run)."""
    updates = {}
    for gv, f in mod.functions.items():
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "tir.noalias" in f.attrs:
            updates[gv] = f.without_attr("tir.noalias").with_attr("tirx.noalias", True)
    for gv, f in updates.items():
        mod[gv] = f
    return mod


def _view_outputs(mod: tvm.IRModule) -> tvm.IRModule:
    """Let the reshape that produces a function's output be a view: ``RewriteDataflowReshape``
    only rewrites reshapes bound to dataflow variables, so the final ``[T, N*M] -> [T, N, C, H, W]``
    of the last neuron layer was a full copy kernel (bench net, N=16: 11% of the library's time,
    profile of bench/tvm.py). Binding it to a dataflow variable first makes it a view."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            continue
        blocks, changed = [], False
        for block in func.body.blocks:
            if not isinstance(block, relax.DataflowBlock):
                blocks.append(block)
                continue
            bindings = []
            for b in block.bindings:
                v = b.value
                if (isinstance(b, relax.VarBinding) and not isinstance(b.var, relax.DataflowVar)
                        and isinstance(v, relax.Call) and v.op == call_tir
                        and v.args[0].name_hint.startswith("reshape")):
                    tmp = relax.DataflowVar(b.var.name + "_view", b.var.ty)
                    bindings += [relax.VarBinding(tmp, v), relax.VarBinding(b.var, tmp)]
                    changed = True
                else:
                    bindings.append(b)
            blocks.append(relax.DataflowBlock(bindings))
        if changed:
            mod[gv] = relax.Function(func.params, relax.SeqExpr(blocks, func.body.body), func.ret_ty,
                                     func.is_pure, func.attrs)
    return mod


def build_relax(relax_mod, target: dict):
    """``tvm.compile`` of a Relax module. On GPU the default pipeline applies the dlight rules
    (Matmul, GEMV, Reduction, GeneralReduction, Fallback) to every unscheduled function; on CPU
    the convolutions get the hand schedule of ``tvm_schedule.py`` first. The neuron kernels carry
    ``tir.is_scheduled`` and keep their own schedule on both."""
    from .tvm_schedule import schedule_cpu_convs
    tgt = make_target(target)
    if target["kind"] == "llvm":
        with tgt:
            relax_mod = tvm.transform.Sequential([
                relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR(),
                schedule_cpu_convs])(relax_mod)
            relax_mod = relax.transform.RewriteDataflowReshape()(_view_outputs(relax_mod))
    return tvm.compile(_noalias(relax_mod), target=tgt)


def build_kernels(funcs: dict, target: dict):
    """One library holding the given PrimFuncs under their dict keys."""
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    return tvm.compile(_noalias(mod), target=make_target(target))
