"""Targets ``tvm:llvm`` and ``tvm:cuda``: the spiking IR compiled with TVM 0.27.

    m = snnc.compile(g, target="tvm:llvm")            # g: multi-step graph (unroll_timesteps)
    m(x); m.export("net.so"); snnc.load("net.so")(x)  # the export runs without the Python model
    m = snnc.compile(g, target="tvm:cuda", arch="sm_90")

Two ways to run, one artefact:
  * ``mode="relax"``: the whole graph as one Relax module (``tvm_lower.to_relax``: TVM's torch
    frontend for standard layers, one fused TIR scan per neuron layer, hand-scheduled convs from
    ``tvm_schedule.py`` on CPU) run by the Relax VM. This
    is what ``export`` writes (``export_library``) and what ``snnc.load`` and ``run_remote`` run:
    standalone, no torch model needed. ``tvm:cuda`` always runs this way (dlight GPU schedules).
  * ``mode="hybrid"`` (``tvm:llvm`` only): torch runs linear/pooling/BN in process and TVM runs
    the fused neuron kernels on the same buffers (``tvm_hybrid.py``); each Conv2d runs in torch
    (oneDNN) or as the hand-scheduled TVM kernel, whichever was faster in a race at compile time
    (``convs="auto"``; the choice is cached with the library; ``"torch"`` / ``"tvm"`` force it).
    Convs / linears whose input is 0/1 spikes also race the int8 spike kernels (``spike_conv.py``,
    ``spike_block.py``: AMX/VNNI int8 with fp32 output, error within a stated bound of fp32, not
    bit-exact) by default where the CPU has AMX-INT8 / VNNI (``spike_int8=None``: detected at
    compile time, recorded in ``meta["spike_int8"]``); ``spike_int8=False`` opts out (fp32
    everywhere, bit-exact), ``convs="int8"`` forces them wherever the input is spikes. On a VNNI
    host without AMX the conv+neuron blocks also race ``"fused"`` (``spike_fused.py``: conv and
    neuron in one TVM kernel, same two-digit bound; the analog first conv in fp32).
    On this CPU it is the fast one (bench/tvm.py), so ``mode="auto"`` (default) picks it for
    ``tvm:llvm``.
Thread safety: the hybrid keeps its preallocated buffers per thread (``tvm_hybrid``), and each
thread that calls a Relax-mode module gets its own ``relax.VirtualMachine`` (one VM's registers
cannot serve two calls at once); the executable is shared.
Options: ``mcpu`` ("host" = the detected CPU, the default; None = portable x86-64; or an LLVM
CPU name), ``num_cores``, ``arch`` (cuda, default
sm_80), ``T`` (unroll a per-step graph first), ``dump_dir`` (write the Relax module and, for
cuda, the generated CUDA source), ``cache`` (default True, see ``tvm_build``), ``spike_convs``
("auto" = the host's best int8 kernel for convs on spikes in the Relax library, "amx", "vnni",
"avx512bw", or "fp32" to keep every conv fp32; ``tvm_spike_conv.py``, recorded in
``meta["spike_convs"]``; default: "auto" for ``mode="relax"``, and for a hybrid module what the
module itself does: "auto" where its spike convs run int8 (the default on AMX/VNNI hosts), else
"fp32").
``spike_digits`` (int8 spike convs only): 2 (default), 1 (one int8 weight digit in every spike conv
the fused kernel takes: half its int8 work, rounding balanced per window, a wider stated bound) or
"auto" with ``calib`` (a ``[T, N, ...]`` input batch): one digit only in the convs where the output
spikes on ``calib`` still agree with the fp32 reference on at least ``min_agreement`` (0.999) of
their elements, the rounding fitted to those inputs (``spike_digits.py``; ``meta["spike_digits"]``:
digits, measured agreement and bound per conv). The export computes with the same weights.

Batch size of the library: ``batch="any"`` (default) lowers the graph with a symbolic batch
``n`` (``R.Tensor((T, n, C, H, W))``), so one library, exported or remote, serves every batch
size with one VM call per forward. A graph that reshapes to a hard-coded batch cannot be made
symbolic; it (and ``batch="static"``, and every tuned library) is built for the traced batch B,
and ``TVMModule`` runs a batch of n as ceil(n/B) calls on chunks of B, the last one zero-padded
(exact: samples never interact at inference). ``meta["library_batch"]`` says which.

Tuning (``tvm:llvm``): ``tune=True``, ``trials=N`` (per kernel), ``tune_minutes=M`` (wall budget),
``database=DIR``, ``progress`` -- MetaSchedule over the library's conv/dense kernels, see
``tvm_tune.py``; implies a static library as above.
"""
from __future__ import annotations

import copy
import os
import tempfile
import threading
from pathlib import Path

import torch
import tvm
from tvm import relax

from snnc.compiled import CompiledModule, output_meaning
from snnc.errors import SnncError, one_of
from snnc.fileio import atomic_write
from snnc.ir import annotate, graph_spec, info

from . import tvm_build as tb
from .spike_conv import int8_isa
from .spike_digits import apply as apply_spike_digits
from .tvm_hybrid import (aligned, apply_conv_choices, bind_kernels, hybrid_graph, race_convs, raced_layers,
                         run_hybrid, spike_report)
from .tvm_lower import check_supported, to_relax
from .tvm_parallel import on_torch_threads
from .tvm_spike_conv import AMX_MATTR, amx_permission, check_loadable, spike_kernels

MODES = ("auto", "hybrid", "relax")
BATCH_KINDS = ("any", "static")  # the exported library: symbolic batch, or the traced one
CONV_CHOICES = ("auto", "torch", "tvm", "int8")  # who runs each Conv2d in hybrid mode


def _to_tvm(x: torch.Tensor, dev):
    if dev.dlpack_device_type() == 1:
        return tvm.runtime.from_dlpack(aligned(x.detach()))  # it refuses unaligned data
    return tvm.runtime.tensor(x.detach().cpu().numpy(), device=dev)


def _to_torch(v):
    if isinstance(v, (list, tuple)) or type(v).__name__ == "Array":
        return tuple(_to_torch(e) for e in v)
    if v.device.dlpack_device_type() == 1:
        return torch.from_dlpack(v)
    return torch.from_numpy(v.numpy())


class TVMModule(CompiledModule):
    """A compiled graph; ``forward`` runs the hybrid graph or the Relax VM (see module doc).
    Every batch size runs: the hybrid graph and a ``batch="any"`` library take any batch; a
    static library (``batch="static"``, ``tune=``) runs chunks of its built batch (``_chunked``)."""

    def __init__(self, target, spec, meta, relax_lib: tb.Built | None = None, relax_build=None, hybrid=None):
        super().__init__(target, spec, meta)
        self._relax_lib = relax_lib
        self._relax_build = relax_build  # () -> (Built, batch kind), for exports of a hybrid module
        self._hybrid = hybrid
        self._vms = {}  # thread id -> its own Relax VM (one VM's registers cannot serve two threads)
        self._vm_lock = threading.Lock()
        self.dynamic_batch = True

    @property
    def library_batch(self) -> str:
        """``"any"`` (symbolic batch in the library) or ``"static"`` (built for the traced batch)."""
        return self.meta.get("library_batch", "static")

    @property
    def mode(self):
        return "hybrid" if self._hybrid is not None else "relax"

    @property
    def relax_lib(self):
        if self._relax_lib is None:
            self._relax_lib, self.meta["library_batch"] = self._relax_build()
        return self._relax_lib

    def _device(self):
        if self.target == "tvm:cuda":
            dev = tvm.cuda(0)
            if not dev.exist:
                raise SnncError("tvm:cuda module: no CUDA device on this machine (the module builds and "
                                "exports without one; run it where a GPU is present)")
            return dev
        return tvm.cpu(0)

    def forward(self, *inputs):
        if self._hybrid is not None:
            return run_hybrid(self._hybrid, inputs)
        dev = self._device()
        vm = self._vms.get(threading.get_ident())
        if vm is None:
            if self.meta.get("spike_convs") == "amx" and not amx_permission():  # tile state: once per process
                raise SnncError("this library's AMX kernels need the AMX tile permission, which the kernel refused")
            with self._vm_lock:  # the lazy library build and VM creation happen once per thread
                vm = self._vms[threading.get_ident()] = relax.VirtualMachine(self.relax_lib.module, dev)
        run = lambda *xs: _to_torch(vm["main"](*[_to_tvm(x, dev) for x in xs]))  # noqa: E731
        if self.library_batch == "static":
            return _chunked(run, inputs, self.spec, self.meta.get("output", ""))
        return run(*inputs)

    def _write(self, path):
        with self._vm_lock:
            self.relax_lib.write(path)

    def run_remote(self, host: str, port: int, *inputs, key: str | None = None, session_timeout: int = 60):
        """Upload the exported library to a ``tvm.rpc`` server at ``host:port`` (with ``key``: a
        device of that key from the RPC tracker at ``host:port``), run it there on ``inputs``,
        and return the outputs as torch tensors. The remote runs the standalone Relax module."""
        from tvm import rpc
        self.check_inputs(inputs)
        if self.target == "tvm:cuda":
            raise SnncError("run_remote: only tvm:llvm modules run over RPC here (cuda needs a remote GPU)")
        where = f"tracker {host}:{port} key {key!r}" if key else f"server {host}:{port}"
        try:
            if key:
                remote = rpc.connect_tracker(host, int(port)).request(key, session_timeout=session_timeout)
            else:
                remote = rpc.connect(host, int(port), session_timeout=session_timeout)
        except Exception as e:  # tvm raises TVMError subclasses with long backtraces
            raise SnncError(f"run_remote: cannot reach the TVM RPC {where}: {str(e).splitlines()[0]}") from None
        with tempfile.TemporaryDirectory() as d:
            lib_path = os.path.join(d, "snnc_module.so")
            self.relax_lib.write(lib_path)
            remote.upload(lib_path)
        lib = remote.load_module("snnc_module.so")
        dev = remote.cpu(0)
        vm = relax.VirtualMachine(lib, dev)
        args = [tvm.runtime.tensor(x.detach().contiguous().numpy(), device=dev) for x in inputs]
        out = vm["main"](*args)
        if isinstance(out, tvm.runtime.Tensor):
            return torch.from_numpy(out.numpy())
        return tuple(torch.from_numpy(o.numpy()) for o in out)


def _batch_dim(spec) -> int:
    return 1 if spec["layout"] == "seq" else 0


def _chunked(run, inputs, spec, output_meaning_: str):
    """Run a library built for batch B on any batch n: chunks of B, the last one zero-padded,
    outputs cut back and concatenated. Exact because samples never interact at inference
    (BN uses running statistics); the cost is the padding of the last chunk."""
    bdim = _batch_dim(spec)
    B = spec["inputs"][0][0][bdim]
    n = inputs[0].shape[bdim]
    if n == B:
        return run(*inputs)
    out_dim = 0 if output_meaning_.startswith("readout") else bdim
    pieces = []
    for start in range(0, n, B):
        size = min(B, n - start)
        chunk = []
        for x in inputs:
            c = x.narrow(bdim, start, size)
            if size < B:
                pad = list(c.shape)
                pad[bdim] = B - size
                c = torch.cat([c, c.new_zeros(pad)], dim=bdim)
            chunk.append(c.contiguous())
        out = run(*chunk)
        outs = out if isinstance(out, tuple) else (out,)
        pieces.append(tuple(o.narrow(out_dim if o.dim() > out_dim else 0, 0, size).clone() for o in outs))
    joined = tuple(torch.cat(parts, dim=out_dim if parts[0].dim() > out_dim else 0) for parts in zip(*pieces))
    return joined if isinstance(out, tuple) else joined[0]


def _prepare(gm, T):
    g = copy.deepcopy(gm)
    g.snnc_spec = copy.deepcopy(graph_spec(gm))  # a plain attribute: deepcopy of a GraphModule drops it
    if not graph_spec(g).get("T"):
        if T is None:
            raise SnncError("the tvm targets compile multi-step graphs: run "
                            "snnc.passes.unroll_timesteps(g, T) first, or pass T= to snnc.compile")
        from snnc.passes import unroll_timesteps
        g = unroll_timesteps(g, T=int(T))
    g.eval()
    return g if _annotated(g) else annotate(g)


def _annotated(g) -> bool:
    """Whether every node carries metadata matching the spec (passes end with ``annotate``, and a
    deepcopy keeps it), so the graph need not be run again: that run costs as much as inference."""
    placeholders = [n for n in g.graph.nodes if n.op == "placeholder"]
    shapes = [tuple(s) for s, _ in graph_spec(g)["inputs"]]
    if len(placeholders) != len(shapes) or any(info(n) is None or info(n).shape != s
                                                for n, s in zip(placeholders, shapes)):
        return False
    return all("snnc" in n.meta for n in g.graph.nodes if n.op not in ("output", "get_attr"))


def _dump(dump_dir, target, relax_mod):
    """Write the Relax module as TVMScript next to the snnc IR dumps (``tvm_llvm.relax.py``)."""
    path = Path(dump_dir) / f"{target.replace(':', '_')}.relax.py"
    atomic_write(path, lambda tmp: Path(tmp).write_text(relax_mod.script()), overwrite=True)


def cuda_source(lib) -> str:
    """The generated CUDA C of a built ``tvm:cuda`` module (for inspection and tests)."""
    todo, seen = [lib.mod if hasattr(lib, "mod") else lib], []
    while todo:
        m = todo.pop()
        if m.kind == "cuda":
            seen.append(m.inspect_source())
        todo.extend(m.imports)
    if not seen:
        raise SnncError("cuda_source: the module holds no CUDA code (was it built for tvm:cuda?)")
    return "\n".join(seen)


def _exported_sources(g) -> str:
    """The source of every op lowered from its exported forward: the built code depends on it."""
    import hashlib
    import inspect
    from .tvm_lower import fused_scan_ok
    from snnc.ops import Neuron
    mods = {type(m) for m in g.modules() if (isinstance(m, Neuron) and not fused_scan_ok(m))
            or getattr(type(m), "exportable", False)}
    h = hashlib.sha256()
    for cls in sorted(mods, key=lambda c: c.__qualname__):
        for k in cls.__mro__:
            if k.__module__.startswith("snnc"):
                h.update(inspect.getsource(k).encode())
    return h.hexdigest()[:16]


def _exported_ops(g) -> list:
    """Nodes whose op TVM imports from its exported forward (no fused scan kernel)."""
    from snnc.ops import Neuron, is_snnc_op
    from .tvm_lower import fused_scan_ok

    def exported(m):
        if isinstance(m, Neuron):
            return not fused_scan_ok(m)
        return is_snnc_op(m) and getattr(type(m), "exportable", False)
    return [n for n in g.graph.nodes if n.op == "call_module" and exported(g.get_submodule(n.target))]


def _lowering(g) -> dict:
    """``meta["lowering"]``: how many neuron layers run as one fused TIR scan each, and the op names
    lowered from their exported forward instead (why a model takes the relax mode, a static batch)."""
    from snnc.ops import Neuron
    plain = _exported_ops(g)
    neurons = [n for n in g.graph.nodes if n.op == "call_module" and isinstance(g.get_submodule(n.target), Neuron)]
    return {"fused_scans": len(set(neurons) - set(plain)),
            "exported": sorted({type(g.get_submodule(n.target)).op_name for n in plain})}


def _cpu_mode(g, mode):
    """``auto`` is hybrid unless a neuron has no fused scan kernel (those lower from their
    forward inside the Relax module, which only the relax mode builds)."""
    plain = _exported_ops(g)
    if mode == "auto":
        return "relax" if plain else "hybrid"
    if mode == "hybrid" and plain:
        from snnc.errors import UnsupportedOp, node_ref
        raise UnsupportedOp(f"{node_ref(plain[0])}: {type(g.get_submodule(plain[0].target)).op_name} has no fused "
                            "TVM scan kernel, so hybrid mode cannot run it; use mode='relax' (or 'auto')")
    return mode


def compile(gm, target="tvm:llvm", *, mode="auto", mcpu="host", num_cores=None, arch=None, T=None,
            dump_dir=None, cache=True, convs="auto", batch="any", tune=False, trials=None, database=None,
            tune_minutes=None, progress=True, spike_int8=None, spike_convs=None, spike_digits=2, calib=None,
            min_agreement=0.999):
    one_of(target, "mode", mode, MODES, SnncError)
    one_of(target, "batch", batch, BATCH_KINDS, SnncError)
    tuning = tune or trials is not None or database is not None or tune_minutes is not None
    if tuning and target != "tvm:llvm":
        raise SnncError(f"{target}: tuning (tune=/trials=/database=) is for tvm:llvm only")
    one_of(target, "convs", convs, CONV_CHOICES, SnncError)
    if target == "tvm:cuda":
        if mode == "hybrid":
            raise SnncError("tvm:cuda has no hybrid mode (torch here is CPU-only); use mode='relax'")
        tdict, device, mode = tb.cuda_target(arch), "gpu", "relax"
    else:
        tdict, device = tb.llvm_target(mcpu, num_cores), "cpu"
    g = _prepare(gm, T)
    check_supported(g)
    if target != "tvm:cuda":
        mode = _cpu_mode(g, mode)
    spec = graph_spec(g)
    if spike_int8 not in (None, True, False):
        raise SnncError(f"{target}: spike_int8={spike_int8!r}; expected None (auto), True or False")
    if spike_int8 is None:  # default: on where the CPU has int8 matrix instructions, for convs="auto"
        spike_int8 = device == "cpu" and convs == "auto" and int8_isa() is not None
    spike_int8 = bool(spike_int8 or convs == "int8") and device == "cpu" and int8_isa() is not None
    if spike_convs is None:  # a hybrid module's export computes what the module computes
        spike_convs = "auto" if mode == "relax" or spike_int8 or convs == "int8" else "fp32"
    spike_isa = spike_kernels(spike_convs, tdict) if device == "cpu" else "fp32"
    if spike_isa == "amx":
        tdict = {**tdict, "mattr": list(AMX_MATTR)}
    g, digit_report = apply_spike_digits(g, spike_digits, calib, min_agreement, spike_isa != "fp32" or spike_int8)
    meta = {"spike_convs": spike_isa, "output": output_meaning(g), "tvm_target": tdict, "tvm_version": tvm.__version__,
            "host_isa": tb.host_isa() if device == "cpu" else None, "compiled_mode": mode, "lowering": _lowering(g),
            "artefact": "Relax VM executable (export_library); snnc.load runs it standalone"}
    if digit_report:
        meta["spike_digits"] = digit_report

    if tuning:
        from .tvm_tune import tuned_relax
        get_relax = lambda: (tuned_relax(g, tdict, trials=trials, database=database, minutes=tune_minutes,  # noqa: E731
                                         progress=progress, cache=cache, spike_isa=spike_isa), "static")
    else:
        get_relax = lambda: _relax_library(g, tdict, device, batch, cache, spike_isa)  # noqa: E731
    if dump_dir is not None:
        _dump(dump_dir, target, to_relax(g, device, batch="static" if tuning else batch,
                                         spike_convs=spike_isa))
    if mode == "relax":
        lib, meta["library_batch"] = get_relax()
        if getattr(lib, "tuning", None):
            meta["tuning"] = lib.tuning
        if dump_dir is not None and target == "tvm:cuda":
            atomic_write(Path(dump_dir) / "tvm_cuda.cu", lambda tmp: Path(tmp).write_text(cuda_source(lib.module)),
                         overwrite=True)
        return TVMModule(target, spec, meta, relax_lib=lib)
    meta["spike_int8"], meta["int8_isa"] = spike_int8, int8_isa() if device == "cpu" else None
    hg, make_kernels = hybrid_graph(g, device, spike_int8=spike_int8,
                                    one_digit=getattr(g, "snnc_spike_digits", {}))
    key = tb.graph_key(g, tdict, "hybrid", hg.kernel_key)
    lib, _ = tb.cached(key, lambda: tb.build_kernels(make_kernels(), tdict), cache)
    if device == "cpu":  # one thread pool for torch ops and TVM kernels (tvm_parallel: why)
        lib, meta["kernel_threads"] = on_torch_threads(lib)
    bind_kernels(hg, lib.module)
    if convs == "auto":
        # a race's winner depends on the thread count (torch's; TVM's pool follows it)
        race_key = f"{key}.races{'.int8-' + str(int8_isa()) if spike_int8 else ''}.t{torch.get_num_threads()}"
        choices = tb.cached_json(race_key, lambda: race_convs(hg), cache)
    else:
        choices = {m.name: convs for m in raced_layers(hg)}
    meta["hybrid_convs"] = apply_conv_choices(hg, choices)
    if spike_int8:
        meta["spike_layers"] = spike_report(hg)
    return TVMModule(target, spec, meta, relax_build=get_relax, hybrid=hg)


def _relax_library(g, tdict, device, batch, cache, spike_isa="fp32"):
    """``(Built, "any" | "static")``: the Relax library with a symbolic batch when asked and the
    graph allows it (a model that reshapes to a hard-coded batch does not), else the traced one.
    ``spike_isa``: the int8 kernels of spike-input convs (``tvm_spike_conv``), or "fp32"."""
    exported = _exported_sources(g)
    sc = () if spike_isa == "fp32" else (spike_isa,)  # fp32 keys stay what they were
    one = sorted(getattr(g, "snnc_spike_digits", ()))
    sc += (("one_digit", one),) if one and sc else ()
    if batch == "any" and not _exported_ops(g):  # exported forwards have the traced (static) shapes
        key = tb.graph_key(g, tdict, "relax", "any", exported, *sc)
        try:
            return tb.cached(key, lambda: tb.build_relax(to_relax(g, device, batch="any", spike_convs=spike_isa),
                                                         tdict), cache)[0], "any"
        except Exception:  # noqa: BLE001 - TVM raises many kinds; the static build below is the answer
            pass
    key = tb.graph_key(g, tdict, "relax", exported, *sc)
    return tb.cached(key, lambda: tb.build_relax(to_relax(g, device, spike_convs=spike_isa), tdict),
                     cache)[0], "static"


def load(path, meta):
    check_loadable(meta, path)
    try:
        lib = tvm.runtime.load_module(str(path))
    except Exception as e:
        from snnc.errors import FileFormatError
        raise FileFormatError(f"{path} is not a loadable TVM library: {str(e).splitlines()[0]}") from None
    meta = dict(meta)
    return TVMModule(meta["target"], CompiledModule.spec_from_meta(meta), meta, relax_lib=tb.Built(lib, Path(path)))
