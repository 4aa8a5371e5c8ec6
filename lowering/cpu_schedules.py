"""Fast CPU lowering with no tuning: blocked layouts, custom legalizations, hand schedules.

:func:`prepare` takes the Relax module from :func:`slimfx.lowering.to_relax` to fused TIR:

1. ``DecomposeOpsForInference``, ``CanonicalizeBindings``;
2. ``ConvertLayout`` with a per-conv callback: dense and depthwise convolutions go to the
   channel-blocked ``NCHW{c}c`` layout (kernels ``OIHW{ci}i{co}o``), the block being the
   target's vector width in floats (16 on AVX-512, 8 on AVX2, 4 on NEON) or, for a channel
   count it does not divide, the largest power of two that does (a 3-channel stem is
   packed whole: ``NCHW3c``).  Element-wise ops, pooling and reductions follow the
   blocked layout, so activations are converted once at the ends of the network;
3. ``LiftTransformParams``: every weight-only computation (kernel re-layout, bias
   reshape, transposed linear weights) moves into ``main_transform_params``, run once
   when a model is loaded (see :class:`slimfx.runtime.CompiledModel`), never per call;
4. ``LegalizeOps`` with slimfx's legalization of blocked convolutions (Relax itself
   refuses them), then ``AnnotateTIROpPattern``, ``FoldConstant``, ``FuseOps``,
   ``FuseTIR``.

:func:`schedule` then gives every PrimFunc not already scheduled (by a tuning database)
a hand schedule chosen by its anchor block:

- blocked convolution: a register tile of up to 7 (AVX-512) pixels of a row x two
  vectors of output channels (or up to 14 pixels x one vector where the chunks are odd),
  accumulated in registers, reduction ``ic_chunk, kh, kw, ic_block`` outside, epilogue
  (bias, residual add, ReLU) fused at the register tile, rows and channel chunks in
  parallel;
- depthwise convolution: the same tile with the vector over the channel block, the
  padding inlined as guarded loads (also for stems with few input channels);
- ``clip`` (ReLU6) is rewritten to ``maximum``/``minimum`` before ``ConvertLayout``
  so it follows the blocked layout and fuses into the convolution's epilogue;
- register tiles are small stack arrays (``_ACC_SCOPE``), promoted to registers;
- matmul / dense: rows x two vectors of columns in registers, parallel over tiles;
- row reductions (layer norm, softmax, RMS norm over a last axis of whole vectors): rows
  in parallel, each row's sums a vector of partial sums (``rfactor``), output in vectors;
- anything else (pooling, reductions, element-wise, layout transforms): producers
  inlined, outer loops fused and parallel, the innermost loop vectorized when it is
  contiguous and a useful width.

>>> from slimfx.lowering import resolve_target
>>> channel_block(64, 16), channel_block(3, 16), channel_block(24, 16), channel_block(100, 4)
(16, 3, 8, 4)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from .targets import LoweringError, TargetInfo

__all__ = [
    "ANCHOR_SCHEDULES", "LEGALIZATIONS", "POST_LAYOUT_PASSES", "CONV_BLOCK", "DWCONV_BLOCK",
    "PrepareOptions", "channel_block", "prepare", "schedule",
    "schedule_primfunc", "hand_schedule", "kernel_kind", "kernel_kinds", "lower_passes",
    "SERIAL_BELOW", "SERIAL_MAX_ELEMENTS", "SERIAL_REUSED_ELEMENTS", "SERIAL_MIN_REUSE",
    "serial_kernels",
]

#: Block names of slimfx's blocked convolution computes (the anchors the schedules find).
CONV_BLOCK = "conv2d_NCHWc"
#: Block annotation of the blocked convolution: its (larger) stride, for the schedule.
STRIDE_ATTR = "slimfx.stride"
DWCONV_BLOCK = "dwconv2d_NCHWc"

#: Hand schedules of kernels that other lowerings define, by the name prefix of their
#: anchor block: ``{prefix: (kind, fn(sch, block, lanes))}`` (e.g. the Winograd transforms
#: of :mod:`slimfx.lowering.fast_conv`).  A schedule that raises falls back to the generic one.
ANCHOR_SCHEDULES: dict[str, tuple[str, Any]] = {}

#: Legalizations of Relax ops for the fast CPU lowering besides slimfx's blocked
#: convolution, as ``{op name: factory(info) -> fn(bb, call)}`` (e.g. attention,
#: :mod:`slimfx.lowering.attention`).
LEGALIZATIONS: dict[str, Any] = {}

#: Relax module passes run right after ``ConvertLayout`` (blocked layouts only), as
#: ``fn(mod, lanes) -> mod``: other lowerings adapt their kernels to the blocked layout
#: (e.g. :func:`slimfx.lowering.fast_conv.blocked_winograd`).
POST_LAYOUT_PASSES: list[Any] = []


@dataclass(frozen=True)
class PrepareOptions:
    """Options of :func:`prepare`.

    Attributes
    ----------
    blocked_layout:
        Convert convolutions to ``NCHW{c}c`` (measured 20-40x faster than NCHW untuned).
    lift_params:
        Lift weight-only computations into ``main_transform_params``.
    """

    blocked_layout: bool = True
    lift_params: bool = True


# --------------------------------------------------------------------------- layouts
def channel_block(channels: int, lanes: int) -> int:
    """The channel block for ``channels`` with ``lanes``-wide float vectors.

    ``lanes`` when it divides ``channels``; all of them when there are fewer (a 3-channel
    stem becomes ``NCHW3c``); otherwise the largest power of two dividing ``channels``.
    (A 24-wide block on AVX-512 was tried: LLVM assembles ``<24 x float>`` vectors
    element by element through the stack, 10-20x slower than 8-wide blocks.)
    """
    if channels % lanes == 0:
        return lanes
    if channels <= lanes:
        return channels
    b = 1
    while channels % (b * 2) == 0 and b * 2 <= lanes:
        b *= 2
    return b


def vector_lanes(info: TargetInfo) -> int:
    """float32 lanes of the target's vectors (16 with AVX-512, 8 with AVX2, 4 with NEON)."""
    return max(4, info.vector_bits // 32)


def _ints(shape) -> list[int]:
    return [int(s) for s in shape]


def _block_map(cb: int):
    """``NCHW`` -> ``NCHW{cb}c``."""
    from tvm import tirx

    return tirx.IndexMap.from_func(lambda n, c, h, w: (n, c // cb, h, w, c % cb))


def _unblock_map(cb: int):
    """``NCHW{cb}c`` -> ``NCHW``."""
    from tvm import tirx

    return tirx.IndexMap.from_func(lambda n, c, h, w, b: (n, c * cb + b, h, w))


def _shape(expr) -> list[int] | None:
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    try:
        return [int(s) for s in shape]
    except (TypeError, ValueError):
        return None  # symbolic or unknown


#: Ops whose layout inference in TVM 0.27 mis-handles blocked layouts (layer_norm maps
#: its axis onto the channel block): models using them keep NCHW.
_NO_BLOCKED_LAYOUT = frozenset({"relax.nn.layer_norm", "relax.nn.group_norm",
                                "relax.nn.instance_norm", "relax.nn.rms_norm"})


def _op_names(mod) -> set[str]:
    from tvm import relax

    names: set[str] = set()

    def visit(e) -> None:
        if isinstance(e, relax.Call) and hasattr(e.op, "name"):
            names.add(e.op.name)

    for _gv, f in mod.functions.items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f.body, visit)
    return names


def blocked_layout_supported(mod) -> bool:
    """Whether ``mod`` has no op that breaks blocked layouts (see ``_NO_BLOCKED_LAYOUT``)."""
    return not (_op_names(mod) & _NO_BLOCKED_LAYOUT)


def _uniform_block(mod, lanes: int) -> int | None:
    """One channel block for the whole model when it concatenates feature maps.

    Relax's layout conversion cannot concatenate maps blocked differently (DenseNet's
    24 + 12 + 12 ... channels), so such models use the largest power of two (up to
    ``lanes``) dividing every convolution's channel counts (a stem's input excepted).
    """
    from tvm import relax

    counts: list[int] = []
    concat = False

    def visit(e) -> None:
        nonlocal concat
        if isinstance(e, relax.Call) and hasattr(e.op, "name"):
            if e.op.name == "relax.concat":
                concat = True
            elif e.op.name == "relax.nn.conv2d":
                data, weight = _shape(e.args[0]), _shape(e.args[1])
                if data and weight:
                    counts.extend(c for c in (data[1], weight[0]) if c >= lanes)

    for _gv, f in mod.functions.items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f.body, visit)
    if not concat or not counts:
        return None
    b = lanes
    while b > 1 and any(c % b for c in counts):
        b //= 2
    return b


def _layout_callback_lanes(lanes: int):
    def cb(call) -> dict[str, list[str]]:
        if call.op.name != "relax.nn.conv2d":
            return {}
        a = call.attrs
        data, weight = _shape(call.args[0]), _shape(call.args[1])
        if (data is None or weight is None or len(data) != 4 or a.data_layout != "NCHW"
                or a.kernel_layout != "OIHW" or a.out_layout != "NCHW"
                or str(a.out_dtype) not in ("float32", "")):
            return {}
        cin, cout, groups = data[1], weight[0], int(a.groups)
        cb_out = channel_block(cout, lanes)
        if groups == 1:
            cb_in = channel_block(cin, lanes)
            return {"relax.nn.conv2d": [f"NCHW{cb_in}c", f"OIHW{cb_in}i{cb_out}o",
                                        f"NCHW{cb_out}c"]}
        if groups == cin == cout:  # depthwise, multiplier 1
            return {"relax.nn.conv2d": [f"NCHW{cb_out}c", f"OIHW1i{cb_out}o", f"NCHW{cb_out}c"]}
        if _group_merge(cin, cout, groups, lanes) == 1:  # no channel block straddles groups
            cb_in = channel_block(cin, lanes)
            return {"relax.nn.conv2d": [f"NCHW{cb_in}c", f"OIHW{cb_in}i{cb_out}o",
                                        f"NCHW{cb_out}c"]}
        # Plain NCHW, said explicitly: left to infer, TVM 0.27 takes the neighbours' blocked
        # layout and fails ("Layouts must have the same size").
        return {"relax.nn.conv2d": ["NCHW", "OIHW", "NCHW"]}

    return cb


# --------------------------------------------------------------------------- legalization
def _blocked(layout: str, base: str) -> int | None:
    """The block of ``NCHW16c``-style layouts (``base`` ``"NCHW"``), None if not blocked."""
    if not layout.startswith(base) or not layout.endswith("c") or layout == base:
        return None
    try:
        return int(layout[len(base):-1])
    except ValueError:
        return None


def _conv_nchwc_te(data, kernel, strides, padding, dilation, depthwise: bool, groups: int = 1):
    from tvm import te, topi

    n, icc, ih, iw, icb = (int(s) for s in data.shape)
    occ, kicc, kh, kw, kicb, ocb = (int(s) for s in kernel.shape)
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(s) for s in dilation)
    pt, pl, pb, pr = (int(s) for s in padding)
    oh = (ih + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (iw + pl + pr - (kw - 1) * dw - 1) // sw + 1
    if pt or pl or pb or pr:
        data = topi.nn.pad(data, (0, 0, pt, pl, 0), (0, 0, pb, pr, 0), name="data_pad")
    rh = te.reduce_axis((0, kh), name="kh")
    rw = te.reduce_axis((0, kw), name="kw")
    if depthwise:
        return te.compute(
            (n, occ, oh, ow, ocb),
            lambda b, c, y, x, cc: te.sum(
                data[b, c, y * sh + rh * dh, x * sw + rw * dw, cc] * kernel[c, 0, rh, rw, 0, cc],
                axis=[rh, rw]),
            name=DWCONV_BLOCK)
    # grouped: output chunk c reads the kicc input chunks of its group, c // (occ / groups)
    rc = te.reduce_axis((0, kicc), name="icc")
    rb = te.reduce_axis((0, icb), name="icb")
    per_group = occ // groups

    def chunk(c):
        return rc if groups == 1 else c // per_group * kicc + rc

    return te.compute(
        (n, occ, oh, ow, ocb),
        lambda b, c, y, x, cc: te.sum(
            data[b, chunk(c), y * sh + rh * dh, x * sw + rw * dw, rb]
            * kernel[c, rc, rh, rw, rb, cc],
            axis=[rc, rh, rw, rb]),
        name=CONV_BLOCK, attrs={STRIDE_ATTR: max(sh, sw)})


def legalize_conv2d(bb, call):
    """Legalize ``relax.nn.conv2d``: blocked layouts through slimfx's compute, else TVM's."""
    from tvm.relax.transform.legalize_ops.nn import _nn_conv2d

    a = call.attrs
    ib, ob = _blocked(a.data_layout, "NCHW"), _blocked(a.out_layout, "NCHW")
    if ib is None and ob is None:
        return _nn_conv2d(bb, call)
    data, weight = _shape(call.args[0]), _shape(call.args[1])
    groups = int(a.groups)
    depthwise = groups != 1
    if (ib is None or ob is None or data is None or weight is None
            or not a.kernel_layout.startswith("OIHW")):
        raise LoweringError(f"relax.nn.conv2d with layouts {a.data_layout}/{a.kernel_layout}/"
                            f"{a.out_layout} has no slimfx legalization")
    depthwise = depthwise and weight[1] == 1 and weight[4] == 1 and groups == data[1] * data[4]
    if groups != 1 and not depthwise and not (weight[0] % groups == 0
                                              and weight[1] * groups == data[1]):
        raise LoweringError(f"grouped relax.nn.conv2d (groups={groups}, data {data}, weight "
                            f"{weight}) in a blocked layout: a channel block straddles groups")
    return bb.call_te(_conv_nchwc_te, call.args[0], call.args[1], a.strides, a.padding,
                      a.dilation, depthwise, 1 if depthwise else groups,
                      primfunc_name_hint="dwconv2d_nchwc" if depthwise else "conv2d_nchwc")


# --------------------------------------------------------------------------- the pipeline
def prepare(mod, info: TargetInfo, options: PrepareOptions | None = None):
    """Relax from :func:`~slimfx.lowering.to_relax` -> fused TIR, ready to schedule or tune.

    The result is deterministic for a given module and target: tuning records are keyed
    on these exact kernels, so tuning and applying both start here.
    """
    import tvm
    from tvm import relax

    opts = options or PrepareOptions()
    t = info.tvm()
    passes = [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
              tvm.ir.transform.module_pass(_fold_pad_into_conv_fn, opt_level=0,
                                           name="SlimfxFoldPadIntoConv")]
    lanes = vector_lanes(info)
    if info.kind == "llvm" and PACK_MATMUL_WEIGHTS:
        passes.append(tvm.ir.transform.module_pass(
            lambda m, _ctx: _pack_matmul_weights_fn(m, lanes), opt_level=0,
            name="SlimfxPackMatmulWeights"))
    if opts.blocked_layout and info.kind == "llvm" and blocked_layout_supported(mod):
        block_lanes = _uniform_block(mod, lanes) or lanes
        passes.append(_make_clip_pass())
        passes.append(tvm.ir.transform.module_pass(
            lambda m, _ctx: _merge_groups_fn(m, block_lanes), opt_level=0,
            name="SlimfxMergeGroups"))
        passes.append(relax.transform.ConvertLayout({}, _layout_callback_lanes(block_lanes)))
        if SUBSAMPLE_STRIDED_POINTWISE:
            passes.append(tvm.ir.transform.module_pass(
                _subsample_strided_pointwise_fn, opt_level=0,
                name="SlimfxSubsampleStridedPointwise"))
        for fn in POST_LAYOUT_PASSES:
            passes.append(tvm.ir.transform.module_pass(
                lambda m, _ctx, fn=fn: fn(m, lanes), opt_level=0, name=fn.__name__))
    elif opts.blocked_layout and info.kind == "llvm":
        passes.append(tvm.ir.transform.module_pass(
            lambda m, _ctx: _block_nchw_convs_fn(_merge_groups_fn(m, lanes), lanes),
            opt_level=0, name="SlimfxBlockNchwConvs"))
    if opts.lift_params:
        passes.append(relax.transform.LiftTransformParams())
        passes.append(_make_untuple_pass())
    passes += [
        relax.transform.LegalizeOps(customize_legalize_map={
            "relax.nn.conv2d": legalize_conv2d,
            **{op: factory(info) for op, factory in LEGALIZATIONS.items()}}),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]
    with t:
        return tvm.ir.transform.Sequential(passes)(mod)


def _clip_to_min_max_fn(mod, _ctx=None):
    """``clip(x, lo, hi)`` -> ``minimum(maximum(x, lo), hi)`` (the same values).

    TVM 0.27's ``relax.clip`` has no layout inference: ``ConvertLayout`` would convert
    every ReLU6 back to NCHW and the next convolution's input to the blocked layout again
    (MobileNetV2: a third of its time in those transforms).  The binary ops follow the
    blocked layout and fuse into the convolution's epilogue.
    """
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    x, lo, hi = wildcard(), wildcard(), wildcard()
    pattern = is_op("relax.clip")(x, lo, hi)

    def rewriter(orig, m):
        dtype = str(getattr(getattr(m[x], "ty", None), "dtype", ""))
        bounds = [m[b] for b in (lo, hi)]
        while any(hasattr(b, "value") for b in bounds):  # PrimValue -> FloatImm -> float
            bounds = [getattr(b, "value", b) for b in bounds]
        if not dtype.startswith("float") or not all(isinstance(b, (int, float)) for b in bounds):
            return orig
        return relax.op.minimum(relax.op.maximum(m[x], relax.const(float(bounds[0]), dtype)),
                                relax.const(float(bounds[1]), dtype))

    mod = mod.clone()
    for gv, f in list(mod.functions.items()):
        if isinstance(f, relax.Function):
            mod[gv] = rewrite_call(pattern, rewriter, f)
    return mod


def _rewrite_functions(mod, rw):
    """The module with every Relax function of ``mod`` passed through the expression
    mutator ``rw`` (its block builder collects the results)."""
    from tvm import relax

    for gv, f in mod.functions.items():
        if isinstance(f, relax.Function):
            rw.builder_.update_func(gv, rw.visit_expr(f))
    return rw.builder_.get()


def _rewrite_convs(mod, rewrite):
    """The module with every ``relax.nn.conv2d`` call passed to ``rewrite(mutator, call)``
    (its arguments already rewritten), which returns the replacement or None to keep it;
    ``mutator.builder_`` emits bindings in front of it."""
    from tvm import relax

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", None) != "relax.nn.conv2d":
                return call
            new = rewrite(self, call)
            return call if new is None else new

    return _rewrite_functions(mod, Rewriter(mod))


#: A grouped convolution whose groups are narrower than the channel block is merged into
#: fewer, block-diagonal groups when that multiplies its MACs by at most this.
MAX_GROUP_MERGE = 4


def _group_merge(cin: int, cout: int, groups: int, lanes: int) -> int:
    """How many neighbouring groups to merge so that channel blocks never straddle one
    (1: none needed; 0: not possible within ``MAX_GROUP_MERGE``)."""
    cb_in, cb_out = channel_block(cin, lanes), channel_block(cout, lanes)
    for k in range(1, min(groups, MAX_GROUP_MERGE) + 1):
        if groups % k == 0 and (k * cout // groups) % cb_out == 0 and (k * cin // groups) % cb_in == 0:
            return k
    return 0


def _fold_pad_into_conv_fn(mod, _ctx=None):
    """``conv2d(pad(x, zeros))`` -> ``conv2d(x)`` with the pad in its own (asymmetric) padding.

    TensorFlow-style "same" padding of strided convolutions (transformers' EfficientNet:
    ``ZeroPad2d((0, 1, 0, 1))`` before each stride-2 depthwise conv) is otherwise a
    separate pass over the feature map in NCHW plus a layout change before the conv
    (EfficientNet-B0: 3.7 ms of a 17.5 ms profile).  The pad itself stays for any other
    user and is dropped when none is left.
    """
    from tvm import relax

    def rewrite(rw, call):
        if call.attrs.data_layout != "NCHW":
            return None
        src = call.args[0]
        pad = rw.lookup_binding(src) if isinstance(src, relax.Var) else None
        if getattr(getattr(pad, "op", None), "name", None) != "relax.nn.pad":
            return None
        pa = pad.attrs
        w = [int(v) for v in pa.pad_width]
        if (pa.pad_mode != "constant" or float(pa.pad_value) != 0.0 or len(w) != 8
                or any(w[:4]) or min(w) < 0):
            return None
        t, left, b, r = (int(v) for v in call.attrs.padding)
        a = call.attrs
        return relax.op.nn.conv2d(pad.args[0], call.args[1], a.strides,
                                  [t + w[4], left + w[6], b + w[5], r + w[7]], a.dilation,
                                  a.groups, a.data_layout, a.kernel_layout, a.out_layout,
                                  a.out_dtype)

    return relax.transform.DeadCodeElimination()(_rewrite_convs(mod, rewrite))


#: Module switch for A/B measurements of :func:`_subsample_strided_pointwise_fn`.
SUBSAMPLE_STRIDED_POINTWISE = True


def _subsample_strided_pointwise_fn(mod, _ctx=None):
    """``conv2d(x, 1x1, stride s)`` -> ``conv2d(x[:, :, ::s, ::s], 1x1, stride 1)`` in the
    blocked layout (``NCHW{c}c``: after ``ConvertLayout``, which leaves a strided slice
    before it in ``NCHW``, between two layout transforms).

    A strided 1x1 convolution (ResNet's downsampling shortcuts) reads one pixel in s x s
    of a map that is often larger than L2 (256 channels at 56x56: 3.2 MB), once per group
    of output channels; the subsampled copy is s^2 times smaller and stays in cache.
    The copy is its own kernel: a strided slice is not fused into the convolution.
    ``bench/conv_tiles.py --ab SUBSAMPLE_STRIDED_POINTWISE`` (7 rounds, copy included):
    ResNet-50's 256 -> 512 at 56x56 1.29x, 512 -> 1024 at 28x28 1.06x, 1024 -> 2048 at
    14x14 1.07x, ResNet-18's 64 -> 128 and 128 -> 256 1.14x and 1.12x; whole ResNet-50
    1.00-1.01x and ResNet-18 0.99-1.00x (the shortcuts are a few percent of the model).
    """
    from tvm import relax

    def rewrite(rw, call):
        a = call.attrs
        shape, weight = _shape(call.args[0]), _shape(call.args[1])
        strides = [int(v) for v in a.strides]
        if (_blocked(a.data_layout, "NCHW") is None or shape is None or weight is None
                or not a.kernel_layout.startswith("OIHW") or weight[2:4] != [1, 1]
                or int(a.groups) != 1 or max(strides) == 1 or any(int(v) for v in a.padding)
                or any(int(v) != 1 for v in a.dilation)):
            return None
        x = rw.builder_.emit(relax.op.strided_slice(
            call.args[0], [2, 3], [0, 0], shape[2:4], strides))
        return relax.op.nn.conv2d(x, call.args[1], [1, 1], a.padding, a.dilation, a.groups,
                                  a.data_layout, a.kernel_layout, a.out_layout, a.out_dtype)

    return _rewrite_convs(mod, rewrite)


PACKED_MATMUL_BLOCK = "matmul_packed"
#: Module switch for A/B measurements of :func:`_pack_matmul_weights_fn`.
PACK_MATMUL_WEIGHTS = True


def _packed_matmul_te(x, wp):
    """``x (..., K) @ W (K, N)`` with ``W`` packed as ``(N / P, K, P)``: the P columns a
    register tile uses are contiguous for every k (row-major ``W`` puts them N floats
    apart: a strided walk through a weight panel bigger than L1)."""
    from tvm import te

    *lead, kdim = x.shape
    nb, _, pw = wp.shape
    rk = te.reduce_axis((0, kdim), name="k")
    return te.compute(
        (*lead, nb * pw),
        lambda *idx: te.sum(x[(*idx[:-1], rk)] * wp[idx[-1] // pw, rk, idx[-1] % pw], axis=rk),
        name=PACKED_MATMUL_BLOCK)


def _pack_matmul_weights_fn(mod, lanes: int):
    """``matmul(x, W)`` with ``W`` a (K, N) weight -> slimfx's matmul on ``W`` packed in
    panels of two vectors of columns, re-laid out once at load time."""
    from tvm import relax, tirx

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def __init__(self, mod, weights):
            super().__init__(mod)
            self.weights = weights

        def is_weight(self, e) -> bool:
            if e in self.weights:
                return True
            b = self.lookup_binding(e) if isinstance(e, relax.Var) else None
            return (getattr(getattr(b, "op", None), "name", None) == "relax.permute_dims"
                    and b.args[0] in self.weights)

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", None) != "relax.matmul":
                return call
            x, w = _shape(call.args[0]), _shape(call.args[1])
            if x is None or w is None or len(w) != 2 or len(x) < 2 or not self.is_weight(call.args[1]):
                return call
            if str(call.args[0].ty.dtype) != "float32" or str(call.args[1].ty.dtype) != "float32":
                return call
            n = w[1]
            pw = 2 * lanes if n % (2 * lanes) == 0 else lanes if n % lanes == 0 else 0
            if not pw:
                return call
            wp = self.builder_.emit(relax.op.layout_transform(
                call.args[1], tirx.IndexMap.from_func(lambda k, j: (j // pw, k, j % pw))))
            return self.builder_.call_te(_packed_matmul_te, call.args[0], wp,
                                         primfunc_name_hint=PACKED_MATMUL_BLOCK)

    weights = set()  # parameters after each function's num_input inputs
    for f in mod.functions.values():
        if isinstance(f, relax.Function):
            n_in = int(f.attrs["num_input"]) if f.attrs and "num_input" in f.attrs else len(f.params)
            weights.update(f.params[n_in:])
    return _rewrite_functions(mod, Rewriter(mod, weights))


def _merge_groups_fn(mod, lanes: int):
    """Grouped convolutions with groups narrower than a channel block (RegNet's width-8
    groups, ResNeXt's width-4 ones) -> fewer groups with block-diagonal weights.

    A vector of output channels must read one group's inputs (the input is broadcast);
    merging ``k`` groups computes ``k`` times the MACs, zeros included, in the blocked
    kernel, where the alternative is TVM's plain NCHW loops and a layout change on each
    side.  The weight expansion is weight-only and moves to load time.
    """
    import numpy as np
    from tvm import relax

    def rewrite(rw, call):
        a = call.attrs
        data, weight = _shape(call.args[0]), _shape(call.args[1])
        groups = int(a.groups)
        if (groups == 1 or data is None or weight is None or a.data_layout != "NCHW"
                or a.kernel_layout != "OIHW" or groups == data[1] == weight[0]):
            return None
        cout, cin_g, kh, kw = weight
        k = _group_merge(data[1], cout, groups, lanes)
        if k <= 1:
            return None
        g2, cout_g = groups // k, cout // groups
        emit = rw.builder_.emit
        w = emit(relax.op.reshape(call.args[1], (g2, k, cout_g, 1, cin_g, kh, kw)))
        eye = np.eye(k, dtype=str(call.args[1].ty.dtype)).reshape(1, k, 1, k, 1, 1, 1)
        w = emit(relax.op.multiply(w, relax.const(eye)))  # (g2, k, cout_g, k, cin_g, kh, kw)
        w = emit(relax.op.reshape(w, (cout, k * cin_g, kh, kw)))
        return relax.op.nn.conv2d(call.args[0], w, a.strides, a.padding, a.dilation, g2,
                                  a.data_layout, a.kernel_layout, a.out_layout, a.out_dtype)

    return _rewrite_convs(mod, rewrite)


#: ``_block_nchw_convs_fn``: depthwise convolutions of models kept in NCHW run channels-last.
NHWC_DEPTHWISE = True


def _block_nchw_convs_fn(mod, lanes: int):
    """Convolutions left in ``NCHW`` -> the blocked convolution between two layout transforms.

    Models whose other ops keep the whole graph in ``NCHW`` (``_NO_BLOCKED_LAYOUT``: ViT's
    patch embedding, ConvNeXt's convolutions next to its layer norms) would otherwise get
    TVM's plain convolution, 20-40x slower than the blocked one; converting the activations
    at each such convolution costs two copies of its input and output.  The weight's
    re-layout is weight-only and moves to load time (``LiftTransformParams``).

    A depthwise convolution whose channels are a whole number of vectors takes all of them
    as one block: ``NCHW{C}c`` is ``NHWC``, so its output is given back as a permutation
    that the next element-wise kernels (ConvNeXt: the bias, the permute to channels-last for
    the layer norm) fuse with, where a blocked output needed a layout transform first.
    """
    from tvm import relax

    choose = _layout_callback_lanes(lanes)

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def depthwise_nhwc(self, call):
            a, emit = call.attrs, self.builder_.emit
            n, c, h, w = _shape(call.args[0])
            z = emit(relax.op.permute_dims(call.args[0], [0, 2, 3, 1]))
            xb = emit(relax.op.reshape(z, [n, 1, h, w, c]))
            wb = emit(relax.op.layout_transform(
                call.args[1], lambda o, i, kh, kw: (o // c, i, kh, kw, i, o % c)))
            y = emit(relax.op.nn.conv2d(xb, wb, a.strides, a.padding, a.dilation, a.groups,
                                        f"NCHW{c}c", f"OIHW1i{c}o", f"NCHW{c}c", a.out_dtype))
            _, _, oh, ow, _ = _shape(y)
            return relax.op.permute_dims(emit(relax.op.reshape(y, [n, oh, ow, c])), [0, 3, 1, 2])

        def visit_call_(self, call):
            call = super().visit_call_(call)
            layouts = choose(call).get("relax.nn.conv2d") if hasattr(call.op, "name") else None
            if not layouts:
                return call
            data_l, kernel_l, out_l = layouts
            bi, bo = _blocked(data_l, "NCHW"), _blocked(out_l, "NCHW")
            if bi is None or bo is None:
                return call  # a grouped convolution that stays NCHW
            channels = _shape(call.args[0])[1]
            if kernel_l.startswith("OIHW1i") and channels > lanes and channels % lanes == 0 \
                    and NHWC_DEPTHWISE:
                return self.depthwise_nhwc(call)
            a = call.attrs
            emit = self.builder_.emit
            xb = emit(relax.op.layout_transform(call.args[0], _block_map(bi)))
            if kernel_l.startswith("OIHW1i"):  # depthwise: (C, 1, kh, kw) -> (C/b, 1, kh, kw, 1, b)
                wmap = lambda o, i, h, w: (o // bo, i, h, w, i, o % bo)  # noqa: E731
            else:
                wmap = lambda o, i, h, w: (o // bo, i // bi, h, w, i % bi, o % bo)  # noqa: E731
            wb = emit(relax.op.layout_transform(call.args[1], wmap))
            y = emit(relax.op.nn.conv2d(xb, wb, a.strides, a.padding, a.dilation, a.groups,
                                        data_l, kernel_l, out_l, a.out_dtype))
            return relax.op.layout_transform(y, _unblock_map(bo))

    return _rewrite_functions(mod, Rewriter(mod))


def _make_clip_pass():
    import tvm

    return tvm.ir.transform.module_pass(_clip_to_min_max_fn, opt_level=0,
                                        name="SlimfxClipToMinMax")


def _untuple_transform_params_fn(mod, _ctx=None):
    """``main_transform_params(params: Tuple)`` -> ``main_transform_params(p0, p1, ...)``.

    TVM's RPC cannot pass a tuple argument; separate tensors work locally and remotely.
    """
    from tvm import relax

    name = "main_transform_params"
    if name not in [gv.name_hint for gv in mod.functions]:
        return mod
    inner = mod[name]
    if len(inner.params) != 1 or not hasattr(inner.params[0].ty, "fields"):
        return mod
    fields = list(inner.params[0].ty.fields)
    mod = mod.clone()
    del mod[name]
    bb = relax.BlockBuilder(mod)
    inner_gv = bb.add_func(inner.without_attr("global_symbol"), f"{name}_tuple")
    params = [relax.Var(f"param{i}", ty) for i, ty in enumerate(fields)]
    with bb.function(name, params, attrs={"num_input": 0}):
        out = bb.emit(relax.Call(inner_gv, [relax.Tuple(params)]))
        bb.emit_func_output(out)
    return bb.get()


def _make_untuple_pass():
    import tvm

    return tvm.ir.transform.module_pass(_untuple_transform_params_fn, opt_level=0,
                                        name="SlimfxUntupleTransformParams")


def lower_passes(info: TargetInfo):
    """The Relax passes after scheduling (dataflow lowering, memory planning, VM lowering)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from .workspace import persistent_workspace

    t = info.tvm()
    final = cpu.finalize_passes(t)
    # planned intermediates allocated once at load time (workspace.py): right after the plan
    plan = [i for i, p in enumerate(final) if p.info.name == "StaticPlanBlockMemory"]
    if plan:
        final.insert(plan[0] + 1, persistent_workspace())
    return cpu.dataflow_lower_passes(t) + final


# --------------------------------------------------------------------------- schedules
def _extent(sch, loop) -> int | None:
    try:
        return int(sch.get(loop).extent)
    except (TypeError, ValueError):
        return None


def _largest_divisor(n: int, limit: int) -> int:
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


def _vector_split(sch, loop, lanes: int):
    """Split ``loop`` into (outer, vector) with the vector as wide as ``lanes`` allows;
    the outer loop is None when the vector is the whole loop."""
    ext = _extent(sch, loop)
    vec = lanes if ext % lanes == 0 else _largest_divisor(ext, lanes)
    if vec == ext:
        return None, loop
    return sch.split(loop, [None, vec])


def _blocks(sch):
    return sch.get_child_blocks(sch.get_sblock("root", func_name="main"))


def _block_name(sch, block) -> str:
    return sch.get(block).name_hint


def _iter_kinds(sch, block) -> list[str]:
    return ["R" if int(iv.iter_type) == 2 else "S" for iv in sch.get(block).iter_vars]


#: A block whose body's TVMScript is longer than this many characters (a polynomial ``exp`` or
#: ``erf``, or a chain already inlined into it) is not inlined into a consumer that reads
#: it more than once: each read would copy the whole expression, and a chain of such
#: functions grew exponentially (four sigmoids in one kernel: a 276 s build; five: out of
#: memory).  It is computed once into its own buffer instead.
INLINE_COPY_LIMIT = 1500


def _copies_large(sch, producer, consumers) -> str | None:
    """The name of the first of ``consumers`` into which inlining ``producer`` (either
    way) would copy a large expression: the producer's body is long and that consumer
    reads it more than once.  None if there is none."""
    stmt = sch.get(producer)
    if len(stmt.body.script()) <= INLINE_COPY_LIMIT:
        return None
    read = re.compile(rf"(?<![\w.]){re.escape(stmt.writes[0].source.name)}\[")
    for c in consumers:
        if len(read.findall(sch.get(c).body.script())) > 1:
            return sch.get(c).name_hint
    return None


def _inline(sch, block) -> None:
    """``compute_inline(block)``, unless that would copy a large expression into a
    consumer several times (raises ``ValueError`` then, as an illegal inline raises)."""
    reader = _copies_large(sch, block, sch.get_consumers(block))
    if reader is not None:
        raise ValueError(f"{sch.get(block).name_hint} is read more than once by {reader}: "
                         "not inlined")
    sch.compute_inline(block)


def _inline_producers_and_consumers(sch, anchor) -> None:
    """Inline everything but the anchor where it is legal (pads stay: they are cheap)."""
    changed = True
    while changed:
        changed = False
        for b in _blocks(sch):
            if sch.get(b).same_as(sch.get(anchor)) or _block_name(sch, b).startswith("data_pad"):
                continue
            if "R" in _iter_kinds(sch, b):
                continue
            try:
                _inline(sch, b)
                changed = True
                break
            except Exception:  # noqa: BLE001, S110  (not inlinable: left for the epilogue)
                pass


def _schedule_pad(sch) -> None:
    for b in _blocks(sch):
        if _block_name(sch, b).startswith("data_pad"):
            _schedule_elementwise(sch, b)


def _vector_ok(extent: int | None, lanes: int) -> bool:
    return extent is not None and 2 <= extent <= 4 * lanes


def _schedule_elementwise(sch, block, lanes: int = 16) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    ext = _extent(sch, inner)
    if len(loops) > 1 and _vector_ok(ext, lanes):
        outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        sch.parallel(outer)
        sch.vectorize(inner)
    elif ext is not None and ext > 4 * lanes and ext % lanes == 0:
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        o, i = sch.split(fused, [None, lanes])
        sch.parallel(o)
        sch.vectorize(i)
    else:
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        sch.parallel(fused)


def _tile_epilogue(sch, write_back, at_loop, lanes: int) -> None:
    """Fuse the blocks consuming the register tile into its write-back where legal, else
    compute them at the tile (``at_loop``), else leave them at the root, parallel."""
    pending = list(sch.get_consumers(write_back))
    while pending:
        b = pending.pop(0)
        after = list(sch.get_consumers(b))
        try:
            if any(_copies_large(sch, p, [b]) for p in sch.get_producers(b)):
                raise ValueError("a large expression read more than once: computed once")
            sch.reverse_compute_inline(b)
            pending = list(sch.get_consumers(write_back))
            continue
        except Exception:  # noqa: BLE001
            pass
        try:
            sch.reverse_compute_at(b, at_loop)
            loops = sch.get_loops(b)
            if loops and _vector_ok(_extent(sch, loops[-1]), lanes):
                sch.vectorize(loops[-1])
        except Exception:  # noqa: BLE001
            _schedule_elementwise(sch, b, lanes)
        pending.extend(a for a in after if a not in pending)


#: Weight-streaming kernels prefetch the next parallel task's weights into L2 while they
#: compute the current task (:func:`prefetch_next_task`), where those weights, over all
#: tasks, are at least :data:`PREFETCH_MIN_BYTES`: inside a model they come from memory.
PREFETCH_NEXT_TASK = True
PREFETCH_MIN_BYTES = 1 << 20
#: Cache lines prefetched at one point: at least the first (fewer, coarser points: each
#: costs its address arithmetic), at most the second (the reduction loop is split by
#: :data:`PREFETCH_STEP` for finer points, else the kernel is left alone).
PREFETCH_LINES = (4, 32)
PREFETCH_STEP = 8
_LINE_BYTES = 64


def prefetch_next_task(sch, task_loop, loops: list, reduction, buffer, span: int,
                       share: int = 1, min_bytes: int | None = None) -> bool:
    """Prefetch (into L2) the weights the next tasks of the parallel ``task_loop`` read while
    the current ones run.  Task ``f`` reads weight block ``f // share`` of ``buffer``: the
    ``span`` contiguous elements from flat offset ``(f // share) * span`` (a packed panel, a
    convolution's output-channel chunks), the same block for ``share`` consecutive tasks
    (the rows of a convolution).  TVM's parallel loop gives each thread a contiguous range of
    tasks, so block ``f // share + 1`` is usually the one this thread reads next.

    Its lines are spread evenly over the ``share`` tasks and, in each, over the iterations
    of the deepest of ``loops`` (the loops between ``task_loop`` and ``reduction``,
    outermost first) whose points get at least ``PREFETCH_LINES[0]`` lines (one loop deeper
    where those would get more than ``PREFETCH_LINES[1]``), or of ``reduction`` split by
    :data:`PREFETCH_STEP` where even the deepest loop's points would: a few lines at each
    point, so the memory traffic overlaps the arithmetic instead of stalling the first pass
    over a block.  ``min_bytes`` replaces :data:`PREFETCH_MIN_BYTES` (the weights below it
    are left alone).  The prefetches are the last change to the schedule
    (``ScheduleState.replace``, not in its trace: a kernel made serial by replaying the
    trace runs without them); LLVM keeps register tiles in registers through the inner,
    prefetch-free loops (a prefetch inside the register tile's loop made it store its
    accumulators every iteration, 2x slower).  Returns whether it applied.
    """
    import tvm

    if not PREFETCH_NEXT_TASK:
        return False
    shape = _ints(buffer.shape)
    elem = tvm.DataType(str(buffer.dtype)).bits // 8
    numel, tasks = math.prod(shape), _extent(sch, task_loop)
    extents = [_extent(sch, lp) for lp in loops]
    least = PREFETCH_MIN_BYTES if min_bytes is None else min_bytes
    if not tasks or tasks < 2 or numel * elem < least or numel % span \
            or any(e is None for e in extents):
        return False
    lines = -(-span * elem // _LINE_BYTES)
    depth, slots = 0, share  # prefetch points: in the body of loops[depth - 1]
    while depth < len(loops) and -(-lines // (slots * extents[depth])) >= PREFETCH_LINES[0]:
        slots *= extents[depth]
        depth += 1
    if -(-lines // slots) > PREFETCH_LINES[1] and depth < len(loops):
        slots *= extents[depth]  # the next loop's points, though they get fewer lines
        depth += 1
    outer = loops[:depth]
    if -(-lines // slots) > PREFETCH_LINES[1]:
        k = _extent(sch, reduction)
        step = _largest_divisor(k, PREFETCH_STEP) if k else 0
        if step < PREFETCH_STEP // 2:
            return False
        ko, _ = sch.split(reduction, [None, step])
        outer = [*loops, ko]
        slots *= k // step
    per = -(-lines // slots)
    if per > PREFETCH_LINES[1] or not outer:
        return False
    task = sch.get(task_loop).loop_var
    slot = task % share if share > 1 else 0
    for lp in outer:
        slot = slot * _extent(sch, lp) + sch.get(lp).loop_var
    nxt = (task // share + 1) % (numel // span)
    line_elems = _LINE_BYTES // elem
    prefetch_lines(sch, outer[-1], buffer, lambda t: nxt * span + tvm.te.min(
        slot * per + t, lines - 1) * line_elems, per)
    return True


def prefetch_lines(sch, loop, buffer, first, count: int, flat: bool = False) -> None:
    """Prefetch (into L2) ``count`` cache lines of ``buffer`` at the start of ``loop``'s
    body: line ``t`` is the one holding flat element ``first(t)`` (an expression of the
    loop variables, within the buffer).  ``flat``: address them through a flat view of the
    buffer (one add per line) instead of its indices (a division per dimension and line,
    which :func:`prefetch_next_task`'s kernels were measured with).  The last change to a
    schedule (it replaces the loop's statement, outside the schedule's trace)."""
    from tvm import tirx
    from tvm.tirx import stmt as ts

    shape = _ints(buffer.shape)
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    view = tirx.decl_buffer((math.prod(shape),), buffer.dtype, f"{buffer.name}_flat",
                            data=buffer.data) if flat else None
    body = [ts.DeclBuffer(view, data=buffer.data)] if flat else []
    for t in range(count):
        at = first(t)
        if flat:
            load = tirx.BufferLoad(view, [at])
        else:
            load = tirx.BufferLoad(buffer, [(at // s) % n if d else at // s
                                            for d, (s, n) in enumerate(zip(strides, shape))])
        body.append(ts.Evaluate(tirx.call_llvm_intrin(  # read, into L2 (locality 2), data
            "void", "llvm.prefetch.p0", tirx.address_of(load), tirx.const(0, "int32"),
            tirx.const(2, "int32"), tirx.const(1, "int32"))))
    node = sch.get(loop)
    new = ts.For(node.loop_var, node.min, node.extent, node.kind, ts.SeqStmt([*body, node.body]),
                 node.thread_binding, node.annotations)
    sch.state.replace(sch.get_sref(loop), new)


def _decompose(sch, block, loop) -> None:
    """Split the reduction's init out at ``loop`` (its loops keep the body's kinds)."""
    return sch.decompose_reduction(block, loop)


#: Storage scope of register tiles (accumulators).  "local" buffers are allocated with
#: ``TVMBackendAllocWorkspace`` (and zeroed with ``memset``) once per tile on CPU, where a
#: small "global" one is a stack array that LLVM promotes to registers.
_ACC_SCOPE = "global"


def _max_reg(lanes: int) -> int:
    return 14 if lanes >= 16 else 8 if lanes >= 8 else 12


#: Convolutions whose reduction is long next to their output channels take 4 pixels x 4
#: channel vectors tiles where the row and channels divide (see :func:`_conv_tile`).
SQUARE_TILES = True
#: 1x1 convolutions with an odd number of channel chunks take several chunks per tile.
ODD_CHUNK_TILES = True
#: Convolutions on short rows (at most :data:`SHORT_ROW` pixels) with an odd number of
#: channel chunks take several chunks per tile (see :func:`_conv_tile`).
SHORT_ROW_TILES = True
SHORT_ROW = 7


def _conv_tile(ow: int, occ: int, lanes: int, long_reduction: bool = False,
               pointwise: bool = False, strided: bool = False,
               depthwise: bool = False) -> tuple[int, int]:
    """(pixels, channel chunks) of a convolution's register tile.

    About ``_max_reg`` accumulators: up to 7 pixels x two vectors of output channels, so
    each broadcast input feeds two FMAs (one load per two FMAs instead of one per FMA);
    a row of up to 14 pixels x one vector where the channel chunks are odd or the row
    has no divisor of at least 4 pixels that fits.  Measured per kernel against 14 x 1
    on AVX-512 (``bench/conv_tiles.py``, one run): 1x1 convolutions 1.1-1.5x faster;
    3x3 0.98-1.01x, but 0.85x on 256 channels at 14x14; whole models resnet50 1.24x,
    resnet18 1.11x, mobilenet_v2 1.22x, densenet 0.96x.

    With 32 vector registers, a ``long_reduction`` (input values per output at least twice
    the output channels: the reducing 1x1 convolutions, 3x3 layers) on a row divisible by
    4 takes 4 pixels x 4 vectors (3 where the channels come in 3 chunks): a broadcast feeds
    four FMAs and the input map is read once per 4 channel vectors instead of once per 2 --
    these layers' inputs outgrow L2 (256 channels at 56x56 is 3.2 MB).  Measured against
    7 x 2 (``bench/conv_tiles.py --ab SQUARE_TILES``, 5 rounds): 256 -> 64 at 56x56 1.33x,
    512 -> 128 at 28x28 1.23x, MobileNetV2's 144 -> 24 at 56x56 1.70x and 384 -> 64 at
    28x28 1.63x, 3x3 layers 1.02-1.09x.  An expanding 1x1 layer loses (64 -> 256 at 56x56:
    0.88x with 4 x 4, ``bench/conv_tiles.py --tiles 4x4``) and keeps 7 x 2.

    A ``pointwise`` (1x1) convolution whose channel chunks are odd (80 channels: 5 chunks;
    MobileNetV2's 144: 9 chunks of 16) takes 2-4 pixels x 3-7 chunks instead of a row x
    one vector: ``bench/conv_tiles.py --ab ODD_CHUNK_TILES`` (5 rounds) 80 -> 80 at 28x28
    1.33x, 24 -> 144 at 56x56 1.24x, 240 -> 80 and 80 -> 240 at 14x14 1.09-1.12x; whole
    EfficientNet-B0 1.02-1.03x, RegNetY-400MF 1.04-1.05x, MobileNetV2 1.00-1.02x.  3x3 layers
    keep the row: in a comparison outside the bench they ran slower with such tiles.

    A convolution on a short row (at most :data:`SHORT_ROW` pixels: the 7x7 and 4x4 maps of
    late stages) with an odd number of channel chunks -- the widths channel pruning leaves
    at ``round_to=16``: 48, 80, 112 channels -- takes the row (or part of it) x 3-7 vectors,
    at most 21 accumulators, instead of the row x one vector, which loads a weight vector
    for every 4-7 FMAs.  ``bench/conv_tiles.py --ab SHORT_ROW_TILES --layers ...`` (7
    rounds): 3x3 layers 80ch at 4x4 1.37x, 112ch 1.15x, 48ch at 7x7 1.24x, 144ch 1.24x,
    240ch 1.12x.  Strided convolutions keep the row (4 x 5 at stride 2: 0.83-0.87x), and
    so do depthwise ones, which take one vector per tile anyway.
    """
    limit = _max_reg(lanes)
    if SQUARE_TILES and long_reduction and lanes >= 16 and ow % 4 == 0 and occ >= 3:
        chunks = _largest_divisor(occ, 4)
        if chunks >= 3:
            return 4, chunks
    if occ % 2 == 0:
        r2 = _largest_divisor(ow, limit // 2)
        if r2 >= min(4, ow):
            return r2, 2
    elif ODD_CHUNK_TILES and pointwise and lanes >= 16:
        chunks = max((d for d in range(3, 8) if occ % d == 0), default=0)
        pixels = _largest_divisor(ow, limit // chunks) if chunks else 1
        if pixels >= 2:
            return pixels, chunks
    row = _largest_divisor(ow, limit)
    if (SHORT_ROW_TILES and lanes >= 16 and occ % 2 and 2 <= row <= SHORT_ROW
            and not strided and not depthwise):
        tiles = [(p * d, p, d) for d in range(3, 8, 2) if occ % d == 0
                 for p in [_largest_divisor(ow, 3 * limit // 2 // d)] if p >= 2]
        if tiles:
            _, pixels, chunks = max(tiles)
            return pixels, chunks
    return row, 1


def conv_tile_plan(occ: int, ow: int, ocb: int, icc: int, kh: int, kw: int, icb: int,
                   lanes: int, stride: int = 1) -> tuple[int, int]:
    """The register tile (pixels, channel chunks) of a dense blocked convolution with these
    extents (``occ`` output chunks of ``ocb``, ``icc`` input chunks of ``icb``, a ``kh`` x
    ``kw`` kernel, ``ow`` output pixels a row): :func:`_conv_tile` with its reduction
    counted as long where it reads at least twice as many inputs as it has outputs."""
    return _conv_tile(ow, occ, lanes, icc * kh * kw * icb >= 2 * occ * ocb, kh * kw == 1,
                      stride > 1)


def _inline_pad(sch) -> None:
    """Inline the ``data_pad`` stage into its consumer (loads guarded by the border test).

    For depthwise convolutions the separate pad pass costs more than the convolution: it
    copies the whole (often large, early) feature map once more; inlined, the guard is
    uniform across the vectorized channel block and the loads stay contiguous vectors.
    Dense convolutions with many input channels are slower with the guard (1.1-1.8x
    measured on ResNet 3x3 layers): they keep the separate pad.
    """
    for b in _blocks(sch):
        if _block_name(sch, b).startswith("data_pad"):
            sch.compute_inline(b)


#: Stride-1 convolutions with many input channels on short rows (at most
#: :data:`SHORT_ROW` pixels) read a padded copy where each copied value feeds at least this
#: many multiply-adds (output channels x kernel x the map's share of the padded map), the
#: border test below it (see :func:`_pad_inline`); 0: always the copy.
PAD_COPY_MIN_WORK = 256
#: Strided convolutions with many input channels read through the border test too (see
#: :func:`_pad_inline`).
STRIDED_PAD_INLINE = True


def _conv_stride(sch, block) -> int:
    """The (larger) stride of slimfx's blocked convolution ``block`` (1 for others)."""
    return int(sch.get(block).annotations.get(STRIDE_ATTR, 1))


def _pad_inline(sch, block, loops, depthwise: bool) -> bool:
    """Whether the convolution reads its input through the border test (the pad inlined)
    rather than from a zero-padded copy.

    Depthwise convolutions and convolutions with few input channels (stems) read few
    values per output, so the copy costs about as much as the work -- unless each padded
    input value feeds many multiply-adds: k x k / stride^2 of at least 9 on a map of 56
    or more (ResNet's 7x7 / 2 stem at 224: 1.7x faster from the copy; VGG's 3x3 / 1 stem
    at 224 1.5x; at 112 1.2-1.5x).  3x3 / 2 stems (MobileNetV2) and maps under 56 (the
    digit classifiers' stems) keep the guard: 1.3-1.5x faster with it.

    Convolutions with many input channels keep the copy at stride 1; at stride 2 the copy
    costs 4x more per multiply-add and the guard wins (``bench/conv_tiles.py --ab
    STRIDED_PAD_INLINE``: ResNet's 3x3 / 2 layers 128ch at 56 1.14x, 256ch at 28 1.06x,
    512ch at 14 1.08x; whole ResNet-18 and ResNet-50 1.00-1.01x).  The stride is the
    convolution's own (:data:`STRIDE_ATTR`); guessed from the padded width over the output
    width, it took stride-1 layers on maps of 4 pixels or fewer (and 5x5 kernels on 8x8)
    for strided ones.

    On short rows the padded map is much larger than the map (4x4 -> 6x6: 2.25x), and a
    stride-1 layer whose copied values feed fewer than :data:`PAD_COPY_MIN_WORK`
    multiply-adds reads through the border test instead (``bench/conv_tiles.py --ab
    PAD_COPY_MIN_WORK=0``, 7 rounds: 16, 32, 48 channels at 4x4 1.44x, 1.06x, 1.18x, 64 at
    3x3 1.30x, DenseNet's 128 -> 32 at 7x7 1.22x; 64 at 4x4 keeps the copy; whole DenseNet
    1.02-1.08x).  On longer rows the copy stays: 128 -> 32 at 28x28 ran 0.42x through the
    border test.
    """
    if depthwise:
        return True
    kh, kw = _extent(sch, loops[6]) or 1, _extent(sch, loops[7]) or 1
    stride = _conv_stride(sch, block)
    if (_extent(sch, loops[5]) or 16) * (_extent(sch, loops[8]) or 16) > 4:
        # many input channels: measured 1.1-1.8x faster with the copy at stride 1
        if stride > 1:
            return STRIDED_PAD_INLINE
        oh, ow = _extent(sch, loops[2]) or 1, _extent(sch, loops[3]) or 1
        cout = (_extent(sch, loops[1]) or 1) * (_extent(sch, loops[4]) or 1)
        work = cout * kh * kw * oh * ow / ((oh + kh - 1) * (ow + kw - 1))
        return ow <= SHORT_ROW and work < PAD_COPY_MIN_WORK
    widths = [int(r.source.shape[3]) for b in _blocks(sch)
              if _block_name(sch, b).startswith("data_pad") for r in sch.get(b).reads
              if len(r.source.shape) == 5]
    if not widths:
        return True
    return kh * kw / stride**2 < 9 or widths[0] < 56


def _schedule_conv(sch, block, lanes: int, depthwise: bool, threads: int = 1) -> None:
    loops = sch.get_loops(block)
    if _pad_inline(sch, block, loops, depthwise):
        _inline_pad(sch)
    _inline_producers_and_consumers(sch, block)
    loops = sch.get_loops(block)
    if depthwise:
        n, occ, oh, ow, ocb, kh, kw = loops
        reg, oct = _conv_tile(_extent(sch, ow), _extent(sch, occ), lanes, depthwise=True)[0], 1
    else:
        n, occ, oh, ow, ocb, icc, kh, kw, icb = loops
        rest = [_extent(sch, lp) or 1 for lp in (ocb, icc, kh, kw, icb)]
        reg, oct = conv_tile_plan(_extent(sch, occ), _extent(sch, ow), *rest, lanes,
                                  _conv_stride(sch, block))
        plan = _blocked_reduction(sch, loops, reg, oct)
        if plan is not None:
            _schedule_conv_blocked_reduction(sch, block, lanes, reg, oct, plan)
            return
    parts = 1 if depthwise else _row_parts(sch, block, loops, threads)
    owo, owi = sch.split(ow, [None, reg])
    occ_o, occ_i = sch.split(occ, [None, oct])
    blocks = _extent(sch, occ_o)
    # Channel chunks outside rows: rows outside (so an input row stays in cache while
    # every chunk uses it) measured 1.2-1.9x slower on MobileNet's 1x1 convolutions.
    outer = [n, occ_o, oh]
    if parts > 1:
        oh_t, oh = sch.split(oh, [parts, None])
        outer = [n, oh_t, occ_o, oh]
    rows = _extent(sch, oh)
    if depthwise and (_extent(sch, ocb) or 0) > lanes:  # a whole-channel (NHWC) block:
        ocb_o, ocb = sch.split(ocb, [None, lanes])  # one vector at a time, chunks outside
        outer = [n, occ_o, ocb_o, oh]
    if depthwise:
        sch.reorder(*outer, owo, kh, kw, occ_i, owi, ocb)
        first_r = kh
    else:
        sch.reorder(*outer, owo, icc, kh, kw, icb, occ_i, owi, ocb)
        first_r = icc
    acc = sch.cache_write(block, 0, _ACC_SCOPE)
    sch.reverse_compute_at(acc, owo)
    _tile_epilogue(sch, acc, owo, lanes)
    sch.parallel(sch.fuse(*outer))
    _finish_conv_tile(sch, block, acc, first_r)
    sch.unroll(sch.get_loops(acc)[-2])  # the tile's pixels, written back
    _schedule_pad(sch)
    if not depthwise:  # a task is one row of ``oct`` output chunks
        _prefetch_conv_weights(sch, block, blocks, rows)


#: A dense convolution with fewer weights than input values gives each of the target's
#: cores a band of output rows (all channels), not a range of output channels (all rows).
#: The layers before and after it split their maps by rows too, so each core reads the
#: rows it wrote, from its own cache; the price, each core reading all of the (small)
#: weights.  ``bench/conv_tiles.py --ab ROW_PARTITION``.
ROW_PARTITION = True


def _row_parts(sch, block, loops, threads: int) -> int:
    """Row bands (one per core) of a dense convolution's parallel tasks, or 1 (none)."""
    n, occ, oh, ow, ocb, icc, kh, kw, icb = (_extent(sch, lp) or 1 for lp in loops)
    if not ROW_PARTITION or threads < 2 or oh % threads:
        return 1
    weights = occ * icc * kh * kw * icb * ocb
    inputs = icc * icb * oh * ow * _conv_stride(sch, block) ** 2
    return threads if weights < inputs else 1


def _prefetch_conv_weights(sch, block, blocks: int, rows: int) -> None:
    """:func:`prefetch_next_task` for a scheduled dense convolution whose parallel tasks
    are (batch, ``blocks`` groups of output chunks, ``rows`` row groups): the tasks of a
    group read its chunks' weights, one contiguous block, the next group's follow.  The
    prefetch points are in the loops between the task and its input-channel vector loop."""
    loops = sch.get_loops(block)  # task, ..., icb, then the register tile (3 loops)
    weights = [r.source for r in sch.get(block).reads if len(r.source.shape) == 6]
    if len(weights) == 1:
        span = math.prod(_ints(weights[0].shape)) // blocks
        prefetch_next_task(sch, loops[0], loops[1:-4], loops[-4], weights[0], span, rows)


def _finish_conv_tile(sch, block, acc, first_reduction) -> None:
    """The register tile innermost: output channels a vector, its pixels and channel
    vectors unrolled; the reduction's init split out at ``first_reduction``; the write-back
    of the accumulators vectorized."""
    lp = sch.get_loops(block)
    sch.vectorize(lp[-1])
    sch.unroll(lp[-2])
    sch.unroll(lp[-3])
    _decompose(sch, block, first_reduction)
    sch.vectorize(sch.get_loops(acc)[-1])


#: Convolutions whose register tile reads more weights than this (bytes: its output
#: channel chunks x every input channel x kernel) block the reduction: see
#: :func:`_schedule_conv_blocked_reduction`.  0 turns it off.
BLOCK_REDUCTION_ABOVE = 64 << 10
#: Weight bytes of one reduction block (held in L1 while the task's tiles use it), and the
#: register tiles a task covers.
REDUCTION_BLOCK_BYTES = 32 << 10
TILES_PER_TASK = 16
#: A blocked reduction needs at least this many tasks; with fewer (small maps, wide
#: tiles) the plain schedule keeps both cores busy (80 -> 80 3x3 at 4x4 with a 4 x 5 tile:
#: 1.00x against the one-vector row with one blocked task, 1.29-1.37x with the plain one).
MIN_BLOCKED_TASKS = 4


def blocked_reduction_plan(occ: int, oh: int, ow: int, ocb: int, icc: int, kh: int, kw: int,
                           icb: int, reg: int, oct: int) -> tuple[int, int] | None:
    """(input chunks per reduction block, rows per task) where a blocked convolution of
    these extents (``occ`` output chunks of ``ocb``, ``icc`` input chunks of ``icb``) with a
    ``reg`` pixels x ``oct`` chunks register tile blocks its reduction; None where not."""
    if not BLOCK_REDUCTION_ABOVE:
        return None
    per_chunk = kh * kw * icb * oct * ocb * 4  # weight bytes per input chunk
    if per_chunk * icc <= BLOCK_REDUCTION_ABOVE:
        return None
    icc_i = _largest_divisor(icc, max(1, REDUCTION_BLOCK_BYTES // per_chunk))
    rows = _largest_divisor(oh, max(1, -(-TILES_PER_TASK // max(ow // reg, 1))))
    if occ // oct * (oh // rows) < MIN_BLOCKED_TASKS:
        return None  # a small map: too few tasks to keep every core busy
    return icc_i, rows


def _blocked_reduction(sch, loops, reg: int, oct: int) -> tuple[int, int] | None:
    ext = [_extent(sch, lp) for lp in loops[1:]]  # occ, oh, ow, ocb, icc, kh, kw, icb
    if any(e is None for e in ext):
        return None
    return blocked_reduction_plan(*ext, reg, oct)


def _schedule_conv_blocked_reduction(sch, block, lanes: int, reg: int, oct: int,
                                     plan: tuple[int, int]) -> None:
    """A convolution whose tile reads more weights than L1 holds (ResNet-50's 1024 -> 256
    and 2048 -> 512 1x1 layers, 512-channel 3x3 layers): the plain schedule streams every
    weight from L2 once per register tile.  Here a task covers about :data:`TILES_PER_TASK`
    tiles (several rows on small maps) and walks the input channels in blocks of
    :data:`REDUCTION_BLOCK_BYTES` of weights, every tile of the task accumulating one block
    while it is in L1; the accumulators go to a per-task buffer between blocks.
    ``bench/conv_tiles.py --blocked-reduction``: 1x1 1024 -> 256 at 14x14 1.20x, 2048 ->
    512 at 7x7 1.12x, ResNet's 3x3 layers 1.03-1.10x; whole ResNet-50, ResNet-18 and
    VGG-11 1.03-1.05x (with Winograd in the pipeline: 1.00-1.04x).  A layer whose tile reads
    little (256 -> 1024 at 14x14, 32 KiB) ran 0.93x this way in a scratch A/B: hence the
    threshold.
    """
    icc_i, rows = plan  # blocked_reduction_plan's
    n, occ, oh, ow, ocb, icc, kh, kw, icb = sch.get_loops(block)
    owo, owi = sch.split(ow, [None, reg])
    occ_o, occ_i = sch.split(occ, [None, oct])
    oh_o, oh_i = sch.split(oh, [None, rows])
    icc_o, icc_in = sch.split(icc, [None, icc_i])
    blocks, row_groups = _extent(sch, occ_o), _extent(sch, oh_o)
    sch.reorder(n, occ_o, oh_o, icc_o, oh_i, owo, icc_in, kh, kw, icb, occ_i, owi, ocb)
    acc = sch.cache_write(block, 0, _ACC_SCOPE)
    par = sch.fuse(n, occ_o, oh_o)
    sch.reverse_compute_at(acc, par)  # the task's accumulators, written back after all blocks
    _tile_epilogue(sch, acc, par, lanes)
    sch.parallel(par)
    _finish_conv_tile(sch, block, acc, icc_o)
    _schedule_pad(sch)
    _prefetch_conv_weights(sch, block, blocks, row_groups)


def _shared_weight(sch, block) -> bool:
    """Whether a batched matmul block multiplies every batch by one 2-D matrix."""
    if _block_name(sch, block).startswith(PACKED_MATMUL_BLOCK):
        return True
    reads = sch.get(block).reads
    return len(reads) == 2 and any(len(r.source.shape) == 2 for r in reads) \
        and any(len(r.source.shape) > 2 for r in reads)


#: Row counts with no divisor of at least 4 (ViT's 197 tokens) get 4-row tiles, the last
#: one partial (``bench/matmul_rows.py`` compares with the divisor-sized tiles).
RAGGED_ROWS = True


def _schedule_matmul(sch, block, lanes: int) -> bool:
    kinds = _iter_kinds(sch, block)
    if kinds[-1] != "R" or kinds.count("R") != 1 or len(kinds) < 3:
        return False
    _inline_producers_and_consumers(sch, block)
    loops = sch.get_loops(block)
    *batch, i, j, k = loops
    i_ext, j_ext = _extent(sch, i), _extent(sch, j)
    if i_ext is None or j_ext is None:
        return False
    vec = _largest_divisor(j_ext, lanes) if j_ext % lanes else lanes
    if vec < 4:
        return False
    nv = 2 if (j_ext // vec) % 2 == 0 else 1
    # x (..., K) @ W (K, N) with every batch sharing W (ConvNeXt's MLP on (1, 14, 14, C)):
    # up to 8 rows x 2 vectors of accumulators, and the weight panel (K x 2 vectors)
    # outside the rows, so it stays in cache while every row tile uses it ((1, 14, 14,
    # 384) x (384, 1536) with rows of 2 and the whole weight streamed per row tile ran at
    # 27 GFLOP/s).  Otherwise up to 4 rows, row tiles outside.
    shared = bool(batch) and _shared_weight(sch, block)
    ri = _largest_divisor(i_ext, 8 if shared else 4)
    if ri < 4 and i_ext > 8 and RAGGED_ROWS:
        ri = 4  # the last tile partial (rows past the end masked); 8 rows were not faster
    io, ii = sch.split(i, [None, ri])
    jo, jv, ji = sch.split(j, [None, nv, vec])
    outer = [jo, *batch, io] if shared else [*batch, io, jo]
    sch.reorder(*outer, k, ii, jv, ji)
    acc = sch.cache_write(block, 0, _ACC_SCOPE)
    sch.reverse_compute_at(acc, outer[-1])
    _tile_epilogue(sch, acc, outer[-1], lanes)
    par = sch.fuse(*outer)
    sch.parallel(par)
    lp = sch.get_loops(block)
    sch.vectorize(lp[-1])
    sch.unroll(lp[-2])
    sch.unroll(lp[-3])
    wl = sch.get_loops(acc)
    sch.vectorize(wl[-1])
    _decompose(sch, block, k)
    if _block_name(sch, block).startswith(PACKED_MATMUL_BLOCK):
        # W packed (N / P, K, P): a task reads one panel of P columns, the next task the
        # next panel (row tiles outside: the panels in order) or, shared by every row
        # tile (panels outside), the same panel until the next one
        k_ext, tasks = _extent(sch, k), _extent(sch, par)
        panels = j_ext // (nv * vec)
        wp = [r.source for r in sch.get(block).reads
              if _ints(r.source.shape) == [panels, k_ext, nv * vec]]
        if len(wp) == 1 and (not shared or tasks % panels == 0):
            share = tasks // panels if shared else 1
            prefetch_next_task(sch, par, [], k, wp[0], k_ext * nv * vec, share)
    return True


def _schedule_reduction(sch, block, lanes: int) -> None:
    """Pooling / mean / softmax-style reductions: parallel spatial loops, vector inner."""
    kinds = _iter_kinds(sch, block)
    loops = sch.get_loops(block)
    if len(loops) != len(kinds):
        _schedule_elementwise(sch, block, lanes)
        return
    spatial = [lp for lp, k in zip(loops, kinds) if k == "S"]
    red = [lp for lp, k in zip(loops, kinds) if k == "R"]
    if not spatial:
        return
    last = spatial[-1]
    if _vector_ok(_extent(sch, last), lanes) and len(spatial) > 1 and kinds[len(spatial) - 1] == "S":
        sch.reorder(*spatial[:-1], *red, last)
        sch.vectorize(last)
        _decompose(sch, block, red[0])
        outer = sch.fuse(*spatial[:-1]) if len(spatial) > 2 else spatial[0]
        sch.parallel(outer)
    else:
        sch.reorder(*spatial, *red)
        outer = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        sch.parallel(outer)


#: Row reductions get :func:`_schedule_row_reduction` (``bench/row_reduction.py`` compares).
ROW_REDUCTION = True


def _schedule_row_reduction(sch, lanes: int) -> bool:
    """Kernels that reduce each row over its last, contiguous axis and then use the results
    element-wise on the same row: layer norm (sum, then sum of squared deviations), softmax
    (max, then sum of exponentials), RMS norm.

    Rows run in parallel; each reduction is computed at its row, a vector of ``lanes``
    partial sums walking the row (``rfactor``) then reduced to one, and the output row is
    written in vectors.  The generic schedule ran these serially with the reduction
    vectorized across rows (strided gathers): a ConvNeXt layer norm of 56x56x96 took about
    1 ms.  Returns False, leaving ``sch`` untouched, where the kernel is not of this form.
    """
    blocks = _blocks(sch)
    out = blocks[-1]
    reductions = [b for b in blocks if "R" in _iter_kinds(sch, b)]
    if not reductions or "R" in _iter_kinds(sch, out):
        return False
    extents = [_extent(sch, lp) for lp in sch.get_loops(out)]
    n = len(extents)
    if n < 2 or extents[-1] is None or extents[-1] % lanes:
        return False
    for r in reductions:  # rows x one reduced axis: the output's rows (and unit axes of a
        kinds = _iter_kinds(sch, r)  # keepdim reduction), the output's row length
        ext = [_extent(sch, lp) for lp in sch.get_loops(r)]
        if kinds[-1] != "R" or "R" in kinds[:-1] or len(ext) != len(kinds) \
                or [e for e in ext[:-1] if e != 1] != [e for e in extents[:-1] if e != 1] \
                or ext[-1] != extents[-1]:
            return False
    for b in blocks:  # element-wise steps between (a mean, an exp) go into their readers
        if b not in reductions and b != out:
            _inline(sch, b)
    loops = sch.get_loops(out)
    rows = sch.fuse(*loops[:-1]) if n > 2 else loops[0]
    _, vec = sch.split(loops[-1], [None, lanes])
    sch.vectorize(vec)
    partial = []
    for r in reversed(reductions):  # consumers first: each lands inside the row loop
        _, ki = sch.split(sch.get_loops(r)[-1], [None, lanes])
        # the lanes' partial sums (lanes last in their buffer); r then adds the lanes up
        rf = sch.rfactor(ki, len(sch.get(r).iter_vars) - 1)
        sch.compute_at(r, rows)
        sch.compute_at(rf, rows)  # -> (row, lane, chunk)
        lane, chunk = sch.get_loops(rf)[-2:]
        sch.reorder(chunk, lane)
        sch.vectorize(lane)
        partial.append(rf)
    sch.parallel(rows)
    for rf in partial:  # the partial sums' zeroing before their chunk loop
        _decompose(sch, rf, sch.get_loops(rf)[-2])
    return True


def _schedule_generic(sch, lanes: int) -> None:
    for b in _blocks(sch):
        if "R" in _iter_kinds(sch, b):
            continue
        try:
            _inline(sch, b)
        except Exception:  # noqa: BLE001
            pass
    for b in _blocks(sch):
        try:
            if "R" in _iter_kinds(sch, b):
                _schedule_reduction(sch, b, lanes)
            else:
                _schedule_elementwise(sch, b, lanes)
        except Exception:  # noqa: BLE001  (leave this block serial rather than fail the build)
            pass


def _anchor(sch):
    """(kind, block) of the PrimFunc's main block: conv, dwconv, matmul, or generic."""
    best = None
    for b in _blocks(sch):
        name = _block_name(sch, b)
        for prefix, (kind, _fn) in ANCHOR_SCHEDULES.items():
            if name.startswith(prefix):
                return kind, b
        if name.startswith(CONV_BLOCK):
            return "conv", b
        if name.startswith(DWCONV_BLOCK):
            return "dwconv", b
        if "matmul" in name or name.startswith("T_dense"):
            best = ("matmul", b)
    return best or ("generic", None)


def kernel_kind(func) -> str:
    """The kind of kernel a (fused, unscheduled) PrimFunc is: its anchor's kind."""
    from tvm import s_tir

    return _anchor(s_tir.Schedule(func))[0]


#: Kernels smaller than this in both respects run on one thread (their schedule's
#: ``parallel`` loops are dropped): fewer loop iterations of their largest block (one per
#: multiply-add of a convolution, one per element of an element-wise kernel) and fewer
#: elements in their buffers (inputs, weights, outputs).  Handing a few microseconds of
#: work to the thread pool costs as much as the work; a kernel that streams more data
#: than fits one core's cache gains from the second core even when its arithmetic is small
#: (MobileNet's 1x1 convolutions on 4x4 maps).  ``bench/serial_small.py`` measures both.
#: ``SERIAL_BELOW = 0`` keeps every kernel parallel.
#:
#: A kernel with up to :data:`SERIAL_REUSED_ELEMENTS` elements also runs on one thread when
#: it does at least :data:`SERIAL_MIN_REUSE` iterations per element of its largest buffer:
#: a convolution that uses each weight at 8 or more pixels computes more than it streams.
#: ``bench/serial_small.py`` (single 3x3 convolutions): 64 channels at 4x4, 39K elements,
#: 16 iterations per weight, ran 1.30x faster serial.  1x1 convolutions on 2x2 and 1x1 maps
#: (MobileNetV2 at 32x32: 4 and 1 iterations per weight) ran slower serial.
SERIAL_BELOW = 1 << 20
SERIAL_MAX_ELEMENTS = 1 << 14
SERIAL_REUSED_ELEMENTS = 1 << 16
SERIAL_MIN_REUSE = 8


def _iterations(sch) -> int:
    """The most loop iterations of any block of ``sch`` (symbolic extents count as huge)."""
    most = 0
    for b in _blocks(sch):
        n = 1
        for lp in sch.get_loops(b):
            ext = _extent(sch, lp)
            n *= ext if ext is not None else 1 << 40
        most = max(most, n)
    return most


def _without_parallel(func, sch):
    """``sch``'s schedule of ``func`` replayed without its ``parallel`` instructions."""
    from tvm import s_tir

    insts = [i for i in sch.trace.insts if i.kind.name != "Parallel"]
    serial = s_tir.Schedule(func)
    s_tir.Trace(insts, {}).apply_to_schedule(serial, remove_postproc=False)
    return serial


def _buffer_sizes(sch) -> list[int]:
    """Elements of each buffer ``sch``'s blocks read or write (a symbolic shape counts as
    huge)."""
    seen: dict[str, int] = {}
    for b in _blocks(sch):
        stmt = sch.get(b)
        for region in (*stmt.reads, *stmt.writes):
            try:
                seen[region.source.name] = math.prod(_ints(region.source.shape))
            except (TypeError, ValueError):
                return [1 << 40]
    return list(seen.values())


def _runs_serial(sch) -> bool:
    """Whether a scheduled kernel is small enough to run on one thread (see
    :data:`SERIAL_BELOW`, :data:`SERIAL_REUSED_ELEMENTS`)."""
    if not SERIAL_BELOW:
        return False
    iterations = _iterations(sch)
    if iterations >= SERIAL_BELOW:
        return False
    sizes = _buffer_sizes(sch)
    elements = sum(sizes)
    return elements < SERIAL_MAX_ELEMENTS or (
        elements < SERIAL_REUSED_ELEMENTS and iterations >= SERIAL_MIN_REUSE * max(sizes))


def _hand_schedule(func, info: TargetInfo):
    """(schedule, kind, serial): ``serial`` when the kernel is small enough to run on one
    thread (see :data:`SERIAL_BELOW`)."""
    sch, kind = _hand_schedule_parallel(func, info)
    if _runs_serial(sch):
        try:
            return _without_parallel(func, sch), kind, True
        except Exception:  # noqa: BLE001, S110  (keep the parallel schedule)
            pass
    return sch, kind, False


def _hand_schedule_parallel(func, info: TargetInfo):
    from tvm import s_tir

    lanes = vector_lanes(info)
    sch = s_tir.Schedule(func)
    kind, block = _anchor(sch)
    try:
        if kind in ("conv", "dwconv"):
            _schedule_conv(sch, block, lanes, depthwise=kind == "dwconv", threads=info.num_cores)
            return sch, kind
        if kind == "matmul" and _schedule_matmul(sch, block, lanes):
            return sch, kind
        for registered_kind, fn in ANCHOR_SCHEDULES.values():
            if kind == registered_kind:
                fn(sch, block, lanes)
                return sch, kind
    except Exception:  # noqa: BLE001, S110  (falls back to the generic schedule below)
        pass
    if kind == "generic" and ROW_REDUCTION:
        sch = s_tir.Schedule(func)
        try:
            if _schedule_row_reduction(sch, lanes):
                return sch, "row-reduction"
        except Exception:  # noqa: BLE001, S110  (the generic schedule below)
            pass
    sch = s_tir.Schedule(func)
    _schedule_generic(sch, lanes)
    return sch, "generic"


def hand_schedule(func, info: TargetInfo):
    """The hand schedule of ``func`` (a PrimFunc) for ``info``, as a traced ``Schedule``.

    A kernel whose anchor's schedule does not fit gets the generic one (still correct).
    """
    return _hand_schedule(func, info)[0]


def schedule_primfunc(func, info: TargetInfo):
    """A hand-scheduled copy of ``func``, marked scheduled, its kind in ``slimfx.kernel``
    (and ``slimfx.serial`` set on a kernel left on one thread)."""
    sch, kind, serial = _hand_schedule(func, info)
    out = sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("slimfx.kernel", kind)
    return out.with_attr("slimfx.serial", True) if serial else out


def serial_kernels(mod) -> list[str]:
    """Names of ``mod``'s PrimFuncs that the hand schedules left on one thread."""
    from tvm import tirx

    return sorted(gv.name_hint for gv, f in mod.functions.items()
                  if isinstance(f, tirx.PrimFunc) and f.attrs and f.attrs.get("slimfx.serial"))


def kernel_kinds(mod) -> dict[str, str]:
    """``{PrimFunc name: "conv" | "dwconv" | "matmul" | "row-reduction" | "generic" |
    "tuned"}`` of a module."""
    from tvm import tirx

    out = {}
    for gv, f in mod.functions.items():
        if isinstance(f, tirx.PrimFunc):
            attrs = f.attrs or {}
            out[gv.name_hint] = str(attrs.get("slimfx.kernel", "tuned" if attrs.get(
                "tirx.is_scheduled", False) else "none"))
    return out


def schedule(mod, info: TargetInfo):
    """Hand-schedule every PrimFunc of ``mod`` that is not scheduled yet."""
    from tvm import tirx

    if info.kind != "llvm":
        return mod
    updates: dict[Any, Any] = {}
    for gv, f in mod.functions.items():
        if isinstance(f, tirx.PrimFunc) and not (f.attrs and f.attrs.get("tirx.is_scheduled")):
            updates[gv] = schedule_primfunc(f, info)
    for gv, f in updates.items():
        mod[gv] = f
    return mod
