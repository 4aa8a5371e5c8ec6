"""Drawing a graph: Graphviz DOT text, and a self-contained SVG laid out by slimfx itself.

Both drawings show one shape per FX node: inputs (placeholders) as pills, ops as boxes
labelled with the op, the module path it came from, its output type and its MACs, and
the output node.  Edges follow the data flow.  With ``collapse_params=True`` (the
default) the ``get_attr`` nodes that feed parameters into an op are not drawn; the op's
box lists their shapes instead.  Ops that do MACs are filled from light to dark by their
MAC count relative to the most expensive op (the label gives the share of the total).

:func:`to_dot` leaves the layout to Graphviz.  :func:`to_svg` needs no Graphviz: it lays
the graph out in rows (``networkx.topological_generations``), orders each row by the
barycentre of the neighbours' positions to reduce crossings, routes edges that skip rows
through gaps, and places boxes so that none overlap.

>>> import torch, slimfx
>>> from slimfx.ir.draw import to_dot, to_svg
>>> g = slimfx.capture(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()),
...                    (torch.randn(2, 4),))
>>> dot = to_dot(g)
>>> dot.startswith('digraph "Sequential" {')
True
>>> [line.strip() for line in dot.splitlines() if "->" in line]
['"input_1" -> "linear" [label="f32[2,4]"];', '"linear" -> "relu" [label="f32[2,3]"];', '"relu" -> "output" [label="f32[2,3]"];']
>>> to_svg(g).count('class="node"'), to_svg(g, collapse_params=False).count('class="node"')
(4, 6)
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import networkx as nx
import torch.fx

from .graph import Graph, NodeInfo
from .printing import human

__all__ = ["to_dot", "to_svg", "save"]

# ---------------------------------------------------------------------------------------
# What is drawn: boxes (one per drawn fx node) and edges (one per data dependency).
# ---------------------------------------------------------------------------------------

_FILL = {"input": "#deebf7", "output": "#e5e5e5", "param": "#f7f7f7", "op": "#ffffff"}
_MAC_LIGHT = (0xFE, 0xE6, 0xCE)  # fill of an op with (next to) no MACs ...
_MAC_DARK = (0xA6, 0x36, 0x03)  # ... and of the most expensive one


@dataclass
class _Box:
    name: str  # the fx node's name
    kind: str  # "input", "op", "param" or "output"
    title: str  # first line: op name, input name, parameter name or "output"
    path: str  # module path ("" when none)
    types: list[str]  # output types, one per line
    params: list[str] = field(default_factory=list)  # collapsed parameters, "weight f32[..]"
    macs: int = 0
    share: float = 0.0  # of the graph's total MACs
    fill: str = "#ffffff"
    ink: str = "#1a1a1a"  # text colour, readable on ``fill``

    def lines(self) -> list[tuple[str, str]]:
        """(style, text) per label line; styles: title, path, type, param, macs."""
        out = [("title", self.title)]
        if self.path:
            out.append(("path", self.path))
        out += [("type", t) for t in self.types]
        out += [("param", p) for p in self.params]
        if self.macs:
            out.append(("macs", f"{human(self.macs)} MACs ({self.share:.1%})"))
        return out

    def tooltip(self) -> str:
        rows = [f"%{self.name}", self.title]
        if self.path:
            rows.append(f"module: {self.path}")
        rows += [f"out: {t}" for t in self.types] + [f"param: {p}" for p in self.params]
        if self.macs:
            rows.append(f"MACs: {self.macs:,} ({self.share:.1%} of total)")
        return "\n".join(rows)


@dataclass
class _Edge:
    src: str
    dst: str
    label: str  # the tensor type(s) flowing along the edge


def _types(info: NodeInfo) -> list[str]:
    return [str(s) for s in info.outputs] or ["()"]


def _compact(types: list[str]) -> list[str]:
    """Runs of equal types as one line: ``f32[2,8] (×12)`` for the outputs of a split."""
    out = []
    for t, run in itertools.groupby(types):
        n = len(list(run))
        out.append(t if n == 1 else f"{t} (\u00d7{n})")
    return out


def _edge_label(src: torch.fx.Node, dst: torch.fx.Node) -> str:
    outs = src.meta["slimfx"].outputs
    if len(outs) == 1:
        return str(outs[0])
    if dst.op == "call_function" and dst.target is operator.getitem:
        return ", ".join(_types(dst.meta["slimfx"]))  # the element it picks
    return "(" + ", ".join(map(str, outs)) + ")"


def _mac_fill(t: float) -> tuple[str, str]:
    """Fill colour for ``t`` in [0, 1] (light to dark) and a text colour readable on it."""
    rgb = [round(a + (b - a) * t) for a, b in zip(_MAC_LIGHT, _MAC_DARK)]
    luminance = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255
    return "#{:02x}{:02x}{:02x}".format(*rgb), ("#ffffff" if luminance < 0.55 else "#1a1a1a")


def _collect(graph: Graph, collapse_params: bool) -> tuple[list[_Box], list[_Edge]]:
    graph.analyze()
    nodes = list(graph.fx.nodes)
    total = sum(n.meta["slimfx"].macs for n in nodes)
    most = max((n.meta["slimfx"].macs for n in nodes), default=0)
    drawn = {n for n in nodes if not (collapse_params and n.op == "get_attr")}
    boxes, edges = [], []
    for n in nodes:
        if n not in drawn:
            continue
        info: NodeInfo = n.meta["slimfx"]
        if n.op == "placeholder":
            box = _Box(n.name, "input", n.name, "", _compact(_types(info)))
        elif n.op == "output":
            box = _Box(n.name, "output", "output", "", _compact(_types(info)))
        elif n.op == "get_attr":
            box = _Box(n.name, "param", str(n.target), "", _compact(_types(info)))
        else:
            box = _Box(n.name, "op", info.op, info.module_path, _compact(_types(info)))
        box.fill = _FILL[box.kind]
        for a in n.all_input_nodes:
            if a in drawn:
                edges.append(_Edge(a.name, n.name, _edge_label(a, n)))
            elif box.kind != "param":  # a collapsed parameter: list it in the box
                target, prefix = str(a.target), info.module_path + "."
                short = target[len(prefix):] if info.module_path and target.startswith(prefix) \
                    else target
                box.params.append(f"{short} {', '.join(_types(a.meta['slimfx']))}")
        if info.macs:
            box.macs, box.share = info.macs, info.macs / total
            box.fill, box.ink = _mac_fill(info.macs / most)
        boxes.append(box)
    return boxes, edges


# ---------------------------------------------------------------------------------------
# DOT
# ---------------------------------------------------------------------------------------

def _dot_str(text: str) -> str:
    """A DOT quoted string whose label text is ``text``.

    Inside a quoted string only ``"`` and (for labels, whose escapes Graphviz expands)
    ``\\`` are special; newlines become ``\\n``.  Angle brackets, braces and ``|`` are
    only special in HTML-like labels and ``record`` shapes, neither of which is used, so
    they are written as they are.
    """
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\\n")
    return f'"{text}"'


def to_dot(graph: Graph, *, collapse_params: bool = True, title: str | None = None) -> str:
    """Graphviz DOT text of ``graph``: one node statement per drawn FX node, one edge
    statement per data dependency (labelled with the tensor type), each on its own line.

    ``collapse_params`` hides ``get_attr`` nodes and lists their shapes in the op box;
    ``title`` is drawn above the graph.
    """
    boxes, edges = _collect(graph, collapse_params)
    graph_attrs = 'rankdir=TB, fontname="Helvetica", nodesep=0.3, ranksep=0.35'
    if title is not None:
        graph_attrs += f", label={_dot_str(title)}, labelloc=t, fontsize=16"
    lines = [
        f"digraph {_dot_str(graph.name)} {{",
        f"  graph [{graph_attrs}];",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, '
        'color="#555555"];',
        '  edge [fontname="Helvetica", fontsize=8, color="#555555", fontcolor="#555555"];',
    ]
    shapes = {"input": "ellipse", "output": "ellipse", "param": "box", "op": "box"}
    for b in boxes:
        attrs = [f"label={_dot_str(chr(10).join(text for _, text in b.lines()))}",
                 f"shape={shapes[b.kind]}", f'fillcolor="{b.fill}"',
                 f"tooltip={_dot_str(b.tooltip())}"]
        if b.ink != "#1a1a1a":
            attrs.append(f'fontcolor="{b.ink}"')
        if b.kind == "param":
            attrs.append('style="filled,dashed"')
        elif b.kind != "op":
            attrs.append('style="filled"')
        lines.append(f"  {_dot_str(b.name)} [{', '.join(attrs)}];")
    for e in edges:
        lines.append(f"  {_dot_str(e.src)} -> {_dot_str(e.dst)} [label={_dot_str(e.label)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# SVG: a layered (Sugiyama-style) layout
# ---------------------------------------------------------------------------------------

# Text is set in a monospace font so that its width can be known without font metrics.
_FONT = "DejaVu Sans Mono, Menlo, Consolas, monospace"
_SIZE = {"title": 12.0, "path": 10.5, "type": 10.5, "param": 9.5, "macs": 9.5}
_CHAR_W = 0.61  # advance of a monospace glyph, in ems (DejaVu Sans Mono: 0.602)
_LINE_H = 1.3  # line height, in ems
_MAX_CHARS = 44  # longer label lines are shortened (the tooltip keeps them whole)
_PAD_X, _PAD_Y = 8.0, 5.0
_MIN_W = 56.0
_GAP = 24.0  # least horizontal space between two boxes
_GAP_DUMMY = 12.0  # ... between a box and an edge passing through its row
_GAP_DUMMIES = 8.0  # ... between two edges passing through a row
_ROW_GAP = 34.0  # least vertical space between rows (grows with the edges' slope)
_MARGIN = 16.0
_STUB = 7.0  # edges leave and enter boxes vertically for this long


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_CHARS else "\u2026" + text[-(_MAX_CHARS - 1):]


def _box_size(box: _Box) -> tuple[float, float]:
    lines = box.lines()
    w = max(len(_shorten(t)) * _SIZE[s] * _CHAR_W for s, t in lines) + 2 * _PAD_X
    h = sum(_SIZE[s] * _LINE_H for s, _ in lines) + 2 * _PAD_Y
    if box.kind in ("input", "output"):
        w += h * 0.6  # room for the rounded ends of a pill
    return float(math.ceil(max(w, _MIN_W))), float(math.ceil(h))


@dataclass
class _Layout:
    rows: list[list]  # keys per row, left to right: box names, or dummies (src, dst, i)
    x: dict  # centre x of each key
    w: dict  # width of each key (0 for dummies)
    h: dict  # height of each box
    row_top: list[float]
    row_bottom: list[float]
    chains: list[list]  # per edge: the keys it passes, source to destination
    width: float
    height: float


def _is_dummy(key) -> bool:
    return isinstance(key, tuple)


def _crossings(upper: list, lower: list, succs: dict) -> int:
    pu = {k: i for i, k in enumerate(upper)}
    pl = {k: i for i, k in enumerate(lower)}
    ends = sorted((pu[u], pl[v]) for u in upper for v in succs[u] if v in pl)
    count = 0
    for i, (_, b) in enumerate(ends):  # inversions among the lower ends
        for _, b2 in ends[i + 1:]:
            count += b2 < b
    return count


def _order_rows(rows: list[list], preds: dict, succs: dict, sweeps: int = 24) -> list[list]:
    """Barycentre heuristic: alternate down and up sweeps, keep the order with the fewest
    crossings."""
    rows = [list(r) for r in rows]

    def total() -> int:
        return sum(_crossings(a, b, succs) for a, b in zip(rows, rows[1:]))

    pos = {k: i for r in rows for i, k in enumerate(r)}
    best, best_c = [list(r) for r in rows], total()
    for sweep in range(sweeps):
        if best_c == 0:
            break
        down = sweep % 2 == 0
        order = range(1, len(rows)) if down else range(len(rows) - 2, -1, -1)
        nbrs = preds if down else succs
        for r in order:
            def bary(k, nb=nbrs):
                ns = nb[k]
                return (sum(pos[n] for n in ns) / len(ns)) if ns else pos[k]
            rows[r].sort(key=lambda k: (bary(k), pos[k]))
            pos.update((k, i) for i, k in enumerate(rows[r]))
        c = total()
        if c < best_c:
            best, best_c = [list(r) for r in rows], c
    return best


def _place_row(row: list, desired: list[float], weight: list[float], w: dict) -> list[float]:
    """Centres for one row, in order, at least the minimum gaps apart, as close as possible
    (weighted least squares) to ``desired``: isotonic regression by pool-adjacent-violators
    on the positions less the gaps."""
    offs = [0.0]
    for a, b in zip(row, row[1:]):
        offs.append(offs[-1] + _min_sep(a, b, w))
    blocks: list[list[float]] = []  # [sum of weight*target, sum of weight, first, end]
    for i in range(len(row)):
        blocks.append([weight[i] * (desired[i] - offs[i]), weight[i], i, i + 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, wt, _, end = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += wt
            blocks[-1][3] = end
    xs = [0.0] * len(row)
    for s, wt, first, end in blocks:
        for i in range(int(first), int(end)):
            xs[i] = s / wt + offs[i]
    return xs


def _min_sep(a, b, w: dict) -> float:
    gap = (_GAP_DUMMIES if _is_dummy(a) and _is_dummy(b)
           else _GAP_DUMMY if _is_dummy(a) or _is_dummy(b) else _GAP)
    return (w[a] + w[b]) / 2 + gap


def _straighten(rows: list[list], x: dict, w: dict, preds: dict, succs: dict,
                chains: list[list]) -> None:
    """Remove the jogs the least-squares placement leaves: run each long edge straight
    down where its rows have room, then hang every node that is its predecessor's only
    successor straight below it (where it fits), so chains are vertical and only merges
    bend."""
    where = {k: (r, i) for r, row in enumerate(rows) for i, k in enumerate(row)}

    def fits(k, v: float) -> bool:
        r, i = where[k]
        row = rows[r]
        return ((i == 0 or v - x[row[i - 1]] >= _min_sep(row[i - 1], k, w) - 1e-6)
                and (i == len(row) - 1 or x[row[i + 1]] - v >= _min_sep(k, row[i + 1], w) - 1e-6))

    for chain in sorted(chains, key=len, reverse=True):
        dummies = chain[1:-1]
        if len(dummies) < 2:
            continue
        xs = sorted(x[d] for d in dummies)
        median = xs[len(xs) // 2]
        for v in sorted(xs, key=lambda v: abs(v - median)):
            if all(fits(d, v) for d in dummies):
                x.update((d, v) for d in dummies)
                break
    for row in rows:
        for k in row:
            if len(preds[k]) == 1 and len(succs[preds[k][0]]) == 1:
                v = x[preds[k][0]]
                if v != x[k] and fits(k, v):
                    x[k] = v


def _layout(boxes: Sequence[_Box], edges: Sequence[_Edge]) -> _Layout:
    g = nx.DiGraph()
    g.add_nodes_from(b.name for b in boxes)
    g.add_edges_from((e.src, e.dst) for e in edges)
    kind = {b.name: b.kind for b in boxes}
    index = {b.name: i for i, b in enumerate(boxes)}
    layer = {k: r for r, gen in enumerate(nx.topological_generations(g)) for k in gen}
    # Sources other than inputs (parameters, constants such as aten.arange) go just above
    # their first consumer instead of all in the top row.
    for k in g.nodes:
        if kind[k] != "input" and g.in_degree(k) == 0 and g.out_degree(k):
            layer[k] = min(layer[s] for s in g.successors(k)) - 1
    n_rows = max(layer.values(), default=-1) + 1

    # Edges that skip rows pass through one dummy per skipped row.
    preds: dict = {k: [] for k in g.nodes}
    succs: dict = {k: [] for k in g.nodes}
    rows: list[list] = [[] for _ in range(n_rows)]
    rank: dict = {}  # initial order within a row
    for k in g.nodes:
        rows[layer[k]].append(k)
        rank[k] = index[k]
    chains = []
    for e in edges:
        chain = [e.src]
        for r in range(layer[e.src] + 1, layer[e.dst]):
            d = (e.src, e.dst, r)
            rows[r].append(d)
            rank[d] = index[e.src] + 0.5
            preds[d], succs[d] = [], []
            chain.append(d)
        chain.append(e.dst)
        for a, b in zip(chain, chain[1:]):
            succs[a].append(b)
            preds[b].append(a)
        chains.append(chain)
    for r in rows:
        r.sort(key=lambda k: rank[k])
    rows = _order_rows(rows, preds, succs)

    size = {b.name: _box_size(b) for b in boxes}
    w = {k: (size[k][0] if not _is_dummy(k) else 0.0) for r in rows for k in r}
    h = {k: size[k][1] for k in size}

    # Horizontal positions: minimise the weighted squared horizontal length of the edges
    # (edge pieces between dummies weigh most, so long edges run straight), one row at a
    # time, subject to the gaps within each row.  The problem is convex; sweeping the rows
    # down and up converges towards its optimum.
    def weight(a, b) -> float:
        return 8.0 if _is_dummy(a) and _is_dummy(b) else 2.0 if _is_dummy(a) or _is_dummy(b) else 1.0

    x: dict = {}
    for row in rows:
        xs = _place_row(row, [0.0] * len(row), [1.0] * len(row), w)
        mid = (xs[0] + xs[-1]) / 2 if xs else 0.0
        x.update((k, v - mid) for k, v in zip(row, xs))
    order = list(range(n_rows))
    for sweep in range(40):
        before = dict(x)
        for r in (order if sweep % 2 == 0 else order[::-1]):
            row = rows[r]
            desired, wts = [], []
            for k in row:
                nb = [(n, weight(k, n)) for n in preds[k] + succs[k]]
                s = sum(wt for _, wt in nb)
                if s:
                    desired.append(sum(x[n] * wt for n, wt in nb) / s)
                    wts.append(s)
                else:
                    desired.append(x[k])
                    wts.append(1e-3)
            x.update(zip(row, _place_row(row, desired, wts, w)))
        if max((abs(x[k] - before[k]) for k in x), default=0.0) < 0.5:
            break
    _straighten(rows, x, w, preds, succs, chains)
    left = min((x[k] - w[k] / 2 for k in x), default=0.0)
    for k in x:  # to half pixels, so that box edges are exact in the SVG text
        x[k] = round((x[k] + _MARGIN - left) * 2) / 2
    width = max((x[k] + w[k] / 2 for k in x), default=0.0) + _MARGIN

    # Vertical positions: the space between two rows grows with how far its edges travel
    # sideways, so that steep edges stay apart.
    row_top, row_bottom = [], []
    y = _MARGIN
    for r, row in enumerate(rows):
        row_h = max((h[k] for k in row if not _is_dummy(k)), default=0.0)
        row_top.append(y)
        row_bottom.append(y + row_h)
        travel = max((abs(x[k] - x[s]) for k in row for s in succs[k]), default=0.0)
        y += row_h + round(min(max(_ROW_GAP, 2 * _STUB + 0.2 * travel), 4 * _ROW_GAP))
        if r == n_rows - 1:
            y = row_bottom[-1]
    height = y + _MARGIN
    return _Layout(rows, x, w, h, row_top, row_bottom, chains, width, height)


def _edge_points(lay: _Layout, chain: list, port_out: float, port_in: float,
                 layer: dict) -> list[tuple[float, float]]:
    """The polyline of one edge: down out of the source's row, through a gap in every row it
    crosses, into the top of the destination (leaving and entering vertically)."""
    src, dst = chain[0], chain[-1]
    rs, rd = layer[src], layer[dst]
    pts = [(port_out, lay.row_top[rs] + lay.h[src])]
    pts.append((port_out, lay.row_bottom[rs] + _STUB))
    for d in chain[1:-1]:
        r = layer[d]
        pts += [(lay.x[d], lay.row_top[r] - _STUB), (lay.x[d], lay.row_bottom[r] + _STUB)]
    pts += [(port_in, lay.row_top[rd] - _STUB), (port_in, lay.row_top[rd])]
    out = [pts[0]]
    for p in pts[1:]:  # drop repeated points
        if abs(p[0] - out[-1][0]) > 1e-6 or abs(p[1] - out[-1][1]) > 1e-6:
            out.append(p)
    return out


def _ports(lay: _Layout, chains: list[list]) -> tuple[list[float], list[float]]:
    """Where each edge leaves its source and enters its destination: spread over the
    middle of the box, in the left-to-right order of the other ends."""
    outs: dict = {}
    ins: dict = {}
    for i, c in enumerate(chains):
        outs.setdefault(c[0], []).append((lay.x[c[1]], i))
        ins.setdefault(c[-1], []).append((lay.x[c[-2]], i))
    port_out = [0.0] * len(chains)
    port_in = [0.0] * len(chains)
    for table, port in ((outs, port_out), (ins, port_in)):
        for k, ends in table.items():
            ends.sort()
            span = min(lay.w[k] * 0.6, 14.0 * (len(ends) - 1))
            for j, (_, i) in enumerate(ends):
                t = j / (len(ends) - 1) - 0.5 if len(ends) > 1 else 0.0
                port[i] = lay.x[k] + t * span
    return port_out, port_in


def _f(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def to_svg(graph: Graph, *, collapse_params: bool = True, title: str | None = None) -> str:
    """A self-contained SVG drawing of ``graph`` (no Graphviz needed).

    Each drawn node is a ``<g class="node" id="node-NAME">`` holding one ``<rect>``, its
    label and a ``<title>`` tooltip; each data dependency is a ``<g class="edge">`` holding
    one ``<path>`` (ending in an arrowhead) and a tooltip with the tensor type.  Options are
    those of :func:`to_dot`.
    """
    boxes, edges = _collect(graph, collapse_params)
    lay = _layout(boxes, edges)
    layer = {k: r for r, row in enumerate(lay.rows) for k in row}
    head = 30.0 if title is not None else 0.0
    width, height = math.ceil(lay.width), math.ceil(lay.height + head)
    out = [
        '<svg xmlns="http://www.w3.org/2000/svg" version="1.1" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f"<title>{escape(title if title is not None else graph.name)}</title>",
        "<defs>",
        '<marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" markerUnits="userSpaceOnUse" orient="auto">'
        '<path d="M0,0 L10,5 L0,10 z" fill="#555555"/></marker>',
        "</defs>",
        f'<rect class="background" x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<g font-family="{_FONT}" fill="#1a1a1a">',
    ]
    if title is not None:
        out.append(f'<text x="{_f(_MARGIN)}" y="{_f(_MARGIN + 12)}" font-size="15" '
                   f'font-weight="bold">{escape(title)}</text>')
    out.append(f'<g transform="translate(0,{_f(head)})">')

    port_out, port_in = _ports(lay, lay.chains)
    for e, chain, po, pi in zip(edges, lay.chains, port_out, port_in):
        pts = _edge_points(lay, chain, po, pi, layer)
        d = "M" + " L".join(f"{_f(px)},{_f(py)}" for px, py in pts)
        out.append(f'<g class="edge" id={quoteattr(f"edge-{e.src}-{e.dst}")}>'
                   f"<title>{escape(f'{e.src} -> {e.dst}: {e.label}')}</title>"
                   f'<path d="{d}" fill="none" stroke="#555555" stroke-width="1.2" '
                   'marker-end="url(#arrow)"/></g>')

    for b in boxes:
        bw, bh = lay.w[b.name], lay.h[b.name]
        left, top = lay.x[b.name] - bw / 2, lay.row_top[layer[b.name]]
        rx = bh / 2 if b.kind in ("input", "output") else 6.0
        dash = ' stroke-dasharray="4,3"' if b.kind == "param" else ""
        out.append(f'<g class="node" id={quoteattr(f"node-{b.name}")}>'
                   f"<title>{escape(b.tooltip())}</title>")
        out.append(f'<rect x="{_f(left)}" y="{_f(top)}" width="{_f(bw)}" height="{_f(bh)}" '
                   f'rx="{_f(rx)}" fill="{b.fill}" stroke="#555555" stroke-width="1"{dash}/>')
        y = top + _PAD_Y
        for style, text in b.lines():
            size = _SIZE[style]
            y += size * _LINE_H
            attrs = f'font-size="{_f(size)}"'
            if style == "title":
                attrs += ' font-weight="bold"'
            if b.ink != "#1a1a1a":
                attrs += f' fill="{b.ink}"'
            elif style in ("path", "param", "macs") and not b.macs:
                attrs += ' fill="#555555"'
            out.append(f'<text x="{_f(lay.x[b.name])}" y="{_f(y - size * 0.32)}" '
                       f'text-anchor="middle" {attrs}>{escape(_shorten(text))}</text>')
        out.append("</g>")
    out += ["</g>", "</g>", "</svg>"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------

_WRITERS = {".dot": to_dot, ".svg": to_svg}


def save(graph: Graph, path: str | Path, **options) -> Path:
    """Write a drawing of ``graph`` to ``path``: DOT for ``.dot``, SVG for ``.svg``.

    ``options`` are those of :func:`to_dot` / :func:`to_svg`.  Returns the path written.

    Raises
    ------
    ValueError
        For any other suffix.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _WRITERS:
        raise ValueError(f"cannot save a drawing as {path.suffix or '(no suffix)'!r} ({path}): "
                         f"supported suffixes are {', '.join(_WRITERS)}")
    path.write_text(_WRITERS[suffix](graph, **options), encoding="utf-8")
    return path
