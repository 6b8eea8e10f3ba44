"""snnc passes, one module each; ``PASSES`` is the registry by name (the PassManager and the CLI
look passes up there). Adding a pass: its module here, plus one import in the list below."""
from __future__ import annotations

from .quantize_integer import quantize_integer
from .unroll_timesteps import unroll_timesteps

PASSES = {f.__name__: f for f in (
    unroll_timesteps,
    quantize_integer,
)}

__all__ = sorted(PASSES) + ["PASSES"]
