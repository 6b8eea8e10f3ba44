"""snnc's own ops: the leaf modules of the spiking IR, each with one documented semantics and one
op record (``snnc.ops.registry``) registered by its own module."""
from . import standard, tensor  # records of the torch layers and tensor ops the IR keeps
from .coding import DirectEncoder, MergeTime, PoissonEncoder, Readout, SplitTime
from .dsr import DSRIF, DSRLIF
from .integer import IntAdd, IntConv2d, IntIF, IntLIF, IntLinear, IntMaxPool2d, IntReadout, IntSumPool2d
from .alif import ALIF
from .burst import BurstIF
from .cuba import CurrentLI, CurrentLIF
from .delay import Delay
from .feedback import Feedback
from .multispike import MultiSpikeLIF
from .neurons import IF, LIF, MultiStateNeuron, Neuron, ParametricLIF, StateNeuron
from .norm import NeuNorm, TDBatchNorm
from .pooling import SpikeMaxPool2d
from .qcfs import QCFS, use_qcfs
from .recurrent import RLeaky, RSynaptic
from .voting import Voting


def is_snnc_op(module) -> bool:
    """True for modules the tracer keeps as leaves and the printer names ``snn.*`` / ``time.*``."""
    return hasattr(type(module), "op_name") and hasattr(module, "attrs")


def reset(model):
    """Reset the state of every snnc op inside ``model`` (membranes, readouts, encoder RNGs)."""
    for m in model.modules():
        if is_snnc_op(m) and hasattr(m, "reset"):
            m.reset()
    return model


# every op class and helper above (one import line per ops file is the registration)
__all__ = sorted(n for n, v in dict(globals()).items() if not n.startswith("_") and (isinstance(v, type) or callable(v)))
