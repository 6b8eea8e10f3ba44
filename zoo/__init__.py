"""Model definitions: small nets for digits and benches, and the seed papers' architectures
(each a function with a width knob so tests can build tiny versions)."""
from .small import bench_net, digits_cnn, digits_snn

__all__ = ["digits_cnn", "digits_snn", "bench_net"]
