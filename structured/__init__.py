"""Grammar-constrained decoding (xgrammar): request specs, compile cache, matchers, bitmasks.

params.py   StructuredOutputsParams (the request's constraint, validated)
config.py   StructuredOutputsConfig (engine-wide settings, -so.*)
spec.py     GrammarSpec: params normalized into xgrammar source; the cache key
compiler.py GrammarCompilerService: TokenizerInfo, LRU of compiled grammars, worker threads
matcher.py  RequestGrammar: one sequence's matcher (accept, rollback, termination)
bitmask.py  BatchBitmask: one step's bitmask rows, filled on the CPU, applied to the logits

Only params, config and spec load eagerly: importing xgrammar takes about a second, and the
API layer needs StructuredOutputsParams without it.
"""

from importlib import import_module

from .config import StructuredOutputsConfig
from .params import StructuredOutputsParams
from .spec import GrammarSpec, to_spec

_LAZY = {
    "BatchBitmask": "bitmask", "apply_bitmask_reference": "bitmask", "unpack_bitmask": "bitmask",
    "GrammarCompilerService": "compiler", "build_tokenizer_info": "compiler",
    "RequestGrammar": "matcher", "accept_batch": "matcher",
}

__all__ = ["GrammarSpec", "StructuredOutputsConfig", "StructuredOutputsParams", "to_spec", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
