"""Framework import bench: a spikingjelly (multi-step) and an snntorch (per-step) conv SNN, imported
with ``snnc.trace``, unrolled and compiled to the torch target, timed against the framework running
its own model in the same process. Prints one JSON line per result: spikes identical (bool) and the
speed ratio framework_time / snnc_time (median of repeats; > 1 means snnc is faster).

    .venv/bin/python bench/frontends.py [--quick]
"""
from __future__ import annotations

import argparse
import json

import torch
from torch import nn

import snnc
from snnc.report import median_seconds


def _scaled(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)
    return model.eval()


def bench_spikingjelly(T, batch, repeats):
    from spikingjelly.activation_based import functional, layer, neuron
    m = _scaled(nn.Sequential(
        layer.Conv2d(3, 32, 3, padding=1, step_mode="m"), neuron.LIFNode(tau=2.0, step_mode="m"),
        layer.Conv2d(32, 32, 3, padding=1, step_mode="m"), neuron.LIFNode(tau=2.0, step_mode="m"),
        layer.Flatten(step_mode="m"), layer.Linear(32 * 16 * 16, 10, step_mode="m"), neuron.IFNode(v_threshold=0.2, step_mode="m")))
    x = torch.rand(T, batch, 3, 16, 16)

    def theirs():
        functional.reset_net(m)
        with torch.no_grad():
            return m(x)
    compiled = snnc.compile(snnc.trace(m, x), target="torch")
    ref = theirs()
    same = torch.equal(ref, compiled(x))
    t_theirs, t_ours = median_seconds(theirs, repeats), median_seconds(lambda: compiled(x), repeats)
    return {"bench": "frontends", "framework": "spikingjelly 2.0 (multi-step, torch backend)", "T": T, "batch": batch,
            "spikes_identical": same, "output_spikes": int(ref.sum()), "framework_ms": 1e3 * t_theirs, "snnc_torch_ms": 1e3 * t_ours,
            "ratio": t_theirs / t_ours}


def bench_snntorch(T, batch, repeats):
    import snntorch as snn
    from snntorch import utils
    m = _scaled(nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), snn.Leaky(beta=0.5, init_hidden=True),
        nn.Conv2d(32, 32, 3, padding=1), snn.Leaky(beta=0.5, init_hidden=True),
        nn.Flatten(), nn.Linear(32 * 16 * 16, 10), snn.Leaky(beta=0.9, init_hidden=True)))
    x = torch.rand(T, batch, 3, 16, 16)

    def theirs():
        utils.reset(m)
        with torch.no_grad():
            return torch.stack([m(xt) for xt in x])
    g = snnc.passes.unroll_timesteps(snnc.trace(m, x[0]), T=T)
    compiled = snnc.compile(g, target="torch")
    ref = theirs()
    same = torch.equal(ref, compiled(x))
    t_theirs, t_ours = median_seconds(theirs, repeats), median_seconds(lambda: compiled(x), repeats)
    return {"bench": "frontends", "framework": "snntorch 1.0 (per-step loop)", "T": T, "batch": batch,
            "spikes_identical": same, "output_spikes": int(ref.sum()), "framework_ms": 1e3 * t_theirs, "snnc_torch_ms": 1e3 * t_ours,
            "ratio": t_theirs / t_ours}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    T, batch, repeats = (4, 8, 3) if args.quick else (8, 32, 7)
    torch.set_num_threads(1)  # the machine is shared: compare single-threaded
    for fn in (bench_spikingjelly, bench_snntorch):
        try:
            print(json.dumps(fn(T, batch, repeats)), flush=True)
        except ImportError as e:
            print(json.dumps({"bench": "frontends", "framework": fn.__name__[6:], "skipped": str(e)}), flush=True)


if __name__ == "__main__":
    main()
