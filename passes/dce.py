"""``dce``: dead-code elimination.

Removes ops whose results nothing uses (side-effect-free ones only), the ``get_attr``
nodes nothing reads, and the parameters and buffers no node reads any more, so the
graph's storage shrinks with it.  Placeholders stay: they are the model's interface.

>>> import torch, slimfx
>>> from slimfx.ir import P
>>> g = slimfx.capture(torch.nn.Linear(4, 2), (torch.randn(1, 4),))
>>> lin = next(g.find(torch.ops.aten.linear.default))
>>> with g.fx.inserting_after(lin):
...     dead = g.fx.call_function(torch.ops.aten.relu.default, (lin,))
>>> g2 = slimfx.run_pipeline(g, "dce")
>>> len(list(g.find())), len(list(g2.find()))
(2, 1)
"""

from __future__ import annotations

from slimfx.ir import Graph

from .base import PassResult, register_pass

__all__ = ["dce"]


@register_pass("dce", lossless=True)
def dce(graph: Graph) -> PassResult:
    """Remove unused ops, unused get_attr nodes and unread parameters/buffers."""
    before = len(graph.fx.nodes)
    graph.fx.eliminate_dead_code()
    removed_nodes = before - len(graph.fx.nodes)
    removed_params = graph.remove_unused_params()
    graph.gm.delete_all_unused_submodules()
    return PassResult(graph, bool(removed_nodes or removed_params),
                      {"nodes_removed": removed_nodes, "params_removed": len(removed_params)})
