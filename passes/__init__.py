"""snnc passes, one module each; ``PASSES`` is the registry by name (the PassManager and the CLI
look passes up there). Adding a pass: its module here, plus one import in the list below."""
from __future__ import annotations

from .fold_bn import fold_bn
from .fold_tdbn import fold_tdbn
from .insert_surrogate import insert_surrogate
from .threshold_balance import threshold_balance
from .unroll_timesteps import unroll_timesteps

PASSES = {f.__name__: f for f in (
    fold_bn,
    threshold_balance,
    unroll_timesteps,
    insert_surrogate,
    fold_tdbn,
)}

__all__ = sorted(PASSES) + ["PASSES"]
