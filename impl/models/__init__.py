"""Masked norms inside models you did not write: `conversion.convert` swaps a model's norms for masked
twins, `padding_context.padding` says which positions are padding for the calls inside it,
`padding_from` reads the padding off the model's own forward argument, `length_tracking` carries it
through convolutions and pooling, and `invariance` checks that the result does not depend on it.

The layers (masknorm.modules) read the padding context, and conversion builds those layers, so this
package's __init__ imports nothing: `masknorm.models.convert` is resolved on first use.
"""

from typing import Any

__all__ = ["convert"]


def __getattr__(name: str) -> Any:
    if name == "convert":
        from masknorm.models.conversion import convert

        return convert
    raise AttributeError(f"module 'masknorm.models' has no attribute {name!r}")
