"""``fold-bn``: fold inference BatchNorm into the preceding convolution or linear layer.

``batch_norm(conv(x, W, b))`` computes ``conv(x, W * s, (b - mean) * s + beta)`` with
``s = gamma / sqrt(var + eps)`` per output channel; the fold removes the normalisation at
no cost in accuracy (verified to 1e-5 by the pass manager).  The layer must be the BN's
only producer of that tensor (its output has no other user), and the BN must be in
inference form (``training=False``) with parameters and statistics stored in the graph.
Transposed convolutions and linear layers whose output is not ``(N, C)`` are left alone.

>>> import torch, slimfx
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
>>> g = slimfx.run_pipeline(m, "fold-bn,dce", torch.randn(1, 3, 8, 8))
>>> [i.op for i in g.layers()]
['aten.convolution']
"""

from __future__ import annotations

import torch
import torch.fx

from slimfx.ir import Graph, P, Rewriter, Rules, rewrite

from .base import PassResult, register_pass

__all__ = ["FOLD_BN_RULES", "fold_bn"]

aten = torch.ops.aten


def _only_user(n: torch.fx.Node) -> bool:
    return len(n.users) == 1


def _rank(n: torch.fx.Node) -> int:
    return len(n.meta["slimfx"].shape)  # the pass runs the shape analysis first


def _not_transposed(n: torch.fx.Node) -> bool:
    return len(n.users) == 1 and not n.args[6]


def _inference_bn(n: torch.fx.Node) -> bool:
    stats = n.args[1:5]
    return (not n.args[5]) and all(a is None or (isinstance(a, torch.fx.Node) and a.op == "get_attr")
                                   for a in stats) and n.args[3] is not None and n.args[4] is not None


def _bias_ok(n: torch.fx.Node) -> bool:
    b = n.args[2] if len(n.args) > 2 else None
    return b is None or (isinstance(b, torch.fx.Node) and b.op == "get_attr")


def _fold(rw: Rewriter, layer: torch.fx.Node, w: torch.fx.Node, bn: torch.fx.Node) -> torch.fx.Node | None:
    g = rw.graph
    W = g.param(w)
    gamma, beta, mean, var = (g.param(a) if a is not None else None for a in bn.args[1:5])
    eps = bn.args[7]
    dt = W.dtype
    scale = torch.rsqrt(var.double() + eps)
    if gamma is not None:
        scale = scale * gamma.double()
    old_b = layer.args[2] if len(layer.args) > 2 else None
    b = g.param(old_b).double() if old_b is not None else torch.zeros_like(mean, dtype=torch.float64)
    new_b = (b - mean.double()) * scale
    if beta is not None:
        new_b = new_b + beta.double()
    new_w = (W.double() * scale.reshape(-1, *([1] * (W.dim() - 1)))).to(dt)
    path = layer.meta.get("module_path") or layer.name
    # Overwrite in place when this layer is the only reader, so names stay readable.
    if _only_user(w):
        g.set_param(w.target, new_w)
        w_node = w
    else:
        w_node = rw.param(f"{path}.weight_bnfold", new_w)
    if old_b is not None and _only_user(old_b):
        g.set_param(old_b.target, new_b.to(dt))
        b_node = old_b
    else:
        b_node = rw.param(f"{path}.bias", new_b.to(dt))
    args = list(layer.args)
    args[1], args[2] = w_node, b_node
    return rw.graph.inherit(rw.call(layer.target, *args), layer)  # provenance of the layer


FOLD_BN_RULES = Rules([
    # batch_norm(convolution(x, W, b, ...)) -> convolution(x, W * s, (b - mean) * s + beta, ...)
    (P(aten.batch_norm.default,
       P(aten.convolution.default, P.any(), P.param("w"), name="layer",
         where=lambda n: _not_transposed(n) and _bias_ok(n)),
       name="bn", where=_inference_bn),
     lambda rw, layer, w, bn: _fold(rw, layer, w, bn)),
    # batch_norm(linear(x, W, b)) on (N, C) -> linear(x, W * s, (b - mean) * s + beta)
    (P(aten.batch_norm.default,
       P(aten.linear.default, P.any(), P.param("w"), name="layer",
         where=lambda n: _only_user(n) and _bias_ok(n) and _rank(n) == 2),
       name="bn", where=_inference_bn),
     lambda rw, layer, w, bn: _fold(rw, layer, w, bn)),
])


#: Folding rounds each scaled weight once more; through a deep network the float32
#: differences add up past the default 1e-5: a RegNetY-400MF (transformers, BN statistics
#: estimated on random images) differed by 1.4e-5 of its output's magnitude.  1e-4 is
#: what ``slimfx.compile`` allows between TVM and PyTorch.
FOLD_BN_TOLERANCE = 1e-4


@register_pass("fold-bn", lossless=True, atol=FOLD_BN_TOLERANCE)
def fold_bn(graph: Graph) -> PassResult:
    """Fold inference BatchNorm into the conv/linear before it."""
    graph.analyze()
    n = rewrite(graph, FOLD_BN_RULES)
    return PassResult(graph, n > 0, {"folded": n})
