"""Grammar-constrained decoding (xgrammar): request specs, compile cache, matchers, bitmasks."""

from .params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
