"""Voting readout (Wu 2019): the output layer has ``classes * voters`` neurons; each class's score
is the mean firing rate of its group of ``voters`` consecutive neurons."""
from __future__ import annotations

from torch import nn

from .registry import FORWARD, register_op


class Voting(nn.Module):
    """``[..., classes * voters] -> [..., classes]``: mean over each group of voters."""

    op_name = "snn.voting"
    spiking_output = "no"
    exportable = True  # stateless: TVM lowers its forward (unflatten + mean) as exported

    def __init__(self, classes: int | None = None, voters: int = 10):
        super().__init__()
        self.classes, self.voters = (None if classes is None else int(classes)), int(voters)

    def forward(self, x):
        classes = self.classes if self.classes is not None else x.shape[-1] // self.voters
        if x.shape[-1] != classes * self.voters:
            raise ValueError(f"Voting: last dim {x.shape[-1]} is not classes*voters = {classes}*{self.voters}")
        return x.unflatten(-1, (classes, self.voters)).mean(-1)

    def reset(self):
        pass

    def attrs(self):
        return {"classes": self.classes, "voters": self.voters} if self.classes is not None else {"voters": self.voters}


register_op(Voting, hooks={"onnx": FORWARD, "tvm": "snnc.targets.tvm_lower:_convert_exported"})
