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


def _info(n):
    # Nodes made during this rewrite have no analysis yet; none of them is a mask we match.
    return n.meta.get("slimfx") if isinstance(n, torch.fx.Node) else None


def _mask_to_fix(mask, q) -> bool:
    """A boolean mask, or one of fewer dimensions than ``q`` (TVM takes only 4-D biases)."""
    m, qi = _info(mask), _info(q)
    if m is None or qi is None or m.shape is None or qi.shape is None:
        return False
    return m.dtype == torch.bool or len(m.shape) < len(qi.shape) == 4


def _legal_mask(rw, sdpa, q, mask):
    # TVM accepts only additive float masks of the query's rank: True (attend) -> 0,
    # False -> -inf; leading unit dimensions added as broadcasting would add them.
    if _info(mask).dtype == torch.bool:
        dtype = _info(q).dtype
        zero = rw.call(aten.scalar_tensor.default, 0.0, dtype=dtype)
        ninf = rw.call(aten.scalar_tensor.default, float("-inf"), dtype=dtype)
        mask = rw.call(aten.where.self, mask, zero, ninf)
    for _ in range(len(_info(q).shape) - len(_info(sdpa.args[3]).shape)):
        mask = rw.call(aten.unsqueeze.default, mask, 0)
    args = list(sdpa.args)
    args[3] = mask
    return rw.call(aten.scaled_dot_product_attention.default, *args, **sdpa.kwargs)


LEGALIZE_TVM = Rules([
    # sdpa(q, k, v, mask) with a boolean or lower-rank mask
    #   -> sdpa(q, k, v, unsqueeze(where(mask, 0, -inf)))
    (P(aten.scaled_dot_product_attention.default, P.var("q"), P.any(), P.any(),
       P.var("mask"), name="sdpa", where=lambda n: _mask_to_fix(n.args[3], n.args[0])),
     _legal_mask),
])


@register_pass("legalize-tvm", lossless=True)
def legalize_tvm(graph: Graph) -> PassResult:
    """Rewrite ATen forms TVM's frontend rejects into equivalent accepted forms."""
    graph.analyze()
    n = rewrite(graph, LEGALIZE_TVM)
    return PassResult(graph, n > 0, {"rewritten": n})
