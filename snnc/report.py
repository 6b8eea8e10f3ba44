"""Activity and energy reports: per-layer firing rates, spike counts, synaptic operations (SOPs)
against the ANN's multiply-accumulates (MACs), an energy estimate, a table and PNG plots.

Counting (per sample, over the T steps the graph runs):
  * firing rate of a neuron layer = spikes / (neurons * T);
  * SOPs of a conv/linear layer fed by spikes = the accumulates its input events trigger: for every
    nonzero input, one add per outgoing synapse. Counted exactly (borders, stride, groups included) as
    ``sum(layer_without_bias(1[x != 0]) with all weights set to 1)``; for a linear layer that is
    ``nnz(x) * out_features``. "Fed by spikes" means the input comes from a neuron through
    reshapes, pooling, dropout, time merge/split or a constant scale: a pooled spike count is one
    event whose value scales the weight;
  * a conv/linear layer fed by analog values (the first layer under direct coding) does dense MACs
    each time it runs: counted as MACs. Per-step graphs are unrolled first (``unroll_timesteps``),
    which runs a directly-encoded first layer once, not T times;
  * the ANN's MACs = the same layers run densely once (``--ann`` traces the source ANN instead).
Pooling, BN (folded before deployment) and neuron updates are not counted, as in Rueckauer 2017 and
Sengupta 2019.

Energy, 45 nm CMOS, 32-bit float (Horowitz, "Computing's energy problem", ISSCC 2014, Fig. 1.1.9):
add 0.9 pJ, multiply 3.7 pJ, so one accumulate (AC) = 0.9 pJ and one MAC = 0.9 + 3.7 = 4.6 pJ.
    E_snn = 0.9 pJ * SOPs + 4.6 pJ * MACs(analog-input layers),   E_ann = 4.6 pJ * MACs(ANN).
These are compute-only estimates (memory access, which often dominates, is not modelled).
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from torch import fx, nn

from .errors import SnncError
from .fileio import atomic_write
from .ops import IntIF, Neuron

E_AC_PJ = 0.9    # 32-bit float add, 45 nm (Horowitz ISSCC 2014)
E_MAC_PJ = 4.6   # 32-bit float multiply (3.7 pJ) + add (0.9 pJ)
_SYNAPTIC = (nn.Conv1d, nn.Conv2d, nn.Linear)


def _ones_like_layer(layer):
    """``layer`` with every weight 1 and no bias: applied to a 0/1 mask it counts synaptic events."""
    if isinstance(layer, nn.Linear):
        ones = nn.Linear(layer.in_features, layer.out_features, bias=False)
    else:
        ones = type(layer)(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                           padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=False)
    nn.init.ones_(ones.weight)
    return ones


_EVENT_PRESERVING = {"nn.avg_pool2d", "nn.max_pool2d", "nn.adaptive_avg_pool2d", "nn.flatten", "flatten", "view",
                     "reshape", "nn.dropout", "nn.identity", "contiguous", "time.merge", "time.split", "mul", "div"}


def _fed_by_spikes(gm, node) -> bool:
    """Whether ``node``'s value is spikes, or spikes passed through pooling/reshapes/scaling."""
    from .ir import op_name
    while isinstance(node, fx.Node):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), Neuron):
            return True
        if node.op == "placeholder" or op_name(gm, node) not in _EVENT_PRESERVING:
            return False
        node = node.args[0]
    return False


class _Counter:
    """Forward hooks that count spikes at neurons and synaptic events at conv/linear layers."""

    def __init__(self, gm: fx.GraphModule):
        self.rows = {}
        self.handles = []
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            mod = gm.get_submodule(node.target)
            if isinstance(mod, Neuron):
                self.rows[node.target] = {"layer": node.target, "op": type(mod).op_name, "spikes": 0.0, "neurons_x_steps": 0}
                self.handles.append(mod.register_forward_hook(self._neuron_hook(node.target)))
            elif isinstance(mod, _SYNAPTIC):
                events = _fed_by_spikes(gm, node.args[0])
                self.rows[node.target] = {"layer": node.target, "op": type(mod).__name__.lower(), "sops": 0.0, "macs": 0.0,
                                          "ann_macs": 0.0, "input": "events" if events else "analog"}
                self.handles.append(mod.register_forward_hook(self._synapse_hook(node.target, _ones_like_layer(mod), events)))

    def _neuron_hook(self, name):
        def hook(mod, inputs, out):
            self.rows[name]["spikes"] += float(out.detach().sum())
            self.rows[name]["neurons_x_steps"] += out.numel()
        return hook

    def _synapse_hook(self, name, ones, events):
        def hook(mod, inputs, out):
            x = inputs[0].detach()
            row = self.rows[name]
            dims = 1 if isinstance(mod, nn.Linear) else mod.weight.dim() - 1  # feature dims of one sample
            one = torch.ones_like(x.reshape(-1, *x.shape[x.dim() - dims:])[:1])
            per_sample = float(ones(one).sum())  # one dense pass over one sample (one step)
            row["ann_macs"] = per_sample
            dense = per_sample * (x.numel() // one.numel())
            if events:
                row["sops"] += float(ones((x != 0).float()).sum())
            else:
                row["macs"] += dense
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _run(gm, x, T):
    """Run any graph on a static batch or a ``[T, N, ...]`` batch (repeating static input over T)."""
    from .runtime import run
    spec = gm.snnc_spec
    static = x.dim() == len(spec["inputs"][0][0]) - (1 if spec["layout"] == "seq" else 0)
    if spec["layout"] == "seq":
        return run(gm, x.unsqueeze(0).expand(spec["T"] or T, *x.shape).contiguous() if static else x)
    if spec.get("T"):
        return run(gm, x)
    return run(gm, x, T=T)


def collect(gm: fx.GraphModule, dataset, T: int = 8, batch_size: int = 128, ann: nn.Module | None = None) -> dict:
    """Per-layer activity of ``gm`` on ``dataset`` (``(x, label)`` pairs), per sample, plus accuracy."""
    from .passes import unroll_timesteps
    from .pipeline import logits
    steps = gm.snnc_spec.get("T") or T
    if not gm.snnc_spec.get("T") and gm.snnc_spec["layout"] == "step":
        gm = unroll_timesteps(gm, T=T)  # count what the deployed graph runs: the analog first layer once
    counter = _Counter(gm)
    n = correct = 0
    try:
        with torch.no_grad():
            for i in range(0, len(dataset), batch_size):
                items = [dataset[j] for j in range(i, min(i + batch_size, len(dataset)))]
                x = torch.stack([it[0] for it in items]).float()
                y = torch.as_tensor([int(it[1]) for it in items])
                out = _run(gm, x, T)
                if out.dim() >= 2 and out.shape[-1] > 1:
                    correct += int((logits(out).argmax(-1) == y).sum())
                n += len(y)
    finally:
        counter.close()
    if n == 0:
        raise SnncError("report: the data set is empty")
    layers = []
    for row in counter.rows.values():
        r = dict(row)
        for k in ("spikes", "sops", "macs"):
            if k in r:
                r[k] /= n
        if "spikes" in r:
            r["firing_rate"] = r["spikes"] * n / max(r.pop("neurons_x_steps"), 1)
        layers.append(r)
    ann_macs = _ann_macs(ann, dataset) if ann is not None else sum(r.get("ann_macs", 0.0) for r in layers)
    sops = sum(r.get("sops", 0.0) for r in layers)
    macs = sum(r.get("macs", 0.0) for r in layers)
    return {"T": steps, "samples": n, "accuracy": 100.0 * correct / n, "layers": layers,
            "total": {"spikes": sum(r.get("spikes", 0.0) for r in layers), "sops": sops, "snn_macs": macs,
                      "ann_macs": ann_macs, "energy_snn_nj": (E_AC_PJ * sops + E_MAC_PJ * macs) / 1e3,
                      "energy_ann_nj": E_MAC_PJ * ann_macs / 1e3}}


def _ann_macs(ann, dataset):
    from .tracer import trace
    g = trace(ann, dataset[0][0].unsqueeze(0).float())
    counter = _Counter(g)
    with torch.no_grad():
        g(dataset[0][0].unsqueeze(0).float())
    counter.close()
    return sum(r.get("ann_macs", 0.0) for r in counter.rows.values())


def table(stats: dict) -> str:
    """A markdown table: one row per neuron / synaptic layer, then totals and energy."""
    lines = [f"T={stats['T']}, {stats['samples']} samples, accuracy {stats['accuracy']:.2f}%  (per sample)", "",
             "| layer | op | firing rate | spikes | SOPs | MACs (analog in) | ANN MACs |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in stats["layers"]:
        if "firing_rate" in r:
            lines.append(f"| {r['layer']} | {r['op']} | {r['firing_rate']:.4f} | {r['spikes']:.1f} | | | |")
        else:
            lines.append(f"| {r['layer']} | {r['op']} | | | {r['sops']:.0f} | {r['macs']:.0f} | "
                         f"{r['ann_macs']:.0f} |")
    t = stats["total"]
    lines += [f"| **total** | | | {t['spikes']:.1f} | {t['sops']:.0f} | {t['snn_macs']:.0f} | {t['ann_macs']:.0f} |", "",
              f"energy (45 nm, Horowitz 2014: AC {E_AC_PJ} pJ, MAC {E_MAC_PJ} pJ): SNN {t['energy_snn_nj']:.2f} nJ, "
              f"ANN {t['energy_ann_nj']:.2f} nJ, ratio ANN/SNN {t['energy_ann_nj'] / max(t['energy_snn_nj'], 1e-12):.2f}x"]
    return "\n".join(lines) + "\n"


def _save_png(fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"), overwrite=True)


def plot_firing_rates(stats: dict, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in stats["layers"] if "firing_rate" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    a.bar(range(len(rows)), [r["firing_rate"] for r in rows], color="tab:orange")
    a.set_xticks(range(len(rows)), [f"{r['layer']}\n{r['op']}" for r in rows], fontsize=8)
    a.set_ylabel("firing rate (spikes / neuron / step)")
    a.set_title(f"firing rate per layer (T={stats['T']}, {stats['samples']} samples)")
    syn = [r for r in stats["layers"] if "sops" in r]
    idx = torch.arange(len(syn)).float()
    b.bar(idx - 0.2, [r["sops"] + r["macs"] for r in syn], 0.4, label="SNN ops (SOPs + analog MACs)")
    b.bar(idx + 0.2, [r["ann_macs"] for r in syn], 0.4, label="ANN MACs")
    b.set_xticks(idx.tolist(), [f"{r['layer']}\n{r['op']} ({r['input']})" for r in syn], fontsize=8)
    b.set_yscale("log")
    b.set_ylabel("operations per sample")
    b.set_title("synaptic operations per layer")
    b.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    _save_png(fig, path)
    plt.close(fig)


def _json_lines(path):
    from .errors import FileFormatError
    from .fileio import require_file
    try:
        text = require_file(path, "bench JSON file").read_text()
    except UnicodeDecodeError:
        raise FileFormatError(f"{path}: not a text file of JSON lines") from None
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # bench scripts may print other lines too
        if isinstance(rec, dict):
            yield rec


def _accuracy_of(rec):
    return next((float(rec[k]) for k in ("accuracy", "snn_accuracy", "acc") if isinstance(rec.get(k), (int, float))), None)


_SERIES_KEYS = ("lib", "method", "impl", "name", "peer", "target")


def read_bench_json(path) -> dict:
    """``{series: [(T, accuracy)]}`` from JSON lines with an integer ``T`` and an accuracy field
    (``accuracy`` / ``acc``); lines whose ``kind`` is not ``snn`` (ANN, hybrid, checks) are skipped.
    Series are named by ``lib``/``method``/``impl``/``name`` (and ``net`` when several nets)."""
    recs = [r for r in _json_lines(path) if r.get("kind", "snn") == "snn" and isinstance(r.get("T"), int)
            and _accuracy_of(r) is not None]
    if not recs:
        raise SnncError(f"{path}: no JSON lines with an integer 'T' and an 'accuracy' field")
    nets = {r.get("net") for r in recs}
    series = {}
    for r in recs:
        keys = _SERIES_KEYS + (("net",) if len(nets) > 1 else ())
        name = " ".join(str(r[k]) for k in keys if k in r) or "accuracy"
        series.setdefault(name, []).append((r["T"], _accuracy_of(r)))
    return {k: sorted(v) for k, v in series.items()}


def _ann_accuracy(path):
    """The ANN's accuracy if the bench reports one (``ann_accuracy``, or ``kind: ann``), else None."""
    for rec in _json_lines(path):
        if isinstance(rec.get("ann_accuracy"), (int, float)):
            return float(rec["ann_accuracy"])
        if rec.get("kind") == "ann" and _accuracy_of(rec) is not None:
            return _accuracy_of(rec)
    return None


def plot_accuracy_vs_T(series: dict, path, ann_accuracy=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    many = len(series) > 6
    fig, ax = plt.subplots(figsize=(9 if many else 6, 4.5 if many else 4))
    colors = plt.get_cmap("tab20" if len(series) > 10 else "tab10").colors
    for i, (name, pts) in enumerate(series.items()):
        peer = not name.startswith("snnc") and "snnc" in " ".join(series)  # peers dashed, snnc solid
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s" if peer else "o", linestyle="--" if peer else "-",
                color=colors[i % len(colors)], label=name)
    if ann_accuracy is not None:
        ax.axhline(ann_accuracy, color="gray", linestyle="--", label="ANN")
    ax.set_xscale("log", base=2)
    ticks = sorted({p[0] for pts in series.values() for p in pts})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("time steps T")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("converted SNN: accuracy vs T")
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    else:
        ax.legend(fontsize=8)
    _save_png(fig, path)
    plt.close(fig)


def write_report(gm, dataset, T=8, out_dir="snnc_report", ann=None, bench_json=None, overwrite=False) -> dict:
    """Collect the stats and write ``report.md``, ``report.json``, ``firing_rates.png`` (and
    ``accuracy_vs_T.png`` from a bench JSON file) into ``out_dir``; returns their paths. Existing
    report files are kept unless ``overwrite=True``."""
    from .fileio import OverwriteError
    series = read_bench_json(bench_json) if bench_json else None  # fail before the long part
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OverwriteError(f"--out {out} is a file; give a folder for the report")
    paths = {"table": out / "report.md", "json": out / "report.json", "firing_rates": out / "firing_rates.png"}
    if bench_json:
        paths["accuracy_vs_T"] = out / "accuracy_vs_T.png"
    taken = [str(p) for p in paths.values() if p.exists()]
    if taken and not overwrite:
        raise OverwriteError(f"{', '.join(taken)} exist(s); pass overwrite=True (--overwrite) to replace")
    out.mkdir(parents=True, exist_ok=True)
    stats = collect(gm, dataset, T=T, ann=ann)
    atomic_write(paths["table"], lambda tmp: Path(tmp).write_text(table(stats)), overwrite=True)
    atomic_write(paths["json"], lambda tmp: Path(tmp).write_text(json.dumps(stats, indent=1)), overwrite=True)
    plot_firing_rates(stats, paths["firing_rates"])
    if bench_json:
        plot_accuracy_vs_T(series, paths["accuracy_vs_T"], ann_accuracy=_ann_accuracy(bench_json))
    return paths


def interleaved_seconds(fns: dict, rounds: int, *, warmup=True, sync=None, pause=0.0) -> dict:
    """Median wall seconds per callable of ``fns``, the calls interleaved round-robin for ``rounds``
    rounds (after one untimed call of each with ``warmup``): on a shared machine a change of load
    then hits every contender alike, so their ratios hold even when the absolute times drift.
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs after each call, inside the timed span, so an
    asynchronous device is timed to completion. ``pause``: seconds slept after each call, untimed,
    so thread pools that spin on after a call (OpenMP's, TVM's, onnxruntime's: milliseconds) are idle
    before the next contender starts. The one timer of the report and the benches."""
    sync = sync or (lambda: None)
    if warmup:
        for fn in fns.values():
            fn()
            sync()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
            if pause:
                time.sleep(pause)
    return {k: statistics.median(v) for k, v in times.items()}


def fastest(fns: dict, rounds: int) -> tuple:
    """``(winner, {name: best seconds})`` of a race between the callables of ``fns``: one untimed
    call of each first (a oneDNN primitive or a TVM kernel is built on its first call), then
    ``rounds`` rounds that call each once in turn, so a burst of load from elsewhere hits every
    contender alike; each keeps its fastest call (the least disturbed one). Ties go to the first
    listed. The one race of snnc's kernel choices (conv runners, spike blocks, GEMM backends)."""
    best = {k: float("inf") for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return min(best, key=best.get), best


def median_seconds(fn, repeats, warmup=True):
    """Median wall time of ``repeats`` calls of ``fn`` (after one untimed call with ``warmup``)."""
    return interleaved_seconds({"fn": fn}, repeats, warmup=warmup)["fn"]


def firing_rates(gm: fx.GraphModule, x) -> list:
    """Mean spike rate of every spiking layer of ``gm`` (snnc neurons and the integer ``IntIF`` /
    ``IntLIF``), in graph order, from one run on ``x`` (unrounded). Assumes a graph that runs as
    ``gm(x)`` (an unrolled or integer graph). Guarantees fresh state: reset before and after, so
    the rates do not depend on, or leak into, other runs."""
    from .runtime import reset
    rates = []

    class _Rates(fx.Interpreter):
        def call_module(self, target, args, kwargs):
            out = super().call_module(target, args, kwargs)
            if isinstance(self.module.get_submodule(target), (Neuron, IntIF)):
                rates.append(out.float().mean().item())
            return out
    reset(gm)
    with torch.no_grad():
        _Rates(gm).run(x)
    reset(gm)
    return rates


def quick_latency_bench(repeats=5, T=4, batch=8):
    """Built-in bench: a small conv SNN (zoo.bench_net) through each available target, against the
    same model run step by step in torch eager in this process. Yields JSON-able dicts (ratios)."""
    from .compiled import compile
    from .passes import unroll_timesteps
    from .runtime import reset
    from .tracer import trace
    from .zoo import bench_net
    torch.manual_seed(0)
    torch.set_num_threads(1)  # shared CPUs: thread oversubscription swamps small kernels; compare 1-thread
    model = bench_net(channels=(3, 16, 32, 32)).eval()
    x = torch.rand(T, batch, 3, 16, 16)

    def eager():
        reset(model)
        with torch.no_grad():
            return torch.stack([model(xt) for xt in x])
    base = median_seconds(eager, repeats)
    yield {"bench": "quick_latency", "impl": "torch eager (per step)", "T": T, "batch": batch, "ms": 1e3 * base, "ratio": 1.0}
    g = unroll_timesteps(trace(model, x[0]), T=T)
    for target in ("torch", "onnx", "tvm:llvm"):
        try:
            m = compile(g, target=target)
        except (SnncError, ImportError) as e:
            yield {"bench": "quick_latency", "impl": f"snnc {target}", "skipped": str(e).split("\n")[0][:200]}
            continue
        sec = median_seconds(lambda: m(x), repeats)
        yield {"bench": "quick_latency", "impl": f"snnc {target}", "T": T, "batch": batch, "ms": 1e3 * sec,
               "ratio": base / sec, "ratio_meaning": "speed-up over torch eager (median of repeats)"}
