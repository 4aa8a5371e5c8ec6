"""Lowering: slimfx IR -> TVM Relax -> a program built for a target."""

from . import (
    aten_fixes,  # noqa: F401  (registers slimfx's lowerings of mis-converted ATen ops)
    attention,  # noqa: F401  (the CPU kernel of relax.nn.attention)
    fast_conv,  # noqa: F401  (lowerings of slimfx::winograd_conv2d, fft_conv2d)
    fast_math,  # noqa: F401  (vectorizable exp/erf/tanh on the CPU)
    shared_weights,  # noqa: F401  (lowerings of the weight-sharing ops)
)
from .relax import RelaxProgram, lowerings, register_lowering, supported_ops, to_relax
from .targets import PRESETS, LoweringError, TargetInfo, host_target, resolve_target

__all__ = [
    "RelaxProgram", "lowerings", "register_lowering", "supported_ops", "to_relax", "PRESETS",
    "LoweringError", "TargetInfo", "host_target", "resolve_target",
]
