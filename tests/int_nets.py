"""Float SNNs for the integer-target tests: a max-activation conversion of a small ANN and a
directly trained SNN (rectangular surrogate, Wu 2019), each in a few lines so these tests do not
depend on the conversion and training passes."""
from __future__ import annotations

import torch
from torch import nn

import snnc
from snnc.ops import IF, LIF, DirectEncoder, Readout
from snnc.passes import unroll_timesteps


def train(model, data, epochs, lr=3e-3, seed=0, T=None):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    train_loader, _ = data.loaders(batch_size=64, seed=seed)
    model.train()
    for _ in range(epochs):
        for x, y in train_loader:
            opt.zero_grad()
            snnc.reset(model)
            out = model(x) if T is None else torch.stack([model(x) for _ in range(T)])[-1]
            nn.functional.cross_entropy(out, y).backward()
            opt.step()
    snnc.reset(model)
    return model.eval()


def ann(width=8):
    """digits_cnn without BN: conv-ReLU x2, avg-pool, linear-ReLU, linear."""
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, padding=1),
                         nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2 * width * 16, 32), nn.ReLU(),
                         nn.Linear(32, 10))


def convert_by_max(model, x_calib, percentile=99.9):
    """ReLU -> IF(v_th=1) with weights scaled by the previous/this layer's activation percentile
    (Diehl 2015 / Rueckauer 2017 data-based normalisation); readout of the last layer's current."""
    layers, acts, h = list(model), [], x_calib
    with torch.no_grad():
        for m in layers:
            h = m(h)
            if isinstance(m, nn.ReLU):
                acts.append(torch.quantile(h.flatten()[h.flatten() > 0][:200000], percentile / 100).item())
    out, prev, k = [DirectEncoder()], 1.0, 0
    for m in layers:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            lam = acts[k] if k < len(acts) else 1.0  # last layer: no ReLU, keep the ANN's logit scale
            out.append(_copy_scaled(m, prev / lam, 1.0 / lam))
            prev, k = lam, k + 1
        elif isinstance(m, nn.ReLU):
            out.append(IF(v_th=1.0))
        elif not isinstance(m, nn.Dropout):
            out.append(m)
    return nn.Sequential(*out, Readout("membrane"))


def _copy_scaled(m, w_scale, b_scale):
    import copy
    m = copy.deepcopy(m)
    with torch.no_grad():
        m.weight.mul_(w_scale)
        m.bias.mul_(b_scale)
    return m


class RectSurrogate(torch.autograd.Function):
    """Heaviside forward, rectangular window backward (Wu 2019)."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return (z >= 0).float()

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return g * (z.abs() < 0.5).float()


def rect(z, neuron):
    return RectSurrogate.apply(z)


def trained_snn(width=8, tau=2.0):
    """A per-step conv SNN without BN (directly trainable with the surrogate above)."""
    def lif():
        return LIF(tau=tau, v_th=0.5, surrogate=rect)
    net = nn.Sequential(DirectEncoder(), nn.Conv2d(1, width, 3, padding=1), lif(),
                        nn.Conv2d(width, 2 * width, 3, padding=1), lif(), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(2 * width * 16, 64), lif(), nn.Linear(64, 10), Readout("membrane"))
    for m in net:
        if isinstance(m, (nn.Conv2d, nn.Linear)):  # He init: spikes from the first step
            nn.init.kaiming_normal_(m.weight)
            nn.init.constant_(m.bias, 0.1)
    return net


def unrolled(model, T):
    for m in model.modules():
        if hasattr(m, "surrogate"):
            m.surrogate = None
    return unroll_timesteps(snnc.trace(model, torch.zeros(1, 1, 8, 8)), T=T)
