"""The Open Neuromorphic SNN-library benchmark task on the CPU: one Linear(n, n) + one LIF layer,
batch 16, T=500 steps, fp32, forward then ``output.sum().backward()``; forward and backward
times (medians of interleaved rounds, same run) and peak memory per library; JSON lines.

    .venv/bin/python bench/open_neuromorphic.py [--quick] [--n 1024 4096] [--rounds 5]

Peers, each written the way its own documentation does it, same Linear weights and input
(``torch.randn(T, 16, n)``), LIF with decay 0.5 (tau=2) and each library's default surrogate:
  snnc          nn.Sequential(nn.Linear, snnc LIF(tau=2)) traced, unroll_timesteps(T),
                insert_surrogate("atan"), snnc.ops.gemm.fast_linears: one Linear over T*B rows on
                the float32 GEMM that won a per-shape race (MKL vs oneDNN; ``gemm_picks``), its
                output feature-major (y^T = W x^T, so dW = g^T x needs no transposed copy of g)
                + the fused native LIF scan reading that layout (spikes written over the Linear's
                output, backward keeps z fp32 + uint8 spikes, the broadcast dL/dS read once)
  snnc_bf16     the same with fast_linears(precision="bfloat16"): explicit opt-in, GEMM operands
                in bfloat16 (bound 2^-6 * sum|a b| per output, see snnc.ops.gemm); needs native
                bf16 (AVX512_BF16 / AMX), else skipped
  spikingjelly  layer.Linear + neuron.LIFNode(tau=2, decay_input=False, v_reset=None,
                step_mode="m") (snnc's LIF: H = 0.5 V + X, subtract reset; its torch code on CPU)
  snntorch      nn.Linear + snn.Leaky(beta=0.5) stepped over T in Python (its tutorial loop)
  norse         norse.torch.SequentialState(Linear, norse.torch.LIF()) on the [T, B, n] sequence
                (its defaults: current-based LIF), eager and under torch.compile (``norse_compiled``)
  sinabs        sinabs.layers.LIF(tau_mem=1/ln 2, norm_input=False, SingleSpike) on [B, T, n]
Missing libraries are reported as skipped. ``peak_mb``: the rise of peak resident memory over one
forward+backward after a warm-up, measured in a fresh process per library (Linux: VmHWM reset
through /proc/self/clear_refs; MALLOC_MMAP_THRESHOLD_=16384 there so that freed tensors go back to
the OS at once and RSS follows live memory; the timing runs keep the normal allocator). Each line
also gives ``fwd_bwd_ratio_vs_fastest_peer`` (snnc's line: the target is <= 0.5; snnc_* lines are
never the "peer"). The GEMM bound: a first line gives ``host_fp32_peak_gflops`` (bench/host_peak.py,
measured FMA peak with all threads), snnc's line ``gemm_gflops`` (each of its two GEMMs, forward
and weight gradient, timed alone on the task's operands) and ``gemm_floor_ms``: the two GEMMs'
flops at the host's peak, a floor no float32 implementation of the task can beat here (no
Strassen-like tricks), with ``gemm_floor_ratio_vs_fastest_peer``; ``gemm_ms``: the same two GEMMs at
the rates measured here (``gemm_ratio_vs_fastest_peer``: where it is >= 0.5, no float32 version of
the task built on this host's best GEMM reaches 0.5x the fastest peer, whatever the neuron costs).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's snnc (and bench.host_peak)

import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

BATCH, TAU = 16, 2.0


def emit(**row):
    print(json.dumps(row), flush=True)


def make_snnc(linear, T, precision="float32"):
    import snnc
    from snnc.ops import LIF
    from snnc.ops.gemm import fast_linears
    from snnc.passes import insert_surrogate, unroll_timesteps
    model = nn.Sequential(linear, LIF(tau=TAU))
    g = insert_surrogate(unroll_timesteps(snnc.trace(model, torch.zeros(BATCH, linear.in_features)), T=T),
                         kind="atan")
    return fast_linears(g, precision=precision).train(), g.parameters


def make_spikingjelly(linear, T):
    from spikingjelly.activation_based import functional, layer, neuron
    lin = layer.Linear(linear.in_features, linear.out_features, step_mode="m")
    lin.load_state_dict(linear.state_dict())
    net = nn.Sequential(lin, neuron.LIFNode(tau=TAU, decay_input=False, v_reset=None, step_mode="m"))

    def run(x):
        functional.reset_net(net)
        return net(x)
    return run, net.parameters


def make_snntorch(linear, T):
    import snntorch as snn
    fc, lif = linear, snn.Leaky(beta=1 - 1 / TAU)

    def run(x):
        mem, spikes = lif.init_leaky(), []
        for step in range(x.shape[0]):
            spk, mem = lif(fc(x[step]), mem)
            spikes.append(spk)
        return torch.stack(spikes)
    return run, fc.parameters


def make_norse(linear, T, compiled=False):
    import norse.torch as norse
    # norse's LIF module loops over the [T, B, n] sequence itself (current-based LIF, its defaults)
    net = norse.SequentialState(linear, norse.LIF())

    def run(x):
        return net(x)[0]
    return (torch.compile(run) if compiled else run), linear.parameters


def make_sinabs(linear, T):
    import math

    import sinabs.activation as sa
    import sinabs.layers as sl
    # alpha = exp(-1/tau_mem) = 0.5, input not scaled, one spike per step: snnc's LIF
    lif = sl.LIF(tau_mem=1 / math.log(2), norm_input=False, spike_fn=sa.SingleSpike)

    def run(x):
        lif.reset_states()
        return lif(linear(x.transpose(0, 1)))  # sinabs layers take [B, T, ...]
    return run, linear.parameters


PEERS = {"snnc": make_snnc, "snnc_bf16": lambda lin, T: make_snnc(lin, T, precision="bfloat16"), "spikingjelly": make_spikingjelly, "snntorch": make_snntorch,
         "norse": make_norse, "norse_compiled": lambda lin, T: make_norse(lin, T, compiled=True),
         "sinabs": make_sinabs}


def _fwd_bwd(run, params, x):
    for p in params():
        p.grad = None
    t0 = time.perf_counter()
    out = run(x)
    t1 = time.perf_counter()
    out.sum().backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, out


def _kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def peak_mb(run, params, x):
    """Rise of peak RSS over one forward+backward (None where /proc cannot reset the peak)."""
    _fwd_bwd(run, params, x)  # warm-up
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    base = _kb("VmRSS")
    _fwd_bwd(run, params, x)
    return round((_kb("VmHWM") - base) / 1024, 1)


def _task(n, T):
    torch.manual_seed(0)
    return nn.Linear(n, n), torch.randn(T, BATCH, n)


def _make(name, proto, T):
    linear = nn.Linear(proto.in_features, proto.out_features)
    linear.load_state_dict(proto.state_dict())
    return PEERS[name](linear, T)


def memory_of(name, n, T):
    """``peak_mb`` of one library, measured in a fresh process with the mmap threshold set."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="16384")
    cmd = [sys.executable, __file__, "--memory-of", name, "--n", str(n), "--T", str(T)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]
    except (IndexError, KeyError, json.JSONDecodeError):
        return None


def _gemm_rates(n, T, rounds=3):
    """GFLOP/s of snnc's two GEMMs on this task's shapes (feature-major forward ``W x^T`` and
    weight gradient ``g^T x``, on their raced backends), each timed alone, median of ``rounds``."""
    from snnc.ops.gemm import _nt, picks
    from snnc.report import interleaved_seconds
    won = {key.split()[0]: v for key, v in picks().items()}
    rows = T * BATCH
    w, x, gt = torch.randn(n, n), torch.randn(rows, n), torch.randn(n, rows)
    secs = interleaved_seconds({"forward": lambda: _nt(w, x, None, won.get("forward_fm", "onednn"), "float32"),
                                "weight_grad": lambda: _nt(gt, x.t(), None, won.get("weight_grad_fm", "onednn"), "float32")},
                               rounds)
    return {k: round(2 * rows * n * n / v / 1e9, 1) for k, v in secs.items()}


def _gemm_picks(n, impl):
    """The GEMM race's winners for this size (snnc.ops.gemm), e.g. ``{"forward": "onednn"}``."""
    from snnc.ops.gemm import picks
    if impl == "snnc_bf16":   # not raced: bfloat16 is oneDNN's
        return {"all": "onednn bfloat16"}
    return {key.split()[0]: v for key, v in picks().items() if str(n) in key.split()[1].split("x")}


def _vs_float32(firsts, name):
    """For snnc_bf16: spike agreement with snnc's float32 run and the relative error of its
    weight gradient (same weights and input), i.e. what the opt-in costs on this task."""
    if name != "snnc_bf16" or "snnc" not in firsts:
        return {}
    (out, grads), (ref, ref_grads) = firsts[name], firsts["snnc"]
    w, w_ref = grads[0].double(), ref_grads[0].double()
    return {"spike_agreement_vs_snnc_fp32": round(float((out == ref).double().mean()), 6),
            "weight_grad_rel_err_vs_snnc_fp32": round(float((w - w_ref).norm() / w_ref.norm()), 5)}


def bench(n, T, rounds, names, peak=None):
    proto, x = _task(n, T)
    peers, firsts = {}, {}
    for name in names:
        try:
            t0 = time.perf_counter()
            run, params = _make(name, proto, T)
            _, _, out = _fwd_bwd(run, params, x)  # warm-up (and torch.compile's compile)
        except Exception as e:  # noqa: BLE001 - a missing or failing peer is reported, not fatal
            emit(bench="open_neuromorphic", n=n, impl=name, skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        peers[name] = (run, params)
        firsts[name] = (out.detach(), [p.grad.clone() for p in params()])
        emit(bench="open_neuromorphic", n=n, impl=name, setup_s=round(time.perf_counter() - t0, 2),
             firing_rate=round(float(out.detach().float().mean()), 4), peak_mb=memory_of(name, n, T),
             **_vs_float32(firsts, name))
    times = {k: ([], []) for k in peers}
    for _ in tqdm(range(rounds), desc=f"n={n} rounds", file=sys.stderr):
        for k, (run, params) in peers.items():
            f, b, _ = _fwd_bwd(run, params, x)
            times[k][0].append(f)
            times[k][1].append(b)
    med = {k: (statistics.median(f), statistics.median(b)) for k, (f, b) in times.items()}
    fastest_peer = min((f + b for k, (f, b) in med.items() if not k.startswith("snnc")), default=None)
    floor = {}
    if peak and "snnc" in med:   # the two GEMMs (forward, dW; x needs no gradient) at the host's peak
        floor_s = 2 * (2 * T * BATCH * n * n) / (peak * 1e9)
        rates = _gemm_rates(n, T)
        gemm_s = sum(2 * T * BATCH * n * n / (r * 1e9) for r in rates.values())   # the two GEMMs alone, as measured
        floor = {"gemm_gflops": rates, "host_fp32_peak_gflops": peak, "gemm_floor_ms": round(floor_s * 1e3, 1),
                 "gemm_floor_ratio_vs_fastest_peer": None if fastest_peer is None else round(floor_s / fastest_peer, 3),
                 "gemm_ms": round(gemm_s * 1e3, 1),
                 "gemm_ratio_vs_fastest_peer": None if fastest_peer is None else round(gemm_s / fastest_peer, 3)}
    for k, (f, b) in med.items():
        emit(bench="open_neuromorphic", n=n, impl=k, batch=BATCH, T=T, rounds=rounds, threads=torch.get_num_threads(),
             fwd_ms=round(f * 1e3, 1), bwd_ms=round(b * 1e3, 1), fwd_bwd_ms=round((f + b) * 1e3, 1),
             fwd_bwd_ratio_vs_fastest_peer=None if fastest_peer is None else round((f + b) / fastest_peer, 3),
             **({"gemm_picks": _gemm_picks(n, k)} if k.startswith("snnc") else {}), **(floor if k == "snnc" else {}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="n=256, T=50, 2 rounds, no norse_compiled (its compile alone takes minutes)")
    ap.add_argument("--peers", nargs="+", choices=tuple(PEERS), default=None, help="default: all")
    ap.add_argument("--n", type=int, nargs="+", default=None)
    ap.add_argument("--T", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--memory-of", choices=tuple(PEERS), help=argparse.SUPPRESS)  # the child of memory_of
    args = ap.parse_args(argv)
    if args.memory_of:
        proto, x = _task(args.n[0], args.T)
        print(json.dumps({"peak_mb": peak_mb(*_make(args.memory_of, proto, args.T), x)}))
        return
    names = args.peers or [p for p in PEERS if not (args.quick and p == "norse_compiled")]
    from bench.host_peak import fp32_peak_gflops
    try:
        peak = round(fp32_peak_gflops(torch.get_num_threads()), 1)
    except (OSError, subprocess.SubprocessError) as e:   # no C compiler: no bound, the rest still runs
        peak = None
        emit(bench="open_neuromorphic", host_fp32_peak_gflops=None, skipped=f"{type(e).__name__}: {e}")
    else:
        emit(bench="open_neuromorphic", host_fp32_peak_gflops=peak, threads=torch.get_num_threads())
    for n in args.n or ([256] if args.quick else [1024, 4096]):
        bench(n, args.T or (50 if args.quick else 500), args.rounds or (2 if args.quick else 5), names, peak)


if __name__ == "__main__":
    main()
