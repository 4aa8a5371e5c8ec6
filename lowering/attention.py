"""CPU lowering of ``relax.nn.attention``: one kernel, blocked over query rows.

TVM's own legalization computes the whole ``S x T`` score matrix per head, then softmax
and the second product as separate passes, with ``exp`` as a libm call per element; untuned
on the CPU it is one loop nest with no vectorization (ViT at 3,137 tokens spent 98% of
its time there, 11x slower than ONNX Runtime).

Here each task takes ``R`` query rows of one head and keeps their scores in cache:

1. scores ``S = Q K^T * scale (+ bias)`` for the ``R`` rows against every key, keys
   transposed and padded to a multiple of the vector width once per call, so the vector
   runs over keys and each loaded key vector feeds ``R`` FMAs;
2. the row maximum and the sum of ``exp(S - max)`` as vector reductions (a lane-wise
   partial result, then across lanes), ``exp`` a polynomial (``topi.fast_exp``, relative
   error about 1e-7) that vectorizes;
3. ``O = softmax(S) V``: ``R`` rows x the value width accumulated in registers over the
   keys, values copied per head to rows of contiguous channels; normalized at the end.

Causal masks (``TopLeft``/``BottomRight`` as TVM defines them) and an additive bias are
folded into step 1; masked and padded keys get ``exp(-100) * 0``-sized weights (under
1e-43 of a row's total).  Sliding-window attention keeps TVM's legalization.
"""

from __future__ import annotations

import math

from . import cpu_schedules as cs

__all__ = ["ATTENTION_BLOCK", "legalize_attention"]

#: The anchor block: the unnormalized ``softmax(S) V`` of a block of query rows.
ATTENTION_BLOCK = "attn_out"
#: Query rows per task: each key and value vector loaded feeds this many FMAs.
ROWS = 4


def _attention_te(q, k, v, bias, scale, causal: str | None, lanes: int):
    from tvm import te, tirx, topi

    b_, s_, h_, d_ = cs._ints(q.shape)
    t_ = int(k.shape[1])
    dv = int(v.shape[3])
    sc = float(scale) if scale is not None else 1.0 / math.sqrt(d_)
    tp = -(-t_ // lanes) * lanes  # keys padded to whole vectors
    sp = -(-s_ // ROWS) * ROWS  # query rows padded to whole tasks
    nj = tp // lanes
    if causal is None:
        offset = None
    elif causal == "TopLeft":
        offset = 0
    elif causal == "BottomRight":
        offset = abs(s_ - t_)
    else:
        raise ValueError(f"unknown causal mask {causal!r}")
    zero = tirx.const(0.0, "float32")

    kt = te.compute((b_, h_, d_, tp), lambda b, h, d, j: tirx.if_then_else(
        j < t_, k[b, tirx.min(j, t_ - 1), h, d], zero), name="attn_kt")
    vp = te.compute((b_, h_, tp, dv), lambda b, h, j, e: tirx.if_then_else(
        j < t_, v[b, tirx.min(j, t_ - 1), h, e], zero), name="attn_vp")
    rd = te.reduce_axis((0, d_), name="d")
    score = te.compute((b_, h_, sp, tp), lambda b, h, i, j: te.sum(
        q[b, tirx.min(i, s_ - 1), h, rd] * kt[b, h, rd, j], axis=rd), name="attn_scores")

    def valid(i, j):
        ok = j < t_ if tp != t_ else None
        if offset is not None:
            c = j <= i + offset
            ok = c if ok is None else tirx.all(ok, c)
        return ok

    def logit(b, h, i, j):
        x = score[b, h, i, j] * tirx.const(sc, "float32")
        if bias is not None:  # (B, H, S, T), size-1 dimensions broadcast
            idx = [b, h, tirx.min(i, s_ - 1), tirx.min(j, t_ - 1)]
            x = x + bias[tuple(0 if n == 1 else ix for n, ix in zip(cs._ints(bias.shape), idx))]
        return x

    def masked(i, j, value, fill):
        ok = valid(i, j)
        return value if ok is None else tirx.Select(ok, value, tirx.const(fill, "float32"))

    ro = te.reduce_axis((0, nj), name="jo")
    mxl = te.compute((b_, h_, sp, lanes), lambda b, h, i, ln: te.max(
        masked(i, ro * lanes + ln, logit(b, h, i, ro * lanes + ln), -3.0e38), axis=ro),
        name="attn_max_lanes")
    rl = te.reduce_axis((0, lanes), name="l")
    mx = te.compute((b_, h_, sp), lambda b, h, i: te.max(mxl[b, h, i, rl], axis=rl),
                    name="attn_max")
    shift = te.compute((b_, h_, sp, tp), lambda b, h, i, j: masked(
        i, j, logit(b, h, i, j) - mx[b, h, i], -100.0), name="attn_shift")
    ex = topi.fast_exp(shift)
    ro2 = te.reduce_axis((0, nj), name="jo")
    sml = te.compute((b_, h_, sp, lanes), lambda b, h, i, ln: te.sum(
        ex[b, h, i, ro2 * lanes + ln], axis=ro2), name="attn_sum_lanes")
    rl2 = te.reduce_axis((0, lanes), name="l")
    sm = te.compute((b_, h_, sp), lambda b, h, i: te.sum(sml[b, h, i, rl2], axis=rl2),
                    name="attn_sum")
    rj = te.reduce_axis((0, tp), name="j")
    out = te.compute((b_, h_, sp, dv), lambda b, h, i, e: te.sum(
        ex[b, h, i, rj] * vp[b, h, rj, e], axis=rj), name=ATTENTION_BLOCK)
    norm = te.compute((b_, h_, sp, dv), lambda b, h, i, e: out[b, h, i, e] / sm[b, h, i],
                      name="attn_norm")
    return te.compute((b_, s_, h_, dv), lambda b, i, h, e: norm[b, h, i, e],
                      name="attn_result")


def legalize_attention(info):
    """The legalization of ``relax.nn.attention`` / ``attention_bias`` for target ``info``."""
    lanes = cs.vector_lanes(info)

    def legalize(bb, call):
        from tvm.relax.transform.legalize_ops import nn as tvm_nn

        a = call.attrs
        with_bias = call.op.name.endswith("bias")
        shapes = [cs._shape(x) for x in call.args]
        if (a.window_size is not None or any(s is None for s in shapes)
                or str(call.args[0].ty.dtype) != "float32"
                or (with_bias and len(shapes[3]) != 4)):
            return (tvm_nn._nn_attention_bias if with_bias else tvm_nn._nn_attention)(bb, call)
        return bb.call_te(
            lambda q, k, v, *b: _attention_te(q, k, v, b[0] if b else None, a.scale,
                                              a.causal_mask, lanes),
            *call.args[:4 if with_bias else 3], primfunc_name_hint="attention")

    return legalize


def _block(sch, name: str):
    for b in cs._blocks(sch):
        if cs._block_name(sch, b) == name:
            return b
    raise KeyError(name)


def _register_tile(sch, block, lanes: int) -> None:
    """A block whose last loops are (query rows, columns, reduction): ROWS rows x one
    vector of columns accumulated over the reduction, each loaded column vector feeding
    ROWS FMAs."""
    r, col, red = sch.get_loops(block)[-3:]
    co, ci = cs._vector_split(sch, col, lanes)
    sch.reorder(*(lp for lp in (co, red, r, ci) if lp is not None))
    sch.unroll(r)
    sch.vectorize(ci)
    sch.decompose_reduction(block, red)


def _schedule_attention(sch, block, lanes: int) -> None:
    # ops fused before or after the kernel (head split / merge): inlined into it
    own = {"attn_kt", "attn_vp", "attn_scores", "attn_max_lanes", "attn_max", "attn_shift",
           "attn_sum_lanes", "attn_sum", ATTENTION_BLOCK, "attn_norm", "attn_result"}
    for b in cs._blocks(sch):
        name = cs._block_name(sch, b)
        if name not in own and "fast_exp" not in name:
            try:
                sch.compute_inline(b)
            except Exception:  # noqa: BLE001  (a consumer: into the result's loop)
                sch.reverse_compute_inline(b)
    names = {cs._block_name(sch, b) for b in cs._blocks(sch)}
    exp_name = next(n for n in names if "fast_exp" in n)
    # per-call copies: transposed keys and per-head values, parallel, vectorized
    for name in ("attn_kt", "attn_vp"):
        b = _block(sch, name)
        loops = sch.get_loops(b)
        sch.parallel(sch.fuse(*loops[:3]))
        _, vi = cs._vector_split(sch, loops[3], lanes)
        sch.vectorize(vi)
    res = _block(sch, "attn_result")
    loops = sch.get_loops(res)
    sch.parallel(sch.fuse(*loops[:3]))
    _, vi = cs._vector_split(sch, loops[3], lanes)
    sch.vectorize(vi)
    # the main loop: tasks of ROWS query rows of one head
    norm = _block(sch, "attn_norm")
    b, h, i, e = sch.get_loops(norm)
    io, ii = sch.split(i, [None, ROWS])
    task = sch.fuse(b, h, io)
    sch.parallel(task)
    _, vi = cs._vector_split(sch, e, lanes)
    sch.vectorize(vi)
    sch.compute_inline(_block(sch, "attn_shift"))  # into exp: logit - max, masked
    for name in ("attn_out", "attn_sum", "attn_sum_lanes", exp_name, "attn_max",
                 "attn_max_lanes", "attn_scores"):  # consumers first
        sch.compute_at(_block(sch, name), task)
    # scores: ROWS rows x one vector of keys in registers, reduction over the head dim
    _register_tile(sch, _block(sch, "attn_scores"), lanes)
    # lane-wise max / sum over key vectors, then across the lanes
    for name in ("attn_max_lanes", "attn_sum_lanes"):
        blk = _block(sch, name)
        r, ln, jo = sch.get_loops(blk)[-3:]
        sch.reorder(r, jo, ln)
        sch.vectorize(ln)
        sch.decompose_reduction(blk, jo)
    ex = _block(sch, exp_name)
    _, ji = cs._vector_split(sch, sch.get_loops(ex)[-1], lanes)
    sch.vectorize(ji)
    # softmax(S) V: ROWS rows x the value vectors in registers over the keys
    _register_tile(sch, _block(sch, ATTENTION_BLOCK), lanes)


cs.ANCHOR_SCHEDULES["attn_kt"] = ("attention", _schedule_attention)
cs.LEGALIZATIONS["relax.nn.attention"] = legalize_attention
cs.LEGALIZATIONS["relax.nn.attention_bias"] = legalize_attention
