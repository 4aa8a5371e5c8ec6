"""slimfx: a compiler for compressing neural networks.

``nn.Module`` + example inputs -> :func:`capture` (one canonical FX graph) ->
:class:`PassManager` (verified rewrite passes) -> :func:`compile` (TVM Relax, built for a
target) -> :class:`CompiledModel` (run, benchmark, ``save``; :func:`load` reads it back).
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
from slimfx.lowering.build import compile_graph as compile  # noqa: A001  (like torch.compile)
from slimfx.passes import PassManager, register_pass, run_pipeline
from slimfx.runtime import CompiledModel, load

__version__ = "0.1.0"

__all__ = [
    "capture", "compile", "load", "CompiledModel", "Graph", "diff", "layer_table", "PassManager", "register_pass", "run_pipeline",
    "SlimfxError", "CaptureError", "GraphError", "PassError", "PipelineError",
    "VerificationError", "__version__",
]
