"""snnc targets, one module each; the registry is ``snnc.compiled.TARGETS``."""
