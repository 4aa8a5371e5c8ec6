"""slimfx's lowerings of ATen ops that TVM 0.27's torch frontend converts wrongly.

Each entry overrides TVM's converter (custom converters win) and says what it fixes;
each has a test that compiles the op alone and compares it with PyTorch.
"""

from __future__ import annotations

import numpy as np
import torch

from .relax import register_lowering
from .targets import LoweringError

__all__: list[str] = []

aten = torch.ops.aten


@register_lowering(aten.batch_norm.default)
def _batch_norm(node, importer):
    # TVM 0.27 reads aten.batch_norm's arguments with _native_batch_norm_legit's layout:
    # `training` (arg 5) becomes the momentum and `momentum` (arg 6) the epsilon, and it
    # always normalises with batch statistics.  slimfx's canonical inference BN is
    # batch_norm(x, w, b, mean, var, training=False, momentum, eps, cudnn).
    from tvm import relax

    x, w, b, mean, var, training, _momentum, eps = importer.retrieve_args(node)[:8]
    if training:
        raise LoweringError(f"node '{node.name}': training-mode batch_norm cannot be compiled; "
                            "capture the model in eval mode")
    channels = int(importer.shape_of(x)[1])
    dtype = x.ty.dtype.dtype  # as TVM's own converters read it in 0.27
    ones = relax.const(np.ones(channels, dtype=dtype))
    zeros = relax.const(np.zeros(channels, dtype=dtype))
    out = importer.block_builder.emit(relax.op.nn.batch_norm(
        x, w if w is not None else ones, b if b is not None else zeros, mean, var,
        axis=1, epsilon=float(eps), center=True, scale=True, training=False))
    return importer.block_builder.emit(relax.TupleGetItem(out, 0))
