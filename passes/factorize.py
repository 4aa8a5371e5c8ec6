"""``factorize``: low-rank factorization that turns a layer's rank into a channel count
(the seed thesis's Rank Pruning Framework).

A ``k x k`` convolution ``Cin -> Cout`` becomes a ``k x k`` convolution ``Cin -> R``
followed by a ``1 x 1`` convolution ``R -> Cout`` (``form=svd``), initialised from the
SVD of the weight reshaped to ``(Cout, Cin*k*k)``; the singular values are split evenly
(``sqrt(S)``) between the two factors, so a rank channel's weight norm in either factor
grows with its singular value.  A linear layer becomes two linears the same way.
``form=tucker2`` gives ``1 x 1 (Cin -> R1)``, ``k x k (R1 -> R2)``, ``1 x 1 (R2 -> Cout)``
from a Tucker-2 (HOSVD) decomposition; 1x1 convolutions and linears use the SVD form.

The ``R`` channels between two factors are ordinary channels: the channel analysis puts
them in a dependency group of their own, so ``prune-channels`` prunes ranks with any
criterion, globally with every other group.  A residual trunk blocks channel pruning of
the layers that write into it (their outputs must stay aligned with the trunk), but not
the ranks inside those layers.

Initial rank: ``rank=full`` keeps every singular value (exact: the pass manager verifies
the outputs to 1e-4); ``rank=energy`` keeps the smallest rank whose squared singular
values reach ``energy`` of the total; ``rank=ratio`` keeps ``ratio`` of the full rank.
Ranks are rounded up to a multiple of ``round_to``.  A truncated rank is lossy: the pass
manager records the output error, and the statistics give each layer's relative weight
error ``||W - W_R||_F / ||W||_F``.

At a truncated rank, layers whose factors would not cost fewer MACs than the layer are
left alone (``keep_larger=false``) and listed in the statistics; at full rank every
eligible layer is factorized (``keep_larger`` defaults to true there: the factors cost
more until rank pruning shrinks ``R`` below the break-even rank, given per layer in the
statistics).  Grouped, depthwise and transposed convolutions are skipped.

>>> import torch, slimfx
>>> m = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU())
>>> g = slimfx.capture(m, torch.randn(1, 16, 8, 8))
>>> pm = slimfx.PassManager("factorize{rank=full}")
>>> f = pm.run(g)
>>> [tuple(f.param(n.args[1]).shape) for n in f.find(torch.ops.aten.convolution.default)]
[(32, 16, 3, 3), (32, 32, 1, 1)]
>>> pm.records[0].stats["factorized"], pm.records[0].lossless
(1, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx

from slimfx.ir import Graph, in_modules

from .base import Pass, PassResult, register_pass

__all__ = ["FactorizeOptions", "Factorize", "choose_rank", "svd_factors", "tucker2_factors"]

aten = torch.ops.aten
Node = torch.fx.Node


@dataclass(frozen=True)
class FactorizeOptions:
    """Options of ``factorize``.

    form: ``svd`` (k x k then 1 x 1) or ``tucker2`` (1 x 1, k x k, 1 x 1).
    rank: ``full``, ``energy`` (keep ``energy`` of the squared singular values) or
        ``ratio`` (keep ``ratio`` of the full rank).
    round_to: ranks rounded up to a multiple of this (SIMD-friendly widths).
    keep_larger: factorize layers even where the factors cost more MACs than the layer;
        default: true for ``rank=full``, false otherwise.
    layers: which layers: ``conv``, ``linear`` or ``all``.
    exclude: module paths left alone (a path excludes its submodules).
    """

    form: Literal["svd", "tucker2"] = "svd"
    rank: Literal["full", "energy", "ratio"] = "full"
    energy: float = 0.95
    ratio: float = 0.5
    round_to: int = 1
    keep_larger: bool | None = None
    layers: Literal["conv", "linear", "all"] = "all"
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {self.round_to}")


# ============================================================================ the maths
def choose_rank(s: torch.Tensor, opts: FactorizeOptions) -> int:
    """The rank kept from singular values ``s`` (descending) under ``opts``.

    >>> choose_rank(torch.tensor([3.0, 1.0, 0.0]), FactorizeOptions(rank="energy", energy=0.9))
    1
    >>> choose_rank(torch.tensor([3.0, 1.0, 0.5, 0.1]), FactorizeOptions(rank="ratio", ratio=0.5))
    2
    """
    full = len(s)
    if opts.rank == "full":
        return full
    if opts.rank == "ratio":
        r = math.ceil(opts.ratio * full)
    else:
        e = (s.double() ** 2).cumsum(0)
        if e[-1] <= 0:
            r = 1
        else:
            r = int(torch.searchsorted(e / e[-1], torch.tensor(opts.energy, dtype=e.dtype) - 1e-12)) + 1
    r = math.ceil(max(r, 1) / opts.round_to) * opts.round_to
    return min(r, full)


def _svd(m: torch.Tensor):
    """Thin SVD ``m = u diag(s) vh`` (float64, ``s`` descending) from the eigendecomposition
    of the smaller Gram matrix.  On these shapes (a few hundred rows, thousands of columns)
    LAPACK's SVD takes 10-30x longer here; the reconstruction ``u diag(s) vh`` stays exact
    to float64 rounding because ``u`` is orthonormal and ``diag(s) vh = u^T m``.
    Directions whose singular value is below 1e-10 of the largest get a zero ``vh`` row.
    """
    tall = m.shape[0] > m.shape[1]
    a = m.T if tall else m
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # MKL's threaded eigh runs 5-15x slower on a busy 2-core machine
    try:
        evals, e = torch.linalg.eigh(a @ a.T)
    finally:
        torch.set_num_threads(threads)
    evals, e = evals.flip(0), e.flip(1)
    s = evals.clamp_min(0).sqrt()
    proj = e.T @ a  # row i = s_i v_i^T
    keep = s > (s[0] * 1e-10 if len(s) and s[0] > 0 else 0)
    vh = proj * torch.where(keep, 1 / torch.where(keep, s, 1), 0)[:, None]
    return (vh.T, s, e.T) if tall else (e, s, vh)


def _balanced(u, s, vh, r: int, w: torch.Tensor):
    root = s[:r].sqrt()
    a = (root[:, None] * vh[:r]).reshape(r, *w.shape[1:])
    b = u[:, :r] * root[None, :]
    return a.to(w.dtype), b.to(w.dtype)


def svd_factors(w: torch.Tensor, rank: int | None = None):
    """``w`` (Cout, Cin, *k) ~= B @ A with A (R, Cin, *k) and B (Cout, R): the SVD of the
    weight reshaped to (Cout, Cin*prod(k)), singular values split as ``sqrt(S)`` on both
    sides.  Returns (A, B, singular values, relative Frobenius error at ``rank``).
    """
    u, s, vh = _svd(w.detach().double().reshape(w.shape[0], -1))
    r = len(s) if rank is None else rank
    a, b = _balanced(u, s, vh, r, w)
    return a, b, s, _tail_error(s, r)


def _tail_error(s: torch.Tensor, r: int) -> float:
    total = float((s ** 2).sum())
    return math.sqrt(float((s[r:] ** 2).sum()) / total) if total > 0 else 0.0


def _mode_svd(w: torch.Tensor, mode: int):
    """Left singular vectors and values of the mode-``mode`` unfolding of ``w``."""
    u, s, _ = _svd(w.movedim(mode, 0).reshape(w.shape[mode], -1))
    return u, s


def tucker2_factors(w: torch.Tensor, r_in: int | None = None, r_out: int | None = None):
    """Tucker-2 (HOSVD) of a conv weight (Cout, Cin, *k): ``w ~= core x0 U_out x1 U_in``.

    Returns (first (R1, Cin, 1..), core (R2, R1, *k), last (Cout, R2, 1..), singular
    values of the input and output unfoldings, relative Frobenius error).
    """
    wd = w.detach().double()
    u_out, s_out = _mode_svd(wd, 0)
    u_in, s_in = _mode_svd(wd, 1)
    r_out = len(s_out) if r_out is None else r_out
    r_in = len(s_in) if r_in is None else r_in
    u_out, u_in = u_out[:, :r_out], u_in[:, :r_in]
    core = torch.einsum("oi...,or,is->rs...", wd, u_out, u_in)
    approx = torch.einsum("rs...,or,is->oi...", core, u_out, u_in)
    err = float((wd - approx).norm() / wd.norm()) if wd.norm() > 0 else 0.0
    ones = [1] * (w.dim() - 2)
    first = u_in.t().reshape(r_in, w.shape[1], *ones)
    last = u_out.reshape(w.shape[0], r_out, *ones)
    return first.to(w.dtype), core.to(w.dtype), last.to(w.dtype), s_in, s_out, err


# ============================================================================ the pass
def _eligible(graph: Graph, n: Node, opts: FactorizeOptions) -> str | None:
    """Why ``n`` cannot be factorized, or ``None`` when it can."""
    w = n.args[1]
    if not (isinstance(w, Node) and w.op == "get_attr"):
        return "weight is not a stored parameter"
    if n.target is aten.convolution.default:
        if n.args[6]:
            return "transposed convolution"
        if n.args[8] != 1:
            return "grouped or depthwise convolution"
    bias = n.args[2] if len(n.args) > 2 else None
    if bias is not None and not (isinstance(bias, Node) and bias.op == "get_attr"):
        return "bias is not a stored parameter"
    if graph.param(w).dim() < 2 or min(graph.param(w).shape[:2]) < 2:
        return "fewer than 2 channels"
    return None


class _Plan:
    """The factors of one layer and their cost."""

    def __init__(self, node: Node, kind: str, factors: list[torch.Tensor], ranks: list[int],
                 full: list[int], macs_before: int, macs_after: int, error: float,
                 break_even: float):
        self.node, self.kind, self.factors = node, kind, factors
        self.ranks, self.full = ranks, full
        self.macs_before, self.macs_after = macs_before, macs_after
        self.error, self.break_even = error, break_even


def _plan(graph: Graph, n: Node, opts: FactorizeOptions) -> _Plan:
    w = graph.param(n.args[1])
    info = n.meta["slimfx"]  # run() ran the analysis (graph.info would re-fingerprint)
    out_shape = info.shape
    macs = info.macs
    cout, cin = w.shape[:2]
    ksize = math.prod(w.shape[2:])
    if n.target is aten.linear.default:
        rows = math.prod(out_shape[:-1])  # one row per output vector
        in_rows = rows
    else:
        rows = out_shape[0] * math.prod(out_shape[2:])  # output pixels
        in_shape = n.meta["slimfx"].inputs[0].shape
        in_rows = in_shape[0] * math.prod(in_shape[2:])
    if opts.form == "tucker2" and n.target is aten.convolution.default and ksize > 1:
        _, s_in = _mode_svd(w.detach().double(), 1)
        _, s_out = _mode_svd(w.detach().double(), 0)
        r_in, r_out = choose_rank(s_in, opts), choose_rank(s_out, opts)
        first, core, last, _, _, err = tucker2_factors(w, r_in, r_out)
        after = in_rows * cin * r_in + rows * r_in * ksize * r_out + rows * r_out * cout
        # break-even at r_in = r_out = r: in_rows*cin*r + rows*ksize*r^2 + rows*r*cout = macs
        a, b, c = rows * ksize, in_rows * cin + rows * cout, -macs
        even = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
        return _Plan(n, "tucker2", [first, core, last], [r_in, r_out], [len(s_in), len(s_out)],
                     macs, after, err, even)
    u, s, vh = _svd(w.detach().double().reshape(cout, -1))
    r = choose_rank(s, opts)
    a, b = _balanced(u, s, vh, r, w)
    err = _tail_error(s, r)
    b = b.reshape(cout, r, *[1] * (w.dim() - 2))  # a 1x1 conv (or a linear when w is 2-D)
    after = rows * r * (cin * ksize + cout)
    even = macs / (rows * (cin * ksize + cout))
    return _Plan(n, "svd", [a, b], [r], [len(s)], macs, after, err, even)


def _conv(graph: Graph, x, weight: Node, bias, like: Node, *, spatial: bool) -> Node:
    """A convolution with ``like``'s arguments (k x k factor) or a 1x1 one, before ``like``."""
    args = list(like.args)
    nd = len(args[3])
    args[0], args[1], args[2] = x, weight, bias
    if not spatial:  # the 1x1 factors: unit stride, no padding, no dilation
        args[3], args[4], args[5], args[7] = [1] * nd, [0] * nd, [1] * nd, [0] * nd
    args[8] = 1
    with graph.fx.inserting_before(like):
        return graph.fx.call_function(aten.convolution.default, tuple(args))


def _rewrite(graph: Graph, p: _Plan) -> list[Node]:
    n = p.node
    path = n.meta.get("module_path") or n.name
    bias = n.args[2] if len(n.args) > 2 else None
    params = [graph.add_param(f"{path}.f{i}.weight", t, before=n) for i, t in enumerate(p.factors)]
    new: list[Node] = []
    if n.target is aten.linear.default:
        with graph.fx.inserting_before(n):
            h = graph.fx.call_function(aten.linear.default, (n.args[0], params[0], None))
            out = graph.fx.call_function(aten.linear.default, (h, params[1], bias))
        new = [h, out]
    elif p.kind == "svd":
        h = _conv(graph, n.args[0], params[0], None, n, spatial=True)
        out = _conv(graph, h, params[1], bias, n, spatial=False)
        new = [h, out]
    else:
        h0 = _conv(graph, n.args[0], params[0], None, n, spatial=False)
        h1 = _conv(graph, h0, params[1], None, n, spatial=True)
        out = _conv(graph, h1, params[2], bias, n, spatial=False)
        new = [h0, h1, out]
    for i, node in enumerate(new):
        graph.inherit(node, n)
        node.meta["module_path"] = f"{path}.f{i}"
    n.replace_all_uses_with(out)
    w = n.args[1]
    graph.fx.erase_node(n)
    if not w.users:  # the dense weight, unless another layer shares it
        graph.fx.erase_node(w)
    return new


@register_pass("factorize", options=FactorizeOptions, lossless=True, atol=1e-4)
class Factorize(Pass):
    """Low-rank factorization of conv and linear layers into two (or three) layers whose
    rank is a channel count that ``prune-channels`` can prune.

    Lossless (verified to 1e-4) at ``rank=full``; lossy otherwise (output error recorded).
    """

    lossy_when = "rank other than full"

    def __init__(self, options: FactorizeOptions | None = None, **kw):
        super().__init__(options, **kw)
        self.lossless = self.options.rank == "full"  # the manager verifies or records

    def run(self, graph: Graph) -> PassResult:
        opts = self.options
        keep_larger = opts.keep_larger if opts.keep_larger is not None else opts.rank == "full"
        graph.analyze()
        targets = {"conv": (aten.convolution.default,), "linear": (aten.linear.default,),
                   "all": (aten.convolution.default, aten.linear.default)}[opts.layers]
        layers: list[dict[str, Any]] = []
        skipped: dict[str, str] = {}
        plans: list[_Plan] = []
        for n in list(graph.fx.nodes):
            if n.op != "call_function" or n.target not in targets:
                continue
            path = n.meta.get("module_path") or n.name
            if in_modules(path, opts.exclude):
                skipped[path] = "excluded"
                continue
            why = _eligible(graph, n, opts)
            if why is not None:
                skipped[path] = why
                continue
            p = _plan(graph, n, opts)
            if p.macs_after >= p.macs_before and not keep_larger:
                skipped[path] = (f"rank {'/'.join(map(str, p.ranks))} factors cost "
                                 f"{p.macs_after / p.macs_before:.3f}x the layer's MACs "
                                 f"(break-even rank {p.break_even:.1f})")
                continue
            plans.append(p)
        if not plans:
            return PassResult(graph, False, {"factorized": 0, "skipped": skipped})
        macs_before = graph.macs()
        for p in plans:
            path = p.node.meta.get("module_path") or p.node.name
            _rewrite(graph, p)
            layers.append({"layer": path, "form": p.kind, "rank": p.ranks, "full_rank": p.full,
                           "macs_ratio": round(p.macs_after / p.macs_before, 4),
                           "break_even_rank": round(p.break_even, 1),
                           "weight_error": round(p.error, 6)})
        graph.gm.recompile()
        graph.remove_unused_params()
        graph.analyze(force=True)
        return PassResult(graph, True, {
            "factorized": len(plans),
            "macs_ratio": round(graph.macs() / macs_before, 4) if macs_before else 1.0,
            "max_weight_error": round(max(p.error for p in plans), 6),
            "layers": layers,
            "skipped": skipped,
        })
