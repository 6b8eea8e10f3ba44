"""The seed papers' architectures at tiny width: each traces, unrolls, trains one step with
surrogate gradients, folds tdBN (outputs within 1e-5) and dumps."""
import pytest
import torch
from torch import nn

import snnc
from snnc.ops import TDBatchNorm
from snnc.passes import fold_tdbn, insert_surrogate, unroll_timesteps
from snnc.zoo import cifarnet, preact_resnet18, resnet19, vgg11, vgg16


# tiny tensors: one thread avoids thread-pool sync costs on a shared CPU
pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = {
    "cifarnet": (lambda: cifarnet(width=1 / 32, image_size=8), 8, ["snn.voting", "snn.lif"]),
    "cifarnet_neunorm": (lambda: cifarnet(width=1 / 32, image_size=8, neunorm=True), 8, ["snn.neunorm"]),
    "resnet19": (lambda: resnet19(width=1 / 32), 8, ["snn.tdbn", "add"]),
    "vgg11": (lambda: vgg11(width=1 / 64), 32, ["nn.avg_pool2d", "snn.if"]),
    "vgg16_poisson": (lambda: vgg16(width=1 / 64, poisson=True), 32, ["snn.poisson_encoder"]),
    "preact_resnet18": (lambda: preact_resnet18(width=1 / 16), 8, ["snn.dsr_if", "nn.batch_norm"]),
    "preact_resnet18_lif": (lambda: preact_resnet18(width=1 / 16, neuron="lif", alpha=1.0), 8, ["snn.dsr_lif"]),
}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_trace_unroll_train_fold_dump(name):
    make, size, expected_ops = ARCHS[name]
    torch.manual_seed(0)
    g = snnc.trace(make(), torch.zeros(2, 3, size, size))
    u = insert_surrogate(unroll_timesteps(g, T=2), kind="atan")
    text = snnc.dump(u)
    assert all(f"= {op}(" in text for op in expected_ops), text
    x, y = torch.rand(4, 3, size, size), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(u.parameters(), lr=0.5)
    loss = nn.functional.cross_entropy(u(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in u.parameters())
    u.eval()
    folded = fold_tdbn(u)
    assert (folded(x) - u(x)).abs().max() <= 1e-5
    if "tdbn" in name or name == "resnet19":
        n_before = sum(isinstance(m, TDBatchNorm) for m in u.modules())
        assert n_before > 0 and not any(isinstance(m, TDBatchNorm) for m in folded.modules())
    assert snnc.dump(folded).startswith("graph(%0: f32[2,3,")


def test_full_width_channel_plans():
    net = cifarnet()
    convs = [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [128, 256, 512, 1024, 512]
    fcs = [m.out_features for m in net.modules() if isinstance(m, nn.Linear)]
    assert fcs == [1024, 512, 100]
    r19 = [m.out_channels for m in resnet19().modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert r19 == [128] + [128] * 6 + [256] * 6 + [512] * 4    # stem + 2 convs per block (3+3+2 blocks)
    v16 = [m.out_channels for m in vgg16(width=1 / 8).modules() if isinstance(m, nn.Conv2d)]
    assert v16 == [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64]
    assert sum(isinstance(m, nn.Conv2d) for m in vgg11(width=1 / 8).modules()) == 8
    with pytest.raises(ValueError, match="too small"):
        vgg16(width=1 / 64, image_size=16)
