"""``pad-channels``: grow channel counts to a multiple of the vector width with zero
channels, the inverse of ``prune-channels`` and exact (verified lossless).

The fast CPU lowering blocks convolutions ``NCHW{c}c`` with ``c`` the vector width (16
floats on AVX-512) only when it divides the channel count, else the largest power of two
that does (24 -> 8, 12 -> 4, odd -> scalar code), and a model that concatenates feature
maps uses one block for all of them (:mod:`slimfx.lowering.cpu_schedules`).  Padding a
DenseNet's 12-channel growth to 16 or a pruned network's odd widths to the next multiple
of 16 buys full vectors for some extra MACs (``bench/pad_channels.py``).

1. :class:`~slimfx.ir.channels.ChannelAnalysis` gives the channel sets; the sets produced
   by one layer that appear in exactly the same tensors form a *segment* (a conv's
   outputs, or one part of them when a split sends parts different ways).  Each segment
   whose width (along its producing layer's output) is not a multiple of ``multiple`` is
   widened to the next one by new channels inserted after its last channel, in every
   tensor it appears in.
2. New channels are zero where they are made: zero filters and bias of the producing
   conv/linear, zero per-channel parameters (a BatchNorm's running variance is 1, so the
   channel stays 0 and finite), zero input columns of every consumer, so they never
   reach a real channel.  Concat offsets, split sizes, slices, groups and reshape
   constants are rewritten by :func:`~slimfx.passes.prune.apply_pruning`'s machinery.
3. Segments are left alone, with the reason in the statistics, when the channel count
   itself changes a result (softmax, mean or another reduction over the channels,
   LayerNorm / GroupNorm over them, attention, a contraction of two activations), when a
   new channel could become non-finite (a division by it, log, sqrt, rsqrt, reciprocal,
   negative powers), when :class:`ChannelAnalysis` blocks them (model inputs and
   outputs, excluded layers, ops without a channel rule), or when padding would grow the
   segment by more than ``max_growth`` (3 -> 16 is not worth it).

>>> import torch, slimfx
>>> from torch import nn
>>> m = nn.Sequential(nn.Conv2d(3, 12, 3), nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 8, 1))
>>> g = slimfx.capture(m.eval(), torch.randn(1, 3, 8, 8))
>>> pm = slimfx.PassManager("pad-channels")   # verified: same outputs
>>> padded = pm.run(g)
>>> pm.records[0].stats["padded"]
{'0': '12 -> 16'}
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx

from slimfx.ir import Graph
from slimfx.ir.channels import ChannelAnalysis
from slimfx.ir.ops import op_name

from .base import Pass, PassResult, register_pass
from .prune import apply_pruning

__all__ = ["PadOptions", "ChannelPadding", "plan_padding", "PadPlan"]

aten = torch.ops.aten
Node = torch.fx.Node


@dataclass(frozen=True)
class PadOptions:
    """Options of ``pad-channels``.

    multiple: widths are grown to a multiple of this (16: whole AVX-512 float vectors).
    max_growth: leave a segment alone when padding would multiply its width by more than
        this (1.5: 12 -> 16 and 24 -> 32 are padded, 3 -> 16 and 10 -> 16 are not).
    exclude: module paths whose layers keep their shape (a path excludes its submodules,
        as in ``prune-channels``).
    """

    multiple: int = 16
    max_growth: float = 1.5
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if self.multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {self.multiple}")
        if not self.max_growth >= 1:
            raise ValueError(f"max_growth must be >= 1 (a width multiplier), got {self.max_growth}")


# ============================================================================ unsafe dims
def _dims_of(ca: ChannelAnalysis, node, dims=None):
    shape = ca.shape(node)
    if shape is None:
        return []
    return [(node, d % len(shape)) for d in (range(len(shape)) if dims is None else dims)]


def _reduced_dims(node: Node, rank: int) -> list[int]:
    dims = node.args[1] if len(node.args) > 1 and node.args[1] is not None else list(range(rank))
    return [d % rank for d in (dims if isinstance(dims, (list, tuple)) else [dims])]


def _unsafe(ca: ChannelAnalysis, node: Node) -> list[tuple[tuple[Node, int], str]]:
    """(dim, reason) pairs of ``node`` whose channel count may not grow: the op's result
    depends on it, or a zero channel could turn non-finite there."""
    t = node.target
    name = op_name(t) if node.op == "call_function" else node.op
    out: list[tuple[tuple[Node, int], str]] = []

    def add(n, dims, why):
        out.extend((k, why) for k in _dims_of(ca, n, dims))

    x = node.args[0] if node.args else None
    if t in (aten._softmax.default, aten._log_softmax.default):
        add(x, [node.args[1]], f"{name} over the channels")
        add(node, [node.args[1]], f"{name} over the channels")
    elif t in (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default,
               aten.var.correction):
        shape = ca.shape(x)
        if shape is not None:
            add(x, _reduced_dims(node, len(shape)), f"{name} over the channels")
    elif t is aten.layer_norm.default:
        shape = ca.shape(x)
        if shape is not None:
            k = len(node.args[1])
            dims = range(len(shape) - k, len(shape))
            add(x, dims, "layer_norm over the channels")
            add(node, dims, "layer_norm over the channels")
    elif t is aten.group_norm.default:
        add(x, [1], "group_norm over the channels")
        add(node, [1], "group_norm over the channels")
    elif t is aten.scaled_dot_product_attention.default:
        for a in node.all_input_nodes:
            add(a, None, "attention")
        add(node, None, "attention")
    elif t in (aten.mm.default, aten.addmm.default, aten.bmm.default):
        a, b = node.args[-2], node.args[-1]
        if all(isinstance(v, Node) and v.op != "get_attr" for v in (a, b)):
            add(a, [-1], "matmul of two activations contracts the channels")
            add(b, [-2], "matmul of two activations contracts the channels")
    elif t is aten.div.Tensor:
        if isinstance(node.args[1], Node):
            add(node.args[1], None, "divisor (a zero channel would divide by zero)")
    elif t in (aten.log.default, aten.sqrt.default, aten.rsqrt.default,
               aten.reciprocal.default):
        add(x, None, f"{name} of a zero channel is not finite")
    elif t is aten.pow.Tensor_Scalar:
        e = node.args[1]
        if not (isinstance(e, int) or (isinstance(e, float) and e.is_integer())) or e < 0:
            add(x, None, f"pow({e}) of a zero channel may not be finite")
    return out


# ============================================================================ the plan
@dataclass
class _Segment:
    roots: list[int]  # channel sets, in order along the source dim
    keys: frozenset  # (node, dim) where they appear
    source: tuple[Node, int]  # the producing parameter dim the width is counted along
    per_set: int  # elements of one set along the source dim
    label: str


@dataclass
class PadPlan:
    """What :func:`plan_padding` decided: the index maps for ``apply_pruning`` and, per
    segment, ``padded`` (label -> ``"old -> new"``) or ``left_alone`` (label -> reason)."""

    index_maps: dict
    fill: dict
    padded: dict[str, str]
    left_alone: dict[str, str]


def _layer_of(param: Node) -> str:
    for u in param.users:
        path = u.meta.get("module_path")
        if path:
            return path
    return param.name


def _segments(ca: ChannelAnalysis) -> list[_Segment]:
    """Channel sets of every layer output, grouped by the tensors they appear in."""
    roots_all = ca._roots
    sources = []
    for (node, dim), d in ca.dims.items():
        if node.op == "get_attr" and ca.source[d.base:d.base + d.size].any():
            sources.append((node, dim))
    candidates: dict[int, tuple[Node, int]] = {}
    for node, dim in sources:
        e = ca.elems(node, dim)
        for r in roots_all[e.start:e.stop].tolist():
            candidates.setdefault(r, (node, dim))
    if not candidates:
        return []
    cand = np.fromiter(candidates, dtype=np.int64)
    where: dict[int, list] = {r: [] for r in candidates}
    for key, d in ca.dims.items():
        rs = roots_all[d.base:d.base + d.size]
        u = np.unique(rs[np.isin(rs, cand)])
        for r in u.tolist():
            where[r].append(key)
    source_keys = set(sources)
    by_sig: dict[tuple, list[int]] = {}
    for r, (node, dim) in candidates.items():
        by_sig.setdefault((node, dim, frozenset(where[r])), []).append(r)
    segs = []
    for (node, dim, keys), rs in by_sig.items():
        e = ca.elems(node, dim)
        line = roots_all[e.start:e.stop]
        first = {r: int(np.argmax(line == r)) for r in rs}
        rs.sort(key=first.get)
        per_set = int(np.sum(line == rs[0]))
        layers = sorted({_layer_of(n) for n, d in keys if (n, d) in source_keys},
                        key=lambda p: (p != _layer_of(node), p))  # the counting layer first
        label = "+".join(layers) if len(layers) <= 3 else \
            f"{'+'.join(layers[:2])}+... ({len(layers)} layers)"
        if len(rs) * per_set != len(line):  # part of a layer's output
            lo = first[rs[0]]
            label += f"[{lo}:{lo + len(rs) * per_set}]"
        segs.append(_Segment(rs, keys, (node, dim), per_set, label))
    segs.sort(key=lambda s: ca._order(s.source[0]))
    return segs


def _run(line: np.ndarray, r: int) -> tuple[int, int] | None:
    """[a, b) of set ``r``'s elements in ``line`` if they are contiguous, else None."""
    idx = np.nonzero(line == r)[0]
    a, b = int(idx[0]), int(idx[-1]) + 1
    return (a, b) if b - a == len(idx) else None


def _straddles(ca: ChannelAnalysis, keys, anchor: int) -> str | None:
    """A split or slice boundary inside the anchor set's run (its new channels would
    not know which side they belong to)."""
    for node, dim in keys:
        e = ca.elems(node, dim)
        run = _run(ca._roots[e.start:e.stop], anchor)
        for u in node.users:
            if u.target is aten.split_with_sizes.default and u.args[0] is node:
                udim = (u.args[2] if len(u.args) > 2 else 0) % len(ca.shape(node))
                cuts = np.cumsum(u.args[1])[:-1].tolist()
            elif u.target is aten.slice.Tensor and u.args[0] is node:
                udim = (u.args[1] if len(u.args) > 1 else 0) % len(ca.shape(node))
                size = ca.shape(node)[udim]
                start = u.args[2] if len(u.args) > 2 and u.args[2] is not None else 0
                end = u.args[3] if len(u.args) > 3 and u.args[3] is not None else size
                cuts = [max(0, min(size, c + size if c < 0 else c)) for c in (start, end)]
            else:
                continue
            if udim == dim and any(run[0] < c < run[1] for c in cuts):
                return f"{op_name(u.target)} cuts through a channel ({u.name})"
    return None


def plan_padding(ca: ChannelAnalysis, opts: PadOptions) -> PadPlan:
    """Which segments to pad, by how much, and the index maps that do it."""
    graph = ca.graph
    unsafe: dict[int, str] = {}
    for node in graph.fx.nodes:
        if node.op != "call_function":
            continue
        for key, why in _unsafe(ca, node):
            d = ca.dims[key]
            for r in np.unique(ca._roots[d.base:d.base + d.size]).tolist():
                unsafe.setdefault(r, f"{why} ({node.name})")
    blocked_why: dict[int, str] = {}
    for (node, dim), d in ca.dims.items():
        b = ca.blocked[d.base:d.base + d.size]
        if b.any():
            why = ca.blocked_by.get((node.name, dim), "blocked")
            for r in np.unique(ca._roots[d.base:d.base + d.size][b]).tolist():
                blocked_why.setdefault(r, why)
    inserts: dict[tuple[Node, int], list[tuple[int, int, int]]] = {}
    padded, left = {}, {}
    m = opts.multiple
    for seg in _segments(ca):
        width = len(seg.roots) * seg.per_set
        if width % m == 0:
            continue
        unit = m // math.gcd(m, seg.per_set)
        new_sets = -(-len(seg.roots) // unit) * unit
        new_width = new_sets * seg.per_set
        why = next((blocked_why.get(r) or ("blocked" if r not in ca.prunable else None)
                    for r in seg.roots if r not in ca.prunable), None)
        why = why or next((unsafe[r] for r in seg.roots if r in unsafe), None)
        if why is None and new_width > opts.max_growth * width:
            why = (f"{width} -> {new_width} would grow it {new_width / width:.2f}x > "
                   f"max_growth={opts.max_growth:g}")
        anchor = seg.roots[-1]
        runs = {}
        if why is None:
            for key in seg.keys:
                e = ca.elems(*key)
                run = _run(ca._roots[e.start:e.stop], anchor)
                if run is None:
                    why = f"its channels are not contiguous in {key[0].name}[{key[1]}]"
                    break
                runs[key] = run
        why = why or _straddles(ca, seg.keys, anchor)
        if why is not None:
            left[seg.label] = f"{width}: {why}"
            continue
        for key, (a, b) in runs.items():
            inserts.setdefault(key, []).append((b, b - a, new_sets - len(seg.roots)))
        padded[seg.label] = f"{width} -> {new_width}"
    index_maps = {}
    for (node, dim), ins in inserts.items():
        size = ca.shape(node)[dim]
        parts, prev = [], 0
        for at, run, n in sorted(ins):
            parts += [np.arange(prev, at), np.full(run * n, -1)]
            prev = at
        parts.append(np.arange(prev, size))
        index_maps[(node, dim)] = np.concatenate(parts).astype(np.int64)
    fill = {}
    for node in graph.fx.nodes:  # a BatchNorm's new channels: (0 - 0) / sqrt(1 + eps) * 0 + 0
        if node.target is aten.batch_norm.default and len(node.args) > 4 and \
                isinstance(node.args[4], Node):
            fill[node.args[4]] = 1.0
    return PadPlan(index_maps, fill, padded, left)


# ============================================================================ the pass
@register_pass("pad-channels", options=PadOptions)
class ChannelPadding(Pass):
    """Grow channel counts to a multiple of ``multiple`` with zero channels (lossless).

    Statistics: ``padded`` (per segment, ``"old -> new"`` width), ``left_alone`` (per
    segment not a multiple, why), ``macs_before`` / ``macs_after`` / ``macs_ratio``.
    """

    def run(self, graph: Graph) -> PassResult:
        ca = ChannelAnalysis(graph, exclude=self.options.exclude)
        plan = plan_padding(ca, self.options)
        before = graph.macs()
        stats = {"padded": plan.padded, "left_alone": plan.left_alone, "macs_before": before}
        if not plan.index_maps:
            stats.update(macs_after=before, macs_ratio=1.0)
            return PassResult(graph, False, stats)
        apply_pruning(ca, set(), index_maps=plan.index_maps, fill=plan.fill)
        after = graph.macs()
        stats.update(macs_after=after, macs_ratio=round(after / before, 4) if before else 1.0)
        return PassResult(graph, True, stats)
