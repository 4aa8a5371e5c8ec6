"""``legalize-tvm``: rewrite canonical ATen forms that TVM's torch frontend rejects into
equivalent forms it accepts.  Run by :func:`slimfx.compile` before lowering, through the
pass manager, so each rewrite is verified lossless like any other pass.

>>> import torch, slimfx
>>> class Attn(torch.nn.Module):
...     def forward(self, q, mask):
...         return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
>>> g = slimfx.capture(Attn(), (torch.randn(1, 2, 4, 8), torch.rand(4, 4) > 0.2))
>>> g2 = slimfx.run_pipeline(g, "legalize-tvm")
>>> sdpa = next(g2.find(torch.ops.aten.scaled_dot_product_attention.default))
>>> g2.info(sdpa.args[3]).dtype
torch.float32
"""

from __future__ import annotations

import torch
import torch.fx

from slimfx.ir import Graph, P, Rules, rewrite
from slimfx.passes import PassResult, register_pass

__all__ = ["LEGALIZE_TVM"]

aten = torch.ops.aten


def _is_bool(n) -> bool:
    # Nodes made during this rewrite have no analysis yet; they are the float masks.
    info = n.meta.get("slimfx") if isinstance(n, torch.fx.Node) else None
    return info is not None and info.dtype == torch.bool


def _float_mask(rw, sdpa, q, mask):
    # TVM accepts only additive float masks: True (attend) -> 0, False -> -inf.
    dtype = q.meta["slimfx"].dtype
    zero = rw.call(aten.scalar_tensor.default, 0.0, dtype=dtype)
    ninf = rw.call(aten.scalar_tensor.default, float("-inf"), dtype=dtype)
    additive = rw.call(aten.where.self, mask, zero, ninf)
    args = list(sdpa.args)
    args[3] = additive
    return rw.call(aten.scaled_dot_product_attention.default, *args, **sdpa.kwargs)


LEGALIZE_TVM = Rules([
    # scaled_dot_product_attention(q, k, v, bool_mask) -> sdpa(q, k, v, where(mask, 0, -inf))
    (P(aten.scaled_dot_product_attention.default, P.var("q"), P.any(), P.any(),
       P.var("mask", where=_is_bool), name="sdpa"),
     _float_mask),
])


@register_pass("legalize-tvm", lossless=True)
def legalize_tvm(graph: Graph) -> PassResult:
    """Rewrite ATen forms TVM's frontend rejects into equivalent accepted forms."""
    graph.analyze()
    n = rewrite(graph, LEGALIZE_TVM)
    return PassResult(graph, n > 0, {"rewritten": n})
