"""Reading a graph: the IR listing, the per-layer table, and the diff of two graphs.

>>> import torch, slimfx
>>> g = slimfx.capture(torch.nn.Sequential(torch.nn.Linear(4, 3)), (torch.randn(2, 4),))
>>> print(layer_table(g))
#  op          module  inputs   output   params  MACs
0  aten.linear 0       f32[2,4] f32[2,3]     15    24
   total                                     15    24
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch.fx

from .graph import Graph, NodeInfo

__all__ = ["format_graph", "layer_table", "GraphDiff", "diff", "format_table", "human"]


def human(n: float) -> str:
    """Compact count: 1.2K, 3.4M, 5.6G."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def format_table(headers: list[str], rows: list[list], right: set[int] = frozenset()) -> str:
    """Plain text table; columns in ``right`` are right-aligned."""
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append(" ".join(parts).rstrip())
    return "\n".join(lines)


def _arg(a) -> str:
    if isinstance(a, torch.fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    return repr(a)


def format_graph(graph: Graph) -> str:
    """The IR as text: one line per node with its output type and module path."""
    graph.analyze()
    ins = ", ".join(f"%{p.name}: {p.meta['slimfx'].outputs[0]}" for p in graph.placeholders)
    lines = [f"graph {graph.name}({ins}) {{"]
    for n in graph.fx.nodes:
        info: NodeInfo = n.meta["slimfx"]
        ty = ", ".join(map(str, info.outputs))
        if n.op == "placeholder":
            continue
        if n.op == "output":
            lines.append(f"  return {_arg(n.args[0])}")
            continue
        if n.op == "get_attr":
            rhs = f"param {n.target}"
        else:
            args = [_arg(a) for a in n.args] + [f"{k}={_arg(v)}" for k, v in n.kwargs.items()]
            rhs = f"{info.op}({', '.join(args)})"
        where = f"  # {info.module_path}" if info.module_path and n.op != "get_attr" else ""
        lines.append(f"  %{n.name} = {rhs} : {ty}{where}")
    lines.append("}")
    return "\n".join(lines)


def layer_table(graph: Graph, *, all_nodes: bool = False) -> str:
    """Per-layer table (op, module path, input/output shapes, params, MACs) with totals.

    ``all_nodes=True`` lists every op, not only those with parameters or MACs.
    """
    graph.analyze()
    if all_nodes:
        infos = [i for i in graph.infos() if i.kind == "call_function"]
    else:
        infos = graph.layers()
    node = {n.name: n for n in graph.fx.nodes}
    rows = []
    for k, info in enumerate(infos):
        acts = [a.meta["slimfx"] for a in node[info.name].all_input_nodes if a.op != "get_attr"]
        ins = " ".join(str(o) for a in acts for o in a.outputs[:1])
        outs = " ".join(map(str, info.outputs))
        rows.append([k, info.op, info.module_path or "-", ins, outs, f"{info.params:,}", f"{info.macs:,}"])
    total_p = sum(i.params for i in infos)
    total_m = sum(i.macs for i in infos)
    rows.append(["", "total", "", "", "", f"{total_p:,}", f"{total_m:,}"])
    return format_table(["#", "op", "module", "inputs", "output", "params", "MACs"], rows,
                        right={5, 6})


@dataclass
class _Agg:
    ops: list = field(default_factory=list)
    params: int = 0
    macs: int = 0
    shape: str = ""


def _by_module(graph: Graph) -> dict[str, _Agg]:
    graph.analyze()
    agg: dict[str, _Agg] = defaultdict(_Agg)
    for n in graph.fx.nodes:
        if n.op != "call_function":
            continue
        info: NodeInfo = n.meta["slimfx"]
        a = agg[info.module_path or "<top>"]
        a.ops.append(info.op.removeprefix("aten."))
        a.params += info.params
        a.macs += info.macs
        if info.outputs:
            a.shape = str(info.outputs[0])
    return agg


def _signature(n: torch.fx.Node) -> tuple:
    return (n.op, str(n.target), str(n.args), str(n.kwargs), n.meta["slimfx"].outputs)


@dataclass
class GraphDiff:
    """What changed between two graphs: node sets, and per-module params/MACs/shapes."""

    before: dict
    after: dict
    added: list[str]
    removed: list[str]
    changed: list[str]
    modules: list[tuple[str, _Agg | None, _Agg | None]]

    @property
    def nodes_changed(self) -> int:
        return len(self.added) + len(self.removed) + len(self.changed)

    def __str__(self) -> str:
        b, a = self.before, self.after

        def ratio(x, y):
            return f"{y / x:.3f}x" if x else "-"

        lines = [format_table(
            ["", "before", "after", "ratio"],
            [["params", f"{b['params']:,}", f"{a['params']:,}", ratio(b["params"], a["params"])],
             ["MACs", f"{b['macs']:,}", f"{a['macs']:,}", ratio(b["macs"], a["macs"])],
             ["ops", b["nodes"], a["nodes"], ratio(b["nodes"], a["nodes"])]], right={1, 2, 3}),
            f"nodes: {len(self.added)} added, {len(self.removed)} removed, {len(self.changed)} changed"]
        rows = []
        for path, x, y in self.modules:
            rows.append([path,
                         "+".join(x.ops) if x else "-", "+".join(y.ops) if y else "-",
                         f"{x.params:,}" if x else "-", f"{y.params:,}" if y else "-",
                         human(x.macs) if x else "-", human(y.macs) if y else "-",
                         x.shape if x else "-", y.shape if y else "-"])
        if rows:
            lines.append("")
            lines.append(format_table(["module", "ops before", "ops after", "params before",
                                       "params after", "MACs before", "MACs after",
                                       "output before", "output after"], rows, right={3, 4, 5, 6}))
        return "\n".join(lines)


def diff(before: Graph, after: Graph) -> GraphDiff:
    """Compare two graphs (typically the input and output of a pipeline).

    >>> import torch, slimfx
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    >>> g = slimfx.capture(m, torch.randn(1, 3, 8, 8))
    >>> d = diff(g, slimfx.run_pipeline(g, "fold-bn"))
    >>> d.removed, [path for path, _, _ in d.modules]
    (['convolution', 'batch_norm'], ['1'])
    """
    bn = {n.name: n for n in before.fx.nodes if n.op == "call_function"}
    before.analyze()
    after.analyze()
    an = {n.name: n for n in after.fx.nodes if n.op == "call_function"}
    added = [k for k in an if k not in bn]
    removed = [k for k in bn if k not in an]
    changed = [k for k in an if k in bn and _signature(an[k]) != _signature(bn[k])]
    mb, ma = _by_module(before), _by_module(after)
    modules = []
    for path in list(mb) + [p for p in ma if p not in mb]:
        x, y = mb.get(path), ma.get(path)
        if x is None or y is None or (x.ops, x.params, x.macs, x.shape) != (y.ops, y.params, y.macs, y.shape):
            modules.append((path, x, y))
    return GraphDiff(before.summary(), after.summary(), added, removed, changed, modules)
