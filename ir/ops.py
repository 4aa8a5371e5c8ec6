"""The canonical op set and per-op cost models.

Every graph that slimfx captures is normalised to one op set: PyTorch's *core ATen* ops
plus a short, explicit list of higher-level ATen ops that are kept whole because passes
reason about them as units (a linear layer, a normalisation, an attention call).
Passes never need to know how a graph was captured.

Cost models (multiply-accumulate counts) are registered per op target, never found by
matching names.  An op without a registered cost model has zero MACs: only ops that
multiply learned weights or activations against each other count.

>>> is_canonical(torch.ops.aten.convolution.default)
True
>>> is_canonical(torch.ops.aten.conv2d.default)   # decomposed to aten.convolution
False
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "PRESERVED_OPS",
    "is_canonical",
    "op_name",
    "register_macs",
    "macs_of",
]

aten = torch.ops.aten

#: Higher-level ATen ops kept whole instead of being decomposed to core ATen.
PRESERVED_OPS: frozenset = frozenset(
    {
        aten.linear.default,
        aten.batch_norm.default,
        aten.layer_norm.default,
        aten.group_norm.default,
        aten.scaled_dot_product_attention.default,
        aten.max_pool2d.default,
    }
)

# Python callables that may appear as call_function targets in a canonical graph.
_PYTHON_TARGETS = frozenset({operator.getitem})


def _namespace(target) -> str:
    return getattr(getattr(target, "_schema", None), "name", "").split("::")[0]


def is_canonical(target) -> bool:
    """Whether ``target`` belongs to slimfx's canonical op set.

    Canonical: a core ATen op, one of :data:`PRESERVED_OPS`, an op of the ``slimfx``
    namespace (slimfx's own ops, each with a PyTorch reference), or ``operator.getitem``.
    """
    if target in _PYTHON_TARGETS or target in PRESERVED_OPS:
        return True
    if not isinstance(target, torch._ops.OpOverload):
        return False
    ns = _namespace(target)
    if ns == "slimfx":
        return True
    return ns == "aten" and torch.Tag.core in target.tags


def op_name(target) -> str:
    """A short readable name: ``aten.convolution`` for ``aten.convolution.default``."""
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.replace("::", ".")
        overload = target._overloadname
        return name if overload == "default" else f"{name}.{overload}"
    return getattr(target, "__name__", str(target))


# ---------------------------------------------------------------------------------------
# MAC cost models.  A model receives the node's input shapes (``None`` for non-tensor
# arguments), its positional arguments, and the output shape, and returns a MAC count.
# ---------------------------------------------------------------------------------------
MacFn = Callable[[Sequence, Sequence, Sequence[int]], int]
_MACS: dict = {}


def register_macs(*targets) -> Callable[[MacFn], MacFn]:
    """Register a MAC cost model for one or more op targets (a decorator)."""

    def deco(fn: MacFn) -> MacFn:
        for t in targets:
            _MACS[t] = fn
        return fn

    return deco


def macs_of(target, in_shapes: Sequence, args: Sequence, out_shape) -> int:
    """MACs of one call of ``target``; 0 for ops without a cost model."""
    fn = _MACS.get(target)
    if fn is None or out_shape is None:
        return 0
    return int(fn(in_shapes, args, out_shape))


@register_macs(aten.convolution.default)
def _conv_macs(in_shapes, args, out_shape):
    # weight is (Cout, Cin/groups, *kernel): out elements x Cin/groups x prod(kernel);
    # transposed weight is (Cin, Cout/groups, *kernel): each input element scatters.
    w = in_shapes[1]
    transposed = args[6]
    counted = in_shapes[0] if transposed else out_shape
    return math.prod(counted) * w[1] * math.prod(w[2:])


@register_macs(aten.linear.default)
def _linear_macs(in_shapes, args, out_shape):
    return math.prod(out_shape) * in_shapes[1][1]


@register_macs(aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default)
def _mm_macs(in_shapes, args, out_shape):
    a = in_shapes[-2]  # (..., n, k) for mm/bmm; addmm/baddbmm put the bias first
    return math.prod(out_shape) * a[-1]


@register_macs(aten.scaled_dot_product_attention.default)
def _sdpa_macs(in_shapes, args, out_shape):
    q, k = in_shapes[0], in_shapes[1]
    # Q K^T: (..., L, E) x (..., E, S); attn V: (..., L, S) x (..., S, Ev)
    return math.prod(q[:-1]) * k[-2] * q[-1] + math.prod(out_shape) * k[-2]
