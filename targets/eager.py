"""Target ``torch``: the spiking-IR GraphModule itself, run by torch eager (the reference).

The compiled module is trainable and ``torch.save``-able; ``export`` writes the graph with
``snnc.save`` (the code-free graph format) and ``load`` reads it back without the original Python
model class. Thread safety: the graph's neurons keep their membrane in the modules, so calls
are serialised by a lock (one call at a time per module; each thread gets its own correct result).
An integer graph quantizes float input with its input scale, as ``tvm:int`` does.
"""
from __future__ import annotations

import threading

import torch

from snnc.compiled import CompiledModule, output_meaning
from snnc.ir import graph_spec
from snnc.runtime import load_graph, quantize_float_inputs, reset, save


class TorchModule(CompiledModule):
    def __init__(self, gm, meta=None):
        super().__init__("torch", graph_spec(gm), meta)
        self.gm = gm
        self._lock = threading.Lock()

    def __call__(self, *inputs):
        return super().__call__(*quantize_float_inputs(self.gm, list(inputs)))

    def __getstate__(self):  # picklable like the graph itself; a lock is not
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    def forward(self, *inputs):
        with self._lock:  # membranes live in the modules: one run at a time
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
