"""``prune-channels``: structured channel pruning with residual alignment, ranked globally
with per-layer score normalisation (the seed thesis's "debiasing"), physically rewritten.

1. :class:`~slimfx.ir.channels.ChannelAnalysis` finds the channel sets that must go
   together (through adds, concats, splits, grouped convs, norms, flatten->linear, heads).
2. A criterion scores each set from all of its members: ``l1`` / ``l2`` (weight
   magnitude), ``bn_scale`` (|gamma| of the norms in the set), ``taylor`` (|w * dL/dw|,
   needs data and a loss), ``activation`` (mean |activation|, needs data), ``apoz``
   (1 - average percentage of zeros after ReLU-like ops, needs data), ``random``.
3. Scores are normalised per group (``normalize=mean|max|l2|rank|none``) so that one
   global ranking compares layers fairly (``strategy=global``); ``strategy=uniform``
   removes the same fraction from every group instead.  The budget is a fraction of
   channel sets (``ratio``), of MACs (``macs``) or of parameters (``params``) to keep or
   remove; kept counts are rounded to ``round_to`` for SIMD and never fall below
   ``min_ratio`` of a group.
4. Weights and biases are sliced and every shape constant in the graph (views, groups,
   split sizes, norm shapes, slices) rewritten: the result is an ordinary, smaller graph.

>>> import torch, slimfx
>>> from slimfx import zoo
>>> g = slimfx.capture(zoo.resnet18(), torch.randn(1, 3, 32, 32))
>>> pm = slimfx.PassManager("fold-bn,prune-channels{macs=0.5}")
>>> small = pm.run(g)
>>> 0.4 < small.macs() / g.macs() <= 0.5
True
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.fx

from slimfx.errors import GraphError
from slimfx.ir import Graph
from slimfx.ir.channels import ChannelAnalysis, kept_fraction, macs_dims

from .base import Pass, PassResult, register_pass

__all__ = ["PruneOptions", "ChannelPruning", "select_channels", "apply_pruning", "score_sets",
           "register_arg_rewrite", "gradual_prune", "norm_scales", "GradualStep", "split_budget", "scheduled_keep"]

aten = torch.ops.aten
Node = torch.fx.Node

Criterion = Literal["l1", "l2", "bn_scale", "taylor", "activation", "apoz", "random"]
DATA_CRITERIA = ("taylor", "activation", "apoz")


@dataclass(frozen=True)
class PruneOptions:
    """Options of ``prune-channels``.  Give exactly one of ``ratio``, ``macs``, ``params``.

    ratio: fraction of prunable channel sets to remove.
    round_to: kept channels a multiple of this (16 by default: whole AVX-512 vectors of
        float32, and a multiple of the AVX2 and NEON widths).  ``bench/prune_widths.py``:
        at equal MACs a pruned ResNet with widths 24 and 40 ran about 1.6x slower than one
        with widths 16 and 32 (half-width vector blocks), and with odd widths
        (``round_to=1``) 7x slower, slower than the unpruned model.
    macs / params: fraction of the graph's MACs / parameters to keep (e.g. 0.5 halves it).
    exclude: module paths whose layers keep their shape (a path excludes its submodules).
    only: module-path patterns (``fnmatch``): prune only the groups whose channels are
        produced by a matching layer; ``only=[*.f0]`` prunes just the ranks that
        ``factorize`` (SVD form) introduced.
    """

    ratio: float | None = None
    macs: float | None = None
    params: float | None = None
    criterion: Criterion = "l1"
    normalize: Literal["mean", "max", "l2", "rank", "none"] = "mean"
    strategy: Literal["global", "uniform"] = "global"
    round_to: int = 16
    min_ratio: float = 0.1
    exclude: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        given = [k for k in ("ratio", "macs", "params") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one budget: ratio (fraction of channels removed), "
                             f"macs or params (fraction kept); got {given or 'none'}")
        value = getattr(self, given[0])
        if not 0 < value < 1:
            raise ValueError(f"{given[0]} must be in (0, 1), got {value}")
        if self.round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {self.round_to}")
        if not 0 <= self.min_ratio < 1:
            raise ValueError(f"min_ratio must be in [0, 1), got {self.min_ratio}")


# ============================================================================ scoring
def _param_dims(ca: ChannelAnalysis):
    """(get_attr node, dim, roots along that dim) for every parameter dim."""
    for (node, dim), d in ca.dims.items():
        if node.op == "get_attr":
            yield node, dim, ca._roots[d.base:d.base + d.size]


def _reduce_except(t: torch.Tensor, dim: int, how: str) -> np.ndarray:
    t = t.detach().double().movedim(dim, 0).reshape(t.shape[dim], -1)
    if how == "l1":
        v = t.abs().mean(1)
    elif how == "l2":
        v = t.pow(2).mean(1).sqrt()
    elif how == "sum":
        v = t.sum(1)
    else:
        raise ValueError(how)
    return v.numpy()


def _norm_weight_nodes(graph: Graph) -> set[Node]:
    out = set()
    for n in graph.fx.nodes:
        if n.target is aten.batch_norm.default and isinstance(n.args[1], Node):
            out.add(n.args[1])
        elif n.target in (aten.layer_norm.default, aten.group_norm.default) and \
                isinstance(n.args[2], Node):
            out.add(n.args[2])
    return out


def score_sets(ca: ChannelAnalysis, roots: list[int], criterion: str, *, seed: int = 0,
               data: Iterable | None = None, loss_fn: Callable | None = None) -> np.ndarray:
    """Importance of each channel set in ``roots`` (higher = more important).

    A set's score is the mean over its members of the member's score: every weight slice
    (l1, l2, taylor), every norm scale (bn_scale), every activation channel (activation,
    apoz) that the set would remove.
    """
    index = {r: i for i, r in enumerate(roots)}
    total = np.zeros(len(roots))
    count = np.zeros(len(roots))

    def add(values: np.ndarray, member_roots: np.ndarray) -> None:
        for v, r in zip(values, member_roots.tolist()):
            i = index.get(r)
            if i is not None:
                total[i] += v
                count[i] += 1

    graph = ca.graph
    if criterion == "random":
        return np.random.default_rng(seed).random(len(roots))
    if criterion in ("l1", "l2"):
        for node, dim, rs in _param_dims(ca):
            w = graph.param(node)
            if w.dim() >= 2 and w.is_floating_point():
                add(_reduce_except(w, dim, criterion), rs)
    elif criterion == "bn_scale":
        norms = _norm_weight_nodes(graph)
        for node, dim, rs in _param_dims(ca):
            if node in norms:
                add(_reduce_except(graph.param(node).unsqueeze(1), dim, "l1"), rs)
        missing = count == 0
        if missing.any():  # sets without a norm layer: weight magnitude, scaled alike
            l1 = score_sets(ca, roots, "l1")
            scale = np.median(total[~missing] / count[~missing]) / max(np.median(l1[~missing]), 1e-12) \
                if (~missing).any() else 1.0
            total[missing], count[missing] = l1[missing] * scale, 1
    elif criterion in DATA_CRITERIA:
        if data is None:
            raise GraphError(f"criterion '{criterion}' needs data: pass data= (and loss_fn= for "
                             "taylor) to ChannelPruning; it cannot be given in a pipeline string")
        if criterion == "taylor":
            _taylor(ca, data, loss_fn, add)
        else:
            _activation(ca, data, criterion, add)
    else:
        raise GraphError(f"unknown criterion {criterion!r}")
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    return s


def _batches(data):
    for batch in data:
        if isinstance(batch, torch.Tensor):
            yield (batch,), None
        else:
            *inputs, target = batch
            yield tuple(inputs), target


def _taylor(ca: ChannelAnalysis, data, loss_fn, add) -> None:
    if loss_fn is None:
        raise GraphError("criterion 'taylor' needs loss_fn(outputs, target) -> scalar loss")
    gm = ca.graph.gm
    params = {n: ca.graph.param(n) for n, _, _ in _param_dims(ca)}
    grads: dict[Node, torch.Tensor] = {}
    for inputs, target in _batches(data):
        for p in params.values():
            if isinstance(p, torch.nn.Parameter):
                p.grad = None
        with torch.enable_grad():
            out = gm(*inputs)
            loss = loss_fn(out[0] if len(out) == 1 else out, target)
            loss.backward()
        for n, p in params.items():
            if isinstance(p, torch.nn.Parameter) and p.grad is not None:
                grads[n] = grads.get(n, 0) + (p.detach() * p.grad).detach()
    for p in params.values():
        if isinstance(p, torch.nn.Parameter):
            p.grad = None
    for node, dim, rs in _param_dims(ca):
        if node in grads and grads[node].dim() >= 1:
            add(np.abs(_reduce_except(grads[node], dim, "sum")), rs)


_ACTIVATIONS = {aten.relu.default, aten.hardtanh.default, aten.clamp.default, aten.gelu.default,
                aten.sigmoid.default, aten.tanh.default, aten.leaky_relu.default}


def _activation(ca: ChannelAnalysis, data, criterion: str, add) -> None:
    graph = ca.graph
    acts = [n for n in graph.fx.nodes if n.target in _ACTIVATIONS and ca.shape(n)]
    if not acts:
        acts = [n for n in graph.fx.nodes if n.op == "call_function" and ca.shape(n)]
    sums: dict[tuple[Node, int], np.ndarray] = {}
    recorded: dict[Node, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                recorded[n] = out.detach()
            return out

    wanted = set(acts)
    batches = 0
    for inputs, _ in _batches(data):
        recorded.clear()
        with torch.no_grad():
            Recorder(graph.gm).run(*inputs)
        batches += 1
        for n, t in recorded.items():
            for d in range(t.dim()):
                if not ca.has(n, d):
                    continue
                x = t.movedim(d, 0).reshape(t.shape[d], -1).double()
                v = (x.abs().mean(1) if criterion == "activation" else 1 - (x == 0).double().mean(1))
                sums[(n, d)] = sums.get((n, d), 0) + v.numpy()
    for (n, d), v in sums.items():
        e = ca.elems(n, d)
        add(v / max(batches, 1), ca._roots[e.start:e.stop])


# ============================================================================ selection
def _norm_scale(scores: np.ndarray, how: str) -> float | None:
    """The denominator ``normalize=how`` divides a group's scores by (None: rank / none)."""
    if how in ("none", "rank") or len(scores) == 0:
        return None
    return float({"mean": np.mean(np.abs(scores)), "max": np.max(np.abs(scores)),
                  "l2": np.sqrt(np.sum(scores ** 2))}[how])


def _normalize(scores: np.ndarray, how: str, scale: float | None) -> np.ndarray:
    """``scores`` normalised per ``how``: ranked, or divided by ``scale`` (their own
    :func:`_norm_scale`, or one kept from an earlier, wider graph: see :func:`norm_scales`)."""
    if how == "none" or len(scores) == 0:
        return scores
    if how == "rank":
        order = scores.argsort(kind="stable")
        ranks = np.empty(len(scores))
        ranks[order] = np.arange(len(scores))
        return ranks / max(len(scores) - 1, 1)
    return scores / scale if scale > 0 else scores


@dataclass
class _Plan:
    groups: list  # ChannelGroup
    order: list[np.ndarray]  # per group: set indices, lowest score first
    norm_scores: list[np.ndarray]
    unit: list[int]  # per group: kept count must be a multiple of this
    min_keep: list[int]
    # Dims (of any tensor) whose every element is in a prunable set: the sets along each,
    # most important first.  Removing them all would leave an empty tensor (a split part,
    # a concat input), so the first one is kept.
    guards: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    # per group source: the normalisation denominator its scores were divided by
    scales: dict[tuple[str, int], float] = dataclasses.field(default_factory=dict)


def _source_layer(by_name: dict[str, Node], group) -> str:
    """Module path of the layer that produces a group's channels (reads its source param)."""
    node = by_name[group.source[0]]
    if node.op == "get_attr":
        node = next(iter(node.users), node)
    return node.meta.get("module_path", node.name)


def _plan(ca: ChannelAnalysis, opts: PruneOptions, data=None, loss_fn=None,
          scales: dict[tuple[str, int], float] | None = None) -> _Plan:
    groups = ca.groups()
    if opts.only:
        by_name = {n.name: n for n in ca.graph.fx.nodes}
        sources = [_source_layer(by_name, g) for g in groups]
        groups = [g for g, src in zip(groups, sources)
                  if any(fnmatch.fnmatchcase(src, p) for p in opts.only)]
        if not groups:
            raise GraphError(f"only={list(opts.only)} matches no prunable group; the groups' "
                             f"producing layers are: {', '.join(sources) or 'none'}")
    all_roots = [r for g in groups for r in g.sets]
    raw = score_sets(ca, all_roots, opts.criterion, seed=opts.seed, data=data, loss_fn=loss_fn)
    order, norms, units, mins = [], [], [], []
    used: dict[tuple[str, int], float] = {}
    k = 0
    for g in groups:
        s = raw[k:k + len(g.sets)]
        k += len(g.sets)
        scale = (scales or {}).get(g.source)
        if scale is None:
            scale = _norm_scale(s, opts.normalize)
        if scale is not None:
            used[g.source] = scale
        ns = _normalize(s, opts.normalize, scale)
        norms.append(ns)
        order.append(np.argsort(s, kind="stable"))
        e = max(g.elements_per_set, 1)
        units.append(opts.round_to // math.gcd(opts.round_to, e))
        mins.append(max(1, math.ceil(opts.min_ratio * len(g.sets))))
    score = {r: ns[i] for g, ns in zip(groups, norms) for i, r in enumerate(g.sets)}
    guards = set()
    for d in ca.dims.values():
        rs = set(ca._roots[d.base:d.base + d.size].tolist())
        if rs <= score.keys():
            guards.add(tuple(sorted(rs, key=lambda r: (-score[r], r))))
    return _Plan(groups, order, norms, units, mins, sorted(guards), used)


def _constrain(plan: _Plan, gi: int, remove: int) -> int:
    n = len(plan.groups[gi].sets)
    keep = max(n - remove, plan.min_keep[gi])
    u = plan.unit[gi]
    keep = min(n, -(-keep // u) * u)
    return n - keep


def _removal(plan: _Plan, counts: list[int]) -> set[int]:
    removed = set()
    for gi, c in enumerate(counts):
        c = _constrain(plan, gi, c)
        sets = plan.groups[gi].sets
        removed.update(sets[i] for i in plan.order[gi][:c].tolist())
    for rs in plan.guards:  # never empty a tensor dim
        if all(r in removed for r in rs):
            removed.discard(rs[0])
    return removed


class _Estimator:
    """MACs and parameters of the graph after removing channel sets, without rewriting."""

    def __init__(self, ca: ChannelAnalysis):
        self.ca = ca
        graph = ca.graph
        self.mac_ops = [(n, n.meta["slimfx"].macs, macs_dims(ca, n)) for n in graph.fx.nodes
                        if n.op == "call_function" and n.meta["slimfx"].macs]
        self.params = [(n, graph.param(n).numel(), [(n, d) for d in range(graph.param(n).dim())])
                       for n in graph.fx.nodes if n.op == "get_attr" and ca.shape(n) is not None]
        self.members: dict[int, list[tuple[tuple[Node, int], int]]] = defaultdict(list)
        prunable = np.fromiter(ca.prunable, dtype=np.int64) if ca.prunable else np.zeros(0, np.int64)
        for (node, dim), d in ca.dims.items():
            rs = ca._roots[d.base:d.base + d.size]
            mask = np.isin(rs, prunable)
            if mask.any():
                u, c = np.unique(rs[mask], return_counts=True)
                for r, cnt in zip(u.tolist(), c.tolist()):
                    self.members[r].append(((node, dim), cnt))

    def counts(self, removed: set[int]) -> dict:
        out: dict = defaultdict(int)
        for r in removed:
            for key, c in self.members[r]:
                out[key] += c
        return out

    def macs(self, removed: set[int]) -> float:
        c = self.counts(removed)
        return sum(m * kept_fraction(self.ca, dims, c) for _, m, dims in self.mac_ops)

    def param_count(self, removed: set[int]) -> float:
        c = self.counts(removed)
        return sum(p * kept_fraction(self.ca, dims, c) for _, p, dims in self.params)


#: A global selection may undershoot its MAC/parameter budget by this fraction before
#: :func:`_fill` looks for a closer one.
_FILL_TOLERANCE = 0.02


def _fill(plan: _Plan, flat: list, metric: Callable[[set[int]], float], limit: float,
          first: set[int]) -> set[int]:
    """A removal closer to the budget than ``first``, the first prefix of the strategy's
    order (global: scores; uniform: fractions of each group) that meets it.

    With ``round_to`` a group loses channels in quanta (a 16-wide group at ``round_to=8``
    can only halve), and the plain prefix overshoots the budget by whole quanta
    (``tests/test_prune.py``: resnet18(width=16) asked for 0.4x lands below 0.3x; uniform
    ratios move every group at once and overshoot further).  This walks the same order,
    but when a quantum would cross the budget it records that removal, leaves the group at
    its width and goes on with the other groups; the candidate that meets the budget with
    the most MACs (parameters) left wins.
    """
    counts = [0] * len(plan.groups)
    frozen: set[int] = set()
    best, best_value = first, metric(first)
    last: set[int] | None = None
    for _, gi, _ in flat:
        if gi in frozen:
            continue
        counts[gi] += 1
        r = _removal(plan, counts)
        if r == last:
            continue  # inside a quantum: nothing changes until the group reaches the next one
        value = metric(r)
        if value <= limit:
            if value > best_value:
                best, best_value = r, value
            counts[gi] -= 1
            frozen.add(gi)
            if best_value >= (1 - _FILL_TOLERANCE) * limit:
                break
        else:
            last = r
    return best


def norm_scales(ca: ChannelAnalysis, opts: PruneOptions, *, data=None,
                loss_fn=None) -> dict[tuple[str, int], float]:
    """Each group's normalisation denominator under ``opts`` (``normalize=mean``: the mean
    score of its channel sets), keyed by the group's source ``(param name, dim)``; empty
    for ``normalize=rank|none``.

    Passed back as ``scales=`` to :func:`select_channels` / :class:`ChannelPruning` on a
    pruned descendant of the graph, the groups keep these denominators instead of
    re-measuring them on their surviving channels (see :func:`gradual_prune`'s
    ``norm_scale``).
    """
    return _plan(ca, opts, data, loss_fn).scales


class Selection(NamedTuple):
    """What :func:`select_channels` chose: the channel sets to remove, statistics, and the
    normalisation denominators it used (as :func:`norm_scales` returns them, so a caller
    gets them without scoring again)."""

    removed: set[int]
    stats: dict[str, Any]
    scales: dict[tuple[str, int], float]


def select_channels(ca: ChannelAnalysis, opts: PruneOptions, *, data=None, loss_fn=None,
                    scales: dict[tuple[str, int], float] | None = None) -> Selection:
    """Choose the channel sets to remove under ``opts``.

    ``scales``: per-group normalisation denominators (from :func:`norm_scales`) used in
    place of those measured on ``ca``'s graph; groups not in it measure their own.
    """
    plan = _plan(ca, opts, data, loss_fn, scales)
    est = _Estimator(ca)
    n_groups = len(plan.groups)
    sizes = [len(g.sets) for g in plan.groups]

    if opts.strategy == "uniform":
        # The fill's order: every group's channels (lowest score first) interleaved by the
        # fraction of the group each removal reaches, so the groups advance together.
        flat = sorted(((rank + 1) / sizes[gi], gi, rank) for gi in range(n_groups)
                      for rank in range(sizes[gi]))

        def removal_at(frac: float) -> set[int]:
            return _removal(plan, [int(round(frac * n)) for n in sizes])
        domain = 1.0
    else:
        flat = sorted(((plan.norm_scores[gi][i], gi, rank) for gi in range(n_groups)
                       for rank, i in enumerate(plan.order[gi].tolist())),
                      key=lambda t: (t[0], t[1], t[2]))

        def removal_at(frac: float) -> set[int]:
            k = int(round(frac * len(flat)))
            counts = [0] * n_groups
            for _, gi, _ in flat[:k]:
                counts[gi] += 1
            return _removal(plan, counts)
        domain = 1.0

    base_macs, base_params = est.macs(set()), est.param_count(set())
    if opts.ratio is not None:
        removed = removal_at(opts.ratio)
    else:
        metric, base, target = ((est.macs, base_macs, opts.macs) if opts.macs is not None
                                else (est.param_count, base_params, opts.params))
        lo, hi = 0.0, domain
        best = removal_at(hi)
        if metric(best) > target * base:
            removed = best  # the constraints stop short of the target: prune what we may
        else:
            for _ in range(30):
                mid = (lo + hi) / 2
                r = removal_at(mid)
                if metric(r) <= target * base:
                    hi, best = mid, r
                else:
                    lo = mid
            removed = best
            if metric(best) < (1 - _FILL_TOLERANCE) * target * base:
                removed = _fill(plan, flat, metric, target * base, best)
    per_group = {g.index: (len(g.sets) - sum(s in removed for s in g.sets), len(g.sets))
                 for g in plan.groups}
    stats = {
        "groups": n_groups,
        "sets_removed": len(removed),
        "sets_total": sum(sizes),
        "est_macs_ratio": round(est.macs(removed) / base_macs, 4) if base_macs else 1.0,
        "est_params_ratio": round(est.param_count(removed) / base_params, 4) if base_params else 1.0,
        "kept_per_group": per_group,
    }
    return Selection(removed, stats, dict(plan.scales))


# ============================================================================ rewrite
ArgRewrite = Callable[[ChannelAnalysis, Node, set, "_Shapes"], None]
_ARG_REWRITES: dict = {}


def register_arg_rewrite(*targets) -> Callable[[ArgRewrite], ArgRewrite]:
    """Register how an op's non-tensor arguments change when channels are removed."""

    def deco(fn):
        for t in targets:
            _ARG_REWRITES[t] = fn
        return fn

    return deco


class _Shapes:
    """How every dim changes: an index map per (node, dim), new position -> old index,
    ``-1`` for a new zero channel (which belongs with the old element before it: a split
    part or slice that ends with that element grows).  Dims without an explicit map
    (``index_maps``) keep the elements of the sets not in ``removed``."""

    def __init__(self, ca: ChannelAnalysis, removed: set[int],
                 index_maps: dict[tuple[Node, int], np.ndarray] | None = None):
        self.ca, self.removed = ca, removed
        self.maps = {(n, d % len(ca.shape(n))): np.asarray(m, dtype=np.int64)
                     for (n, d), m in (index_maps or {}).items()}
        self._cache: dict = {}

    def keep(self, node: Node, dim: int) -> np.ndarray:
        dim %= len(self.ca.shape(node))
        key = (node, dim)
        if key not in self._cache:
            self._cache[key] = self.ca.keep_mask(node, dim, self.removed)
        return self._cache[key]

    def index(self, node: Node, dim: int) -> np.ndarray:
        """New position -> old index (-1: a new zero channel)."""
        dim %= len(self.ca.shape(node))
        m = self.maps.get((node, dim))
        return m if m is not None else np.nonzero(self.keep(node, dim))[0]

    def count(self, node: Node, dim: int, lo: int, hi: int) -> int:
        """New elements of ``node``'s dim coming from old indices ``lo <= i < hi`` (new
        zero channels count with the old element before them)."""
        m = self.index(node, dim)
        if (m < 0).any():  # forward-fill: a new channel goes with its predecessor
            pos = np.where(m >= 0, np.arange(len(m)), 0)
            m = np.where(m >= 0, m, m[np.maximum.accumulate(pos)])
            m = np.where(m >= 0, m, 0)  # new channels at the very front go with element 0
        return int(((m >= lo) & (m < hi)).sum())

    def new_shape(self, node: Node) -> list[int]:
        return [len(self.index(node, d)) for d in range(len(self.ca.shape(node)))]


@register_arg_rewrite(aten.convolution.default)
def _rw_conv(ca, node, removed, sh):
    g = node.args[8]
    if g > 1:
        old_out = ca.shape(node)[1]
        node.update_arg(8, sh.new_shape(node)[1] // (old_out // g))


@register_arg_rewrite(aten.group_norm.default)
def _rw_group_norm(ca, node, removed, sh):
    g = node.args[1]
    c = ca.shape(node)[1]
    node.update_arg(1, sh.new_shape(node)[1] // (c // g))


@register_arg_rewrite(aten.layer_norm.default)
def _rw_layer_norm(ca, node, removed, sh):
    k = len(node.args[1])
    node.update_arg(1, sh.new_shape(node)[-k:])


@register_arg_rewrite(aten.view.default, aten._unsafe_view.default, aten.expand.default)
def _rw_shape_arg(ca, node, removed, sh):
    node.update_arg(1, sh.new_shape(node))


@register_arg_rewrite(aten.full.default, aten.zeros.default, aten.ones.default,
                      aten.empty.memory_format)
def _rw_creation(ca, node, removed, sh):
    node.update_arg(0, sh.new_shape(node))


@register_arg_rewrite(aten.split_with_sizes.default)
def _rw_split(ca, node, removed, sh):
    x, sizes = node.args[0], node.args[1]
    dim = node.args[2] if len(node.args) > 2 else 0
    offs = np.cumsum([0, *sizes])
    node.update_arg(1, [sh.count(x, dim, offs[i], offs[i + 1]) for i in range(len(sizes))])


@register_arg_rewrite(aten.slice.Tensor)
def _rw_slice(ca, node, removed, sh):
    x = node.args[0]
    xs = ca.shape(x)
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(xs)
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    start = max(0, start + xs[dim] if start < 0 else min(start, xs[dim]))
    new_start = sh.count(x, dim, 0, start)
    new_len = sh.new_shape(node)[dim]
    args = list(node.args) + [None] * (4 - len(node.args))
    args[2], args[3] = new_start, new_start + new_len
    node.args = tuple(args[:max(4, len(node.args))])


@register_arg_rewrite(aten.select.int)
def _rw_select(ca, node, removed, sh):
    x, dim, index = node.args
    xs = ca.shape(x)
    node.update_arg(2, sh.count(x, dim, 0, index % xs[dim % len(xs)]))


def apply_pruning(ca: ChannelAnalysis, removed: set[int], *,
                  index_maps: dict[tuple[Node, int], np.ndarray] | None = None,
                  fill: dict[Node, float] | None = None) -> Graph:
    """Physically remove channel sets from ``ca.graph`` (in place) and return it.

    ``index_maps`` generalises removal: ``{(node, dim): new position -> old index}`` with
    ``-1`` for a new channel (``pad-channels`` adds zero channels this way); such a dim
    follows its map instead of ``removed``.  New entries of a parameter are ``0``, or
    ``fill[get_attr node]`` (a BatchNorm's running variance gets 1).
    """
    graph = ca.graph
    sh = _Shapes(ca, removed, index_maps)
    fill = fill or {}
    expected = {n: sh.new_shape(n) for n in graph.fx.nodes if ca.shape(n) is not None}
    for n, shape in expected.items():
        if 0 in shape and 0 not in ca.shape(n):
            raise GraphError(f"pruning these channel sets would leave {n.name} empty "
                             f"(shape {shape}); keep at least one of its channels", n)
    # Parameters: slice every pruned dim.  get_attr nodes reading one attribute with
    # different masks get their own copies.
    by_target: dict[str, list[Node]] = defaultdict(list)
    for n in graph.fx.nodes:
        if n.op == "get_attr" and ca.shape(n) is not None:
            by_target[n.target].append(n)
    for target, nodes in by_target.items():
        maps = [[sh.index(n, d) for d in range(len(ca.shape(n)))] for n in nodes]
        sizes = ca.shape(nodes[0])
        if all(np.array_equal(m, np.arange(s)) for m, s in zip(maps[0], sizes)) and all(
                all(np.array_equal(a, b) for a, b in zip(maps[0], mk)) for mk in maps[1:]):
            continue
        value = graph.param(target)
        for i, (n, mk) in enumerate(zip(nodes, maps)):
            sliced = value
            for d, (m, s) in enumerate(zip(mk, sizes)):
                if np.array_equal(m, np.arange(s)):
                    continue
                sliced = sliced.index_select(d, torch.from_numpy(np.maximum(m, 0)))
                if (m < 0).any():
                    sliced = sliced.index_fill(d, torch.from_numpy(np.nonzero(m < 0)[0]),
                                               fill.get(n, 0.0))
            if i == 0:
                graph.set_param(target, sliced.contiguous())
            else:
                new = graph.add_param(target, sliced.contiguous(), before=n)
                n.replace_all_uses_with(new)
    for n in list(graph.fx.nodes):
        fn = _ARG_REWRITES.get(n.target) if n.op == "call_function" else None
        if fn is not None:
            fn(ca, n, removed, sh)
    graph.fx.eliminate_dead_code()
    graph.gm.recompile()
    graph.analyze(force=True)
    for n, shape in expected.items():
        if n.graph is not graph.fx:
            continue
        info = n.meta["slimfx"]
        if info.outputs and list(info.outputs[0].shape) != shape:
            raise GraphError(f"pruning left {n.name} with shape {list(info.outputs[0].shape)}, "
                             f"expected {shape}: its op has no argument rewrite", n)
    return graph


# ============================================================================ the pass
@register_pass("prune-channels", options=PruneOptions, lossless=False)
class ChannelPruning(Pass):
    """Structured channel pruning with residual alignment and global normalised ranking.

    Data-dependent criteria (taylor, activation, apoz) take ``data`` (an iterable of
    ``(input..., target)`` batches) and, for taylor, ``loss_fn(output, target)``.
    ``scales`` (from :func:`norm_scales` on a wider ancestor of the graph) fixes the groups'
    normalisation denominators, as :func:`gradual_prune` does from its second round on.
    After a run, ``used_scales`` holds the denominators the run used.
    """

    def __init__(self, options: PruneOptions | None = None, *, data=None, loss_fn=None,
                 scales: dict[tuple[str, int], float] | None = None, **kw):
        super().__init__(options, **kw)
        self.data, self.loss_fn, self.scales = data, loss_fn, scales
        self.used_scales: dict[tuple[str, int], float] = {}
        if self.options.criterion in DATA_CRITERIA and data is None:
            raise GraphError(f"criterion '{self.options.criterion}' needs data: use "
                             "ChannelPruning(..., data=batches) from Python")

    def run(self, graph: Graph) -> PassResult:
        ca = ChannelAnalysis(graph, exclude=self.options.exclude)
        removed, stats, self.used_scales = select_channels(
            ca, self.options, data=self.data, loss_fn=self.loss_fn, scales=self.scales)
        stats = {k: v for k, v in stats.items() if k != "kept_per_group"}
        if not removed:
            return PassResult(graph, False, stats)
        before_macs, before_params = graph.macs(), graph.param_count()
        apply_pruning(ca, removed)
        graph.remove_unused_params()
        stats["macs_ratio"] = round(graph.macs() / before_macs, 4) if before_macs else 1.0
        stats["params_ratio"] = round(graph.param_count() / before_params, 4) if before_params else 1.0
        return PassResult(graph, True, stats)


# ============================================================================ gradual
@dataclass
class GradualStep:
    """One round of :func:`gradual_prune`."""

    step: int
    macs_ratio: float  # vs the graph the schedule started from
    params_ratio: float
    metric: float | None
    seconds: float
    accepted: bool


SCHEDULES = ("geometric", "cubic")


def scheduled_keep(keep: float, step: int, steps: int, schedule: str = "geometric") -> float:
    """The fraction kept after ``step`` of ``steps`` rounds that end at ``keep``.

    ``geometric``: ``keep ** (step / steps)``, each round keeps the same fraction of what is
    left.  ``cubic``: the removed fraction follows ``(1 - keep) * (1 - (1 - step/steps)**3)``
    (Zhu & Gupta 2017, "To prune, or not to prune"): most is removed early, while much
    fine-tuning is still to come, and the last rounds remove little.

    >>> [round(scheduled_keep(0.5, k, 3), 3) for k in range(4)]
    [1.0, 0.794, 0.63, 0.5]
    >>> [round(scheduled_keep(0.5, k, 3, "cubic"), 3) for k in range(4)]
    [1.0, 0.648, 0.519, 0.5]
    """
    t = step / steps
    if schedule == "geometric":
        return keep ** t
    if schedule == "cubic":
        return 1 - (1 - keep) * (1 - (1 - t) ** 3)
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def split_budget(total: int, rounds: int, final_share: float = 0.5) -> list[int]:
    """A fine-tune budget of ``total`` steps split over ``rounds`` pruning rounds: the last
    round gets ``final_share`` of it (at least an equal share), the others the rest in
    equal parts (remainders to the later rounds).

    With a short budget, fine-tuning channels that a later round removes is partly
    wasted, and the last round's pruning hurts the most (``bench/prune_accuracy.py``
    prints the accuracy right after it), so the last round gets the larger share;
    ``final_share=0`` is the equal split.

    >>> split_budget(150, 3), split_budget(150, 3, final_share=0), split_budget(10, 1)
    ([37, 38, 75], [50, 50, 50], [10])
    """
    if rounds < 1 or total < 0:
        raise ValueError(f"split_budget needs rounds >= 1 and total >= 0, got {rounds}, {total}")
    if not 0 <= final_share <= 1:
        raise ValueError(f"final_share must be in [0, 1], got {final_share}")
    last = max(round(final_share * total), -(-total // rounds)) if rounds > 1 else total
    base, extra = divmod(total - last, rounds - 1) if rounds > 1 else (0, 0)
    return [base + (1 if i >= rounds - 1 - extra else 0) for i in range(rounds - 1)] + [last]


def gradual_prune(graph: Graph, options: PruneOptions | None = None, *, steps: int = 5,
                  finetune: Callable[[Graph], None] | None = None,
                  evaluate: Callable[[Graph], float] | None = None,
                  min_metric: float | None = None, data=None, loss_fn=None,
                  bn: Literal["train", "fixed"] = "train",
                  schedule: Literal["geometric", "cubic"] = "geometric",
                  norm_scale: Literal["first", "each"] = "first",
                  progress: Callable[[str], None] | None = print,
                  **option_kw) -> tuple[Graph, list[GradualStep]]:
    """The seed thesis's gradual global pruning: ``steps`` rounds, each pruning a slice of
    the budget globally, then ``finetune(graph)`` (train ``graph.gm`` in place), then
    ``evaluate(graph)``.  Stops at the budget, or when the metric falls below
    ``min_metric`` (that round is undone).  The input graph is not modified.

    ``bn="train"`` (default) runs the graph's BatchNorms in training mode during
    ``finetune`` (:meth:`Graph.batchnorm_training`), so their statistics follow the pruned
    layers; ``"fixed"`` keeps the captured statistics.

    The budget in ``options`` (or ``macs=``, ``params=``, ``ratio=`` keywords) is the total
    over all rounds.  ``schedule`` spreads it over the rounds (see :func:`scheduled_keep`):
    ``"geometric"`` removes an equal share in every round; ``"cubic"`` (Zhu & Gupta 2017)
    removes most in the first rounds and little in the last, whose pruning the remaining
    fine-tuning cannot repair.

    ``norm_scale`` says what each group's scores are normalised by (``normalize=mean``:
    divided by the group's mean score).  ``"first"`` (default): by the denominator
    measured on the graph the schedule starts from, every group's full width, kept over
    the rounds.  ``"each"``: re-measured every round on the channels that survived.  The
    survivors of a pruned group are its strongest, so re-measuring lifts its denominator
    and puts its weakest survivors back at the bottom of the ranking: a group keeps
    losing channels in every round, however many it has lost already.  On
    ``bench/prune_accuracy.py``'s residual net (2x fewer MACs in 3 rounds), ``"each"`` left
    the last stage's residual trunk at 16 of 64 channels, ``"first"`` at 32, as
    Torch-Pruning did.  (``normalize=rank`` and ``none`` have no denominator.)

    Returns the final graph and one :class:`GradualStep` per round.
    """
    from .manager import PassManager

    opts = options or PruneOptions(**option_kw)
    if options is not None and option_kw:
        opts = dataclasses.replace(options, **option_kw)
    if steps < 1:
        raise GraphError(f"steps must be >= 1, got {steps}")
    if schedule not in SCHEDULES:
        raise GraphError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if norm_scale not in ("first", "each"):
        raise GraphError(f"norm_scale must be 'first' or 'each', got {norm_scale!r}")
    scales = None  # "first": the denominators round 1 measures on the starting graph
    kind = "macs" if opts.macs is not None else "params" if opts.params is not None else "ratio"
    total = getattr(opts, kind)
    base_macs, base_params = graph.macs(), graph.param_count()
    current, history = graph, []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        if kind == "ratio":  # ratio = the fraction of the original channel sets removed
            done = 1 - scheduled_keep(1 - total, step - 1, steps, schedule)
            want = 1 - scheduled_keep(1 - total, step, steps, schedule)
            share = (want - done) / (1 - done)
        else:  # the fraction of the original MACs/params kept after this round
            now = current.macs() / base_macs if kind == "macs" else current.param_count() / base_params
            keep = scheduled_keep(total, step, steps, schedule)
            share = min(max(keep / now, 1e-6), 1 - 1e-6)
        step_opts = dataclasses.replace(opts, **{kind: share})
        pruner = ChannelPruning(step_opts, data=data, loss_fn=loss_fn, scales=scales)
        pruned = PassManager([pruner]).run(current)
        if norm_scale == "first" and scales is None:
            scales = dict(pruner.used_scales)
        if finetune is not None:
            if bn == "train":  # re-estimate BN statistics of the narrower layers while training
                with pruned.batchnorm_training():
                    finetune(pruned)
            else:
                finetune(pruned)
            pruned.analyze(force=True)
        metric = float(evaluate(pruned)) if evaluate is not None else None
        accepted = min_metric is None or metric is None or metric >= min_metric
        rec = GradualStep(step, pruned.macs() / base_macs, pruned.param_count() / base_params,
                          metric, time.perf_counter() - t0, accepted)
        history.append(rec)
        if progress is not None:
            progress(f"[prune {step}/{steps}] MACs {rec.macs_ratio:.3f}x params "
                     f"{rec.params_ratio:.3f}x" + (f" metric {metric:.4f}" if metric is not None else "")
                     + ("" if accepted else f" < {min_metric}: stopping, round undone")
                     + f" ({rec.seconds:.1f} s)")
        if not accepted:
            break
        current = pruned
    if current is graph:
        current = graph.copy()
    return current, history
