"""``const-fold``: evaluate weight-only subgraphs once and store the result.

An op is constant when every input is a parameter/buffer or another constant op (ops
with no inputs at all, such as ``arange`` or ``full``, are constant too) and it is
deterministic.  Each maximal constant subgraph is evaluated once; its results that the
rest of the graph reads become new parameters or buffers, and the subgraph goes away.

Folding must not grow the model: a result larger than ``max_growth`` times the
elements it was computed from (an ``expand`` of a bias, say) stays unfolded unless it
has at most ``always_below`` elements.  Skipped results are counted in the statistics.

>>> import torch, slimfx
>>> class M(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.w = torch.nn.Parameter(torch.randn(3, 4))
...     def forward(self, x):
...         return x @ (self.w * 2).t()
>>> g = slimfx.run_pipeline(M(), "const-fold", (torch.randn(2, 4),))
>>> sorted(i.op for i in g.infos() if i.kind == "call_function")
['aten.mm']
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from slimfx.ir import Graph

from .base import PassResult, register_pass

__all__ = ["ConstFoldOptions", "const_fold"]


@dataclass(frozen=True)
class ConstFoldOptions:
    max_growth: float = 1.0  # folded elements / source elements allowed
    always_below: int = 4096  # results this small are always folded

    def __post_init__(self):
        if self.max_growth <= 0:
            raise ValueError(f"max_growth must be > 0, got {self.max_growth}")
        if self.always_below < 0:
            raise ValueError(f"always_below must be >= 0, got {self.always_below}")


def _deterministic(n: torch.fx.Node) -> bool:
    if n.is_impure():
        return False
    tags = getattr(n.target, "tags", ())
    return torch.Tag.nondeterministic_seeded not in tags


def _materialize(args, values):
    return torch.fx.node.map_arg(args, lambda a: values[a])


@register_pass("const-fold", lossless=True)
def const_fold(graph: Graph, options: ConstFoldOptions) -> PassResult:
    """Fold weight-only subgraphs into stored tensors."""
    const: set[torch.fx.Node] = set()
    values: dict[torch.fx.Node, object] = {}
    sources: dict[torch.fx.Node, set[torch.fx.Node]] = {}  # constant op -> get_attr leaves
    trainable: dict[torch.fx.Node, bool] = {}
    for n in graph.fx.nodes:
        if n.op == "get_attr":
            const.add(n)
            values[n] = graph.param(n)
            sources[n] = {n}
            trainable[n] = isinstance(values[n], torch.nn.Parameter)
        elif n.op == "call_function" and _deterministic(n) and all(a in const for a in n.all_input_nodes):
            with torch.no_grad():
                values[n] = n.target(*_materialize(n.args, values), **_materialize(n.kwargs, values))
            const.add(n)
            sources[n] = set().union(*(sources[a] for a in n.all_input_nodes)) if n.all_input_nodes else set()
            trainable[n] = any(trainable[a] for a in n.all_input_nodes)
    folded = skipped = 0
    for n in list(graph.fx.nodes):
        if n.op != "call_function" or n not in const or not isinstance(values[n], torch.Tensor):
            continue
        if all(u in const for u in n.users):
            continue  # interior of a constant subgraph: only its frontier is stored
        value = values[n]
        src = sum(graph.param(s).numel() for s in sources[n])
        if value.numel() > options.always_below and value.numel() > options.max_growth * src:
            skipped += 1
            continue
        path = n.meta.get("module_path") or "folded"
        attr = graph.add_param(f"{path}.{n.name}_folded", value.detach().clone(), before=n,
                               trainable=trainable[n] and value.is_floating_point())
        graph.inherit(attr, n)
        n.replace_all_uses_with(attr)
        folded += 1
    if folded:
        graph.fx.eliminate_dead_code()
        graph.remove_unused_params()
    return PassResult(graph, folded > 0, {"folded": folded, "skipped_growth": skipped})
