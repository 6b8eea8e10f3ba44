"""Target ``torch``: the spiking-IR GraphModule itself, run by torch eager (the reference).

The compiled module is trainable and ``torch.save``-able; ``export`` writes the graph with
``snnc.save`` and ``load`` reads it back without the original Python model class.
"""
from __future__ import annotations

import torch

from snnc.compiled import CompiledModule, output_meaning
from snnc.ir import graph_spec
from snnc.runtime import load_graph, reset, save


class TorchModule(CompiledModule):
    def __init__(self, gm, meta=None):
        super().__init__("torch", graph_spec(gm), meta)
        self.gm = gm

    def forward(self, *inputs):
        reset(self.gm)
        with torch.no_grad():
            out = self.gm(*inputs)
        reset(self.gm)
        return out

    def _write(self, path):
        save(self.gm, path, overwrite=True)


def compile(gm, target="torch"):
    return TorchModule(gm, {"output": output_meaning(gm)})


def load(path, meta):
    return TorchModule(load_graph(path), meta)
