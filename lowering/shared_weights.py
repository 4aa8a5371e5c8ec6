"""Relax lowerings of the weight-sharing ops of :mod:`slimfx.passes.share_weights`.

Each op becomes one TIR gather (``bb.emit_te``):

- ``codebook_weight(indices, codebook)``: ``w[i] = codebook[g(i), indices[i]]`` with
  ``g(i)`` the output channel (per-channel codebooks) or 0 (one per layer);
- ``pq_weight(indices, codebook)``: ``w[o, c] = codebook[c // d, indices[o, c // d], c % d]``;
- ``hashed_weight(buckets)``: ``w[p] = buckets[h(p)] * sign(p)``, the hash computed in
  int64 index arithmetic exactly as the PyTorch reference does: no index tensor exists.

Where the gather runs is the op's ``decode`` argument.  ``"load"``: the indices and the
codebook are parameters of ``main``, so ``LiftTransformParams`` moves the gather (and any
weight re-layout after it) into ``main_transform_params``: it runs once when the model
is loaded, and calls see ordinary dense weights.  ``"program"``: the gather's inputs are
wrapped in ``relax.op.builtin.stop_lift_params``, so it (and the re-layout) stays in
``main`` and runs on every call; memory holds only indices and codebooks.
"""

from __future__ import annotations

import math

import torch

from slimfx.passes import share_weights as _sw  # noqa: F401  (defines the torch.ops.slimfx ops)

from .relax import register_lowering
from .targets import LoweringError

__all__: list[str] = []

_M32 = 0xFFFFFFFF


def _decode_arg(node, position: int) -> str:
    decode = node.args[position] if len(node.args) > position else node.kwargs.get("decode", "load")
    if decode not in ("load", "program"):
        raise LoweringError(f"node '{node.name}': decode must be 'load' or 'program', got {decode!r}")
    return decode


def _inputs(importer, node, count: int, decode: str):
    from tvm import relax

    args = [importer.env[a] for a in node.args[:count]]
    if decode == "program":  # keep the gather (and what follows it) out of transform_params
        args = [importer.block_builder.emit(relax.op.builtin.stop_lift_params(a)) for a in args]
    return args


@register_lowering(torch.ops.slimfx.codebook_weight.default)
def _codebook_weight(node, importer):
    from tvm import te

    decode = _decode_arg(node, 2)
    indices, codebook = _inputs(importer, node, 2, decode)

    def gather(idx, cb):
        per_channel = int(cb.shape[0]) > 1

        def body(*i):
            return cb[i[0] if per_channel else 0, idx(*i).astype("int32")]

        return te.compute(idx.shape, body, name="codebook_gather")

    return importer.block_builder.emit_te(gather, indices, codebook,
                                         primfunc_name_hint="codebook_weight")


@register_lowering(torch.ops.slimfx.pq_weight.default)
def _pq_weight(node, importer):
    from tvm import te

    decode = _decode_arg(node, 2)
    indices, codebook = _inputs(importer, node, 2, decode)

    def gather(idx, cb):
        m, d = int(cb.shape[0]), int(cb.shape[2])
        return te.compute((idx.shape[0], m * d),
                          lambda o, c: cb[c // d, idx[o, c // d].astype("int32"), c % d],
                          name="pq_gather")

    return importer.block_builder.emit_te(gather, indices, codebook, primfunc_name_hint="pq_weight")


def _hash(p, buckets: int, seed: int):
    """The int64 hash of :func:`slimfx.passes.share_weights.hash_buckets` as TIR."""
    import tvm.tirx as tir

    def c(v):
        return tir.const(v, "int64")

    x = (p * c(_sw._HASH_MUL1) + c(seed)) & c(_M32)
    for _ in range(2):
        x = (((x >> c(16)) ^ x) * c(_sw._HASH_MUL2)) & c(_M32)
    x = (x >> c(16)) ^ x
    return tir.floormod(x, c(buckets)), (x >> c(31)) & c(1)


@register_lowering(torch.ops.slimfx.hashed_weight.default)
def _hashed_weight(node, importer):
    from tvm import te

    decode = _decode_arg(node, 4)
    (buckets,) = _inputs(importer, node, 1, decode)
    shape = [int(s) for s in node.args[1]]
    seed, signed = int(node.args[2]), bool(node.args[3])
    n_buckets = int(importer.shape_of(buckets)[0])

    def gather(b):
        import tvm.tirx as tir

        def body(*i):
            flat = tir.const(0, "int64")
            for axis, size in enumerate(shape):
                flat = flat * tir.const(size, "int64") + i[axis].astype("int64")
            bucket, negative = _hash(flat, n_buckets, seed)
            v = b[bucket]
            if signed:
                v = tir.Select(negative == tir.const(1, "int64"), -v, v)
            return v

        return te.compute(shape, body, name="hashed_gather")

    if math.prod(shape) >= 2**31:
        raise LoweringError(f"node '{node.name}': hashed weights need fewer than 2**31 elements")
    return importer.block_builder.emit_te(gather, buckets, primfunc_name_hint="hashed_weight")
