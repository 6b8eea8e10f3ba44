"""snnc's own ops: the leaf modules of the spiking IR, each with one documented semantics."""
from .coding import DirectEncoder, MergeTime, PoissonEncoder, Readout, SplitTime
from .dsr import DSRIF, DSRLIF
from .neurons import IF, LIF, Neuron, ParametricLIF
from .norm import NeuNorm, TDBatchNorm
from .qcfs import QCFS, use_qcfs

__all__ = ["IF", "LIF", "ParametricLIF", "Neuron", "DirectEncoder", "PoissonEncoder",
           "Readout", "MergeTime", "SplitTime", "DSRIF", "DSRLIF", "TDBatchNorm", "NeuNorm",
           "QCFS", "use_qcfs"]


def is_snnc_op(module) -> bool:
    """True for modules the tracer keeps as leaves and the printer names ``snn.*`` / ``time.*``."""
    return hasattr(type(module), "op_name") and hasattr(module, "attrs")
