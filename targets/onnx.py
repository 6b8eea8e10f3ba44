"""Target ``onnx``: the unrolled spiking graph as a standard ONNX model, run by onnxruntime.

What is exported: the multi-step graph that ``unroll_timesteps`` produces (or a stateless ANN
graph). Spiking ops need no custom ONNX domain: each neuron's multi-step ``forward`` (the
reference semantics in ``snnc/ops/neurons.py``) is traced by ``torch.onnx.export(dynamo=True)``
(torch.export + onnxscript) into plain ``ai.onnx`` ops — ``Mul``/``Add``/``Sub`` for the charge,
``GreaterOrEqual``/``Greater`` + ``Cast`` for the Heaviside fire, ``Sub``/``Mul`` for the reset —
and stateless layers become ``Conv``/``Gemm``/``AveragePool``... on the ``[T*N, ...]`` batch.

* **Opset 18** (``OPSET``), default domain only; ``onnx.checker`` validates every model built or
  loaded.
* **The loop over T**: ``loop="unroll"`` writes T copies of a neuron's few elementwise ops;
  ``loop="scan"`` writes one ONNX ``Scan`` per neuron whose body is the neuron's own ``step``
  (exported through ``torch._higher_order_ops.scan``), the membrane as loop state; ``"auto"``
  (default) unrolls below ``SCAN_FROM_T`` steps and scans from there. Both forms are bit-exact
  against the reference. Run time: with onnxruntime 1.32, 1 thread, on a 2-core machine shared
  with other jobs, whole nets differ by no more than the run-to-run noise (scan/unroll time
  0.96-1.11 on the bench net, 0.78-1.38 on the digits SNN, over 4 runs; ``bench/targets.py`` rows
  ``onnx`` and ``onnx:scan``); one large isolated LIF layer was faster as Scan (0.26-0.73 for
  [8, 65536] and [4, 2**21]; ``bench/onnx_loop_form.py``). Export time decides: it grows by about
  0.5 s per step unrolled and stays flat as Scan (bench net 3->8->8, 8x8, under load: T=8 6.3 s
  unrolled / 5.3 s scan, T=16 10.4 / 5.8, T=32 21.6 / 6.3, T=64 36.2 / 7.2; a 1000-step LIF
  layer 427 s / 4.5 s), so from T=16 Scan costs nothing at run time and keeps export time
  independent of T; below it the flat graph that every ONNX tool reads is kept.
* **Dynamic batch**: the batch dimension (dim 1 of ``[T, N, ...]`` inputs, dim 0 of static
  ``[N, ...]`` inputs) is a symbolic ONNX dimension; a graph that hard-codes its batch (e.g. a
  ``view(2, -1)``) is exported with a fixed batch instead and the module says so.
* Surrogate gradients are dropped for export (they only change the backward; the forward is the
  Heaviside either way). ``snn.poisson_encoder`` is refused: torch's random stream cannot be
  reproduced by ONNX ``RandomUniform``; feed the encoded spikes as the input instead.
* Why the dynamo exporter: the legacy TorchScript exporter records ``full_like`` (the membrane's
  ``v_init``) as a constant of the traced batch size, which breaks dynamic batch.
"""
from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import fx, nn

from snnc.compiled import CompiledModule, output_meaning
from snnc.errors import FileFormatError, SnncError, UnsupportedOp, one_of
from snnc.ir import example_inputs, graph_spec
from snnc.ops import Neuron, registry

OPSET = 18


def supported_ops() -> list[str]:
    """The ops whose record has an ``onnx`` hook (exported from their reference forward)."""
    return registry.supported("onnx")


def _check_ops(gm: fx.GraphModule) -> None:
    for n in gm.graph.nodes:
        if n.op not in ("placeholder", "output", "get_attr") and not registry.has_hook(registry.lookup(gm, n), "onnx"):
            raise UnsupportedOp(registry.unsupported_message(gm, n, "onnx"))


def _needs_unroll(gm) -> bool:
    stateful = (registry.module_record(m) for m in gm.modules())
    return not graph_spec(gm).get("T") and any(r is not None and r.state for r in stateful)


class _ScanNeuron(nn.Module):
    """A neuron's multi-step form written as ``scan`` over T: exported as one ONNX ``Scan``
    whose body is ``neuron.step`` (the reference update itself), the membrane as carry."""

    def __init__(self, neuron: Neuron):
        super().__init__()
        self.neuron = neuron

    def forward(self, x_seq):
        from torch._higher_order_ops.scan import scan

        def one_step(v, x):
            s, v_next = self.neuron.step(x, v)
            return v_next, s
        return scan(one_step, self.neuron.initial_membrane(x_seq[0]), x_seq)[1]


def _export_copy(gm: fx.GraphModule, loop: str = "unroll") -> fx.GraphModule:
    """A copy in inference form: eval mode (BN running stats, no dropout), no surrogates, and
    with ``loop="scan"`` every neuron wrapped in ``_ScanNeuron``."""
    out = copy.deepcopy(gm).eval()
    for name, m in list(out.named_modules()):
        if isinstance(m, Neuron):
            m.surrogate = None
            if loop == "scan":
                parent, _, leaf = name.rpartition(".")
                setattr(out.get_submodule(parent) if parent else out, leaf, _ScanNeuron(m))
    return out


def _to_onnx(gm, inputs, bdim: int | None):
    """``bdim``: the batch dimension to make symbolic, or None for fixed shapes."""
    names = [f"input_{i}" for i in range(len(inputs))]
    dyn = None
    if bdim is not None:
        batch = torch.export.Dim("batch")
        dyn = tuple({bdim: batch} for _ in inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch").level
        logging.getLogger("torch").setLevel(logging.ERROR)
        try:
            prog = torch.onnx.export(gm, tuple(inputs), dynamo=True, input_names=names, opset_version=OPSET,
                                     dynamic_shapes=dyn, optimize=True, verbose=False, external_data=False)
        finally:
            logging.getLogger("torch").setLevel(level)
    return prog.model_proto


def _session(model_bytes: bytes):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


class OnnxModule(CompiledModule):
    """An onnxruntime session over the exported model; returns torch tensors like the graph."""

    def __init__(self, model_bytes: bytes, spec: dict, meta: dict):
        super().__init__("onnx", spec, meta)
        self.model_bytes = model_bytes
        self.dynamic_batch = bool(meta.get("dynamic_batch", True))
        self.session = _session(model_bytes)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, *inputs):
        feed = {name: x.detach().cpu().contiguous().numpy() for name, x in zip(self.input_names, inputs)}
        outs = [torch.from_numpy(o) for o in self.session.run(None, feed)]
        return outs[0] if self.meta.get("single_output", True) else tuple(outs)

    def _write(self, path):
        with open(path, "wb") as f:
            f.write(self.model_bytes)


LOOPS = ("auto", "unroll", "scan")
SCAN_FROM_T = 16  # loop="auto": Scan from this T on (export-time measurement in the module doc)


def compile(gm, target="onnx", T=None, loop="auto"):
    """Export ``gm`` to ONNX and open an onnxruntime session on it.

    ``gm`` is a multi-step graph (``unroll_timesteps`` ran) or a stateless graph; a per-step SNN
    graph is unrolled here when ``T`` is given. ``loop``: how a neuron's loop over T is written
    (``"auto"``, ``"unroll"`` or ``"scan"``, see the module docstring)."""
    one_of("onnx target", "loop", loop, LOOPS, SnncError)
    if _needs_unroll(gm):
        if T is None:
            raise SnncError("onnx target: the graph is per-step (stateful ops, no T); unroll it with "
                            "snnc.passes.unroll_timesteps(gm, T) or pass T=")
        from snnc.passes import unroll_timesteps
        gm = unroll_timesteps(gm, T=T)
    _check_ops(gm)
    if loop == "auto":
        loop = "scan" if (graph_spec(gm).get("T") or 0) >= SCAN_FROM_T else "unroll"
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    # one tensor, not a multi-output op returned whole (a neuron's (spikes, membrane))
    single = isinstance(out_node.args[0], fx.Node) and not isinstance(out_node.args[0].meta.get("snnc"), tuple)
    model = _export_copy(gm, loop)
    inputs = [torch.randn_like(x) if x.is_floating_point() else x
              for x in example_inputs(gm, batch=max(2, _spec_batch(gm)))]
    dynamic = True
    bdim = 1 if graph_spec(gm)["layout"] == "seq" else 0
    try:
        proto = _to_onnx(model, inputs, bdim)
    except Exception:  # torch.export met a hard-coded batch: export that batch only
        dynamic = False
        inputs = [x for x in example_inputs(gm)]
        try:
            proto = _to_onnx(model, inputs, None)
        except Exception as e:
            raise SnncError(f"onnx target: torch.onnx.export failed: {type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    import onnx
    onnx.checker.check_model(proto)
    # torch.export may also specialise the batch silently: trust the exported input shapes
    dynamic = dynamic and all(not i.type.tensor_type.shape.dim[bdim].dim_value for i in proto.graph.input)
    meta = {"output": output_meaning(gm), "opset": OPSET, "loop": loop, "dynamic_batch": dynamic,
            "single_output": single}
    return OnnxModule(proto.SerializeToString(), graph_spec(gm), meta)


def _spec_batch(gm) -> int:
    spec = graph_spec(gm)
    shape = spec["inputs"][0][0]
    return shape[1 if spec["layout"] == "seq" else 0] if shape else 1


def _refuse_external_data(proto, path) -> None:
    """snnc writes every weight inside the model; a tensor stored outside it would make
    onnxruntime read a file relative to the working directory (any file the user can read)."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data
    for t in _get_all_tensors(proto):
        if uses_external_data(t):
            where = {e.key: e.value for e in t.external_data}.get("location", "?")
            raise FileFormatError(f"{path}: tensor {t.name!r} points to external data {where!r}; snnc exports "
                                  "keep every weight inside the model and refuse to read other files")


def load(path, meta):
    """Read an exported ``.onnx`` file; any damage is a ``FileFormatError`` naming the file."""
    import onnx
    data = open(path, "rb").read()
    try:
        proto = onnx.load_from_string(data)
    except Exception as e:  # DecodeError: truncated or not an ONNX model
        raise FileFormatError(f"{path} is not a valid ONNX model (truncated or corrupt?): "
                              f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    _refuse_external_data(proto, path)
    try:
        onnx.checker.check_model(proto)
    except Exception as e:  # DecodeError / ValidationError: truncated or not an ONNX model
        raise FileFormatError(f"{path} is not a valid ONNX model (truncated or corrupt?): "
                              f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    spec = CompiledModule.spec_from_meta(meta)
    if len(proto.graph.input) != len(spec["inputs"]):
        raise FileFormatError(f"{path} has {len(proto.graph.input)} input(s) but its metadata lists "
                              f"{len(spec['inputs'])}; the .onnx and .snnc.json files do not belong together")
    try:
        return OnnxModule(data, spec, meta)
    except Exception as e:
        raise FileFormatError(f"{path}: onnxruntime cannot open the model: {type(e).__name__}: {e}") from None
