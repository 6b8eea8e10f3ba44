"""NIR's two-state and stateful nodes both ways: CubaLIF, CubaLI, LI, I, Delay and recurrent
edges import with NIR's forward-Euler semantics (checked against a numpy simulation written from
the NIR equations, not from snnc's code), export back exactly, and run in every target."""

import numpy as np
import pytest
import torch
from torch import nn

import snnc
from snnc.errors import UnsupportedOp
from snnc.ops import LIF, CurrentLI, CurrentLIF, Delay, Feedback

nir = pytest.importorskip("nir")


def _graph(nodes, edges, n_in, n_out):
    nodes = {"input": nir.Input(input_type={"input": np.array([n_in])}), **nodes,
             "output": nir.Output(output_type={"output": np.array([n_out])})}
    return nir.NIRGraph(nodes=nodes, edges=edges)


def _euler(x, dt, tau_syn, tau_mem, r, v_leak, w_in, v_th=None, v_reset=0.0):
    """NIR CubaLIF / CubaLI, one forward-Euler step each (float64):
    tau_syn dI/dt = -I + w_in X, tau_mem dV/dt = v_leak - V + r I; fire V > v_th, V <- v_reset."""
    i, v, out = np.zeros(x.shape[1:]), np.full(x.shape[1:], v_leak), []
    for t in range(x.shape[0]):
        i = i + dt / tau_syn * (-i + w_in * x[t]) if tau_syn is not None else x[t]
        v = v + dt / tau_mem * (v_leak - v + r * i) if tau_mem is not None else v + dt * r * i
        if v_th is None:
            out.append(v.copy())
            continue
        s = (v > v_th).astype(np.float64)
        v = np.where(s > 0, v_reset, v)
        out.append(s)
    return np.stack(out)


def test_cuba_lif_li_i_and_delay_import_with_nir_euler_semantics():
    dt, n = 1e-3, 4
    one = np.ones(n)
    g = _graph({
        "syn": nir.CubaLIF(tau_syn=5e-3 * one, tau_mem=1e-2 * one, r=2.0 * one, v_leak=0.1 * one,
                           v_threshold=2.5 * one, v_reset=0 * one, w_in=3.0 * one),
        "li": nir.LI(tau=4e-3 * one, r=1.5 * one, v_leak=0 * one),
        "int": nir.I(r=50.0 * one),
        "cli": nir.CubaLI(tau_syn=2e-3 * one, tau_mem=8e-3 * one, r=one, v_leak=0 * one, w_in=2 * one),
        "del": nir.Delay(delay=3e-3 * one)},
        [("input", "syn"), ("syn", "li"), ("syn", "int"), ("syn", "cli"), ("cli", "del"), ("li", "output"),
         ("int", "output"), ("del", "output")], n, n)
    gm = snnc.from_nir(g, dt=dt)
    text = snnc.dump(gm)
    # the two gains multiply (I is linear in X): gain_in = (w_in dt/tau_syn)(r dt/tau_mem) = 0.6 * 0.2
    assert "snn.current_lif(%0) {alpha=0.8, beta=0.9, gain_in=0.12, v_leak=0.1, v_th=2.5, v_reset=0, reset=zero, " \
           "compare=>, v_init=0.1}  # syn" in text
    assert "snn.current_li(%1) {alpha=0.5, beta=0.875, gain_in=0.125}  # cli" in text
    assert "snn.delay(%2) {steps=3}  # ndel" in text   # 'del' is a Python keyword: renamed for fx
    assert "snn.current_li(%1) {alpha=0, beta=1, gain_in=0.05}  # int" in text
    assert "snn.current_li(%1) {alpha=0, beta=0.75, gain_in=0.375}  # li" in text
    torch.manual_seed(0)
    x = torch.rand(60, 2, n, dtype=torch.float64).float() * 2
    xs = x.double().numpy()
    spikes = _euler(xs, dt, 5e-3, 1e-2, 2.0, 0.1, 3.0, v_th=2.5)
    assert 0.1 < spikes.mean() < 0.9
    li = _euler(spikes, dt, None, 4e-3, 1.5, 0.0, 1.0)
    integ = _euler(spikes, dt, None, None, 50.0, 0.0, 1.0)
    cli = _euler(spikes, dt, 2e-3, 8e-3, 1.0, 0.0, 2.0)
    delayed = np.concatenate([np.zeros_like(cli[:3]), cli[:-3]])
    out = snnc.run(gm, x, T=60).double().numpy()
    np.testing.assert_allclose(out, li + integ + delayed, rtol=1e-4, atol=1e-5)


def test_snnc_to_nir_to_snnc_is_exact_for_current_neurons_feedback_and_delay(tmp_path):
    torch.manual_seed(1)
    m = nn.Sequential(
        nn.Linear(5, 8), CurrentLIF(alpha=0.6, beta=0.85, gain=0.7, v_leak=0.05, reset="subtract_after_leak",
                                    compare=">="),
        nn.Linear(8, 6), Feedback(CurrentLIF(alpha=0.3, beta=0.9, gain_in=1.5), nn.Linear(6, 6)),
        Delay(2), nn.Linear(6, 3), CurrentLI(alpha=0.4, beta=0.95, gain_in=0.5)).eval()
    with torch.no_grad():
        m[0].weight.mul_(2)
    gm = snnc.trace(m, torch.zeros(1, 5))
    with pytest.warns(UserWarning, match="to_nir: neurons 1 reset by subtraction"):
        g = snnc.to_nir(gm, dt=1e-3, path=tmp_path / "g.nir")
    kinds = {k: type(v).__name__ for k, v in g.nodes.items()}
    assert kinds["1"] == "CubaLIF" and kinds["3"] == "CubaLIF" and kinds["3.w_rec"] == "Affine"
    assert kinds["4"] == "Delay" and kinds["6"] == "CubaLI"
    assert ("3", "3.w_rec") in g.edges and ("3.w_rec", "3") in g.edges
    back = snnc.from_nir(tmp_path / "g.nir")
    assert snnc.dump(back).count("snn.feedback") == 1
    x = torch.rand(40, 3, 5)
    ref = snnc.run(gm, x, T=40)
    assert torch.equal(snnc.run(back, x, T=40), ref)
    # the NIR fields alone (no snnc metadata) say the same for the NIR-standard neurons: CubaLIF 3
    spikes = snnc.run(snnc.trace(nn.Sequential(*list(m)[:3]), torch.zeros(1, 5)), x, T=40).detach()
    plain = nir.NIRGraph(nodes={"input": nir.Input(input_type={"input": np.array([6])}),
                                "lif": nir.CubaLIF(**{k: getattr(g.nodes["3"], k) for k in (
                                    "tau_syn", "tau_mem", "r", "v_leak", "v_threshold", "v_reset", "w_in")}),
                                "w": g.nodes["3.w_rec"], "output": nir.Output(output_type={"output": np.array([6])})},
                         edges=[("input", "lif"), ("lif", "w"), ("w", "lif"), ("lif", "output")])
    again = snnc.from_nir(plain, dt=1e-3, warn=False)
    s3 = snnc.run(snnc.trace(nn.Sequential(m[3]), torch.zeros(1, 6)), spikes, T=40)
    assert s3.sum() > 10 and (snnc.run(again, spikes, T=40) == s3).float().mean() >= 0.999


def test_recurrent_cycles_import_as_feedback_and_bad_cycles_are_named():
    n, one = 3, np.ones(3)
    w = np.array([[0.0, 0.5, 0.0], [0.0, 0.0, 0.5], [0.5, 0.0, 0.0]])
    lif = nir.LIF(tau=2.0 * one, r=2.0 * one, v_leak=0 * one, v_threshold=one, v_reset=0 * one)
    g = _graph({"lif": lif, "w": nir.Linear(weight=w)},
               [("input", "lif"), ("lif", "w"), ("w", "lif"), ("lif", "output")], n, n)
    gm = snnc.from_nir(g, dt=1.0, warn=False)
    assert "snn.feedback(%0) {neuron=snn.lif, path=linear3, decay=0.5" in snnc.dump(gm)
    x = torch.zeros(6, 1, n)
    x[0, 0, 0] = 1.5   # neuron 0 fires at t=0; the ring passes the spike on, 0.5 per hop... plus the leak
    out = snnc.run(gm, x, T=6)
    # by hand: V = 0.5 V + 1.0 (x + W s[t-1]); 1.5 -> spike 0; 0.5 into neuron 2 at t=1 (w[2,0]) ...
    v, s, want = np.zeros(n), np.zeros(n), []
    for t in range(6):
        v = 0.5 * v + (x[t, 0].numpy() + w @ s)
        s = (v > 1.0).astype(float)
        v = np.where(s > 0, 0.0, v)
        want.append(s)
    np.testing.assert_array_equal(out[:, 0].numpy(), np.stack(want))
    # the same recurrent layer as a nested NIRGraph node (how older snntorch/nirtorch write RLeaky)
    sub = nir.NIRGraph(nodes={"input": nir.Input(input_type={"input": np.array([n])}), "lif": lif,
                              "w_rec": nir.Linear(weight=w), "output": nir.Output(output_type={"output": np.array([n])})},
                       edges=[("input", "lif"), ("lif", "w_rec"), ("w_rec", "lif"), ("lif", "output")], type_check=False)
    nested = nir.NIRGraph(nodes={"input": nir.Input(input_type={"input": np.array([n])}), "rl": sub,
                                 "output": nir.Output(output_type={"output": np.array([n])})},
                          edges=[("input", "rl"), ("rl", "output")], type_check=False)
    flat = snnc.from_nir(nested, dt=1.0, warn=False)
    assert "# rl_lif" in snnc.dump(flat) and torch.equal(snnc.run(flat, x, T=6), out)
    two = _graph({"a": lif, "b": lif}, [("input", "a"), ("a", "b"), ("b", "a"), ("b", "output")], n, n)
    with pytest.raises(UnsupportedOp, match="cycle through a, b\\) with 2 neurons in it"):
        snnc.from_nir(two, dt=1.0)


def test_current_neurons_and_delay_run_in_onnx_and_tvm(request):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), CurrentLIF(alpha=0.7, beta=0.8, gain=0.9, v_leak=0.1), Delay(2),
                      nn.Linear(8, 3), CurrentLI(alpha=0.5, beta=0.9, gain_in=0.5)).eval()
    with torch.no_grad():
        m[0].weight.mul_(3)
    gm = snnc.trace(m, torch.zeros(1, 6))
    x = torch.rand(10, 1, 6)
    ref = snnc.run(gm, x, T=10)
    u = snnc.passes.unroll_timesteps(gm, T=10)
    pytest.importorskip("tvm")
    for mode in ("hybrid", "relax"):
        c = snnc.compile(u, target="tvm:llvm", mode=mode)
        torch.testing.assert_close(c(x), ref, rtol=1e-5, atol=1e-5)
    # a recurrent edge: one TIR scan over T with the matrix-vector product in its body, both modes
    fb = nn.Sequential(nn.Linear(6, 4), Feedback(LIF(), nn.Linear(4, 4)))
    with torch.no_grad():
        fb[0].bias.fill_(0.8)
    fb = snnc.trace(fb, torch.zeros(1, 6))
    ref = snnc.run(fb, x, T=10)
    assert 0 < float(ref.mean()) < 1
    u = snnc.passes.unroll_timesteps(fb, T=10)
    assert "snn_feedback_scan" in snnc.targets.tvm_lower.to_relax(u).script()
    for mode in ("hybrid", "relax"):
        assert torch.equal(snnc.compile(u, target="tvm:llvm", mode=mode)(x), ref)


@pytest.mark.slow
def test_feedback_and_current_neurons_in_onnx():
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), Feedback(CurrentLIF(alpha=0.7, beta=0.8), nn.Linear(8, 8)), Delay(2),
                      nn.Linear(8, 3), CurrentLI(alpha=0.5, beta=0.9))
    with torch.no_grad():
        m[0].weight.mul_(3)
    gm = snnc.trace(m, torch.zeros(1, 6))
    x = torch.rand(10, 4, 6)
    ref = snnc.run(gm, x, T=10)
    c = snnc.compile(snnc.passes.unroll_timesteps(gm, T=10), target="onnx")
    assert torch.equal(c(x), ref)


def test_multi_step_graph_exports_with_bn_folded_and_a_readout_note():
    from snnc.zoo import digits_snn
    torch.manual_seed(0)
    m = digits_snn(8).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(1.0, 2.0)
                mod.bias.uniform_(0.2, 0.6)
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.weight.mul_(3)
    gm = snnc.trace(m, torch.zeros(1, 1, 8, 8))
    unrolled = snnc.passes.unroll_timesteps(gm, T=4)
    with pytest.warns(UserWarning, match="readout 12 \\(mode=membrane\\) .* has no NIR node"):
        g = snnc.to_nir(unrolled)
    assert not any("BatchNorm" in type(n).__name__ for n in g.nodes.values())
    assert g.metadata["T"] == 4 and ("11", "output") in g.edges
    with pytest.warns(UserWarning):
        assert sorted(snnc.to_nir(gm).edges) == sorted(g.edges)   # per-step and multi-step: one NIR graph
    back = snnc.from_nir(g)
    x = torch.rand(5, 1, 8, 8)
    ref = unrolled(x)
    per_step = snnc.run(back, x.unsqueeze(0).expand(4, -1, -1, -1, -1), T=4)
    rates = {}
    hooks = [mod.register_forward_hook(lambda mod, i, o, k=k: rates.setdefault(k, []).append(float(o.mean())))
             for k, mod in back.named_modules() if isinstance(mod, LIF)]
    per_step = snnc.run(back, x.unsqueeze(0).expand(4, -1, -1, -1, -1), T=4)
    for h in hooks:
        h.remove()
    assert len(rates) == 3 and all(np.mean(r) > 0.02 for r in rates.values()), rates   # every layer fires
    torch.testing.assert_close(per_step.mean(0), ref, rtol=1e-5, atol=1e-5)


def test_spikingjelly_multi_step_model_goes_to_nir_and_back():
    pytest.importorskip("spikingjelly.activation_based")
    from spikingjelly.activation_based import functional, layer, neuron
    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(1, 4, 3, padding=1), layer.BatchNorm2d(4), neuron.LIFNode(tau=2.0),
                        layer.Flatten(), layer.Linear(4 * 36, 5), neuron.IFNode())
    functional.set_step_mode(net, "m")
    net.eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 2.0)
        net[0].weight.mul_(3)
        net[4].weight.mul_(3)
    x = torch.rand(6, 3, 1, 6, 6) * 2
    gm = snnc.trace(net, x)
    assert gm.snnc_spec["layout"] == "seq" and gm.snnc_spec["T"] == 6
    back = snnc.from_nir(snnc.to_nir(gm))
    functional.reset_net(net)
    with torch.no_grad():
        ref = net(x)
    assert ref.mean() > 0.05 and torch.equal(snnc.run(back, x, T=6), ref)
