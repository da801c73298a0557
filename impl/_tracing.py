"""Which tracer, if any, is running masknorm's Python code."""

import torch


def exporting() -> bool:
    """True under torch.export (and the ONNX exporter built on it), False under plain torch.compile.

    Reads the flag torch.compiler.is_exporting() returns: traced by Dynamo, torch 2.11 answers
    is_exporting() with True under every torch.compile, where the flag itself is False."""
    return bool(getattr(torch.compiler, "_is_exporting_flag", False))


def tracing() -> bool:
    """True under torch.compile or torch.export: sizes may be symbolic and data cannot be read."""
    return torch.compiler.is_compiling() or exporting()
