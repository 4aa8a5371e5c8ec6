"""Weight sharing: k-means codebooks (Deep Compression), product quantization, hashing.

Many weights share one value from a small codebook; each weight stores only an index.

``share-weights{bits=4,scope=layer,init=linear}``
    Every conv / linear weight is clustered by 1-D k-means into ``2**bits`` centroids,
    one codebook per layer (``scope=layer``) or per output channel (``scope=channel``).
    The weight becomes ``slimfx::codebook_weight(indices, codebook, decode)``: ``uint8``
    indices of the weight's shape and a ``(groups, 2**bits)`` float codebook.  With
    ``pq=d`` (> 0) linear layers use product quantization instead: each row is cut into
    sub-vectors of ``d`` weights, clustered per sub-space (``slimfx::pq_weight``).
``hash-weights{buckets=4096}``
    HashedNets: a hash of each weight's position picks one of ``buckets`` shared values
    (and a sign); nothing but the buckets is stored (``slimfx::hashed_weight``).

The ops have PyTorch references (so the graph runs and verifies like any other), fake
kernels (export), autograd formulas (the gradient of a centroid is the sum of the
gradients of all weights sharing it, as Deep Compression fine-tunes codebooks) and Relax
lowerings (:mod:`slimfx.lowering.shared_weights`).  Their ``decode`` argument says where
the compiled program decodes: ``"load"`` (the gather is lifted into
``main_transform_params`` and runs once when the model is loaded) or ``"program"`` (the
gather runs on every call; only indices and codebooks stay in memory).  The artifact
stores the indices bit-packed (or Huffman-coded): see :mod:`slimfx.runtime.artifact`.

Both passes are lossy: the pass manager records the output error, and the pass
statistics give each layer's relative weight error.  :func:`storage_report` gives the
stored size per layer (fp32 vs packed vs Huffman-coded indices).

>>> import torch, slimfx
>>> _ = torch.manual_seed(0)
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
>>> g = slimfx.run_pipeline(m, "share-weights{bits=3}", torch.randn(1, 3, 8, 8))
>>> [len(torch.unique(w)) <= 8 for w in shared_weights(g).values()]
[True, True]
>>> rep = storage_report(g)
>>> rep.fp32_bytes, rep.stored_bytes          # 3-bit indices + 8-entry codebooks + biases
(2064, 301)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.fx

from slimfx.errors import GraphError
from slimfx.ir import Graph, in_modules
from slimfx.runtime.artifact import encode_indices, index_bits

from .base import PassResult, register_pass

__all__ = [
    "ShareOptions", "HashOptions", "share_weights", "hash_weights", "kmeans_1d", "kmeans_nd",
    "hash_buckets", "shared_weights", "codebook_parameters", "finetune_codebooks",
    "set_decode", "storage_report", "StorageReport", "LayerStorage", "SHARED_OPS",
]

aten = torch.ops.aten
Node = torch.fx.Node
Decode = Literal["load", "program"]
_DECODES = ("load", "program")


# ======================================================================================
# The ops: PyTorch reference, fake kernel, autograd.
# ======================================================================================
def _check_decode(decode: str) -> None:
    if decode not in _DECODES:
        raise ValueError(f"decode must be 'load' or 'program', got {decode!r}")


@torch.library.custom_op("slimfx::codebook_weight", mutates_args=())
def codebook_weight(indices: torch.Tensor, codebook: torch.Tensor, decode: str = "load") -> torch.Tensor:
    """``weight[g, ...] = codebook[g, indices[g, ...]]``: ``codebook`` is ``(G, K)``;
    ``G`` is 1 (one codebook for the layer) or ``indices.shape[0]`` (one per channel)."""
    _check_codebook_args(indices, codebook, decode)
    flat = indices.reshape(codebook.shape[0], -1).long()
    return torch.gather(codebook, 1, flat).reshape(indices.shape)


def _check_codebook_args(indices, codebook, decode) -> None:
    _check_decode(decode)
    if indices.dtype != torch.uint8:
        raise ValueError(f"codebook_weight: indices must be uint8, got {indices.dtype}")
    if codebook.dim() != 2 or codebook.shape[0] not in (1, indices.shape[0]):
        raise ValueError(f"codebook_weight: codebook must be (1, K) or ({indices.shape[0]}, K), "
                         f"got {tuple(codebook.shape)}")


@codebook_weight.register_fake
def _(indices, codebook, decode="load"):
    _check_codebook_args(indices, codebook, decode)
    return codebook.new_empty(indices.shape)


def _save_indices(ctx, inputs, output):
    """Autograd context of the codebook ops: the indices and the codebook's shape."""
    indices, codebook, _ = inputs
    ctx.save_for_backward(indices)
    ctx.cb_shape = tuple(codebook.shape)


def _codebook_backward(ctx, grad):
    (indices,) = ctx.saved_tensors
    g, k = ctx.cb_shape
    grad_cb = grad.new_zeros(g, k).scatter_add_(1, indices.reshape(g, -1).long(), grad.reshape(g, -1))
    return None, grad_cb, None


codebook_weight.register_autograd(_codebook_backward, setup_context=_save_indices)


@torch.library.custom_op("slimfx::pq_weight", mutates_args=())
def pq_weight(indices: torch.Tensor, codebook: torch.Tensor, decode: str = "load") -> torch.Tensor:
    """Product quantization: ``weight[o, j*d:(j+1)*d] = codebook[j, indices[o, j], :]``;
    ``indices`` is ``(O, M)`` uint8 and ``codebook`` ``(M, K, d)``."""
    _check_pq_args(indices, codebook, decode)
    m = codebook.shape[0]
    return codebook[torch.arange(m)[None, :], indices.long()].reshape(indices.shape[0], -1)


def _check_pq_args(indices, codebook, decode) -> None:
    _check_decode(decode)
    if indices.dtype != torch.uint8 or indices.dim() != 2:
        raise ValueError(f"pq_weight: indices must be 2-D uint8, got {indices.dtype} "
                         f"{tuple(indices.shape)}")
    if codebook.dim() != 3 or codebook.shape[0] != indices.shape[1]:
        raise ValueError(f"pq_weight: codebook must be ({indices.shape[1]}, K, d), "
                         f"got {tuple(codebook.shape)}")


@pq_weight.register_fake
def _(indices, codebook, decode="load"):
    _check_pq_args(indices, codebook, decode)
    return codebook.new_empty(indices.shape[0], codebook.shape[0] * codebook.shape[2])


def _pq_backward(ctx, grad):
    (indices,) = ctx.saved_tensors
    m, k, d = ctx.cb_shape
    flat = (indices.long() + torch.arange(m) * k).reshape(-1)  # row of (M*K, d)
    grad_cb = grad.new_zeros(m * k, d).index_add_(0, flat, grad.reshape(-1, d))
    return None, grad_cb.reshape(m, k, d), None


pq_weight.register_autograd(_pq_backward, setup_context=_save_indices)

_M32 = 0xFFFFFFFF
_HASH_MUL1 = 0x9E3779B1  # Knuth's multiplicative constant: spreads positions over 32 bits
_HASH_MUL2 = 0x45D9F3B  # an integer avalanche mixer, applied twice


def hash_buckets(numel: int, buckets: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bucket index int64, sign +-1 float) of positions ``0..numel-1``.

    ``x = (p * 0x9E3779B1 + seed) mod 2**32``, then twice ``x = ((x >> 16) ^ x) *
    0x45D9F3B mod 2**32``, then ``x ^= x >> 16``; bucket ``x mod buckets``, sign from bit
    31.  Every intermediate fits in int64, so the TVM lowering computes the same values.
    """
    if not 0 < numel < 2**31 or not 0 <= seed < 2**31:
        raise ValueError(f"hash_buckets: numel must be in 1..2**31-1 and seed in 0..2**31-1, "
                         f"got numel={numel}, seed={seed}")
    x = (torch.arange(numel, dtype=torch.int64) * _HASH_MUL1 + seed) & _M32
    for _ in range(2):
        x = (((x >> 16) ^ x) * _HASH_MUL2) & _M32
    x = (x >> 16) ^ x
    sign = 1.0 - 2.0 * ((x >> 31) & 1).to(torch.float32)
    return x % buckets, sign


@torch.library.custom_op("slimfx::hashed_weight", mutates_args=())
def hashed_weight(buckets: torch.Tensor, shape: Sequence[int], seed: int, signed: bool,
                  decode: str = "load") -> torch.Tensor:
    """HashedNets: ``weight.flatten()[p] = buckets[h(p)] * sign(p)`` (see :func:`hash_buckets`)."""
    _check_decode(decode)
    idx, sign = hash_buckets(math.prod(shape), buckets.shape[0], seed)
    w = buckets[idx]
    if signed:
        w = w * sign.to(w.dtype)
    return w.reshape(shape)


@hashed_weight.register_fake
def _(buckets, shape, seed, signed, decode="load"):
    _check_decode(decode)
    return buckets.new_empty(shape)


def _hashed_setup(ctx, inputs, output):
    buckets, shape, seed, signed, _ = inputs
    ctx.args = (int(buckets.shape[0]), tuple(shape), seed, signed)


def _hashed_backward(ctx, grad):
    b, shape, seed, signed = ctx.args
    idx, sign = hash_buckets(math.prod(shape), b, seed)
    g = grad.reshape(-1) * (sign.to(grad.dtype) if signed else 1.0)
    return grad.new_zeros(b).index_add_(0, idx, g), None, None, None, None


hashed_weight.register_autograd(_hashed_backward, setup_context=_hashed_setup)

#: The ops that hold a shared weight, and the position of their trainable table.
SHARED_OPS = {
    torch.ops.slimfx.codebook_weight.default: 1,
    torch.ops.slimfx.pq_weight.default: 1,
    torch.ops.slimfx.hashed_weight.default: 0,
}


# ======================================================================================
# k-means
# ======================================================================================
Init = Literal["linear", "density", "kmeans++"]


def _kmeanspp_1d(xs: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    sample = xs if len(xs) <= 20000 else rng.choice(xs, 20000, replace=False)
    centers = [sample[rng.integers(len(sample))]]
    d2 = (sample - centers[0]) ** 2
    for _ in range(1, k):
        total = d2.sum()
        c = sample[rng.choice(len(sample), p=d2 / total)] if total > 0 else sample[rng.integers(len(sample))]
        centers.append(c)
        d2 = np.minimum(d2, (sample - c) ** 2)
    return np.asarray(centers)


def kmeans_1d(x: np.ndarray | torch.Tensor, k: int, *, init: Init = "linear", iters: int = 100,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means (Lloyd) of ``x`` into ``k`` centroids; returns (sorted centroids, labels).

    In one dimension the clusters are intervals of the sorted values, so each iteration
    is a binary search of the ``k - 1`` midpoints and sums from a prefix sum:
    ``O(k log n)`` after one sort, exact Lloyd updates.  Iterates until the partition no
    longer changes (or ``iters``).  A centroid left with no values moves to split the
    cluster with the largest squared error, so all ``k`` values are used.  When ``x``
    has at most ``k`` distinct values the result is exact (zero error).

    ``init``: ``linear`` (evenly spaced between min and max; Deep Compression's choice:
    it keeps the rare large weights), ``density`` (evenly spaced quantiles), ``kmeans++``.

    >>> c, lab = kmeans_1d(np.array([0.0, 0.1, 1.0, 1.2, 5.0]), 3)
    >>> c.round(2).tolist(), lab.tolist()
    ([0.05, 1.1, 5.0], [0, 0, 1, 1, 2])
    """
    x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64).reshape(-1)
    if not 1 <= k <= 256:
        raise ValueError(f"kmeans_1d: k must be in 1..256 (uint8 labels), got {k}")
    if x.size == 0:
        raise ValueError("kmeans_1d: no values to cluster")
    if not np.isfinite(x).all():
        raise ValueError("kmeans_1d: values contain NaN or inf")
    uniq = np.unique(x)
    if len(uniq) <= k:  # exact: every distinct value is a centroid
        c = np.concatenate([uniq, np.full(k - len(uniq), uniq[-1])])
        return c, np.searchsorted(uniq, x).astype(np.uint8)
    xs = np.sort(x)
    csum = np.concatenate([[0.0], np.cumsum(xs)])
    n = len(xs)
    if init == "linear":
        c = np.linspace(xs[0], xs[-1], k)
    elif init == "density":
        c = np.quantile(xs, (np.arange(k) + 0.5) / k)
    elif init == "kmeans++":
        c = np.sort(_kmeanspp_1d(xs, k, np.random.default_rng(seed)))
    else:
        raise ValueError(f"kmeans_1d: init must be linear, density or kmeans++, got {init!r}")
    csum2 = np.concatenate([[0.0], np.cumsum(xs * xs)])
    bounds = None
    for _ in range(iters):
        new_bounds = np.searchsorted(xs, (c[1:] + c[:-1]) / 2)
        if bounds is not None and np.array_equal(new_bounds, bounds):
            break
        bounds = new_bounds
        edges = np.concatenate([[0], bounds, [n]])
        counts = np.diff(edges)
        sums = csum[edges[1:]] - csum[edges[:-1]]
        c = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        lo, hi = edges[:-1].copy(), edges[1:].copy()
        for e in np.flatnonzero(counts == 0):  # split the worst cluster with a spare centroid
            cnt = hi - lo
            seg = csum[hi] - csum[lo]
            sse = (csum2[hi] - csum2[lo]) - seg ** 2 / np.maximum(cnt, 1)
            sse[cnt < 2] = -1.0
            worst = int(np.argmax(sse))
            if sse[worst] <= 1e-30:
                break
            a, b = lo[worst], hi[worst]
            mid = (a + b) // 2
            c[worst] = (csum[mid] - csum[a]) / (mid - a)
            c[e] = (csum[b] - csum[mid]) / (b - mid)
            hi[worst], lo[e], hi[e] = mid, mid, b
        c = np.sort(c)
    labels = np.searchsorted((c[1:] + c[:-1]) / 2, x)
    return c, labels.astype(np.uint8)


def kmeans_nd(x: torch.Tensor, k: int, *, iters: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of the rows of ``x`` ``(n, d)`` (k-means++ init, Lloyd); returns
    ``(centroids (k, d), labels (n,) uint8)``.  With ``n <= k`` every row is a centroid."""
    x = x.detach().double()
    n = x.shape[0]
    if not 1 <= k <= 256:
        raise ValueError(f"kmeans_nd: k must be in 1..256 (uint8 labels), got {k}")
    if n <= k:
        c = torch.cat([x, x[-1:].expand(k - n, -1)])
        return c, torch.arange(n, dtype=torch.uint8)
    gen = torch.Generator().manual_seed(seed)
    c = x[torch.randint(n, (1,), generator=gen)]
    d2 = torch.cdist(x, c).pow(2).squeeze(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / n)
        nxt = x[torch.multinomial(p, 1, generator=gen)]
        c = torch.cat([c, nxt])
        d2 = torch.minimum(d2, (x - nxt).pow(2).sum(1))
    labels = None
    for _ in range(iters):
        new = torch.cdist(x, c).argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=k).double()
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
    labels = torch.cdist(x, c).argmin(1)
    return c, labels.to(torch.uint8)


# ======================================================================================
# The passes
# ======================================================================================
@dataclass(frozen=True)
class ShareOptions:
    """Options of ``share-weights``.

    bits: index width, 1..8 (``2**bits`` centroids per codebook).
    scope: ``layer`` (one codebook per weight) or ``channel`` (one per output channel).
    init: k-means initialisation, ``linear`` / ``density`` / ``kmeans++``.
    pq: product quantization of linear layers with sub-vectors of this many weights
        (0: off; the input features must be a multiple of it).
    decode: where the compiled program decodes, ``load`` or ``program``.
    exclude: module paths (or their prefixes) whose weights are kept as they are.
    """

    bits: int = 4
    scope: Literal["layer", "channel"] = "layer"
    init: Init = "linear"
    pq: int = 0
    decode: Decode = "load"
    iters: int = 100
    exclude: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.bits <= 8:
            raise ValueError(f"option 'bits' must be in 1..8 (indices are stored as uint8), "
                             f"got {self.bits}")
        if self.pq < 0:
            raise ValueError(f"option 'pq' must be >= 0 (0: off), got {self.pq}")
        if self.iters < 1:
            raise ValueError(f"option 'iters' must be >= 1, got {self.iters}")


@dataclass(frozen=True)
class HashOptions:
    """Options of ``hash-weights``.

    buckets: shared values per layer (a layer with no more weights than this is kept).
    signed: a second hash bit gives each weight a sign (HashedNets' xi), making the
        bucket sums unbiased.
    """

    buckets: int = 4096
    signed: bool = True
    decode: Decode = "load"
    exclude: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.buckets < 2**31:
            raise ValueError(f"option 'buckets' must be in 1..2**31-1, got {self.buckets}")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"option 'seed' must be in 0..2**31-1, got {self.seed}")


_LAYER_OPS = (aten.convolution.default, aten.linear.default)


def _weights(graph: Graph, exclude: tuple[str, ...]) -> list[tuple[Node, Node]]:
    """(weight get_attr, first layer reading it) of conv/linear layers, in graph order."""
    seen: dict[Node, Node] = {}
    for n in graph.fx.nodes:
        if n.op == "call_function" and n.target in _LAYER_OPS and len(n.args) > 1:
            w = n.args[1]
            if isinstance(w, Node) and w.op == "get_attr" and w not in seen:
                seen[w] = n
    paths = {(layer.meta.get("module_path") or layer.name) for layer in seen.values()}
    for ex in exclude:
        if not any(in_modules(p, [ex]) for p in paths):
            raise GraphError(f"option 'exclude': no conv or linear layer at module path {ex!r} "
                             f"(layers: {', '.join(sorted(paths))})")
    out = []
    for w, layer in seen.items():
        path = layer.meta.get("module_path") or layer.name
        if not in_modules(path, exclude):
            out.append((w, layer))
    return out


def _replace_weight(graph: Graph, w: Node, layer: Node, target, tables: list[tuple[str, torch.Tensor]],
                    consts: tuple) -> Node:
    """Replace get_attr ``w`` by ``target(*stored tables, *consts)``; drop the old tensor."""
    path = layer.meta.get("module_path") or layer.name
    # All parameters (uint8 ones with requires_grad=False): TVM's importer keeps parameters
    # as inputs of main (stored in params.npz) but binds buffers into the library.
    nodes = [graph.add_param(f"{path}.{suffix}", t, before=w, trainable=True) for suffix, t in tables]
    with graph.fx.inserting_before(w):
        call = graph.fx.call_function(target, (*nodes, *consts))
    graph.inherit(call, layer)
    w.replace_all_uses_with(call)
    old = w.target
    graph.fx.erase_node(w)
    if not any(n.op == "get_attr" and n.target == old for n in graph.fx.nodes):
        *parents, last = old.split(".")
        mod = graph.gm.get_submodule(".".join(parents)) if parents else graph.gm
        delattr(mod, last)
    return call


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    den = b.double().norm().item()
    return (a.double() - b.double()).norm().item() / den if den > 0 else 0.0


def _share_one(W: torch.Tensor, opts: ShareOptions, seed: int):
    k = 1 << opts.bits
    groups = W.reshape(W.shape[0], -1) if opts.scope == "channel" else W.reshape(1, -1)
    cbs, idx = [], []
    for row in groups:
        c, lab = kmeans_1d(row, k, init=opts.init, iters=opts.iters, seed=seed)
        cbs.append(c)
        idx.append(lab)
    codebook = torch.tensor(np.stack(cbs), dtype=W.dtype)
    indices = torch.from_numpy(np.stack(idx)).reshape(W.shape)
    return indices, codebook


def _pq_one(W: torch.Tensor, opts: ShareOptions, seed: int, layer: Node):
    o, i = W.shape
    d = opts.pq
    if i % d:
        raise GraphError(f"option 'pq={d}': layer {layer.meta.get('module_path') or layer.name} "
                         f"has {i} input features, not a multiple of {d}", layer)
    m, k = i // d, 1 << opts.bits
    sub = W.reshape(o, m, d)
    cbs, idx = [], []
    for j in range(m):
        c, lab = kmeans_nd(sub[:, j, :], k, iters=opts.iters, seed=seed + j)
        cbs.append(c)
        idx.append(lab)
    return torch.stack(idx, 1), torch.stack(cbs).to(W.dtype)


@register_pass("share-weights", options=ShareOptions, lossless=False)
def share_weights(graph: Graph, options: ShareOptions) -> PassResult:
    """Cluster conv/linear weights into codebooks of ``2**bits`` shared values."""
    graph.analyze()
    layers = []
    errors = []
    for i, (w, layer) in enumerate(_weights(graph, options.exclude)):
        W = graph.param(w).detach()
        path = layer.meta.get("module_path") or layer.name
        if not W.is_floating_point():
            raise GraphError(f"layer {path}: weight {w.target} is {W.dtype}, not floating point", layer)
        if options.pq and layer.target is aten.linear.default:
            indices, codebook = _pq_one(W, options, options.seed + i, layer)
            call = _replace_weight(graph, w, layer, torch.ops.slimfx.pq_weight.default,
                                   [("weight_pq_indices", indices), ("weight_pq_codebook", codebook)],
                                   (options.decode,))
        else:
            indices, codebook = _share_one(W, options, options.seed + i)
            call = _replace_weight(graph, w, layer, torch.ops.slimfx.codebook_weight.default,
                                   [("weight_indices", indices), ("weight_codebook", codebook)],
                                   (options.decode,))
        new = _decode_call(graph, call)
        errors.append(_rel_error(new, W))
        layers.append(path)
    stats = {"layers": len(layers), "bits": options.bits, "scope": options.scope,
             "weight_rel_error_max": max(errors, default=0.0),
             "weight_rel_error_mean": float(np.mean(errors)) if errors else 0.0}
    if layers:
        rep = storage_report(graph)
        stats.update(fp32_bytes=rep.fp32_bytes, stored_bytes=rep.stored_bytes)
    return PassResult(graph, bool(layers), stats)


@register_pass("hash-weights", options=HashOptions, lossless=False)
def hash_weights(graph: Graph, options: HashOptions) -> PassResult:
    """HashedNets: each conv/linear weight's position hashes to one of ``buckets`` values."""
    graph.analyze()
    hashed, kept, errors = [], [], []
    for i, (w, layer) in enumerate(_weights(graph, options.exclude)):
        W = graph.param(w).detach()
        path = layer.meta.get("module_path") or layer.name
        if W.numel() <= options.buckets:
            kept.append(path)
            continue
        seed = (options.seed + 7919 * i) % 2**31
        idx, sign = hash_buckets(W.numel(), options.buckets, seed)
        flat = W.reshape(-1).double() * (sign.double() if options.signed else 1.0)
        # least squares: a bucket's value is the mean of its (sign-corrected) weights
        sums = torch.zeros(options.buckets, dtype=torch.float64).index_add_(0, idx, flat)
        counts = torch.bincount(idx, minlength=options.buckets).double()
        values = (sums / counts.clamp(min=1)).to(W.dtype)
        call = _replace_weight(graph, w, layer, torch.ops.slimfx.hashed_weight.default,
                               [("weight_buckets", values)],
                               (list(W.shape), seed, options.signed, options.decode))
        errors.append(_rel_error(_decode_call(graph, call), W))
        hashed.append(path)
    return PassResult(graph, bool(hashed), {
        "layers": len(hashed), "kept": kept, "buckets": options.buckets,
        "weight_rel_error_max": max(errors, default=0.0),
        "weight_rel_error_mean": float(np.mean(errors)) if errors else 0.0})


# ======================================================================================
# Inspecting, fine-tuning and re-targeting shared graphs
# ======================================================================================
def _shared_calls(graph: Graph) -> list[Node]:
    return [n for n in graph.fx.nodes if n.op == "call_function" and n.target in SHARED_OPS]


def _decode_call(graph: Graph, call: Node) -> torch.Tensor:
    args = [graph.param(a) if isinstance(a, Node) else a for a in call.args]
    with torch.no_grad():
        return call.target(*args)


def shared_weights(graph: Graph) -> dict[str, torch.Tensor]:
    """The decoded weight of every shared layer, by module path (for inspection)."""
    return {c.meta.get("module_path") or c.name: _decode_call(graph, c) for c in _shared_calls(graph)}


def codebook_parameters(graph: Graph) -> list[torch.nn.Parameter]:
    """The trainable tables of the shared weights (codebooks, PQ codebooks, hash buckets).

    Give them to an optimizer in your own training loop: the ops' gradients sum the
    gradients of all weights that share a value, so each step moves the centroids as
    Deep Compression's codebook fine-tuning does; the indices never change.
    """
    params = []
    for c in _shared_calls(graph):
        p = graph.param(c.args[SHARED_OPS[c.target]])
        if not isinstance(p, torch.nn.Parameter):
            raise GraphError(f"the table {c.args[SHARED_OPS[c.target]].target} of a shared "
                             "weight is a buffer, not a trainable parameter", c)
        if all(p is not q for q in params):
            params.append(p)
    return params


def finetune_codebooks(graph: Graph, batches: Iterable, loss_fn: Callable, *, lr: float = 1e-3,
                       optimizer: torch.optim.Optimizer | None = None,
                       extra_params: Iterable[torch.nn.Parameter] = (),
                       forward: Callable | None = None) -> list[float]:
    """Train only the codebooks (plus ``extra_params``) of ``graph`` in place.

    ``batches`` yields ``(inputs, target)``; ``inputs`` is a tensor or a tuple of tensors
    for the graph's placeholders; ``loss_fn(output, target)``.  ``optimizer`` defaults
    to Adam(lr) over the codebooks and ``extra_params``.  Other parameters get no
    gradient.  Returns the loss of every step; the graph's analyses are refreshed.
    """
    tables = codebook_parameters(graph) + list(extra_params)
    if not tables:
        raise GraphError(f"{graph.name} has no shared weights to fine-tune; run share-weights "
                         "or hash-weights first")
    opt = optimizer or torch.optim.Adam(tables, lr=lr)
    run = forward or (lambda *xs: graph.gm(*xs)[0])
    frozen = [p for p in graph.gm.parameters() if p.requires_grad and all(p is not t for t in tables)]
    for p in frozen:
        p.requires_grad_(False)
    losses = []
    try:
        for inputs, target in batches:
            xs = inputs if isinstance(inputs, tuple) else (inputs,)
            loss = loss_fn(run(*xs), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for t in tables:
            t.grad = None
    graph.analyze(force=True)
    return losses


def set_decode(graph: Graph, decode: Decode) -> int:
    """Set where every shared weight is decoded (``load`` / ``program``) in place;
    returns the number of ops changed.  Lets one shared graph be compiled both ways."""
    _check_decode(decode)
    changed = 0
    for c in _shared_calls(graph):
        if c.args[-1] != decode:
            c.update_arg(len(c.args) - 1, decode)
            changed += 1
    graph.gm.recompile()
    return changed


# ======================================================================================
# Storage size model
# ======================================================================================
@dataclass
class LayerStorage:
    """Storage of one parameter tensor."""

    name: str
    kind: str  # "fp32" (any plain tensor), "indices", "codebook", "buckets"
    elements: int
    fp32_bytes: int  # what the layer's weight took as float32 before sharing
    stored_bytes: int  # bit-packed indices / the tensor's own bytes
    huffman_bytes: int  # with Huffman-coded indices (the stored size for other kinds)
    bits: int = 0


@dataclass
class StorageReport:
    """Stored size of a graph's parameters; ``rows`` per tensor."""

    rows: list[LayerStorage] = field(default_factory=list)

    @property
    def fp32_bytes(self) -> int:
        return sum(r.fp32_bytes for r in self.rows)

    @property
    def stored_bytes(self) -> int:
        return sum(r.stored_bytes for r in self.rows)

    @property
    def huffman_bytes(self) -> int:
        return sum(r.huffman_bytes for r in self.rows)

    def __str__(self) -> str:
        from slimfx.ir.printing import format_table

        rows = [[r.name, r.kind, f"{r.elements:,}", r.bits or "", f"{r.fp32_bytes:,}",
                 f"{r.stored_bytes:,}", f"{r.huffman_bytes:,}"] for r in self.rows]
        rows.append(["total", "", "", "", f"{self.fp32_bytes:,}", f"{self.stored_bytes:,}",
                     f"{self.huffman_bytes:,}"])
        return format_table(["tensor", "kind", "elements", "bits", "fp32 B", "stored B",
                             "huffman B"], rows, right={2, 3, 4, 5, 6})


def _coded_bytes(arr: np.ndarray, coding: str) -> int:
    encoded = encode_indices(arr, coding)
    return arr.nbytes if encoded is None else encoded[0].nbytes


def storage_report(graph: Graph) -> StorageReport:
    """Stored bytes of every parameter the graph reads.

    ``uint8`` index tensors count as :mod:`slimfx.runtime.artifact` stores them
    (:func:`~slimfx.runtime.artifact.encode_indices`): bit-packed at the bit length of
    their largest value and, in ``huffman_bytes``, Huffman-coded (chunk offsets included;
    the code lengths live in the manifest); every other tensor counts its own bytes.  ``fp32_bytes`` is what the
    same model took with plain float32 weights (a hashed weight counts its full shape).
    """
    rep = StorageReport()
    owner: dict[str, Node] = {}
    for c in _shared_calls(graph):
        for a in c.all_input_nodes:
            owner[a.target] = c
    seen = set()
    for n in graph.fx.nodes:
        if n.op != "get_attr" or n.target in seen:
            continue
        seen.add(n.target)
        t = graph.param(n)
        arr = t.detach().cpu().numpy()
        c = owner.get(n.target)
        if c is None:
            rep.rows.append(LayerStorage(n.target, "fp32" if t.dtype == torch.float32 else str(t.dtype),
                                         t.numel(), t.numel() * 4 if t.is_floating_point() else t.nbytes,
                                         t.nbytes, t.nbytes))
        elif t.dtype == torch.uint8:
            bits = index_bits(arr)
            weight_elems = math.prod(_decoded_shape(graph, c))
            rep.rows.append(LayerStorage(n.target, "indices", t.numel(), weight_elems * 4,
                                         _coded_bytes(arr, "bitpack"), _coded_bytes(arr, "huffman"),
                                         bits))
        else:
            kind = "buckets" if c.target is torch.ops.slimfx.hashed_weight.default else "codebook"
            fp32 = math.prod(_decoded_shape(graph, c)) * 4 if kind == "buckets" else 0
            rep.rows.append(LayerStorage(n.target, kind, t.numel(), fp32, t.nbytes, t.nbytes))
    return rep


def _decoded_shape(graph: Graph, call: Node) -> tuple[int, ...]:
    if call.target is torch.ops.slimfx.hashed_weight.default:
        return tuple(call.args[1])
    idx = graph.param(call.args[0])
    if call.target is torch.ops.slimfx.pq_weight.default:
        cb = graph.param(call.args[1])
        return (idx.shape[0], cb.shape[0] * cb.shape[2])
    return tuple(idx.shape)
