"""slimfx: a compiler for compressing neural networks.

``nn.Module`` + example inputs -> :func:`capture` (one canonical FX graph) ->
:class:`PassManager` (verified rewrite passes) -> lowering to TVM -> a runnable artifact.
"""

from slimfx.errors import (
    CaptureError,
    GraphError,
    PassError,
    PipelineError,
    SlimfxError,
    VerificationError,
)
from slimfx.ir import Graph, capture, diff, layer_table
from slimfx.passes import PassManager, register_pass, run_pipeline

__version__ = "0.1.0"

__all__ = [
    "capture", "Graph", "diff", "layer_table", "PassManager", "register_pass", "run_pipeline",
    "SlimfxError", "CaptureError", "GraphError", "PassError", "PipelineError",
    "VerificationError", "__version__",
]
