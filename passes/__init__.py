"""Passes: the pass manager, instruments, the pipeline parser, and the built-in passes.

Built-in passes register themselves by name on import: ``fold-bn``, ``dce``,
``const-fold``, ``prune-channels``, ``pad-channels``, ``share-weights``, ``hash-weights``,
``winograd``, ``fft-conv``, ``select-conv-algo``.
``slimfx.passes.list_passes()`` lists every registered pass.
"""

from slimfx.ir.pattern import P, Rewriter, Rule, Rules, match, rewrite

from . import (  # noqa: F401  (register the built-in passes)
    const_fold,
    dce,
    factorize,
    fast_conv,  # noqa: F401  (winograd, fft-conv, select-conv-algo)
    fold_bn,
    pad_channels,
    prune,
    share_weights,  # noqa: F401  (share-weights, hash-weights)
)
from .base import (
    NoOptions,
    Pass,
    PassResult,
    get_pass,
    list_passes,
    make_options,
    register_pass,
)
from .instruments import (
    DumpIR,
    PrintAfter,
    PrintAfterChange,
    PrintBefore,
    SkipPasses,
    Statistics,
    Timing,
)
from .manager import Instrument, PassManager, PassRecord, run_pipeline
from .pipeline import parse_pipeline

__all__ = [
    "Pass", "PassResult", "NoOptions", "register_pass", "get_pass", "list_passes",
    "make_options", "PassManager", "PassRecord", "Instrument", "run_pipeline",
    "parse_pipeline", "Timing", "PrintBefore", "PrintAfter", "PrintAfterChange", "DumpIR",
    "Statistics", "SkipPasses", "P", "Rewriter", "Rule", "Rules", "match", "rewrite",
]
