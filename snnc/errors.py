"""Exceptions that snnc raises on bad input. Each message names the node, file or argument."""


class SnncError(Exception):
    """Base class of every error snnc raises on purpose."""


class TraceError(SnncError):
    """The model could not be traced into the spiking IR."""


class VerifyError(SnncError):
    """The graph is malformed; the message names the node."""


class UnsupportedOp(SnncError):
    """An op has no lowering (or no semantics) in the stage that met it."""


class FileFormatError(SnncError):
    """A file is missing, truncated or not what snnc expected; the message names the file."""


class InputError(SnncError):
    """A call got inputs of the wrong shape, dtype or value."""


def node_ref(node) -> str:
    """`node %conv1 (call_module 'conv1')` - how errors name a graph node."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"node %{node.name} ({node.op} '{target}')"


def one_of(where: str, name: str, value, choices, error=None):
    """Raise ``error`` (default ``InputError``) naming ``where`` and the argument unless ``value`` is
    one of ``choices``: ``"retrain: convs='bf16'; expected one of ('exact', 'float32', 'int8')"``."""
    if value not in choices:
        raise (error or InputError)(f"{where}: {name}={value!r}; expected one of {tuple(choices)}")
