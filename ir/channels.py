"""Channel-dependency analysis: which channels of which tensors must be removed together.

Every index of every dimension of every tensor in the graph (activations and parameters)
is an *element*.  Op rules, registered per op target, tie elements that must be kept or
removed together: a residual ``add`` ties its operands' channels index by index, ``cat``
ties each input's channels to the output at an offset, ``view`` from ``(C, H, W)`` to
``(C*H*W)`` ties channel ``c`` to the block of features ``c*H*W ...``, a grouped conv
ties a whole group, attention ties the heads of ``q``, ``k`` and ``v``.  The classes of
tied elements are *channel sets*: removing one removes exactly its elements everywhere,
which keeps every op consistent.

A channel set can be pruned when it holds at least one *source* (an output channel of a
layer with weights: conv, linear, embedding) and no *blocked* element.  Elements are
blocked by model inputs and outputs (whose shapes never change), by excluded layers, and
by ops with no rule: an unknown op is never guessed about, it blocks every element it
touches and says so (:attr:`ChannelAnalysis.blocked_by`).

Dimensions tied by any rule form a *group* (a networkx graph of ``(node, dim)`` pairs
whose edges record the op that tied them), which is what :meth:`ChannelAnalysis.explain`
prints: why two layers are coupled.

>>> import torch, slimfx
>>> from torch import nn
>>> class Res(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
...         self.fc = nn.Linear(8, 2)
...     def forward(self, x):
...         y = self.a(x)
...         return self.fc((self.b(y) + y).mean((2, 3)))
>>> ca = ChannelAnalysis(slimfx.capture(Res(), torch.randn(1, 3, 8, 8)))
>>> [(len(g.sets), sorted(g.layers)) for g in ca.groups()]
[(8, ['a', 'b', 'fc'])]
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch
import torch.fx

from .graph import Graph, in_modules
from .ops import op_name

__all__ = ["ChannelAnalysis", "ChannelGroup", "register_channel_rule", "channel_rules"]

aten = torch.ops.aten
Node = torch.fx.Node
RuleFn = Callable[["ChannelAnalysis", Node], None]
_RULES: dict = {}


def register_channel_rule(*targets) -> Callable[[RuleFn], RuleFn]:
    """Register how op ``targets`` tie channels (``fn(analysis, node)``; a decorator)."""

    def deco(fn: RuleFn) -> RuleFn:
        for t in targets:
            _RULES[t] = fn
        return fn

    return deco


def channel_rules() -> dict:
    return dict(_RULES)


@dataclass
class ChannelGroup:
    """Coupled dimensions (``members``: (node name, dim)) and their prunable channel sets."""

    index: int
    members: list[tuple[str, int]]
    sets: list[int]  # prunable set ids (roots): the first source's in order, then the rest
    layers: set[str]  # module paths of the weighted layers involved
    source: tuple[str, int]  # the (param node, dim) the sets are counted along
    elements_per_set: int = 1


@dataclass
class _Dim:
    node: Node
    dim: int
    base: int
    size: int


class ChannelAnalysis:
    """Element-level channel coupling of a graph (see the module docstring).

    Parameters
    ----------
    graph: the graph to analyse (its shape analysis is run if needed).
    exclude: module paths whose layers keep their shape (a path excludes its submodules).
    """

    def __init__(self, graph: Graph, exclude: Iterable[str] = ()):
        self.graph = graph
        graph.analyze()
        self.exclude = tuple(exclude)
        self.dims: dict[tuple[Node, int], _Dim] = {}
        n = 0
        for node in graph.fx.nodes:
            shape = self._shape_or_none(node)
            if shape is None:
                continue
            for d, s in enumerate(shape):
                self.dims[(node, d)] = _Dim(node, d, n, s)
                n += s
        self.parent = list(range(n))
        self.blocked = np.zeros(n, dtype=bool)
        self.source = np.zeros(n, dtype=bool)
        self.blocked_by: dict[tuple[str, int], str] = {}
        self.links = nx.Graph()
        self.unknown_ops: dict[str, list[str]] = defaultdict(list)
        for node in graph.fx.nodes:
            self._apply_rule(node)
        self._block_excluded()
        self._roots = np.array([self.find(i) for i in range(n)], dtype=np.int64)
        bad = set(self._roots[self.blocked].tolist())
        good = set(self._roots[self.source].tolist()) - bad
        self.prunable: set[int] = good

    # ------------------------------------------------------------------ elements
    def _shape_or_none(self, node: Node):
        info = node.meta.get("slimfx")
        if info is None or len(info.outputs) != 1 or node.op == "output":
            return None
        return info.outputs[0].shape

    def shape(self, node) -> tuple[int, ...] | None:
        return self._shape_or_none(node) if isinstance(node, Node) else None

    def has(self, node, dim: int) -> bool:
        return isinstance(node, Node) and (node, dim) in self.dims

    def elems(self, node: Node, dim: int) -> range:
        d = self.dims[(node, dim % len(self.shape(node)))]
        return range(d.base, d.base + d.size)

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def _link(self, a: Node, da: int, b: Node, db: int, why: str) -> None:
        ka = (a.name, da % len(self.shape(a)))
        kb = (b.name, db % len(self.shape(b)))
        self.links.add_edge(ka, kb, why=why)

    def tie(self, a: Node, da: int, b: Node, db: int, why: str) -> None:
        """Tie dimension ``da`` of ``a`` to ``db`` of ``b`` index by index (equal sizes)."""
        ea, eb = self.elems(a, da), self.elems(b, db)
        if len(ea) != len(eb):
            raise ValueError(f"tie of unequal dims: {a.name}[{da}]={len(ea)} vs {b.name}[{db}]={len(eb)}")
        for i, j in zip(ea, eb):
            self._union(i, j)
        self._link(a, da, b, db, why)

    def tie_map(self, a: Node, da: int, ia: Sequence[int], b: Node, db: int, ib: Sequence[int],
                why: str) -> None:
        """Tie element ``ia[k]`` of ``a``'s dim ``da`` to ``ib[k]`` of ``b``'s dim ``db``."""
        ea, eb = self.elems(a, da), self.elems(b, db)
        for i, j in zip(ia, ib):
            self._union(ea[i], eb[j])
        self._link(a, da, b, db, why)

    def block(self, node: Node, dim: int | None, why: str, index: int | None = None) -> None:
        """Forbid pruning dim ``dim`` of ``node`` (all dims if ``None``; one index if given)."""
        shape = self.shape(node)
        if shape is None:
            return
        dims = range(len(shape)) if dim is None else [dim % len(shape)]
        for d in dims:
            e = self.elems(node, d)
            if index is None:
                self.blocked[e.start:e.stop] = True
            else:
                self.blocked[e[index]] = True
            self.blocked_by.setdefault((node.name, d), why)

    def mark_source(self, param: Node, dim: int) -> None:
        """Dim ``dim`` of a parameter node counts a layer's output channels."""
        if self.has(param, dim) and param.op == "get_attr":
            e = self.elems(param, dim)
            self.source[e.start:e.stop] = True

    # ------------------------------------------------------------------ rules
    def _apply_rule(self, node: Node) -> None:
        if node.op == "placeholder":
            self.block(node, None, "model input")
        elif node.op == "output":
            for a in node.all_input_nodes:
                self.block(a, None, "model output")
        elif node.op == "call_function":
            rule = _RULES.get(node.target)
            if rule is None and node.target is operator.getitem:
                rule = _getitem
            if rule is None:
                self.unknown_ops[op_name(node.target)].append(node.name)
                self.block(node, None, f"no channel rule for {op_name(node.target)}")
                for a in node.all_input_nodes:
                    self.block(a, None, f"input of {op_name(node.target)} (no channel rule)")
                return
            rule(self, node)

    def _block_excluded(self) -> None:
        if not self.exclude:
            return
        for node in self.graph.fx.nodes:
            path = node.meta.get("module_path", "")
            if node.op == "call_function" and in_modules(path, self.exclude):
                for a in node.all_input_nodes:
                    if a.op == "get_attr":
                        self.block(a, None, f"excluded layer {path}")
                self.block(node, None, f"excluded layer {path}")

    # ------------------------------------------------------------------ results
    def set_of(self, node: Node, dim: int, index: int) -> int:
        return int(self._roots[self.elems(node, dim)[index]])

    def keep_mask(self, node: Node, dim: int, removed: set[int]) -> np.ndarray:
        e = self.elems(node, dim)
        if not removed:
            return np.ones(len(e), dtype=bool)
        return ~np.isin(self._roots[e.start:e.stop], np.fromiter(removed, dtype=np.int64))

    def members(self, root: int) -> list[tuple[Node, int, int]]:
        """Every (node, dim, index) in channel set ``root``."""
        out = []
        for d in self.dims.values():
            r = self._roots[d.base:d.base + d.size]
            for i in np.nonzero(r == root)[0]:
                out.append((d.node, d.dim, int(i)))
        return out

    def groups(self) -> list[ChannelGroup]:
        """Dimension groups holding prunable channel sets, largest first by MACs touched."""
        return self.graph.cached(("channel-groups", id(self)), lambda g: self._groups())

    def _groups(self) -> list[ChannelGroup]:
        by_name = {n.name: n for n in self.graph.fx.nodes}
        groups = []
        for comp in nx.connected_components(self.links):
            members = sorted(comp, key=lambda k: (self._order(by_name[k[0]]), k[1]))
            src = None
            for name, d in members:
                node = by_name[name]
                e = self.elems(node, d)
                if self.source[e.start:e.stop].any():
                    src = (node, d)
                    break
            if src is None:
                continue
            e = self.elems(*src)
            roots = self._roots[e.start:e.stop]
            sets, seen = [], set()
            # The source's sets first, then those only other members hold (the outputs
            # of a second conv concatenated with the first one's).
            for name, d in [(src[0].name, src[1]), *members]:
                m = self.elems(by_name[name], d)
                for r in self._roots[m.start:m.stop].tolist():
                    if r in self.prunable and r not in seen:
                        seen.add(r)
                        sets.append(r)
            if not sets:
                continue
            per_set = int(np.sum(roots == sets[0]))
            layers = set()
            for name, _ in members:
                node = by_name[name]
                if node.op == "get_attr":
                    for u in node.users:
                        if u.meta.get("module_path"):
                            layers.add(u.meta["module_path"])
            groups.append(ChannelGroup(0, [(n, d) for n, d in members], sets, layers,
                                       (src[0].name, src[1]), per_set))
        groups.sort(key=lambda g: self._order(by_name[g.source[0]]))
        for i, g in enumerate(groups):
            g.index = i
        return groups

    def _order(self, node: Node) -> int:
        first_user = min((self._pos[u] for u in node.users), default=self._pos[node]) \
            if node.op == "get_attr" else self._pos[node]
        return first_user

    @property
    def _pos(self) -> dict:
        if not hasattr(self, "_pos_cache"):
            self._pos_cache = {n: i for i, n in enumerate(self.graph.fx.nodes)}
        return self._pos_cache

    def explain(self, group: ChannelGroup | int) -> str:
        """Why the layers of a group are coupled: its members and the ops that tie them."""
        g = self.groups()[group] if isinstance(group, int) else group
        by_name = {n.name: n for n in self.graph.fx.nodes}
        lines = [f"group {g.index}: {len(g.sets)} prunable channel sets "
                 f"({g.elements_per_set} element(s) each along {g.source[0]}[{g.source[1]}]); "
                 f"layers: {', '.join(sorted(g.layers)) or '-'}"]
        comp = set(g.members)
        for a, b, data in sorted(self.links.subgraph(comp).edges(data=True)):
            na, nb = by_name[a[0]], by_name[b[0]]
            lines.append(f"  {_desc(na, a[1])}  ~  {_desc(nb, b[1])}   [{data['why']}]")
        blocked = sorted({why for key, why in self.blocked_by.items() if key in comp})
        if blocked:
            lines.append("  partly blocked: " + "; ".join(blocked))
        return "\n".join(lines)

    def summary(self) -> str:
        """All groups, and the unknown ops that blocked channels."""
        parts = [self.explain(g) for g in self.groups()]
        if self.unknown_ops:
            parts.append("ops without a channel rule (their channels are kept): " + ", ".join(
                f"{op} ({len(ns)}x)" for op, ns in sorted(self.unknown_ops.items())))
        return "\n\n".join(parts)


def _desc(node: Node, dim: int) -> str:
    path = node.meta.get("module_path", "")
    what = f"param {node.target}" if node.op == "get_attr" else op_name(node.target) if \
        node.op == "call_function" else node.op
    return f"{node.name}[{dim}] ({what}{', ' + path if path and node.op != 'get_attr' else ''})"


# ============================================================================ op rules
def _tensor_args(node: Node) -> list[Node]:
    return [a for a in node.args if isinstance(a, Node)]


def _broadcast(ca: ChannelAnalysis, node: Node, inputs: Iterable, why: str) -> None:
    """Elementwise: tie each input's dims to the output's, aligned from the right."""
    out = ca.shape(node)
    if out is None:
        return
    for a in inputs:
        s = ca.shape(a)
        if s is None:
            continue
        off = len(out) - len(s)
        for d in range(len(s)):
            if s[d] == out[d + off]:  # equal sizes, 1 included: a 1-channel tensor too
                ca.tie(a, d, node, d + off, why)


_ELEMENTWISE = [
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.add.Scalar,
    aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.relu.default, aten.gelu.default,
    aten.sigmoid.default, aten.tanh.default, aten.hardtanh.default, aten.clamp.default,
    aten.neg.default, aten.exp.default, aten.log.default, aten.sqrt.default,
    aten.rsqrt.default, aten.pow.Tensor_Scalar, aten.abs.default, aten.leaky_relu.default,
    aten.elu.default, aten.where.self, aten.maximum.default, aten.minimum.default,
    aten.erf.default, aten.clone.default, aten._to_copy.default, aten.alias.default,
    aten.ge.Scalar, aten.gt.Scalar, aten.le.Scalar, aten.lt.Scalar, aten.eq.Scalar,
    aten.ne.Scalar, aten.ge.Tensor, aten.gt.Tensor, aten.le.Tensor, aten.lt.Tensor,
    aten.eq.Tensor, aten.ne.Tensor, aten.logical_and.default, aten.logical_or.default,
    aten.logical_not.default, aten.bitwise_and.Tensor, aten.bitwise_or.Tensor,
    aten.reciprocal.default, aten.sign.default, aten.floor.default, aten.ceil.default,
    aten.round.default, aten.sin.default, aten.cos.default, aten.remainder.Scalar,
]


@register_channel_rule(*_ELEMENTWISE)
def _elementwise(ca: ChannelAnalysis, node: Node) -> None:
    why = "residual add" if node.target is aten.add.Tensor and len(_tensor_args(node)) == 2 \
        else op_name(node.target)
    _broadcast(ca, node, _tensor_args(node), why)


@register_channel_rule(aten.scalar_tensor.default, aten.full.default, aten.zeros.default,
                       aten.ones.default, aten.empty.memory_format)
def _creation(ca: ChannelAnalysis, node: Node) -> None:
    pass  # a constant of a given size: its dims follow whatever they are tied to


@register_channel_rule(aten.arange.start_step, aten.arange.default, aten.arange.start)
def _arange(ca: ChannelAnalysis, node: Node) -> None:
    ca.block(node, None, "arange values depend on the index")


@register_channel_rule(aten.convolution.default)
def _conv(ca: ChannelAnalysis, node: Node) -> None:
    x, w, b = node.args[0], node.args[1], node.args[2]
    transposed, groups = node.args[6], node.args[8]
    ca.tie(x, 0, node, 0, "batch")
    if transposed:
        if groups != 1:
            ca.block(node, 1, "grouped transposed conv")
            ca.block(x, 1, "grouped transposed conv")
            return
        ca.tie(x, 1, w, 0, "conv_transpose in-channels")
        ca.tie(node, 1, w, 1, "conv_transpose out-channels")
        ca.mark_source(w, 1)
    elif groups == 1:
        ca.tie(x, 1, w, 1, "conv in-channels")
        ca.tie(node, 1, w, 0, "conv out-channels")
        ca.mark_source(w, 0)
    else:
        # Groups are pruned whole: tie each group's input and output channels together.
        cin, cout = ca.shape(x)[1], ca.shape(node)[1]
        ipg, opg = cin // groups, cout // groups
        kind = "depthwise conv" if ipg == 1 else f"grouped conv ({groups} groups)"
        for k in range(groups):
            ca.tie_map(x, 1, [k * ipg] * ipg, x, 1, range(k * ipg, (k + 1) * ipg), kind)
            ca.tie_map(x, 1, [k * ipg] * opg, node, 1, range(k * opg, (k + 1) * opg), kind)
        ca.tie(node, 1, w, 0, f"{kind} out-channels")
        ca.block(w, 1, f"{kind}: channels within a group are kept")
        ca.mark_source(w, 0)
    if isinstance(b, Node):
        ca.tie(node, 1, b, 0, "conv bias")


@register_channel_rule(aten.linear.default)
def _linear(ca: ChannelAnalysis, node: Node) -> None:
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else None
    r = len(ca.shape(node))
    for d in range(r - 1):
        ca.tie(x, d, node, d, "linear leading dims")
    ca.tie(x, -1, w, 1, "linear in-features")
    ca.tie(node, -1, w, 0, "linear out-features")
    ca.mark_source(w, 0)
    if isinstance(b, Node):
        ca.tie(node, -1, b, 0, "linear bias")


@register_channel_rule(aten.mm.default, aten.addmm.default, aten.bmm.default)
def _mm(ca: ChannelAnalysis, node: Node) -> None:
    a, b = node.args[-2], node.args[-1]
    if node.target is aten.bmm.default:
        ca.tie(a, 0, node, 0, "bmm batch")
        ca.tie(b, 0, node, 0, "bmm batch")
    ca.tie(a, -2, node, -2, "matmul rows")
    ca.tie(a, -1, b, -2, "matmul contraction")
    ca.tie(b, -1, node, -1, "matmul columns")
    ca.mark_source(b, -1 % len(ca.shape(b)))
    if node.target is aten.addmm.default:
        _broadcast(ca, node, [node.args[0]], "addmm bias")


@register_channel_rule(aten.embedding.default)
def _embedding(ca: ChannelAnalysis, node: Node) -> None:
    w, idx = node.args[0], node.args[1]
    ca.tie(node, -1, w, 1, "embedding dim")
    for d in range(len(ca.shape(idx))):
        ca.tie(idx, d, node, d, "embedding index dims")
    ca.block(w, 0, "embedding rows are indexed by token ids")
    ca.mark_source(w, 1)


@register_channel_rule(aten.batch_norm.default)
def _batch_norm(ca: ChannelAnalysis, node: Node) -> None:
    x = node.args[0]
    for d in range(len(ca.shape(node))):
        ca.tie(x, d, node, d, "batch_norm")
    for p in node.args[1:5]:
        if isinstance(p, Node):
            ca.tie(node, 1, p, 0, "batch_norm parameters")


@register_channel_rule(aten.layer_norm.default)
def _layer_norm(ca: ChannelAnalysis, node: Node) -> None:
    x, normalized = node.args[0], node.args[1]
    r = len(ca.shape(node))
    for d in range(r):
        ca.tie(x, d, node, d, "layer_norm")
    for p in node.args[2:4]:
        if isinstance(p, Node):
            for k in range(len(normalized)):
                ca.tie(node, r - len(normalized) + k, p, k, "layer_norm parameters")


@register_channel_rule(aten.group_norm.default)
def _group_norm(ca: ChannelAnalysis, node: Node) -> None:
    x, groups = node.args[0], node.args[1]
    for d in range(len(ca.shape(node))):
        ca.tie(x, d, node, d, "group_norm")
    c = ca.shape(node)[1]
    cpg = c // groups
    for k in range(groups):  # a group's channels go together: the group count shrinks
        ca.tie_map(node, 1, [k * cpg] * cpg, node, 1, range(k * cpg, (k + 1) * cpg),
                   f"group_norm ({groups} groups)")
    for p in node.args[2:4]:
        if isinstance(p, Node):
            ca.tie(node, 1, p, 0, "group_norm parameters")


@register_channel_rule(aten.max_pool2d.default, aten.avg_pool2d.default,
                       aten._adaptive_avg_pool2d.default, aten.avg_pool1d.default,
                       aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec)
def _pool(ca: ChannelAnalysis, node: Node) -> None:
    x = node.args[0]
    ca.tie(x, 0, node, 0, "pooling batch")
    ca.tie(x, 1, node, 1, "pooling keeps channels")


@register_channel_rule(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default,
                       aten.var.correction)
def _reduce(ca: ChannelAnalysis, node: Node) -> None:
    x = node.args[0]
    xs = ca.shape(x)
    dims = node.args[1] if len(node.args) > 1 and node.args[1] is not None else list(range(len(xs)))
    dims = [d % len(xs) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if node.target is aten.var.correction:
        keepdim = node.kwargs.get("keepdim", False)
    o = 0
    for d in range(len(xs)):
        if d in dims:
            if keepdim:
                o += 1
            continue
        ca.tie(x, d, node, o, f"{op_name(node.target)} keeps dim")
        o += 1


@register_channel_rule(aten._softmax.default, aten._log_softmax.default)
def _softmax(ca: ChannelAnalysis, node: Node) -> None:
    _broadcast(ca, node, [node.args[0]], op_name(node.target))


@register_channel_rule(aten.cat.default)
def _cat(ca: ChannelAnalysis, node: Node) -> None:
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out = ca.shape(node)
    dim %= len(out)
    off = 0
    for t in tensors:
        s = ca.shape(t)
        for d in range(len(out)):
            if d != dim:
                ca.tie(t, d, node, d, "concat")
        ca.tie_map(t, dim, range(s[dim]), node, dim, range(off, off + s[dim]),
                   f"concat at offset {off}")
        off += s[dim]


@register_channel_rule(aten.split_with_sizes.default)
def _split(ca: ChannelAnalysis, node: Node) -> None:
    pass  # tied per output by the getitem rule


def _getitem(ca: ChannelAnalysis, node: Node) -> None:
    src, i = node.args
    if isinstance(src, Node) and src.target is aten.split_with_sizes.default:
        x, sizes = src.args[0], src.args[1]
        dim = (src.args[2] if len(src.args) > 2 else 0) % len(ca.shape(x))
        off = sum(sizes[:i])
        for d in range(len(ca.shape(x))):
            if d != dim:
                ca.tie(x, d, node, d, "split")
        ca.tie_map(x, dim, range(off, off + sizes[i]), node, dim, range(sizes[i]),
                   f"split part {i} at offset {off}")
        return
    ca.block(node, None, f"getitem of {op_name(src.target) if isinstance(src, Node) else src}")
    for a in src.all_input_nodes if isinstance(src, Node) else ():
        ca.block(a, None, f"input of {op_name(src.target)} (no channel rule)")


@register_channel_rule(aten.slice.Tensor)
def _slice(ca: ChannelAnalysis, node: Node) -> None:
    x = node.args[0]
    xs, out = ca.shape(x), ca.shape(node)
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(xs)
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    step = node.args[4] if len(node.args) > 4 else 1
    start = max(0, start + xs[dim] if start < 0 else min(start, xs[dim]))
    for d in range(len(xs)):
        if d != dim:
            ca.tie(x, d, node, d, "slice")
    if step != 1:
        ca.block(x, dim, "strided slice")
        ca.block(node, dim, "strided slice")
        return
    ca.tie_map(x, dim, range(start, start + out[dim]), node, dim, range(out[dim]),
               f"slice from {start}")


@register_channel_rule(aten.select.int)
def _select(ca: ChannelAnalysis, node: Node) -> None:
    x, dim, index = node.args
    xs = ca.shape(x)
    dim %= len(xs)
    o = 0
    for d in range(len(xs)):
        if d == dim:
            continue
        ca.tie(x, d, node, o, "select")
        o += 1
    ca.block(x, dim, "selected index", index=index % xs[dim])


@register_channel_rule(aten.permute.default)
def _permute(ca: ChannelAnalysis, node: Node) -> None:
    x, perm = node.args
    for o, d in enumerate(perm):
        ca.tie(x, d % len(perm), node, o, "permute")


@register_channel_rule(aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
                       aten.squeeze.default)
def _squeeze(ca: ChannelAnalysis, node: Node) -> None:
    _reshape_like(ca, node)


@register_channel_rule(aten.view.default, aten._unsafe_view.default)
def _view(ca: ChannelAnalysis, node: Node) -> None:
    _reshape_like(ca, node)


def _reshape_like(ca: ChannelAnalysis, node: Node) -> None:
    """Tie dims of a reshape: dims kept as they are tie one to one; a dim split into
    several (or several merged into one) ties its elements to the *outermost* dim of the
    other side in blocks; the inner dims of a split/merge are kept whole."""
    x = node.args[0]
    xs, out = list(ca.shape(x)), list(ca.shape(node))
    i = j = 0
    while i < len(xs) or j < len(out):
        if i < len(xs) and xs[i] == 1 and (j >= len(out) or out[j] != 1):
            i += 1
            continue
        if j < len(out) and out[j] == 1 and (i >= len(xs) or xs[i] != 1):
            j += 1
            continue
        if i >= len(xs) or j >= len(out):
            break
        gi, gj = [i], [j]
        pi, pj = xs[i], out[j]
        while pi != pj:
            if pi < pj:
                i += 1
                gi.append(i)
                pi *= xs[i]
            else:
                j += 1
                gj.append(j)
                pj *= out[j]
        if len(gi) == 1 and len(gj) == 1:
            ca.tie(x, gi[0], node, gj[0], "view")
        elif len(gi) == 1 or len(gj) == 1:
            total = pi
            inner_x = total // xs[gi[0]]
            flat = range(total)
            if len(gi) == 1:  # one dim split into several: tie to one of them, in blocks
                # The outermost dim that is not indexed later (q/k/v of a fused projection
                # are selected by index: the heads dim is the one to prune).
                indexed = _indexed_dims(node)
                pick = next((k for k in gj if out[k] > 1 and k not in indexed), gj[0])
                inner = math.prod(out[k] for k in gj if k > pick)
                ca.tie_map(x, gi[0], list(flat), node, pick, [(f // inner) % out[pick] for f in flat],
                           f"view splits dim {gi[0]} into {[out[k] for k in gj]}")
                for k in gj:
                    if k != pick:
                        ca.block(node, k, "other dim of a view split")
            else:  # several dims merged into one: each outer index owns a block
                ca.tie_map(x, gi[0], [f // inner_x for f in flat], node, gj[0], list(flat),
                           f"view merges dims {gi} ({'x'.join(str(xs[k]) for k in gi)}) into one")
                for k in gi[1:]:
                    ca.block(x, k, "inner dim of a view merge")
        else:
            for k in gi:
                ca.block(x, k, "view regroups dims")
            for k in gj:
                ca.block(node, k, "view regroups dims")
        i, j = gi[-1] + 1, gj[-1] + 1


def _indexed_dims(node: Node) -> set[int]:
    """Dims of ``node`` that a later ``select`` or ``slice`` picks parts of (through
    permutes): unbinding q, k and v of a fused projection looks like this."""
    out: set[int] = set()
    rank = len(node.meta["slimfx"].shape)
    for u in node.users:
        if u.target in (aten.select.int, aten.slice.Tensor) and u.args[0] is node:
            d = (u.args[1] if len(u.args) > 1 else 0) % rank
            if u.target is aten.select.int or \
                    u.meta["slimfx"].shape[d] != node.meta["slimfx"].shape[d]:
                out.add(d)
        elif u.target is aten.permute.default:
            perm = u.args[1]
            out |= {perm[d] % len(perm) for d in _indexed_dims(u)}
    return out


@register_channel_rule(aten.expand.default)
def _expand(ca: ChannelAnalysis, node: Node) -> None:
    _broadcast(ca, node, [node.args[0]], "expand")


@register_channel_rule(aten.constant_pad_nd.default)
def _pad(ca: ChannelAnalysis, node: Node) -> None:
    x, pad = node.args[0], node.args[1]
    r = len(ca.shape(x))
    padded = {r - 1 - k // 2 for k, p in enumerate(pad) if p}
    for d in range(r):
        if d in padded:
            ca.block(x, d, "padded dim")
            ca.block(node, d, "padded dim")
        else:
            ca.tie(x, d, node, d, "pad")


@register_channel_rule(aten.scaled_dot_product_attention.default)
def _sdpa(ca: ChannelAnalysis, node: Node) -> None:
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    r = len(ca.shape(q))
    for d in range(r - 2):  # batch and heads
        why = "attention heads" if d == r - 3 else "attention batch"
        ca.tie(q, d, node, d, why)
        ca.tie(k, d, node, d, why)
        ca.tie(v, d, node, d, why)
    ca.tie(q, -2, node, -2, "attention queries")
    ca.tie(k, -2, v, -2, "attention keys/values")
    ca.tie(v, -1, node, -1, "attention value dim")
    for t, d in ((q, -1), (k, -1)):  # the scale depends on E: the head dim is kept
        ca.block(t, d, "attention head dim")
    if isinstance(mask, Node):
        _broadcast(ca, node, [mask], "attention mask")


def macs_dims(ca: ChannelAnalysis, node: Node) -> list[tuple[Node, int]]:
    """Dims whose kept fraction scales this op's MACs (for budget estimates)."""
    t = node.target
    if t is aten.convolution.default:
        w = node.args[1]
        return [(node, 1)] + ([(w, 1)] if node.args[8] == 1 else [])
    if t is aten.linear.default:
        return [(node, -1), (node.args[1], 1)]
    if t in (aten.mm.default, aten.addmm.default, aten.bmm.default):
        return [(node, -2), (node, -1), (node.args[-2], -1)]
    if t is aten.scaled_dot_product_attention.default:
        return [(node.args[0], -3)]
    return []


def kept_fraction(ca: ChannelAnalysis, dims, removed_counts: dict) -> float:
    f = 1.0
    for n, d in dims:
        s = ca.shape(n)
        if s is None:
            continue
        d %= len(s)
        f *= 1 - removed_counts.get((n, d), 0) / s[d]
    return f
