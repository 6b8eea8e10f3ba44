"""GPU benchmark driver (run by bench/gpu.sh): tvm:cuda checked against the reference, then the
bench net, ResNet-19 and the Open Neuromorphic task timed against torch eager, torch.compile and
spikingjelly's CUDA kernels (cupy/triton, whichever spikingjelly selects), as JSON lines.

    python bench/gpu.py [--device cuda] [--quick] [--budget-s 420]

Every section is guarded: a failure prints a JSON line with ``error`` and the next section runs;
a section that would start after ``--budget-s`` seconds is skipped (``skipped: budget``).
``--device cpu --quick`` runs the same code paths on small shapes without a GPU (tvm:cuda is then
only built, not run): that is how the script itself is tested.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from torch import nn  # noqa: E402

import snnc  # noqa: E402
from snnc.ops import LIF  # noqa: E402
from snnc.passes import insert_surrogate, unroll_timesteps  # noqa: E402
from snnc.report import interleaved_seconds  # noqa: E402
from snnc.zoo import bench_net, resnet19  # noqa: E402

START = time.perf_counter()


def emit(**row):
    print(json.dumps(row), flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def section(name, budget):
    def wrap(fn):
        def run(*args, **kw):
            if time.perf_counter() - START > budget:
                emit(bench="gpu", section=name, skipped="budget")
                return
            t0 = time.perf_counter()
            try:
                fn(*args, **kw)
            except Exception as e:  # noqa: BLE001 - report and go on to the next section
                emit(bench="gpu", section=name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                     where=traceback.format_exc().strip().splitlines()[-3][:200])
            emit(bench="gpu", section=name, seconds=round(time.perf_counter() - t0, 1))
        return run
    return wrap


def firing(net):
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight *= 4
    return net.eval()


def sj_seq(net):
    """The same net in spikingjelly multi-step form (its CUDA kernels are chosen by device)."""
    from spikingjelly.activation_based import layer, neuron
    return nn.Sequential(*[layer.SeqToANNContainer(m) if isinstance(m, nn.Conv2d) else
                           neuron.LIFNode(tau=m.tau, decay_input=m.decay_input, v_reset=None, step_mode="m")
                           for m in net]).eval()


def sj_implementation(device):
    try:
        from spikingjelly.activation_based import functional
        return functional.neuron_implementation("lif", device)["implementation"]
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__})"


def cuda_arch(device):
    if device.type != "cuda":
        return "sm_80"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def check_tvm_cuda(device, quick):
    net = firing(bench_net((3, 16, 32) if quick else (3, 64, 128, 128)))
    N = 2 if quick else 16
    g = unroll_timesteps(snnc.trace(net, torch.zeros(N, 3, 32, 32)), T=4)
    x = torch.rand(4, N, 3, 32, 32) * 2
    t0 = time.perf_counter()
    m = snnc.compile(g, target="tvm:cuda", arch=cuda_arch(device))
    emit(bench="gpu", case="tvm_cuda_build", arch=cuda_arch(device), compile_s=round(time.perf_counter() - t0, 1))
    if device.type != "cuda":
        emit(bench="gpu", case="tvm_cuda_check", skipped="no CUDA device: built only")
        return
    ref = snnc.run(g, x)
    out = m(x)
    emit(bench="gpu", case="tvm_cuda_check", spike_agreement=float((out == ref).float().mean()),
         firing_rate=round(float(ref.mean()), 3))
    t = interleaved_seconds({"tvm_cuda_incl_copies": lambda: m(x)}, 5, sync=lambda: sync(device))
    emit(bench="gpu", case="tvm_cuda_bench_net", N=N, ms=round(t["tvm_cuda_incl_copies"] * 1e3, 2))


def plain_loop(net):
    """The hand-written multi-step loop of bench/inference.py (one definition for both benches;
    loaded by path because bench/ is kept off sys.path)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_snnc_bench_inference", Path(__file__).with_name("inference.py"))
    inference = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = inference  # torch.compile re-imports the loop's module by its name
    spec.loader.exec_module(inference)
    return inference.PlainLoop(net).eval()


def bench_inference(device, quick, name, net, x, rounds, T=4):
    """``x``: ``[T, N, ...]`` for a sequence net, ``[N, ...]`` for a net with its own encoder."""
    g = unroll_timesteps(snnc.trace(net, x[0] if name == "bench_net" else x), T=T).to(device)
    x = x.to(device)
    fns = {"snnc_graph_eager": lambda: g(x)}
    if name == "bench_net":
        loop = plain_loop(net.to(device))
        fns["plain_loop_eager"] = lambda: loop(x)
        fns["plain_loop_torch_compile"] = torch.compile(lambda: loop(x))
        try:
            from spikingjelly.activation_based import functional
            sj = sj_seq(net).to(device)

            def run_sj():
                functional.reset_net(sj)
                return sj(x)
            fns["spikingjelly_" + sj_implementation(device)] = run_sj
        except ImportError:
            emit(bench="gpu", case=name, impl="spikingjelly", skipped="not installed")
    else:
        fns["snnc_graph_torch_compile"] = torch.compile(lambda: g(x))
    with torch.no_grad():
        t = interleaved_seconds(fns, rounds, sync=lambda: sync(device))
    base = t.get("plain_loop_torch_compile") or t.get("snnc_graph_torch_compile")
    for k, v in t.items():
        emit(bench="gpu", case=name, impl=k, input=list(x.shape), T=T, ms=round(v * 1e3, 2),
             ratio_vs_torch_compile=round(v / base, 3))


def bench_open_neuromorphic(device, quick, rounds):
    n, T, B = (256, 50, 16) if quick else (16384, 500, 16)
    torch.manual_seed(0)
    proto = nn.Linear(n, n)
    x = torch.randn(T, B, n, device=device)
    fns = {}
    lin = nn.Linear(n, n)
    lin.load_state_dict(proto.state_dict())
    g = insert_surrogate(unroll_timesteps(snnc.trace(nn.Sequential(lin, LIF(tau=2.0)), torch.zeros(B, n)), T=T),
                         kind="atan").to(device).train()
    fns["snnc"] = (lambda: g(x), g.parameters)
    try:
        from spikingjelly.activation_based import functional, layer, neuron
        sl = layer.Linear(n, n, step_mode="m")
        sl.load_state_dict(proto.state_dict())
        sj = nn.Sequential(sl, neuron.LIFNode(tau=2.0, decay_input=False, v_reset=None, step_mode="m")).to(device)

        def run_sj():
            functional.reset_net(sj)
            return sj(x)
        fns["spikingjelly_" + sj_implementation(device)] = (run_sj, sj.parameters)
    except ImportError:
        emit(bench="gpu", case="open_neuromorphic", impl="spikingjelly", skipped="not installed")
    try:
        import norse.torch as norse
        nl = nn.Linear(n, n)
        nl.load_state_dict(proto.state_dict())
        nnet = norse.SequentialState(nl, norse.LIF()).to(device)
        fns["norse_compiled"] = (torch.compile(lambda: nnet(x)[0]), nnet.parameters)
    except ImportError:
        emit(bench="gpu", case="open_neuromorphic", impl="norse", skipped="not installed")

    def step(run, params):
        def go():
            for p in params():
                p.grad = None
            run().sum().backward()
        return go
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = interleaved_seconds({k: step(*v) for k, v in fns.items()}, rounds, sync=lambda: sync(device))
    fastest = min(v for k, v in t.items() if k != "snnc") if len(t) > 1 else None
    for k, v in t.items():
        emit(bench="gpu", case="open_neuromorphic", impl=k, n=n, T=T, batch=B, fwd_bwd_ms=round(v * 1e3, 2),
             ratio_vs_fastest_peer=None if fastest is None else round(v / fastest, 3),
             published_n16384_s={"spikingjelly_cupy": 0.118, "norse_compiled": 0.110, "snntorch": 3.08})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no section after this many seconds")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():  # e.g. `make bench` on a CPU machine
        emit(bench="gpu", skipped="no CUDA device visible to torch; run bench/gpu.sh on a GPU machine")
        return 0
    emit(bench="gpu", device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
         torch=torch.__version__, spikingjelly_lif=sj_implementation(device))
    rounds = 3 if args.quick else 10
    section("tvm_cuda", args.budget_s)(check_tvm_cuda)(device, args.quick)
    torch.manual_seed(0)
    N = 2 if args.quick else 16
    section("bench_net", args.budget_s)(bench_inference)(
        device, args.quick, "bench_net", firing(bench_net((3, 16, 32) if args.quick else (3, 64, 128, 128))),
        torch.rand(4, N, 3, 32, 32) * 2, rounds)
    N = 2 if args.quick else 64
    section("resnet19", args.budget_s)(bench_inference)(
        device, args.quick, "resnet19", resnet19(width=0.125 if args.quick else 1.0).eval(),
        torch.rand(N, 3, 32, 32), rounds)
    section("open_neuromorphic", args.budget_s)(bench_open_neuromorphic)(device, args.quick, rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
