"""The peer-model corpus: models written the way each framework's tutorials and model zoo write
them (not for snnc), each with the framework's own run as the reference.

A case is ``Case(build, inputs, run)``: ``build()`` makes the model (eval mode, weights scaled so
that every layer fires), ``inputs()`` the example, and ``run(model, x)`` the framework's own
output: the model called once on ``x`` (multi-step models, and models that loop over time in
``forward``) or the framework's usual per-step loop over ``x[t]`` with its own reset.
``per_step=True`` means snnc traces one step (``x[0]``) and is run over T.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn


@dataclasses.dataclass
class Case:
    framework: str
    build: Callable
    inputs: Callable
    run: Callable
    per_step: bool = False
    slow: bool = False


def _weights(model, std=0.5, seed=0):
    """Deterministic weights large enough that spikes reach the last layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * std * 3.0 / fan_in ** 0.5)
            elif "bias" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 0.2)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.5)
    return model.eval()


def _rand(*shape, scale=1.0, seed=1):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * scale


CASES: dict[str, Case] = {}


def case(name, framework, inputs, per_step=False, slow=False, run=None):
    def wrap(build):
        CASES[name] = Case(framework, build, inputs, run or (_per_step_run(framework) if per_step else _call_run(framework)),
                           per_step, slow)
        return build
    return wrap


def _reset(framework, model):
    if framework == "spikingjelly":
        from spikingjelly.activation_based import functional
        functional.reset_net(model)
    elif framework == "snntorch":
        from snntorch import utils
        utils.reset(model)
    elif framework == "sinabs":
        for m in model.modules():
            if hasattr(m, "reset_states"):
                m.reset_states()


def _call_run(framework):
    def run(model, x):
        _reset(framework, model)
        with torch.no_grad():
            out = model(x)
        _reset(framework, model)
        return out
    return run


def _per_step_run(framework):
    def run(model, x):
        _reset(framework, model)
        with torch.no_grad():
            outs = [model(xt) for xt in x]
        _reset(framework, model)
        if isinstance(outs[0], tuple):
            return tuple(torch.stack([o[i] for o in outs]) for i in range(len(outs[0])))
        return torch.stack(outs)
    return run


# --- spikingjelly 2.0 ------------------------------------------------------------------------------

@case("sj_tutorial_csnn", "spikingjelly", lambda: _rand(2, 1, 28, 28))
def sj_tutorial_csnn():
    """spikingjelly's conv_fashion_mnist tutorial network (multi-step, x.unsqueeze(0).repeat, .mean(0))."""
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    class CSNN(nn.Module):
        def __init__(self, T: int, channels: int):
            super().__init__()
            self.T = T
            self.conv_fc = nn.Sequential(
                layer.Conv2d(1, channels, kernel_size=3, padding=1, bias=False),
                layer.BatchNorm2d(channels),
                neuron.IFNode(surrogate_function=surrogate.ATan()),
                layer.MaxPool2d(2, 2),  # 14 * 14
                layer.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
                layer.BatchNorm2d(channels),
                neuron.IFNode(surrogate_function=surrogate.ATan()),
                layer.MaxPool2d(2, 2),  # 7 * 7
                layer.Flatten(),
                layer.Linear(channels * 7 * 7, channels * 4 * 4, bias=False),
                neuron.IFNode(surrogate_function=surrogate.ATan()),
                layer.Linear(channels * 4 * 4, 10, bias=False),
                neuron.IFNode(surrogate_function=surrogate.ATan()),
            )
            functional.set_step_mode(self, step_mode="m")

        def forward(self, x: torch.Tensor):
            # x.shape = [N, C, H, W]
            x_seq = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)  # [N, C, H, W] -> [T, N, C, H, W]
            x_seq = self.conv_fc(x_seq)
            fr = x_seq.mean(0)
            return fr

    return _weights(CSNN(T=4, channels=4), std=1.0)


@case("sj_single_step_lif", "spikingjelly", lambda: (_rand(6, 3, 1, 8, 8) < 0.4).float(), per_step=True)
def sj_single_step_lif():
    """The single-step MNIST tutorial net (``layer.Flatten -> layer.Linear -> neuron.LIFNode``),
    driven by the tutorial's loop over encoded frames."""
    from spikingjelly.activation_based import layer, neuron, surrogate

    class SNN(nn.Module):
        def __init__(self, tau):
            super().__init__()
            self.layer = nn.Sequential(
                layer.Flatten(),
                layer.Linear(8 * 8, 10, bias=False),
                neuron.LIFNode(tau=tau, surrogate_function=surrogate.ATan()),
            )

        def forward(self, x: torch.Tensor):
            return self.layer(x)

    return _weights(SNN(tau=2.0), std=1.5)


@case("sj_mnistnet_voting", "spikingjelly", lambda: _rand(3, 2, 1, 28, 28, scale=2.0), per_step=True)
def sj_mnistnet_voting():
    """The zoo's parametric-LIF ``MNISTNet`` (Dropout, ``VotingLayer``), single-step."""
    from spikingjelly.activation_based import neuron
    from spikingjelly.activation_based.model.parametric_lif_net import MNISTNet
    return _weights(MNISTNet(channels=4, spiking_neuron=neuron.ParametricLIFNode), std=1.0)


def _zoo_module(name):
    """``spikingjelly.activation_based.model.<name>``. The zoo modules import torchvision only for
    ``load_state_dict_from_url`` (pretrained downloads, unused here); torchvision is not installed
    beside the CPU torch, so they get torch.hub's function under that name while they import."""
    import importlib
    import importlib.util
    import sys
    import types
    full = f"spikingjelly.activation_based.model.{name}"
    if importlib.util.find_spec("torchvision") is not None or full in sys.modules:
        return importlib.import_module(full)
    tv, utils = types.ModuleType("torchvision"), types.ModuleType("torchvision._internally_replaced_utils")
    utils.load_state_dict_from_url = torch.hub.load_state_dict_from_url
    tv._internally_replaced_utils = utils
    sys.modules.update({"torchvision": tv, "torchvision._internally_replaced_utils": utils})
    try:
        return importlib.import_module(full)
    finally:
        del sys.modules["torchvision"], sys.modules["torchvision._internally_replaced_utils"]


def _zoo(fn, **kw):
    from spikingjelly.activation_based import functional, neuron
    net = fn(spiking_neuron=neuron.IFNode, num_classes=5, **kw)
    functional.set_step_mode(net, "m")
    return _weights(net, std=1.0)


@case("sj_sew_resnet18", "spikingjelly", lambda: _rand(2, 1, 3, 32, 32), slow=True)
def sj_sew_resnet18():
    sew_resnet = _zoo_module("sew_resnet")
    return _zoo(sew_resnet.sew_resnet18, cnf="ADD")


@case("sj_spiking_resnet18", "spikingjelly", lambda: _rand(2, 1, 3, 32, 32), slow=True)
def sj_spiking_resnet18():
    spiking_resnet = _zoo_module("spiking_resnet")
    return _zoo(spiking_resnet.spiking_resnet18)


@case("sj_spiking_vgg11_bn", "spikingjelly", lambda: _rand(2, 1, 3, 32, 32), slow=True)
def sj_spiking_vgg11_bn():
    spiking_vgg = _zoo_module("spiking_vgg")
    return _zoo(spiking_vgg.spiking_vgg11_bn)


# --- snntorch --------------------------------------------------------------------------------------

def _snn_seq(reset, output):
    import snntorch as snn
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), snn.Leaky(beta=0.8, threshold=0.7, init_hidden=True, reset_mechanism=reset),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
        snn.Leaky(beta=0.6, init_hidden=True, reset_mechanism=reset, output=output))
    return _weights(net, std=1.0)


for _reset_kind in ("subtract", "zero", "none"):
    for _output in (False, True):
        case(f"snn_leaky_seq_{_reset_kind}{'_output' if _output else ''}", "snntorch",
             lambda: _rand(8, 2, 1, 8, 8, scale=2.0), per_step=True)(
            lambda r=_reset_kind, o=_output: _snn_seq(r, o))


@case("snn_leaky_per_neuron_learnable", "snntorch", lambda: _rand(8, 3, 12, scale=2.0), per_step=True)
def snn_leaky_per_neuron_learnable():
    """Per-neuron learnable beta and threshold (tutorial 'learnable parameters')."""
    import snntorch as snn
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(
        nn.Linear(12, 10),
        snn.Leaky(beta=torch.rand(10, generator=g), threshold=torch.rand(10, generator=g) + 0.5,
                  learn_beta=True, learn_threshold=True, init_hidden=True),
        nn.Linear(10, 4), snn.Leaky(beta=0.7, learn_beta=True, init_hidden=True, output=True))
    return _weights(net, std=1.0)


NUM_STEPS = 6


@case("snn_tutorial_loop", "snntorch", lambda: _rand(3, 12, scale=2.0))
def snn_tutorial_loop():
    """snntorch tutorial 5: the membrane threaded through ``forward``'s own loop over num_steps."""
    import snntorch as snn
    num_steps = NUM_STEPS

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(12, 10)
            self.lif1 = snn.Leaky(beta=0.95)
            self.fc2 = nn.Linear(10, 4)
            self.lif2 = snn.Leaky(beta=0.95)

        def forward(self, x):
            mem1 = self.lif1.init_leaky()
            mem2 = self.lif2.init_leaky()
            spk2_rec = []
            mem2_rec = []
            for step in range(num_steps):
                cur1 = self.fc1(x)
                spk1, mem1 = self.lif1(cur1, mem1)
                cur2 = self.fc2(spk1)
                spk2, mem2 = self.lif2(cur2, mem2)
                spk2_rec.append(spk2)
                mem2_rec.append(mem2)
            return torch.stack(spk2_rec, dim=0), torch.stack(mem2_rec, dim=0)

    return _weights(Net(), std=1.0)


@case("snn_tutorial_loop_spike_input", "snntorch", lambda: (_rand(NUM_STEPS, 3, 1, 8, 8) < 0.5).float())
def snn_tutorial_loop_spike_input():
    """A conv net that loops over spike-encoded frames ``x[step]`` inside ``forward``."""
    import snntorch as snn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 4, 3)
            self.lif1 = snn.Leaky(beta=0.9, reset_mechanism="zero")
            self.fc1 = nn.Linear(4 * 6 * 6, 5)
            self.lif2 = snn.Leaky(beta=0.9)

        def forward(self, x):
            mem1 = self.lif1.init_leaky()
            mem2 = self.lif2.init_leaky()
            spk_rec = []
            for step in range(x.shape[0]):
                spk1, mem1 = self.lif1(self.conv1(x[step]), mem1)
                spk2, mem2 = self.lif2(self.fc1(spk1.flatten(1)), mem2)
                spk_rec.append(spk2)
            return torch.stack(spk_rec)

    return _weights(Net(), std=1.0)


@case("snn_synaptic", "snntorch", lambda: _rand(8, 3, 12, scale=1.5), per_step=True)
def snn_synaptic():
    import snntorch as snn
    return _weights(nn.Sequential(
        nn.Linear(12, 10), snn.Synaptic(alpha=0.9, beta=0.8, init_hidden=True),
        nn.Linear(10, 4), snn.Synaptic(alpha=0.5, beta=0.7, threshold=0.8, reset_mechanism="zero",
                                       init_hidden=True, output=True)), std=1.0)


@case("snn_synaptic_loop", "snntorch", lambda: _rand(3, 12, scale=1.5))
def snn_synaptic_loop():
    import snntorch as snn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(12, 10)
            self.lif1 = snn.Synaptic(alpha=0.9, beta=0.85)
            self.fc2 = nn.Linear(10, 4)
            self.lif2 = snn.Synaptic(alpha=0.8, beta=0.8)

        def forward(self, x):
            syn1, mem1 = self.lif1.init_synaptic()
            syn2, mem2 = self.lif2.init_synaptic()
            spk2_rec, mem2_rec = [], []
            for step in range(NUM_STEPS):
                spk1, syn1, mem1 = self.lif1(self.fc1(x), syn1, mem1)
                spk2, syn2, mem2 = self.lif2(self.fc2(spk1), syn2, mem2)
                spk2_rec.append(spk2)
                mem2_rec.append(mem2)
            return torch.stack(spk2_rec), torch.stack(mem2_rec)

    return _weights(Net(), std=1.0)


@case("snn_rleaky_all_to_all", "snntorch", lambda: _rand(8, 3, 12, scale=1.5), per_step=True)
def snn_rleaky_all_to_all():
    import snntorch as snn
    return _weights(nn.Sequential(
        nn.Linear(12, 10), snn.RLeaky(beta=0.9, linear_features=10, init_hidden=True),
        nn.Linear(10, 4), snn.RLeaky(beta=0.8, all_to_all=False, V=0.5, init_hidden=True)), std=1.0)


@case("snn_rleaky_loop", "snntorch", lambda: _rand(3, 12, scale=1.5))
def snn_rleaky_loop():
    """snntorch's RLeaky docstring example: ``spk, mem = lif(cur, spk, mem)`` in forward's loop."""
    import snntorch as snn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(12, 10)
            self.lif1 = snn.RLeaky(beta=0.9, linear_features=10)
            self.fc2 = nn.Linear(10, 4)
            self.lif2 = snn.RLeaky(beta=0.9, all_to_all=False, V=torch.rand(4) * 0.5)

        def forward(self, x):
            spk1, mem1 = self.lif1.init_rleaky()
            spk2, mem2 = self.lif2.init_rleaky()
            spk2_rec = []
            for step in range(NUM_STEPS):
                spk1, mem1 = self.lif1(self.fc1(x), spk1, mem1)
                spk2, mem2 = self.lif2(self.fc2(spk1), spk2, mem2)
                spk2_rec.append(spk2)
            return torch.stack(spk2_rec)

    return _weights(Net(), std=1.0)


@case("snn_rsynaptic", "snntorch", lambda: _rand(8, 3, 12, scale=1.5), per_step=True)
def snn_rsynaptic():
    import snntorch as snn
    return _weights(nn.Sequential(
        nn.Linear(12, 10), snn.RSynaptic(alpha=0.8, beta=0.9, linear_features=10, init_hidden=True),
        nn.Linear(10, 4), snn.RSynaptic(alpha=0.5, beta=0.8, all_to_all=False, V=0.3, init_hidden=True)), std=1.0)


# --- norse ---------------------------------------------------------------------------------------------

def _norse_state_run(model, x):
    """norse's own style: ``out, state = model(x[ts], state)`` over time."""
    state = None
    outs = []
    with torch.no_grad():
        for ts in range(x.shape[0]):
            out, state = model(x[ts], state)
            outs.append(out)
    return torch.stack(outs)


@case("norse_sequential_lifcell", "norse", lambda: _rand(10, 3, 12, scale=3.0), per_step=True, run=_norse_state_run)
def norse_sequential_lifcell():
    import norse.torch as norse
    return _weights(norse.SequentialState(
        nn.Linear(12, 10), norse.LIFCell(), nn.Linear(10, 6), norse.LIFCell(), nn.Linear(6, 4), norse.LICell()), std=4.0)


@case("norse_sequential_lifbox", "norse", lambda: _rand(10, 2, 1, 8, 8, scale=3.0), per_step=True, run=_norse_state_run)
def norse_sequential_lifbox():
    import norse.torch as norse
    return _weights(norse.SequentialState(
        nn.Conv2d(1, 4, 3), norse.LIFBoxCell(), nn.Flatten(), nn.Linear(4 * 36, 5), norse.LIFBoxCell()), std=4.0)


@case("norse_loop", "norse", lambda: _rand(10, 3, 12, scale=3.0))
def norse_loop():
    """norse's explicit style: the cells' state tuples threaded through ``for ts in range(T)``."""
    import norse.torch as norse

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 8)
            self.lif = norse.LIFCell(p=norse.LIFParameters(tau_mem_inv=torch.tensor(200.0), v_th=torch.tensor(0.5)))
            self.out = nn.Linear(8, 3)
            self.li = norse.LICell()

        def forward(self, x):
            s1 = so = None
            voltages = []
            for ts in range(x.shape[0]):
                z, s1 = self.lif(self.fc(x[ts]), s1)
                v, so = self.li(self.out(z), so)
                voltages.append(v)
            return torch.stack(voltages)

    return _weights(Net(), std=4.0)


# --- sinabs --------------------------------------------------------------------------------------------

@case("sinabs_iaf_multispike", "sinabs", lambda: _rand(2, 6, 12, scale=2.0))
def sinabs_iaf_multispike():
    """sinabs' defaults: ``IAF`` on ``[batch, time, ...]`` with MultiSpike and MembraneSubtract."""
    import sinabs.layers as sl
    return _weights(nn.Sequential(nn.Linear(12, 10), sl.IAF(), nn.Linear(10, 4), sl.IAF()), std=1.0)


@case("sinabs_iaf_singlespike_reset", "sinabs", lambda: _rand(2, 6, 12, scale=2.0))
def sinabs_iaf_singlespike_reset():
    import sinabs.activation as sa
    import sinabs.layers as sl
    return _weights(nn.Sequential(
        nn.Linear(12, 10), sl.IAF(spike_fn=sa.SingleSpike, reset_fn=sa.MembraneReset(), spike_threshold=0.8),
        nn.Linear(10, 4), sl.IAF(spike_fn=sa.SingleSpike, reset_fn=sa.MembraneSubtract(), min_v_mem=-1.0)), std=1.0)


@case("sinabs_lif", "sinabs", lambda: _rand(2, 6, 12, scale=2.0))
def sinabs_lif():
    import sinabs.activation as sa
    import sinabs.layers as sl
    return _weights(nn.Sequential(
        nn.Linear(12, 10), sl.LIF(tau_mem=5.0), nn.Linear(10, 4),
        sl.LIF(tau_mem=8.0, tau_syn=4.0, spike_fn=sa.SingleSpike, norm_input=False)), std=2.0)


@case("sinabs_iafsqueeze_conv", "sinabs", lambda: _rand(2 * 5, 1, 8, 8, scale=2.0))
def sinabs_iafsqueeze_conv():
    """A conv net on ``[batch*time, C, H, W]`` with ``IAFSqueeze(batch_size=...)``."""
    import sinabs.layers as sl
    return _weights(nn.Sequential(
        nn.Conv2d(1, 4, 3), sl.IAFSqueeze(batch_size=2), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(4 * 9, 5), sl.IAFSqueeze(batch_size=2)), std=1.0)


@case("sinabs_from_model", "sinabs", lambda: _rand(3 * 4, 1, 8, 8, scale=2.0))
def sinabs_from_model():
    """``sinabs.from_model(ann)``: the ANN's ReLUs become ``IAFSqueeze`` layers."""
    import sinabs
    ann = _weights(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                                 nn.Linear(4 * 9, 5), nn.ReLU()), std=1.0)
    return sinabs.from_model(ann, input_shape=(1, 8, 8), batch_size=3).spiking_model.eval()
