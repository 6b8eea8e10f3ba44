"""Model definitions: small nets for digits and benches, and the seed papers' architectures
(each a function with a width knob so tests can build tiny versions)."""
from .cifarnet import cifarnet
from .digits_resnet import digits_resnet
from .resnet import preact_resnet18, resnet19
from .small import bench_net, digits_cnn, digits_snn
from .vgg import vgg11, vgg16

__all__ = ["digits_cnn", "digits_snn", "bench_net", "digits_resnet", "cifarnet", "resnet19", "preact_resnet18", "vgg11", "vgg16"]
