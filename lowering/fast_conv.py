"""TVM lowerings of ``slimfx::winograd_conv2d`` and ``slimfx::fft_conv2d``, with hand
schedules for the CPU.

Winograd F(m x m, 3 x 3) becomes three kernels (``alpha = m + 2``, ``P`` tiles):

1. input transform: the input (``NCHW``, or the blocked ``NCHW{c}c`` of its producer:
   :func:`blocked_winograd`) is padded into an ``NHWC`` buffer (channels contiguous),
   then ``V[(eps, nu), p, ci] = (B^T d_p B)[eps, nu]`` for every
   ``alpha x alpha`` tile, all points of a tile unrolled with the constants of ``B``
   folded in, vectorized over input channels, parallel over tiles;
2. transform-domain GEMM ``M[(eps, nu)] = V[(eps, nu)] @ U[(eps, nu)]`` (``P x Cin`` by
   ``Cin x Cout``, batched over the ``alpha^2`` points): a register tile of up to 8 rows
   x 2-4 vectors of output channels (16 accumulators), parallel over (point, column
   panel).  ``U`` is packed to ``(alpha^2, Cout / nb, Cin, nb)`` in
   ``main_transform_params`` (once, at load time; :func:`gemm_panel`), so each panel is
   one contiguous stream read once from memory (and re-read from L1 by further row tiles).
   With few tiles (deep layers on 7x7 or 14x14 maps) the kernel is bound by reading
   ``U``, ``alpha^2 / 9`` times the direct weights: ``bench/fast_conv.py`` prints the
   streaming floor.  There (F(4,3), float32, at most :data:`FACTOR_TILES` tiles) it reads
   the half-transformed ``H = G g`` instead, half the bytes, and forms each vector of ``U``
   from three of ``H`` as it loads it (:func:`factored_weights`); on at most
   :data:`FORM_TILES` tiles it reads ``g`` itself, direct's bytes, and forms ``U`` in
   registers (:data:`FORM_U`), the output transform in the same kernel (:data:`FORM_OUTPUT`);
3. output transform ``Y = A^T M_p A + bias`` per ``m x m`` output tile, written in the
   blocked ``NCHW{c}c`` layout its consumers use (``NCHW`` when none does), with the
   element-wise ops after it fused (ReLU, residual add): unrolled over the tile,
   vectorized over a block of output channels, parallel over tile rows.  The kernel is
   marked out-element-wise-fusable, like a convolution, so the next layer's input
   transform never fuses into it (recomputing it per use).

FFT convolution (:data:`FUSED_FFT`, the default) is three kernels on ``N x N``
overlap-save tiles, like Winograd's: the forward transform (per tile and block of input
channels: for each frequency row ``u <= N/2`` the rows ``R_C``, ``R_S`` of the DFT along
``y``, then the real DFT along ``x`` giving rows ``u`` and ``N - u`` at once, the input being
real), the spectral product below, and the inverse transform (per kept output row, the
inverse DFT along ``y``, then along ``x`` for the kept columns, plus the bias and the ops
fused after), vectorized over channels and reading and writing the blocked layout of their
neighbours.  Without it, FFT convolution is composed of Relax ops: a real DFT along
``x`` and a complex DFT along ``y`` as matrix products with precomputed twiddle matrices
(for ``N <= 32`` a matrix DFT is as fast as any FFT), the spectral product as one complex
GEMM per frequency (``Re M = Re V Re W - Im V Im W``, ``Im M = Re V Im W + Im V Re W``,
over a spectrum stored as ``(Re, Im)`` pairs in panels of output channels, packed in
``main_transform_params``: 2 reals per complex weight), and the inverse DFTs the same way, keeping only the
``tile x tile`` valid outputs.  The two transposes around the spectral product (to and
from frequency-major order) have their own schedules (vectorized over channels, whole cache
lines on both sides).

>>> import torch, slimfx
>>> m = torch.nn.Conv2d(4, 8, 3, padding=1)
>>> cm = slimfx.compile(m, torch.randn(1, 4, 6, 6), pipeline="winograd{tile=2}")
>>> cm.parity["max_abs_error"] < 1e-4
True
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

from slimfx.passes.fast_conv import fft_wraps, winograd_matrices

from . import cpu_schedules as cs
from .relax import register_lowering, target_kind
from .targets import LoweringError

__all__ = ["INPUT_BLOCK", "OUTPUT_BLOCK", "GEMM_BLOCK", "FFT_GEMM_BLOCK", "dft_matrices", "gemm_panel",
           "FFT_CGEMM_BLOCK"]

#: Block names of the Winograd kernels (anchors of the schedules registered below).
INPUT_BLOCK = "winograd_input"
OUTPUT_BLOCK = "winograd_output"
GEMM_BLOCK = "winograd_matmul"
PAD_BLOCK = "winograd_pad"
FFT_GEMM_BLOCK = "fft_matmul"
FFT_CGEMM_BLOCK = "fft_cmatmul"
FFT_FORWARD_BLOCK = "fft_forward_y"
FFT_REGROUP_BLOCK = "fft_regroup"
#: The fused FFT transforms (:data:`FUSED_FFT`) and their row intermediates.
FFT_INPUT_BLOCK = "fft_input"
FFT_IN_ROWS_BLOCK = "fft_in_rows"
FFT_OUTPUT_BLOCK = "fft_output"
FFT_OUT_ROWS_BLOCK = "fft_out_rows"


#: Let Winograd transforms read and write the blocked layout (:func:`blocked_winograd`);
#: False keeps them in NCHW with layout transforms around them, for A/B timing
#: (``bench/fast_conv.py --layouts``).  Read when a graph is built.
BLOCKED = True

#: PrimFunc attribute naming a Winograd transform's role (``"input"``/``"output"``): the
#: blocked-layout pass (:func:`blocked_winograd`) finds and re-emits these kernels.
_ROLE = "slimfx.winograd"

#: Pack the transformed Winograd weights in contiguous column panels (:func:`gemm_panel`);
#: False keeps ``(alpha^2, Cin, Cout)``, the layout before packing, for A/B timing
#: (``bench/fast_conv.py --packing``).  Read when a graph is lowered.
PACK_U = True

#: Where an F(4,3) layer has at most :data:`FACTOR_TILES` tiles (a deep layer on a small map:
#: 16 tiles at 14x14), its float32 GEMM reads the half-transformed weights ``H = G g``
#: (``alpha x 3`` per channel pair, half of ``U``'s ``alpha x alpha``) and forms each
#: ``U[(eps, nu)] = sum_b H[eps, b] G[nu, b]`` as it loads it: with so few tiles to reuse
#: each weight, the GEMM streams ``U`` from memory, and half the bytes outweigh the few
#: adds (:func:`factored_weights`).  False keeps ``U`` (``bench/fast_conv.py --ab FACTOR_U``).
#: Read when a graph is lowered.
FACTOR_U = True
FACTOR_TILES = 16

#: Where an F(4,3) layer has at most :data:`FORM_TILES` tiles (a 7x7 map at batch 1) and
#: its ``g`` at least :data:`FORM_MIN_BYTES`, its float32 GEMM reads the untransformed 3x3
#: weights ``g = P^T U P`` (9 per channel pair: the bytes direct convolution reads, half of
#: ``H``'s 18) and forms ``U`` in registers: per input channel and vector of output
#: channels, one point ``eps``'s three values of ``H = G1 g`` from nine loads of ``g``,
#: then the six ``U1[(eps, nu)]`` from them, each feeding the FMAs of all its rows
#: (``alpha x rows`` accumulators, 24 at 4 rows).  A task is one vector of output
#: channels, its reduction in chunks of :data:`FORM_K_CHUNK` input channels whose ``g``
#: stays in L1 for the six points; each point prefetches a sixth of the next chunk
#: (:data:`FORM_PREFETCH`; without, slower in a scratch chain), and the sixth before it
#: again (:data:`FORM_PREFETCH_TWICE`).  ``U`` is formed with adds (:data:`FORM_ADDS`).
#: ``V`` is stored ``(eps, Cin / vb, nu, tile, vb)`` so a point's values for one input
#: channel are 24 floats in one contiguous run (:func:`_winograd_input_te`), not 24 rows
#: 1 KB apart (in a scratch timing of the GEMM alone, far faster).
#: ``bench/fast_conv.py --ab FORM_U --chain 4``
#: (znver4, with :data:`FORM_OUTPUT`): F(4,3) 1.17x faster at 256 channels 7x7, 1.15x at
#: 512.  Below 512 KB of ``g`` the layer keeps ``H`` (64 channels at 7x7, 4 tasks, was
#: slower with ``g`` in a scratch chain; 128 faster).  False: ``H`` (:data:`FACTOR_U`)
#: there too.
#: Read when a graph is lowered.
FORM_U = True
FORM_TILES = 4
FORM_MIN_BYTES = 1 << 19
FORM_V_BLOCK = 16
FORM_K_CHUNK = 16
FORM_PREFETCH = True
#: Each point of the formed GEMM prefetches the sixth of ``g`` the point before it
#: prefetched again, then its own: every line twice, a point (a sixth of a chunk's compute)
#: apart.  On znver4, where a single prefetch per line left the GEMM waiting for ``g`` cold
#: (why is unmeasured: this VM has no hardware counters; a guess is that prefetches finding
#: the miss buffers full are dropped, and the second gets through), ``bench/fast_conv.py
#: --ab FORM_PREFETCH_TWICE --chain 4``, three runs: F(4,3) 1.18-1.19x faster at 256
#: channels 7x7, 1.04-1.26x at 512 (1.24x with ``--rounds 9``), 1.04x at 128, 1.06x at 512
#: channels 4x4 (F(2,3), untouched: 0.97-1.12x).
#: In a scratch chain (qualitative), one prefetch two to four chunks ahead was no better
#: than one a chunk ahead, and a second one further ahead no better than this.
FORM_PREFETCH_TWICE = True
#: The formed GEMM forms ``U`` with adds only: ``G1``'s rows are scaled to integers
#: (:func:`factored_weights`: ``[4, 2, 1]`` and ``[1, -2, 4]`` for F(4,3)'s points 1/2 and
#: -2) and their 2s and 4s are doublings (``t + t``), so the multiplies are the GEMM's 24
#: FMAs per input channel (was 28-34: LLVM fused the constant multiples into FMAs) and the
#: forming runs on the add ports.  ``bench/fast_conv.py --ab FORM_ADDS --chain 4``: F(4,3)
#: at 256 channels 7x7 1.08x faster warm (``--warm``), 1.05x cold; at 512, 1.02x / 0.99x.
#: Only where the GEMM has at least :data:`FORM_ADDS_ROWS` rows (tiles): on fewer, each
#: ``U`` feeds fewer FMAs than its doublings take adds (a 4x4 map's one tile: 6 FMAs and
#: about 20 adds per channel and point), and ResNet-18 at 112, whose last stage is such
#: maps, ran 0.95x in two runs of ``--ab FORM_ADDS --models resnet18`` with adds there.
FORM_ADDS = True
FORM_ADDS_ROWS = 4
#: The formed GEMM and the output transform are one kernel: a task computes its panel of
#: output channels, then transforms their tiles (plus bias and the element-wise ops after)
#: -- one kernel launch and one trip of ``M`` through memory less per layer
#: (``--ab FORM_OUTPUT --chain 4``, znver4: 1.02-1.05x, one of two runs 0.98-1.03x).
#: Where the consumer's channel block is not the GEMM's panel the two stay apart.
FORM_OUTPUT = True

#: The transform-domain GEMMs prefetch the next task's weights from :data:`PREFETCH_BYTES`
#: of them, where other kernels start at ``cpu_schedules.PREFETCH_MIN_BYTES`` (1 MB): a
#: GEMM task reuses its panel for a few row tiles only, so even a 64-channel layer's ``U``
#: (590 KB) stalls it when it comes from memory.  False: the 1 MB of the other kernels
#: (``bench/fast_conv.py --ab PREFETCH_SMALL``).  Read when a kernel is scheduled.
PREFETCH_SMALL = True
PREFETCH_BYTES = 1 << 17

#: A transform-domain GEMM of one row (an FFT layer whose one tile covers the map, at batch
#: 1) uses each weight once, in the order it is stored: a plain stream, left to the
#: hardware prefetcher, without the next-task prefetches (``cpu_schedules``).  The FFT layers
#: of one tile (256ch 7x7 7x7, 128 and 256ch 14x14 11x11) ran 1.09-1.19x faster without
#: them; at four rows (F(4,3) on 7x7 maps) dropping them cost 0.76-0.82x, so only one row
#: streams (``bench/fast_conv.py --ab STREAM_ONE_ROW --chain 4``, znver4).  False: one row
#: prefetches too.  Read when a kernel is scheduled.
STREAM_ONE_ROW = True

#: A factored GEMM task (one ``eps``, one column panel) whose rows fit one register tile
#: (at most 8 tiles: a 7x7 map at batch 1) runs its ``alpha`` points ``nu`` over chunks of
#: :data:`FACTOR_K_CHUNK` input channels, all points on one chunk before the next: the
#: chunk's three rows of ``H`` (24 KB) stay in L1 for the six points that read them, where
#: whole rows (196 KB at 256 channels) came from L2 once per point, 4 FMAs per loaded
#: vector; the accumulators of all points wait in a buffer between chunks.  F(4,3) at 7x7,
#: 256 and 512 channels: 1.24x and 1.38-1.45x faster; with two row tiles (14x14), whose
#: loads feed 8 FMAs each, 0.92-1.01x, so those keep whole rows (``bench/fast_conv.py --ab
#: FACTOR_K_CHUNKS --chain 4``).  False: whole rows everywhere.
FACTOR_K_CHUNKS = True
FACTOR_K_CHUNK = 32


def _select(matrix: np.ndarray, row, col: int):
    """``matrix[row, col]`` for a symbolic ``row`` and a constant ``col``: a Select chain
    that folds to a constant once ``row`` is unrolled."""
    from tvm import tirx

    val = tirx.const(0.0, "float32")
    for r in range(matrix.shape[0]):
        if matrix[r, col] != 0:
            val = tirx.Select(row == r, tirx.const(float(matrix[r, col]), "float32"), val)
    return val


def _doubled(t, coef: float):
    """``coef * t`` as repeated doubling ``t + t`` where ``|coef|`` is 2 or 4 (None if not):
    adds, which the CPU runs on other ports than its multiplies and FMAs."""
    k = {2.0: 1, 4.0: 2}.get(abs(coef))
    if k is None:
        return None
    for _ in range(k):
        t = t + t
    return t


def _row_times(matrix: np.ndarray, row, term, doubling: bool = False):
    """``sum_k matrix[row, k] * term(k)`` for a symbolic ``row``: one expression per row of
    ``matrix`` holding only its nonzero coefficients (a +-1 is a plain add or subtract),
    chosen by a Select chain that folds to that row's expression once ``row`` is unrolled.
    ``doubling``: coefficients +-2 and +-4 are adds too (:func:`_doubled`)."""
    from tvm import tirx

    val = None
    for r in range(matrix.shape[0] - 1, -1, -1):
        # terms with coefficient 1 first, then the scaled ones, then those subtracted
        order = sorted((k for k in range(matrix.shape[1]) if matrix[r, k] != 0),
                       key=lambda k: (matrix[r, k] != 1, matrix[r, k] == -1))
        acc = None
        for k in order:
            coef, t = float(matrix[r, k]), term(k)
            if coef == 1:
                acc = t if acc is None else acc + t
            elif coef == -1 and acc is not None:
                acc = acc - t
            elif doubling and (d := _doubled(t, coef)) is not None and (coef > 0 or acc is not None):
                acc = d if acc is None else (acc + d if coef > 0 else acc - d)
            else:
                t = tirx.const(coef, "float32") * t
                acc = t if acc is None else acc + t
        acc = acc if acc is not None else tirx.const(0.0, "float32")
        val = acc if val is None else tirx.Select(row == r, acc, val)
    return val


def weight_form(m: int, tiles: int, pairs: int, dtype: str = "float32", cpu: bool = True) -> str:
    """What the GEMM of an F(m, 3) layer of ``tiles`` tiles (batch included) and ``pairs``
    (input, output) channel pairs, with transformed weights of ``dtype``, reads: ``"u"``
    (``U``, ``alpha^2`` per channel pair), ``"h"`` (``H = G g``, ``alpha x 3``;
    :data:`FACTOR_U`) or ``"g"`` (the 3x3 ``g``; :data:`FORM_U`, where ``g`` has at least
    :data:`FORM_MIN_BYTES`).  Float16 ``U`` is read as it is: ``H`` or ``g`` recovered from
    the rounded ``U`` and rounded again would not compute what the graph's float16 ``U``
    does.  Only CPU builds (``cpu``) read ``H`` or ``g``: CUDA builds read ``U`` (dlight's
    GEMM schedule would not unroll the points whose coefficients form ``U``; unmeasured on
    a GPU).

    >>> [weight_form(4, t, 128 * 128) for t in (4, 16, 49)], weight_form(4, 4, 64 * 64)
    (['g', 'h', 'u'], 'h')
    >>> weight_form(2, 16, 128 * 128), weight_form(4, 16, 128 * 128, "float16")
    ('u', 'u')
    >>> weight_form(4, 16, 128 * 128, cpu=False)
    'u'
    """
    if not (PACK_U and cpu and m == 4 and dtype == "float32"):
        return "u"
    if FORM_U and tiles <= FORM_TILES and 9 * 4 * pairs >= FORM_MIN_BYTES:
        return "g"
    return "h" if FACTOR_U and tiles <= FACTOR_TILES else "u"


def weights_per_pair(m: int, form: str) -> int:
    """Weights per (input, output) channel pair that a GEMM of ``form`` (:func:`weight_form`)
    reads for F(m, 3).

    >>> [weights_per_pair(4, f) for f in "ugh"]
    [36, 9, 18]
    """
    alpha = m + 2
    return {"u": alpha * alpha, "h": 3 * alpha, "g": 9}[form]


def factored_weights(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(P, G1, c)`` of the factored transformed weights of Winograd F(m, 3) (float64).

    ``G = diag(c) G1``: each row of ``G`` scaled so its first nonzero is positive and its
    smallest nonzero magnitude is 1 (``[1, p, p^2]`` for a point ``|p| >= 1``, ``[4, 2, 1]``
    for ``p = 1/2``, ``[0, 0, 1]`` at infinity; with :data:`FORM_ADDS` off, so its first
    nonzero is 1).  ``H = U P`` recovers ``H = G g`` from ``U = G g G^T`` (``G^T P = I``);
    then ``U = H G1^T diag(c)``.  The GEMM reads ``H`` (or ``g``) and forms ``U1 = H G1^T``
    (adds and small multiples), and the input transform scales its columns by ``c``
    (``V diag(c)``), so ``(V diag(c)) * U1 = V * U`` point by point.

    >>> p, g1, c = factored_weights(4)
    >>> _, g, _ = (t.numpy() for t in winograd_matrices(4))
    >>> bool(np.allclose(g.T @ p, np.eye(3)) and np.allclose(np.diag(c) @ g1, g))
    True
    >>> g1.astype(int).tolist()
    [[1, 0, 0], [1, -1, 1], [1, 1, 1], [4, 2, 1], [1, -2, 4], [0, 0, 1]]
    """
    _, g, _ = (t.numpy() for t in winograd_matrices(m, 3))

    def lead(row):
        nz = row[row != 0]
        return nz[0] * (np.abs(nz).min() / abs(nz[0]) if FORM_ADDS else 1)

    lead = np.array([lead(row) for row in g])
    return g @ np.linalg.inv(g.T @ g), g / lead[:, None], lead


# --------------------------------------------------------------------------- winograd TE
#: The input transform reads a blocked input where it lies, border loads guarded, instead
#: of first copying it into a zero-padded ``NHWC`` buffer (``NCHW`` inputs keep the copy:
#: their channel vectors would be strided gathers).  ``bench/fast_conv.py --layers`` and
#: the kernel profile: 1.5-1.8x faster input transforms on ResNet's 3x3 layers.
PAD_INLINE = True

#: Compute the separable transforms' intermediate (``B^T d``, ``A^T M``) a row at a time,
#: where the row's outputs are computed: ``alpha`` vectors, a stack array that stays in
#: registers.  False computes a whole tile's at the tile (F(4,3): 2.3 KB for the input,
#: 1.5 KB for the output), above TVM's 1 KB limit for a CPU stack buffer, so every parallel
#: task allocates it from the workspace pool and it goes through memory
#: (``bench/fast_conv.py --ab ROW_TRANSFORMS``).  Read when a kernel is scheduled.
ROW_TRANSFORMS = True

#: Accumulator tiles of the transform-domain GEMMs in the scope the direct convolutions use
#: (``cpu_schedules._ACC_SCOPE``): a "global" buffer under 1 KB is a stack array LLVM keeps
#: in registers; a "local" one, of any size, is allocated from the workspace pool (and
#: zeroed) on every row tile.  False keeps "local" (``bench/fast_conv.py --ab STACK_ACCUMULATORS``).
STACK_ACCUMULATORS = True


def _acc_scope() -> str:
    return cs._ACC_SCOPE if STACK_ACCUMULATORS else "local"


#: Blocks of the separable transforms: ``B^T d`` (then ``(B^T d) B``) for the input,
#: ``A^T M`` (then ``(A^T M) A``) for the output; computed a row at a time inside their kernel.
INPUT_ROWS_BLOCK = "wino_in_rows"
OUTPUT_ROWS_BLOCK = "wino_out_rows"


def _padded_nhwc(x, ph: int, pw: int, hp: int, wp: int):
    """``x`` (``NCHW``, or channel-blocked ``NCHW{cb}c``: 5-D) zero-padded by ``(ph, pw)``
    to ``hp x wp``, channels last (contiguous vectors for the transforms): ``(pad, N, C)``."""
    from tvm import te, tirx

    if len(x.shape) == 5:
        n, cc, h, w, cb = cs._ints(x.shape)
        ci = cc * cb

        def load(b, c, y, xx):
            return x[b, c // cb, y, xx, c % cb]
    else:
        n, ci, h, w = cs._ints(x.shape)

        def load(b, c, y, xx):
            return x[b, c, y, xx]
    pad = te.compute(
        (n, hp, wp, ci),
        lambda b, y, xx, c: tirx.if_then_else(
            tirx.all(y >= ph, y < ph + h, xx >= pw, xx < pw + w),
            load(b, c, y - ph, xx - pw), tirx.const(0.0, x.dtype)),
        name=PAD_BLOCK)
    return pad, n, ci


def _winograd_input_te(x, bt: np.ndarray, m: int, ph: int, pw: int, form: str = "u"):
    """``V[(eps, nu), tile, ci]``.  ``x`` is ``NCHW`` or channel-blocked ``NCHW{cb}c``
    (5-D).  ``form`` is what the GEMM reads (:func:`weight_form`): for ``"h"`` the columns
    ``nu`` of ``V`` are scaled by :func:`factored_weights`' ``c``; for ``"g"`` its rows
    ``eps`` too, and ``V`` is stored ``(eps, Cin / vb, nu, tile, vb)`` (:data:`FORM_U`)."""
    from tvm import te

    alpha = bt.shape[0]
    r = alpha - m + 1
    h, w = cs._ints(x.shape)[2:4]
    ho, wo = h + 2 * ph - r + 1, w + 2 * pw - r + 1
    th, tw = -(-ho // m), -(-wo // m)
    pad, n, ci = _padded_nhwc(x, ph, pw, th * m + r - 1, tw * m + r - 1)
    scale = factored_weights(m)[2][:, None].astype("float32") if form != "u" else 1
    # (B^T d)[eps, j], its rows scaled by c where the GEMM forms both sides of U
    rows_m = bt * scale if form == "g" else bt

    def tile_origin(p):
        b, t = p // (th * tw), p % (th * tw)
        return b, t // tw * m, t % tw * m

    def rows(eps, j, p, c):
        b, y0, x0 = tile_origin(p)
        return _row_times(rows_m, eps, lambda i: pad[b, y0 + i, x0 + j, c])

    bd = te.compute((alpha, alpha, n * th * tw, ci), rows, name=INPUT_ROWS_BLOCK)
    # V[(eps, nu)] = ((B^T d) B)[eps, nu] = sum_j (B^T d)[eps, j] B^T[nu, j]
    cols = bt * scale

    def v(eps, nu, p, c):
        return _row_times(cols, nu, lambda j: bd[eps, j, p, c])

    if form == "g":
        vb = cs._largest_divisor(ci, FORM_V_BLOCK)
        return te.compute((alpha, ci // vb, alpha, n * th * tw, vb),
                          lambda eps, cb, nu, p, cv: v(eps, nu, p, cb * vb + cv),
                          name=INPUT_BLOCK)
    return te.compute((alpha * alpha, n * th * tw, ci),
                      lambda e, p, c: v(e // alpha, e % alpha, p, c), name=INPUT_BLOCK)


def _batch_gemm_te(v, u, name: str = GEMM_BLOCK):
    """``out[e] = v[e] @ u[e]``; an operand with batch 1 is shared by every ``e``.

    ``u`` is ``(batch, K, cols)``, or column-panel packed ``(batch, cols / nb, K, nb)``: each
    panel of ``nb`` output columns contiguous, so the GEMM streams it once, in order.  A
    ``u`` narrower than ``v`` (float16) is converted to ``v``'s dtype as it is loaded.
    """
    from tvm import te

    bv, rows, k = cs._ints(v.shape)
    rk = te.reduce_axis((0, k), name="k")
    if len(u.shape) == 4:
        bu, panels, _, nb = cs._ints(u.shape)
        cols = panels * nb

        def ue(e, kk, j):
            return u[e if bu > 1 else 0, j // nb, kk, j % nb]
    else:
        bu, _, cols = cs._ints(u.shape)

        def ue(e, kk, j):
            return u[e if bu > 1 else 0, kk, j]
    if u.dtype != v.dtype:  # float16 U (``weight_dtype=float16``): widened as it is read
        narrow = ue

        def ue(e, kk, j):
            return narrow(e, kk, j).astype(v.dtype)
    return te.compute(
        (max(bv, bu), rows, cols),
        lambda e, i, j: te.sum(v[e if bv > 1 else 0, i, rk] * ue(e, rk, j), axis=rk),
        name=name)


def _factored_gemm_te(v, h, g1: np.ndarray, name: str = GEMM_BLOCK):
    """``out[(eps, nu)] = v[(eps, nu)] @ U1[(eps, nu)]`` with ``U1[(eps, nu)] = sum_b
    g1[nu, b] H[eps, b]`` formed as it is loaded from ``h``, packed ``(alpha, cols / nb,
    3, K, nb)``: the three column panels of ``H[eps]`` that any ``U1[(eps, nu)]`` needs,
    contiguous (:func:`factored_weights`)."""
    from tvm import te

    _, rows, k = cs._ints(v.shape)
    alpha, panels, r, _, nb = cs._ints(h.shape)
    rk = te.reduce_axis((0, k), name="k")

    def ue(e, kk, j):
        return _row_times(g1, e % alpha,
                          lambda b: h[e // alpha, j // nb, b, kk, j % nb].astype(v.dtype))

    return te.compute((alpha * alpha, rows, panels * nb),
                      lambda e, i, j: te.sum(v[e, i, rk] * ue(e, rk, j), axis=rk), name=name)


def _formed_gemm_te(v, g, g1: np.ndarray, name: str = GEMM_BLOCK):
    """``out[eps, nu] = v[(eps, nu)] @ U1[(eps, nu)]`` (``(alpha, alpha, tiles, Cout)``) with
    ``U1 = G1 g G1^T`` formed from ``g``, packed ``(Cout / nb, Cin, 9, nb)``, as it is
    loaded; ``v`` is ``(alpha, Cin / vb, alpha, tiles, vb)`` (:data:`FORM_U`).  The three values
    ``(G1 g)[eps, b]`` are the same expression for every ``nu``: LLVM computes them once."""
    from tvm import te

    alpha, _, _, rows, vb = cs._ints(v.shape)
    panels, k, _, nb = cs._ints(g.shape)
    rk = te.reduce_axis((0, k), name="k")
    adds = FORM_ADDS and rows >= FORM_ADDS_ROWS

    def ue(eps, nu, kk, j):
        def h(b):  # (G1 g)[eps, b]
            return _row_times(g1, eps, lambda a: g[j // nb, kk, a * 3 + b, j % nb].astype(v.dtype),
                              doubling=adds)
        return _row_times(g1, nu, h, doubling=adds)

    def out(eps, nu, i, j):
        return te.sum(v[eps, rk // vb, nu, i, rk % vb] * ue(eps, nu, rk, j), axis=rk)

    return te.compute((alpha, alpha, rows, panels * nb), out, name=name)


def _formed_output_te(v, g, *bias, at: np.ndarray, n: int, ho: int, wo: int, block: int = 0):
    """The formed GEMM (:func:`_formed_gemm_te`) and the output transform after it, one
    kernel (:data:`FORM_OUTPUT`); ``bias`` is the optional bias."""
    g1 = factored_weights(at.shape[0])[1].astype("float32")
    return _winograd_output_te(_formed_gemm_te(v, g, g1), bias[0] if bias else None, at, n,
                               ho, wo, block)


def gemm_panel(rows: int, cols: int) -> int:
    """Output columns per contiguous panel of the packed transformed weight ``U``.

    Few rows (4 tiles of a 7x7 map under F(4,3)) take 64 columns (four 16-lane vectors), so
    each loaded weight vector feeds every row's FMA and the accumulators stay 16; more rows
    take 32 (8 rows x 2 vectors).  A panel must divide ``cols``.

    >>> gemm_panel(4, 256), gemm_panel(16, 256), gemm_panel(49, 24), gemm_panel(4, 5)
    (64, 32, 24, 5)
    """
    for nb in ((64, 32, 16) if rows <= 4 else (32, 16)):
        if cols % nb == 0:
            return nb
    return cols if cols <= 64 else cs._largest_divisor(cols, 32)


def _winograd_output_te(mm, bias, at: np.ndarray, n: int, ho: int, wo: int, block: int = 0):
    """``NCHW``, or channel-blocked ``NCHW{block}c`` with ``block`` > 0."""
    from tvm import te

    m, alpha = at.shape
    *_, tiles, co = cs._ints(mm.shape)  # M: (alpha^2, tiles, Cout) or (alpha, alpha, ...)

    def mval(eps, nu, p, c):
        return mm[eps, nu, p, c] if len(mm.shape) == 4 else mm[eps * alpha + nu, p, c]

    # (A^T M)[i, nu] = sum_eps A^T[i, eps] M[(eps, nu)]
    am = te.compute((m, alpha, tiles, co),
                    lambda i, nu, p, c: _row_times(at, i, lambda eps: mval(eps, nu, p, c)),
                    name=OUTPUT_ROWS_BLOCK)

    def y(p, c, i, j):  # ((A^T M) A)[i, j] = sum_nu (A^T M)[i, nu] A^T[j, nu] of tile p
        return _row_times(at, j, lambda nu: am[i, nu, p, c])

    return _tiled_output_te(y, bias, m, n, co, ho, wo, block, f"{OUTPUT_BLOCK}_m{m}")


def _tiled_output_te(value, bias, m: int, n: int, co: int, ho: int, wo: int, block: int,
                     name: str):
    """The output of ``m x m`` tiles, ``NCHW`` or channel-blocked ``NCHW{block}c`` with
    ``block`` > 0: ``value(p, c, i, j)`` at row ``i``, column ``j`` of tile ``p``, plus
    the bias."""
    from tvm import te

    th, tw = -(-ho // m), -(-wo // m)

    def y(b, c, yy, xx):
        acc = value((b * th + yy // m) * tw + xx // m, c, yy % m, xx % m)
        return acc + bias[c] if bias is not None else acc

    if block:
        return te.compute((n, co // block, ho, wo, block),
                          lambda b, cc, yy, xx, cb: y(b, cc * block + cb, yy, xx), name=name)
    return te.compute((n, co, ho, wo), y, name=name)


@register_lowering(torch.ops.slimfx.winograd_conv2d.default)
def _lower_winograd(node, importer):
    from tvm import relax

    x, u, bias, padding, tile = importer.retrieve_args(node)[:5]
    bb = importer.block_builder
    n, ci, h, w = cs._ints(importer.shape_of(x))
    alpha, _, co, _ = cs._ints(importer.shape_of(u))
    m = int(tile)
    r = alpha - m + 1
    if r != 3 or m not in (2, 4):
        raise LoweringError(f"node '{node.name}': Winograd F({m},{r}) has no lowering "
                            "(tile 2 or 4, 3x3 kernels)")
    at, _, bt = (t.numpy().astype("float32") for t in winograd_matrices(m, r))
    ph, pw = (int(p) for p in padding)
    ho, wo = h + 2 * ph - r + 1, w + 2 * pw - r + 1
    # (alpha, alpha, Cout, Cin) -> (alpha^2, Cout / nb, Cin, nb): panels of nb output
    # channels, each contiguous so the GEMM streams it; weight-only, lifted to load time.
    tiles = n * -(-ho // m) * -(-wo // m)
    form = weight_form(m, tiles, ci * co, str(u.ty.dtype), cpu=target_kind() == "llvm")
    nb = gemm_panel(tiles, co) if form != "g" else cs._largest_divisor(co, FORM_V_BLOCK)
    p_mat, g1, _ = factored_weights(m)
    p_mat, g1 = relax.const(p_mat.astype("float32")), g1.astype("float32")
    if form != "u":  # H = U P: (alpha, Cout, Cin, 3)
        h = relax.op.matmul(relax.op.permute_dims(u, [0, 2, 3, 1]), p_mat)
    if form == "g":  # g = P^T H: (Cout, Cin, 3 (b), 3 (a)) -> (Cout / nb, Cin, 9 (a, b), nb)
        g = relax.op.matmul(relax.op.permute_dims(h, [1, 2, 3, 0]), p_mat)
        u2 = bb.emit(relax.op.permute_dims(
            relax.op.reshape(relax.op.permute_dims(g, [0, 1, 3, 2]), (co // nb, nb, ci, 9)),
            [0, 2, 3, 1]))
    elif form == "h":  # (alpha, Cout, Cin, 3) -> (alpha, Cout / nb, 3, Cin, nb)
        u2 = bb.emit(relax.op.permute_dims(
            relax.op.reshape(h, (alpha, co // nb, nb, ci, r)), [0, 1, 4, 3, 2]))
    elif PACK_U:
        u2 = bb.emit(relax.op.permute_dims(
            relax.op.reshape(u, (alpha * alpha, co // nb, nb, ci)), [0, 1, 3, 2]))
    else:  # (alpha^2, Cin, Cout): blocks of columns read with a row stride of Cout
        u2 = bb.emit(relax.op.permute_dims(relax.op.reshape(u, (alpha * alpha, co, ci)), [0, 2, 1]))
    # (the transform matrices are constants of the computes, not tensors: closures)
    v = bb.emit_te(lambda d: _winograd_input_te(d, bt, m, ph, pw, form), x,
                   primfunc_name_hint="winograd_input",
                   primfunc_attrs={_ROLE: "input", "slimfx.tile": m, "slimfx.padding": [ph, pw],
                                   "slimfx.weight_form": form})
    # Fusion pattern "out-elementwise-fusable" (4), as a convolution: ReLU, bias and residual
    # adds fuse into the output transform, but never the next layer's input transform.
    if form == "g" and FORM_OUTPUT:  # one kernel: each task transforms its own channels
        return bb.emit_te(lambda *a: _formed_output_te(*a, at=at, n=n, ho=ho, wo=wo), v, u2,
                          *([bias] if bias is not None else []),
                          primfunc_name_hint="winograd_matmul_output",
                          primfunc_attrs={"op_pattern": 4, _ROLE: "gemm_output", "slimfx.tile": m})
    gemm_te = {"g": lambda a, b: _formed_gemm_te(a, b, g1),
               "h": lambda a, b: _factored_gemm_te(a, b, g1)}.get(form, _batch_gemm_te)
    mm = bb.emit_te(gemm_te, v, u2, primfunc_name_hint="winograd_matmul")
    return bb.emit_te(lambda mt, b: _winograd_output_te(mt, b, at, n, ho, wo), mm, bias,
                      primfunc_name_hint="winograd_output",
                      primfunc_attrs={"op_pattern": 4, _ROLE: "output", "slimfx.tile": m})


# --------------------------------------------------------------------------- winograd schedules
def _prepare_input(sch, block, rows_prefix: str, lanes: int,
                   inline_pad: bool = True) -> tuple[list, int]:
    """An input transform's kernel: the producer's layout conversions inlined into the
    ``NHWC`` pad copy, which is itself inlined when it reads a blocked input (contiguous
    channel vectors) or else scheduled as a copy.  Returns the row blocks (``rows_prefix``)
    and the vector width (at most the input's channel block).  ``inline_pad`` False keeps
    the copy for any input: a kernel that reads each input value many times (the FFT's
    rows, once per frequency row) then reads it without bounds checks."""
    pad, rows = None, []
    for b in cs._blocks(sch):
        name = cs._block_name(sch, b)
        if name.startswith(PAD_BLOCK):
            pad = b
        elif name.startswith(rows_prefix):
            rows.append(b)
        elif not sch.get(b).same_as(sch.get(block)):
            sch.compute_inline(b)
    if pad is not None:
        src = [r.source.shape for r in sch.get(pad).reads if len(r.source.shape) == 5]
        if src:  # a blocked input: vectors within one channel block (contiguous loads)
            lanes = cs._largest_divisor(int(src[0][4]), lanes)
            if PAD_INLINE and inline_pad:
                sch.compute_inline(pad)
                pad = None
    if pad is not None:
        bl, y, x, c = sch.get_loops(pad)
        co, ci = cs._vector_split(sch, c, lanes)
        sch.reorder(*(lp for lp in (bl, y, x, co) if lp is not None), ci)
        sch.parallel(sch.fuse(bl, y))
        sch.vectorize(ci)
    return rows, lanes


def _schedule_input(sch, block, lanes: int) -> None:
    rows, lanes = _prepare_input(sch, block, INPUT_ROWS_BLOCK, lanes)
    loops = sch.get_loops(block)
    if len(loops) == 5:  # V stored (eps, Cin / vb, nu, tile, vb) for a GEMM forming U
        eps, cb, nu, p, c = loops
        co, ci = cs._vector_split(sch, c, lanes)
        chunks = [p, cb] if co is None else [p, cb, co]
        sch.reorder(*chunks, eps, nu, ci)
        tile = sch.fuse(*chunks)
    else:
        e, p, c = loops
        co, ci = cs._vector_split(sch, c, lanes)
        if co is not None:
            sch.reorder(p, co, e, ci)
            tile = sch.fuse(p, co)
        else:
            sch.reorder(p, e, ci)
            tile = p
        alpha = math.isqrt(cs._extent(sch, e))
        eps, nu = sch.split(e, [alpha, alpha])
    sch.parallel(tile)
    sch.unroll(eps)
    sch.unroll(nu)
    sch.vectorize(ci)
    for r in rows:
        # B^T d's row eps at the eps loop: all that V[(eps, nu)] reads (ROW_TRANSFORMS)
        _compute_in_registers(sch, r, block, eps if ROW_TRANSFORMS else tile, lanes)


def _schedule_fft_input(sch, block, lanes: int) -> None:
    # Parallel over (tile, block of channels); per frequency row u (a loop: its twiddles
    # come from a table), the rows R_C[u], R_S[u] (N vectors each, registers), then the H
    # frequencies v and both parts unrolled, the DFT's constants folded in.
    rows, lanes = _prepare_input(sch, block, FFT_IN_ROWS_BLOCK, lanes, inline_pad=False)
    q, p, part, c = sch.get_loops(block)
    u, which, v = sch.split(q, [None, 2, math.isqrt(cs._extent(sch, q) // 2)])
    ci = cs._extent(sch, c)
    vec = lanes if ci % lanes == 0 else cs._largest_divisor(ci, lanes)
    cc, cv = sch.split(c, [None, vec])
    sch.reorder(p, cc, u, which, part, v, cv)
    sch.parallel(sch.fuse(p, cc))
    for lp in (which, part, v):
        sch.unroll(lp)
    sch.vectorize(cv)
    # the x-DFT's partial sums (consumers of the rows) are placed at u first, the rows
    # before them
    for r in _consumers_first(sch, rows):
        _compute_in_registers(sch, r, block, u, vec)


def _consumers_first(sch, blocks: list) -> list:
    """``blocks`` ordered so that each comes after those of them that read it: the order in
    which to compute them at a loop of the block they all feed."""
    left, order = list(blocks), []
    while left:
        for b in left:
            others = [sch.get(o) for o in left if o is not b]
            if not any(sch.get(c).same_as(o) for c in sch.get_consumers(b) for o in others):
                order.append(b)
                left.remove(b)
                break
        else:
            raise LoweringError("blocks that read each other in a cycle")
    return order


def _compute_in_registers(sch, block, consumer, anchor, lanes: int) -> None:
    """``block`` computed at ``anchor`` (a loop of ``consumer``), its loops there unrolled
    and the innermost vectorized: constants folded, values in registers."""
    depth = 1 + next(i for i, lp in enumerate(sch.get_loops(consumer))
                     if sch.get_sref(lp).same_as(sch.get_sref(anchor)))
    sch.compute_at(block, anchor)
    *outer, inner = sch.get_loops(block)[depth:]
    for lp in outer:
        sch.unroll(lp)
    if cs._vector_ok(cs._extent(sch, inner), lanes):
        sch.vectorize(inner)


def _schedule_output(sch, block, lanes: int) -> None:
    # Inline the element-wise ops fused after the transform (ReLU, residual add) into the
    # last block, then tile that block by m x m, unrolled so the constants of A fold, with
    # (A^T M) of each tile row computed at it (registers).
    _schedule_tiled_output(sch, lanes, _tile_of(sch, block), OUTPUT_ROWS_BLOCK, True)


def _schedule_fft_output(sch, block, lanes: int) -> None:
    # As Winograd's output transform, per T x T tile: its rows a loop (their twiddles
    # come from a table), Z_r and Z_i of a row (H vectors each) computed at it, the T
    # columns of the row unrolled with the inverse DFT's constants folded in.
    _schedule_tiled_output(sch, lanes, _tile_of(sch, block), FFT_OUT_ROWS_BLOCK, False)


def _schedule_tiled_output(sch, lanes: int, m: int, rows_prefix: str, unroll_rows: bool) -> None:
    rows = []
    for b in cs._blocks(sch)[:-1]:
        if cs._block_name(sch, b).startswith(rows_prefix):
            rows.append(b)
        else:
            sch.compute_inline(b)
    loops = sch.get_loops(cs._blocks(sch)[-1])
    if len(loops) == 5:  # NCHW{c}c: the channel block is the vector (contiguous stores)
        b, co, y, x, ci = loops
        if cs._extent(sch, ci) > lanes:
            cb, ci = sch.split(ci, [None, lanes])
            co = sch.fuse(co, cb)
    elif len(loops) == 4:  # NCHW: vectorize a block of channels (strided stores)
        b, c, y, x = loops
        co, ci = cs._vector_split(sch, c, lanes)
    else:
        raise LoweringError(f"unexpected output transform kernel with {len(loops)} loops")
    yo, yi = sch.split(y, [None, m])
    xo, xi = sch.split(x, [None, m])
    # Tiles in parallel, a tile's channel chunks inside: M[(eps, nu), p, :] is read whole
    # (contiguous), not a chunk of it per task (chunks outside tiles fetched each line of
    # M once per chunk).
    outer = [lp for lp in (b, yo, xo) if lp is not None]
    sch.reorder(*outer, *(lp for lp in (co,) if lp is not None), yi, xi, ci)
    if not unroll_rows and co is not None:  # FFT: few tiles (often one); channels too
        outer.append(co)
        co = None
    tile = sch.fuse(*outer)
    sch.parallel(tile)
    if unroll_rows:
        sch.unroll(yi)
    sch.unroll(xi)
    sch.vectorize(ci)
    for r in rows:  # row i of the intermediate at the row loop: all that its outputs read
        _compute_in_registers(sch, r, cs._blocks(sch)[-1],
                              yi if ROW_TRANSFORMS else (co if co is not None else tile), lanes)


def _tile_of(sch, block) -> int:
    """The output tile: the output transform's block is named ``..._m{m}`` (Winograd) or
    ``..._t{tile}`` (FFT)."""
    name = cs._block_name(sch, block)
    found = re.search(r"_[mt](\d+)$", name)
    if found is None:
        raise LoweringError(f"output transform block '{name}' does not name its tile")
    return int(found.group(1))


def _prefetch_bytes() -> int | None:
    return PREFETCH_BYTES if PREFETCH_SMALL else None


def _prefetches(rows: int) -> bool:
    """Whether a transform-domain GEMM of ``rows`` rows prefetches its next task's weights
    (:data:`STREAM_ONE_ROW`)."""
    return rows > 1 or not STREAM_ONE_ROW


def _schedule_formed_gemm(sch, block, lanes: int) -> None:
    # FORM_U: a task is one panel of output channels.  Per vector of it, the reduction over
    # input channels runs in chunks of FORM_K_CHUNK; per chunk and point eps (unrolled: the
    # coefficients of G1 fold), all points nu x rows of accumulators in registers over the
    # chunk, U formed from g in each iteration; the chunk's g (9 KB) stays in L1 for the
    # six points, and each point prefetches a sixth of the next chunk's (the next task's
    # first one after the last), so the stream from memory overlaps the arithmetic.  Where
    # the accumulators would not fit the vector registers (32 with AVX-512, else 16
    # assumed), the points nu are split into groups, each its own pass over the chunk.
    # With the output transform in the kernel (FORM_OUTPUT), the task is its loop over
    # panels of output channels, and the GEMM is computed at it, before its tiles.
    g = next(r.source for r in sch.get(block).reads if len(r.source.shape) == 4)  # g
    panels, _, _, nb = cs._ints(g.shape)
    alpha = cs._extent(sch, sch.get_loops(block)[0])
    task = _task_output(sch, nb, alpha - 2, lanes)
    if task is not None:
        sch.compute_at(block, task, preserve_unit_loops=True)
    eps, nu, i, j, k = sch.get_loops(block)[-5:]
    rows, k_extent = cs._extent(sch, i), cs._extent(sch, k)
    vec = lanes if nb % lanes == 0 else cs._largest_divisor(nb, lanes)
    budget = (32 if lanes >= 16 else 16) - 8
    groups = next(d for d in range(1, alpha + 1)
                  if alpha % d == 0 and (alpha // d * rows <= budget or d == alpha))
    if task is None:
        task, jv, ji = sch.split(j, [None, nb // vec, vec])
        outer = [task]
    else:
        jv, ji = sch.split(j, [nb // vec, vec])
        outer = []
    nug, nu = sch.split(nu, [groups, alpha // groups])
    vb = int(next(r.source for r in sch.get(block).reads if len(r.source.shape) == 5).shape[-1])
    kc = vb * cs._largest_divisor(k_extent // vb, max(1, FORM_K_CHUNK // vb))
    ko, k1, k = sch.split(k, [None, kc // vb, vb])  # k1, k: V's (Cin / vb, vb) in the chunk
    sch.reorder(*outer, jv, ko, eps, nug, k1, k, nu, i, ji)
    acc = sch.cache_write(block, 0, "global")
    sch.reverse_compute_at(acc, jv)
    sch.parallel(task)
    for lp in (eps, nug, nu, i):
        sch.unroll(lp)
    sch.vectorize(ji)
    sch.decompose_reduction(block, ko)
    sch.vectorize(sch.get_loops(acc)[-1])
    if FORM_PREFETCH:  # a sixth of chunk ko + 1 (or of the next panel's first) per point
        from tvm import te

        chunk, line = kc * 9 * nb, cs._LINE_BYTES // 4  # elements (float32)
        per = -(-chunk // (line * alpha))  # lines per point
        base = te.min((sch.get(task).loop_var * (k_extent // kc) + sch.get(ko).loop_var + 1)
                      * chunk + sch.get(eps).loop_var * per * line,
                      panels * k_extent * 9 * nb - per * line)  # the last lines: in the buffer
        again = per if FORM_PREFETCH_TWICE else 0  # the point before's sixth, then this one's
        cs.prefetch_lines(sch, eps, g, lambda t: base + (t - again) * line, again + per, flat=True)


def _task_output(sch, nb: int, m: int, lanes: int):
    """The output transform fused after a formed GEMM (:data:`FORM_OUTPUT`), if any,
    scheduled as tasks of ``nb`` output channels (the element-wise ops after it inlined;
    tile rows unrolled and ``A^T M``'s rows in registers at the row loop, as in
    :func:`_schedule_tiled_output`); its task loop, or None without one."""
    blocks = [b for b in cs._blocks(sch) if not cs._block_name(sch, b).startswith(GEMM_BLOCK)]
    if not blocks:
        return None
    rows = [b for b in blocks if cs._block_name(sch, b).startswith(OUTPUT_ROWS_BLOCK)]
    last = blocks[-1]
    for b in blocks[:-1]:
        if b not in rows:
            sch.compute_inline(b)
    loops = sch.get_loops(last)
    if len(loops) == 5:  # NCHW{cb}c, cb = nb: a task per channel block, its vectors inside
        b, task, y, x, c = loops
        if cs._extent(sch, c) != nb:
            raise LoweringError(f"fused Winograd output: channel block {cs._extent(sch, c)} "
                                f"is not the GEMM's panel of {nb}")
    elif len(loops) == 4:  # NCHW: a task per nb channels, vectors of them (strided stores)
        b, c, y, x = loops
        task, c = sch.split(c, [None, nb])
    else:
        raise LoweringError(f"unexpected fused output transform with {len(loops)} loops")
    co, ci = cs._vector_split(sch, c, lanes)
    yo, yi = sch.split(y, [None, m])
    xo, xi = sch.split(x, [None, m])
    sch.reorder(task, *(lp for lp in (b, co, yo, xo) if lp is not None), yi, xi, ci)
    sch.unroll(yi)
    sch.unroll(xi)
    sch.vectorize(ci)
    for r in rows:
        _compute_in_registers(sch, r, last, yi if ROW_TRANSFORMS else xo, lanes)
    return task


def _schedule_gemm(sch, block, lanes: int) -> None:
    shapes = [cs._ints(r.source.shape) for r in sch.get(block).reads]
    if any(len(sh) == 5 for sh in shapes) and any(len(sh) == 4 and sh[2] == 9 for sh in shapes):
        return _schedule_formed_gemm(sch, block, lanes)  # V (5-D) and g (FORM_U)
    # rows (tiles) x up to 4 vectors of output channels in registers (16 accumulators at
    # most), the reduction over input channels outside them; parallel over (point, column
    # panel), row tiles inside, so a panel of the (large) transformed weight is streamed
    # from memory once, in order when ``U`` is packed (:func:`gemm_panel`), and re-read
    # from L1 by the other row tiles; the next task's panel is prefetched meanwhile
    # (:func:`cpu_schedules.prefetch_next_task`) unless one row reads it (STREAM_ONE_ROW).
    e, i, j, k = sch.get_loops(block)
    rows, cols, k_extent = cs._extent(sch, i), cs._extent(sch, j), cs._extent(sch, k)
    packed = [r.source for r in sch.get(block).reads if len(r.source.shape) >= 4]
    factored = bool(packed) and len(packed[0].shape) == 5  # H: (alpha, cols / nb, 3, K, nb)
    if packed:  # U packed as (batch, cols / nb, K, nb)
        nb = int(packed[0].shape[-1])
    else:
        nb = 2 * lanes if cols % (2 * lanes) == 0 else cols
    vec = lanes if nb % lanes == 0 else cs._largest_divisor(nb, lanes)
    # up to 8 rows; a row count with no divisor in 4..8 (49 tiles of a 28x28 map) is split
    # by 8 with a guard on the last tile, measured 1.6x faster than its 1-row tiles.
    ri = cs._largest_divisor(rows, 8)
    if ri < 4:
        ri = min(rows, 8)
    max_nv = max(1, 16 // ri)
    nv = nb // vec
    jo, jv, ji = sch.split(j, [None, nv, vec])
    io, ii = sch.split(i, [None, ri])
    # factored: a task is (eps, panel), its alpha points nu unrolled (the coefficients
    # forming U from H fold) and reading the same panels of H
    outer, inner = (sch.split(e, [None, math.isqrt(cs._extent(sch, e))]) if factored
                    else (e, None))
    # factored: all points over one chunk of the reduction, then the next (FACTOR_K_CHUNK)
    one_tile = -(-rows // ri) == 1
    kc = cs._largest_divisor(k_extent, FACTOR_K_CHUNK) if factored and FACTOR_K_CHUNKS \
        and one_tile else 0
    ko = None
    if 8 <= kc < k_extent:
        ko, k = sch.split(k, [None, kc])
    first = [lp for lp in (jo, ko, inner) if lp is not None]
    if nv > max_nv:
        jvo, jv = sch.split(jv, [None, cs._largest_divisor(nv, max_nv)])
        sch.reorder(outer, *first, jvo, io, k, ii, jv, ji)
        between = [*first[1:], jvo, io]
    else:
        sch.reorder(outer, *first, io, k, ii, jv, ji)
        between = [*first[1:], io]
    acc = sch.cache_write(block, 0, _acc_scope() if ko is None else "global")
    sch.reverse_compute_at(acc, io if ko is None else jo)
    task = sch.fuse(outer, jo)
    sch.parallel(task)
    if inner is not None:
        sch.unroll(inner)
    sch.vectorize(ji)
    sch.unroll(jv)
    sch.unroll(ii)
    sch.decompose_reduction(block, k if ko is None else ko)
    sch.vectorize(sch.get_loops(acc)[-1])
    # task (point, panel) reads panel ``task`` of U: prefetch the next one
    span = math.prod(cs._ints(packed[0].shape)) // cs._extent(sch, task) if packed else 0
    if packed and span % (k_extent * nb) == 0 and _prefetches(rows):
        cs.prefetch_next_task(sch, task, between, k, packed[0], span, min_bytes=_prefetch_bytes())


def _schedule_complex_gemm(sch, block, lanes: int) -> None:
    # As the GEMM above, with the output's real/imaginary part ``t`` and the reduction's
    # ``s`` unrolled inside: per input channel, one panel of Re W and Im W is loaded and
    # feeds 4 FMAs per row and vector (rows x 2 x vectors accumulators, 16 at most).
    e, i, jo, t, c, k, s = sch.get_loops(block)
    rows, nb = cs._extent(sch, i), cs._extent(sch, c)
    vec = lanes if nb % lanes == 0 else cs._largest_divisor(nb, lanes)
    ri = cs._largest_divisor(rows, 8)
    if ri < 4:
        ri = min(rows, 8)
    nv = nb // vec
    max_nv = max(1, 8 // ri)
    jv, ji = sch.split(c, [nv, vec])
    io, ii = sch.split(i, [None, ri])
    if nv > max_nv:
        jvo, jv = sch.split(jv, [None, cs._largest_divisor(nv, max_nv)])
        sch.reorder(e, jo, jvo, io, k, s, ii, t, jv, ji)
        between = [jvo, io]
    else:
        sch.reorder(e, jo, io, k, s, ii, t, jv, ji)
        between = [io]
    acc = sch.cache_write(block, 0, _acc_scope())
    sch.reverse_compute_at(acc, io)
    task = sch.fuse(e, jo)
    sch.parallel(task)
    sch.vectorize(ji)
    for lp in (jv, t, ii, s):
        sch.unroll(lp)
    sch.decompose_reduction(block, k)
    sch.vectorize(sch.get_loops(acc)[-1])
    local = sch.get(acc).reads[0].source
    w = next(r.source for r in sch.get(block).reads
             if len(r.source.shape) == 5 and not r.source.same_as(local))
    _, _, ci, _, nb_w = cs._ints(w.shape)  # task (frequency, panel) reads one panel
    if _prefetches(rows):
        cs.prefetch_next_task(sch, task, between, k, w, ci * 2 * nb_w, min_bytes=_prefetch_bytes())


def _schedule_fft_forward_y(sch, block, lanes: int) -> None:
    # A transpose (tiles x channels x frequencies -> frequencies x tiles x channels): for each
    # (tile, part, block of channels, row u), the H frequencies of a row are unrolled and
    # the channels vectorized, so the 2 x vec rows of the DFT's output read are whole cache
    # lines, reused across the row, and each store is a full vector.
    for b in cs._blocks(sch):
        if not sch.get(b).same_as(sch.get(block)):
            sch.compute_inline(b)
    q, t, r = sch.get_loops(block)
    half = int(sch.get(block).reads[0].source.shape[-1]) // 2
    ci = cs._extent(sch, r) // 2
    vec = lanes if ci % lanes == 0 else cs._largest_divisor(ci, lanes)
    u, v = sch.split(q, [None, half])
    part, cb, cc = sch.split(r, [2, None, vec])
    sch.reorder(t, part, cb, u, v, cc)
    sch.parallel(sch.fuse(t, part, cb))
    sch.unroll(v)
    sch.vectorize(cc)


def _schedule_fft_regroup(sch, block, lanes: int) -> None:
    # The transpose back (frequencies x tiles x channels -> tiles x channels x frequencies),
    # the reshape after it written directly: vectorized over a block of channels (each load
    # a full vector of the product), the 2H frequencies of a row unrolled, so the scattered
    # stores fill whole cache lines of the next DFT's input.
    for b in cs._blocks(sch):
        if not sch.get(b).same_as(sch.get(block)):
            sch.reverse_compute_inline(b)
    row, u, w = sch.get_loops(block)
    rd = sch.get(block).reads[0].source.shape  # (N*H, P, Co / nb, 2, nb)
    co = int(rd[2]) * int(rd[4])
    vec = lanes if co % lanes == 0 else cs._largest_divisor(co, lanes)
    rb, cc = sch.split(row, [None, vec])
    sch.reorder(rb, u, w, cc)
    sch.parallel(rb)
    sch.unroll(w)
    sch.vectorize(cc)


cs.ANCHOR_SCHEDULES[INPUT_BLOCK] = ("winograd_input", _schedule_input)
cs.ANCHOR_SCHEDULES[FFT_FORWARD_BLOCK] = ("fft_forward_y", _schedule_fft_forward_y)
cs.ANCHOR_SCHEDULES[FFT_INPUT_BLOCK] = ("fft_input", _schedule_fft_input)
cs.ANCHOR_SCHEDULES[FFT_OUTPUT_BLOCK] = ("fft_output", _schedule_fft_output)
cs.ANCHOR_SCHEDULES[FFT_REGROUP_BLOCK] = ("fft_regroup", _schedule_fft_regroup)
cs.ANCHOR_SCHEDULES[FFT_CGEMM_BLOCK] = ("fft_complex_gemm", _schedule_complex_gemm)
cs.ANCHOR_SCHEDULES[GEMM_BLOCK] = ("winograd_gemm", _schedule_gemm)
cs.ANCHOR_SCHEDULES[FFT_GEMM_BLOCK] = ("fft_gemm", _schedule_gemm)
cs.ANCHOR_SCHEDULES[OUTPUT_BLOCK] = ("winograd_output", _schedule_output)


# --------------------------------------------------------------------------- fft
def dft_matrices(size: int, tile: int) -> dict[str, np.ndarray]:
    """Real matrices of the forward and inverse 2-D real DFTs of ``size x size`` tiles.

    - ``rx`` (size, 2H): ``d @ rx = [Re, Im]`` of the real DFT along x (``H = size/2+1``);
    - ``ly`` (2 size, size): ``ly @ A = [[C A], [S A]]`` along y, combined as
      ``Re = C Ar + S Ai``, ``Im = C Ai - S Ar``;
    - ``liy`` (2 tile, size): the inverse along y for the first ``tile`` rows;
    - ``irx`` (2H, tile): the inverse real DFT along x for the first ``tile`` columns,
      with the ``1 / size^2`` scale.

    >>> mats = dft_matrices(8, 4)
    >>> d = np.random.default_rng(0).standard_normal((8, 8))
    >>> a = d @ mats["rx"]
    >>> np.allclose(a[:, :5] + 1j * a[:, 5:], np.fft.rfft(d, axis=1))
    True
    """
    half = size // 2 + 1
    y, u = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    xv = np.outer(np.arange(size), np.arange(half)) * 2 * np.pi / size
    rx = np.concatenate([np.cos(xv), -np.sin(xv)], axis=1)
    ang = u * y * 2 * np.pi / size  # symmetric in (u, y)
    ly = np.concatenate([np.cos(ang), np.sin(ang)], axis=0)
    liy = np.concatenate([np.cos(ang[:tile]), np.sin(ang[:tile])], axis=0)
    weight = np.full(half, 2.0)
    weight[0] = 1.0
    if size % 2 == 0:
        weight[-1] = 1.0
    xt = np.outer(np.arange(half), np.arange(tile)) * 2 * np.pi / size
    irx = np.concatenate([weight[:, None] * np.cos(xt), -weight[:, None] * np.sin(xt)],
                         axis=0) / size ** 2
    return {"rx": rx, "ly": ly, "liy": liy, "irx": irx}


def _fft_tiles_te(x, size: int, tile: int, ph: int, pw: int, ho: int, wo: int):
    from tvm import te, tirx

    n, ci, h, w = cs._ints(x.shape)
    th, tw = -(-ho // tile), -(-wo // tile)

    def f(p, c, yy, xx):
        b, t = p // (th * tw), p % (th * tw)
        iy = (t // tw) * tile + yy - ph
        ix = (t % tw) * tile + xx - pw
        return tirx.if_then_else(tirx.all(iy >= 0, iy < h, ix >= 0, ix < w), x[b, c, iy, ix],
                                 tirx.const(0.0, x.dtype))

    return te.compute((n * th * tw, ci, size, size), f, name="fft_tiles")


def _fft_untile_te(z, bias, n: int, ho: int, wo: int):
    from tvm import te

    p, co, tile, _ = cs._ints(z.shape)
    th, tw = -(-ho // tile), -(-wo // tile)

    def f(b, c, yy, xx):
        val = z[(b * th + yy // tile) * tw + xx // tile, c, yy % tile, xx % tile]
        return val + bias[c] if bias is not None else val

    return te.compute((n, co, ho, wo), f, name="fft_untile")


def _fft_complex_gemm_te(v, w, size: int = 0):
    """The spectral product, summed over input channels, per frequency ``q``:
    ``v`` ``(Q, P, 2Ci)`` ``[Re V | Im V]`` times the packed spectrum ``w``
    ``(Q, Co / nb, Ci, 2, nb)`` (panels of ``nb`` output channels, ``Re W`` then ``Im W``
    per input channel) -> ``(Q, P, Co / nb, 2, nb)`` (``Re M`` then ``Im M`` per panel) with
    ``Re M = Re V Re W - Im V Im W``, ``Im M = Re V Im W + Im V Re W``.

    ``size`` > 0: ``v`` is ``(Q', P, 2, Ci)``, frequency row ``u`` in slot
    :func:`fft_slot` (the fused forward transform's order), read as such.

    The same MACs as a real GEMM by ``[[Re W, Im W], [-Im W, Re W]]``, but each complex
    weight is 2 reals, not 4: half the bytes of the stored spectrum, which is what small
    maps with many channels wait for.  The reduction over the real/imaginary part ``s``
    and the output's part ``t`` are unrolled by the schedule, so the selects fold.
    """
    from tvm import te, tirx

    p = int(v.shape[1])
    q, panels, ci, _, nb = cs._ints(w.shape)
    rk = te.reduce_axis((0, ci), name="k")
    rs = te.reduce_axis((0, 2), name="s")
    half = size // 2 + 1

    def f(e, i, jo, t, c):
        re, im = w[e, jo, rk, 0, c], w[e, jo, rk, 1, c]
        if w.dtype != v.dtype:  # a float16 spectrum: widened as it is read
            re, im = re.astype(v.dtype), im.astype(v.dtype)
        coef = tirx.Select(rs == t, re, tirx.Select(rs == 0, im, -im))
        if size:
            vv = v[fft_slot(e // half, size) * half + e % half, i, rs, rk]
        else:
            vv = v[e, i, rs * ci + rk]
        return te.sum(vv * coef, axis=[rk, rs])

    return te.compute((q, p, panels, 2, nb), f, name=FFT_CGEMM_BLOCK)


def _fft_forward_y_te(ca, ci: int, size: int, half: int):
    """``[[C A], [S A]]`` ``(P Ci, 2N, 2H)`` -> spectrum ``(N*H, P, 2Ci)``: ``[Re | Im]``
    with ``Re = C Ar + S Ai``, ``Im = C Ai - S Ar``."""
    from tvm import te, tirx

    p = int(ca.shape[0]) // ci

    def f(q, t, r):
        u, v, row = q // half, q % half, t * ci + r % ci
        re = ca[row, u, v] + ca[row, size + u, half + v]
        im = ca[row, u, half + v] - ca[row, size + u, v]
        return tirx.Select(r < ci, re, im)

    return te.compute((size * half, p, 2 * ci), f, name=FFT_FORWARD_BLOCK)


def _fft_regroup_te(mm, size: int, half: int):
    """Spectral product ``(N*H, P, Co / nb, 2, nb)`` -> ``(P Co, N, 2H)`` (rows ``u``:
    ``[Mr | Mi]``)."""
    from tvm import te

    _, p, panels, _, nb = cs._ints(mm.shape)
    co = panels * nb

    def f(row, u, w):
        t, c = row // co, row % co
        return mm[u * half + w % half, t, c // nb, w // half, c % nb]

    return te.compute((p * co, size, 2 * half), f, name=FFT_REGROUP_BLOCK)


def _fft_inverse_y_te(z, tile: int, half: int):
    """``[[C M], [S M]]`` ``(P, Co, 2T, 2H)`` -> ``(P, Co, T, 2H)``: ``[zr | zi]`` with
    ``zr = C Mr - S Mi``, ``zi = S Mr + C Mi``."""
    from tvm import te, tirx

    p, co = cs._ints(z.shape)[:2]

    def f(t, c, y, w):
        v = w % half
        zr = z[t, c, y, v] - z[t, c, tile + y, half + v]
        zi = z[t, c, tile + y, v] + z[t, c, y, half + v]
        return tirx.Select(w < half, zr, zi)

    return te.compute((p, co, tile, 2 * half), f, name="fft_inverse_y")


def _clean(matrix: np.ndarray) -> np.ndarray:
    """Twiddles rounded where they are 0 or +-1 up to float error (so they drop out or
    become adds), as float32."""
    out = np.where(np.abs(matrix) < 1e-9, 0.0, matrix)
    out = np.where(np.abs(np.abs(out) - 1) < 1e-9, np.sign(out), out)
    return out.astype("float32")


def fft_input_matrices(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fused forward transform's constants: ``ly`` (2N, N), ``[cos; sin]`` of
    ``2 pi u y / N`` (a table the kernel reads, row ``u`` not unrolled), and ``cos``,
    ``msin`` (H, N): ``cos`` and ``-sin`` of ``2 pi v x / N``, the real DFT along ``x``
    (unrolled: they fold).  With the rows ``R_C[u, x] = sum_y cos d``, ``R_S[u, x] = sum_y
    sin d`` and ``A = R_C cos``, ``B = R_S msin``, ``C = R_C msin``, ``D = R_S cos`` (summed
    over ``x``): ``X[u, v] = A + B + i (C - D)`` and, the input being real,
    ``X[N - u, v] = A - B + i (C + D)``, so rows ``u <= N/2`` are all the kernel computes.

    >>> ly, cos, msin = fft_input_matrices(6)
    >>> d = np.random.default_rng(0).standard_normal((6, 6))
    >>> rc, rs = (ly @ d)[:6], (ly @ d)[6:]  # u, x
    >>> a, b, c, e = rc @ cos.T, rs @ msin.T, rc @ msin.T, rs @ cos.T
    >>> x = np.fft.rfft2(d)
    >>> np.allclose(a + b + 1j * (c - e), x, atol=1e-5)
    True
    >>> np.allclose(a[1] - b[1] + 1j * (c[1] + e[1]), x[5], atol=1e-5)
    True
    """
    mats = dft_matrices(size, 1)
    half = size // 2 + 1
    rx = mats["rx"]  # (N, 2H): cos, -sin of 2 pi x v / N
    return _clean(mats["ly"]), _clean(rx[:, :half].T), _clean(rx[:, half:].T)


def fft_slot(u, size: int):
    """Where the fused forward transform puts frequency row ``u``: ``2 min(u, N - u)``,
    plus 1 above ``N / 2`` (``u`` may be symbolic)."""
    from tvm import tirx

    if isinstance(u, int):
        return 2 * u if 2 * u <= size else 2 * (size - u) + 1
    return tirx.Select(2 * u <= size, 2 * u, 2 * (size - u) + 1)


def _fft_input_te(x, ly, size: int, tile: int, ph: int, pw: int, ho: int, wo: int):
    """The padded input (``NCHW``, or blocked ``NCHW{cb}c``) -> its spectrum per tile,
    ``(2 (N/2 + 1) H, P, 2, Ci)`` (``Re``, ``Im``; frequency row ``u`` in slot
    :func:`fft_slot`, two slots unused): first ``R[u, s, x] = sum_y ly[s N + u, y] d[y, x]``
    for ``u <= N / 2`` (a row at a time), then the real DFT along ``x`` of ``R_C - i R_S``
    (row ``u``) and of ``R_C + i R_S`` (row ``N - u``)."""
    from tvm import te, tirx

    half = size // 2 + 1
    th, tw = -(-ho // tile), -(-wo // tile)
    pad, n, ci = _padded_nhwc(x, ph, pw, (th - 1) * tile + size, (tw - 1) * tile + size)
    _, cos, msin = fft_input_matrices(size)

    def rows(part):  # R_C (part 0) or R_S (1): a row u is N vectors
        def f(u, j, p, c):
            b, t = p // (th * tw), p % (th * tw)
            y0, x0 = t // tw * tile, t % tw * tile
            acc = ly[part * size + u, 0] * pad[b, y0, x0 + j, c]
            for yy in range(1, size):
                acc = acc + ly[part * size + u, yy] * pad[b, y0 + yy, x0 + j, c]
            return acc
        return te.compute((half, size, n * th * tw, ci), f, name=f"{FFT_IN_ROWS_BLOCK}_{part}")

    r = (rows(0), rows(1))
    # the DFT along x shared by rows u and N - u: A = R_C cos, B = R_S (-sin), C = R_C
    # (-sin), D = R_S cos (H vectors each); then Re = A +- B, Im = C -+ D

    def dft_x(i, m, src):
        return te.compute((half, half, n * th * tw, ci),
                          lambda u, v, p, c: _row_times(m, v, lambda j: src[u, j, p, c]),
                          name=f"{FFT_IN_ROWS_BLOCK}_s{i}")

    sums = [dft_x(i, m, src)
            for i, (m, src) in enumerate(((cos, r[0]), (msin, r[1]), (msin, r[0]), (cos, r[1])))]

    def spec(q, p, part, c):
        u, which, v = q // (2 * half), q // half % 2, q % half
        a, b, cc, d = (t[u, v, p, c] for t in sums)
        sign = tirx.Select(which == 0, tirx.const(1.0, "float32"), tirx.const(-1.0, "float32"))
        return tirx.Select(part == 0, a + sign * b, cc - sign * d)

    return te.compute((2 * half * half, n * th * tw, 2, ci), spec, name=FFT_INPUT_BLOCK)


def fft_output_matrices(size: int, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """The fused inverse transform's constants: ``liy`` (2T, N), ``[cos; sin]`` of
    ``2 pi u y / N`` for the ``T`` kept rows (a table), and the inverse real DFT along
    ``x`` as ``(T, 2H)`` rows over ``[Z_r | Z_i]`` (scaled by ``1 / N^2``; unrolled)."""
    mats = dft_matrices(size, tile)
    return _clean(mats["liy"]), mats["irx"].T.astype("float32")


def _fft_output_te(mm, bias, liy, size: int, tile: int, n: int, ho: int, wo: int,
                   block: int = 0):
    """The spectral product ``(N*H, P, Co / nb, 2, nb)`` -> the output, ``NCHW`` or
    channel-blocked ``NCHW{block}c``: per kept row ``y`` of a tile,
    ``Z[y, v] = sum_u e^{2 pi i u y / N} M[u, v]`` (``[Z_r | Z_i]``), then the inverse
    real DFT along ``x`` for the ``T`` kept columns, plus the bias."""
    from tvm import te

    half = size // 2 + 1
    _, p, panels, _, nb = cs._ints(mm.shape)
    co = panels * nb
    _, irx = fft_output_matrices(size, tile)

    def zrow(part):  # Z_r (part 0) or Z_i (1) of a kept row: H vectors
        def f(y, v, pp, c):
            acc = None
            for u in range(size):
                mr, mi = (mm[u * half + v, pp, c // nb, t, c % nb] for t in (0, 1))
                cu, su = liy[y, u], liy[tile + y, u]
                a = cu * mr - su * mi if part == 0 else su * mr + cu * mi
                acc = a if acc is None else acc + a
            return acc
        return te.compute((tile, half, p, co), f, name=f"{FFT_OUT_ROWS_BLOCK}_{part}")

    z = (zrow(0), zrow(1))

    def out(pp, c, i, j):
        return _row_times(irx, j, lambda k: z[k // half][i, k % half, pp, c])

    return _tiled_output_te(out, bias, tile, n, co, ho, wo, block, f"{FFT_OUTPUT_BLOCK}_t{tile}")


#: FFT convolution as three kernels: the forward transform (tiles, both DFTs) and the
#: inverse (both inverse DFTs, untiling, bias and what fuses after) each one kernel
#: vectorized over channels, reading and writing the blocked layout of their neighbours
#: (:func:`blocked_winograd`).  False composes them of matrix products, transposes and
#: gathers, each its own kernel over a tensor of all tiles (``--ab FUSED_FFT``).  Only CPU
#: lowerings fuse: a CUDA build keeps the matrix DFTs, which dlight schedules as GEMMs
#: (the fused kernels have no GPU schedule, and no GPU was at hand to measure one).
FUSED_FFT = True

#: (Unfused FFT only) let ``FuseOps`` fuse the FFT's tile gather into its producer (the previous layer's
#: untiling, an element-wise op between).  False keeps it a kernel of its own.
FUSE_FFT_TILES = False


@register_lowering(torch.ops.slimfx.fft_conv2d.default)
def _lower_fft(node, importer):
    from tvm import relax

    x, w_hat, bias, padding, kernel, tile = importer.retrieve_args(node)[:6]
    bb = importer.block_builder
    op = relax.op
    n, ci, h, w = cs._ints(importer.shape_of(x))
    _, size, half, _, co = cs._ints(importer.shape_of(w_hat))
    k, t = int(kernel), int(tile)
    ph, pw = (int(p) for p in padding)
    if (size != t + k - 1 and not fft_wraps(size, t, k, (h, w), (ph, pw))) \
            or half != size // 2 + 1:
        raise LoweringError(f"node '{node.name}': spectrum of shape "
                            f"{tuple(cs._ints(importer.shape_of(w_hat)))} does not fit tile {t} "
                            f"and kernel {k}")
    ho, wo = h + 2 * ph - k + 1, w + 2 * pw - k + 1
    ntiles = n * math.ceil(ho / t) * math.ceil(wo / t)
    # (2, N, H, Ci, Co) -> (N*H, Co / nb, Ci, 2, nb): weight-only, lifted to load time
    nb = gemm_panel(ntiles, co)  # half its panel: a column is a (Re, Im) pair of vectors
    nb = nb // 2 if nb % 32 == 0 else nb
    w_pack = bb.emit(op.permute_dims(op.reshape(w_hat, (2, size * half, ci, co // nb, nb)),
                                     [1, 3, 2, 0, 4]))
    if FUSED_FFT and target_kind() == "llvm":  # CPU schedules; CUDA keeps the matrix DFTs
        ly = relax.const(fft_input_matrices(size)[0])
        v = bb.emit_te(lambda a, tab: _fft_input_te(a, tab, size, t, ph, pw, ho, wo), x, ly,
                       primfunc_name_hint="fft_input",
                       primfunc_attrs={_ROLE: "input", "slimfx.tile": t,
                                       "slimfx.padding": [ph, pw], "slimfx.fft_size": size,
                                       "slimfx.out_hw": [ho, wo]})
        mm = bb.emit_te(lambda a, b: _fft_complex_gemm_te(a, b, size), v, w_pack,
                        primfunc_name_hint="fft_cmatmul")
        liy = relax.const(fft_output_matrices(size, t)[0])
        return bb.emit_te(lambda m, tab, *b: _fft_output_te(m, b[0] if b else None, tab, size,
                                                            t, n, ho, wo),
                          mm, liy, *([bias] if bias is not None else []),
                          primfunc_name_hint="fft_output",
                          primfunc_attrs={"op_pattern": 4, _ROLE: "output",
                                          "slimfx.tile": t, "slimfx.fft_size": size})
    mats = {key: relax.const(v.astype("float32")[None]) for key, v in dft_matrices(size, t).items()}

    def gemm(a, b, shape_a, shape_b):  # batched matmul through slimfx's GEMM schedule
        a = bb.emit(op.reshape(a, shape_a)) if shape_a else a
        b = bb.emit(op.reshape(b, shape_b)) if shape_b else b
        return bb.emit_te(_batch_gemm_te, a, b, FFT_GEMM_BLOCK, primfunc_name_hint="fft_matmul")

    d = bb.emit_te(lambda a: _fft_tiles_te(a, size, t, ph, pw, ho, wo), x,
                   primfunc_name_hint="fft_tiles",
                   primfunc_attrs=None if FUSE_FFT_TILES else {"op_pattern": 8})  # P, Ci, N, N
    rows = ntiles * ci
    a = gemm(d, mats["rx"], (1, rows * size, size), None)  # (P Ci N(y)), 2H: [Ar | Ai]
    ca = gemm(mats["ly"], a, None, (rows, size, 2 * half))  # P Ci, 2N: [C A; S A], 2H
    v = bb.emit_te(lambda c: _fft_forward_y_te(c, ci, size, half), ca,
                   primfunc_name_hint="fft_forward_y")
    # N*H, P, Co / nb, 2, nb: [Mr | Mi] per panel
    mm = bb.emit_te(_fft_complex_gemm_te, v, w_pack, primfunc_name_hint="fft_cmatmul")
    mm = bb.emit_te(lambda m: _fft_regroup_te(m, size, half), mm, primfunc_name_hint="fft_regroup")
    z = gemm(mats["liy"], mm, None, None)  # P Co, 2T: [C M; S M], 2H
    z = bb.emit(op.reshape(z, (ntiles, co, 2 * t, 2 * half)))
    zz = bb.emit_te(lambda m: _fft_inverse_y_te(m, t, half), z, primfunc_name_hint="fft_inverse_y")
    out = gemm(zz, mats["irx"], (1, ntiles * co * t, 2 * half), None)  # (P Co T), T
    out = bb.emit(op.reshape(out, (ntiles, co, t, t)))
    return bb.emit_te(lambda o, b: _fft_untile_te(o, b, n, ho, wo), out, bias,
                      primfunc_name_hint="fft_untile")


# --------------------------------------------------------------------------- blocked layouts
#: Element-wise ops that a channel-blocked tensor passes through unchanged in meaning.
_UNARY_OPS = frozenset({"relax.nn.relu", "relax.sigmoid", "relax.tanh", "relax.nn.silu",
                        "relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.leakyrelu"})
_BINARY_OPS = frozenset({"relax.add", "relax.subtract", "relax.multiply", "relax.divide",
                         "relax.maximum", "relax.minimum"})
_POOL_OPS = frozenset({"relax.nn.max_pool2d", "relax.nn.avg_pool2d"})


def _transform_block(call) -> tuple[str, int] | None:
    """``("block", cb)`` / ``("unblock", cb)`` for a ``layout_transform`` between ``NCHW``
    and ``NCHW{cb}c``; None for any other call."""
    if getattr(call.op, "name", "") != "relax.layout_transform":
        return None
    src, dst = cs._shape(call.args[0]), cs._shape(call)
    if src is None or dst is None:
        return None
    if len(src) == 4 and len(dst) == 5:
        kind, cb = "block", dst[4]
    elif len(src) == 5 and len(dst) == 4:
        kind, cb = "unblock", src[4]
    else:
        return None
    want = cs._block_map(cb) if kind == "block" else cs._unblock_map(cb)
    if call.attrs.pad_value is not None or not call.attrs.index_map.is_equivalent_to(want):
        return None
    return kind, cb


def _is_scalar(expr) -> bool:
    shape = cs._shape(expr)
    return shape is not None and all(s == 1 for s in shape)


def blocked_winograd(mod, lanes: int):
    """Winograd transforms that read and write ``NCHW{c}c`` directly, after ``ConvertLayout``.

    ``ConvertLayout`` leaves every kernel it does not know (the Winograd transforms are
    TIR functions) in ``NCHW``, with a layout transform on each side: from the blocked
    producer, and back to the blocked layout after the output transform (and the ReLU or
    residual add that follow it).  This pass re-emits the input transform on the blocked
    tensor and the output transform in the blocked layout whenever a blocked consumer
    (or another Winograd op) is downstream, carries the blocked form through the
    element-wise ops and pooling in between, and drops the transforms that become unused.
    """
    import tvm
    from tvm import relax

    if not BLOCKED:
        return mod
    at_bt = {m: tuple(t.numpy().astype("float32") for t in winograd_matrices(m, 3))
             for m in (2, 4)}

    def role(call) -> tuple[str, dict] | None:
        if getattr(call.op, "name", "") != "relax.call_tir":
            return None
        func = mod.functions.get(call.args[0]) if isinstance(call.args[0], tvm.ir.GlobalVar) \
            else None
        attrs = getattr(func, "attrs", None)
        if attrs is None or _ROLE not in attrs:
            return None
        return str(attrs[_ROLE]), attrs

    users: dict = {}
    for _gv, f in mod.functions.items():
        if isinstance(f, relax.Function):
            for blk in f.body.blocks:
                for bd in blk.bindings:
                    if isinstance(bd.value, relax.Call):
                        for a in bd.value.args:
                            for v in (a.fields if isinstance(a, relax.Tuple) else [a]):
                                if isinstance(v, relax.Var):
                                    users.setdefault(v, []).append(bd)

    def wanted_block(var, co: int, depth: int = 0) -> int | None:
        """The block a downstream consumer of ``var`` wants, through element-wise ops."""
        for bd in users.get(var, ()):
            call = bd.value
            name = getattr(call.op, "name", "")
            t = _transform_block(call)
            if t is not None and t[0] == "block":
                return t[1]
            r = role(call)
            if r is not None and r[0] == "input":
                return cs.channel_block(co, lanes)
            if depth < 8 and (name in _UNARY_OPS or name in _BINARY_OPS or name in _POOL_OPS):
                found = wanted_block(bd.var, co, depth + 1)
                if found:
                    return found
        return None

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def __init__(self):
            super().__init__(mod)
            self.alias: dict = {}  # NCHW var -> (its NCHW{cb}c twin, cb)

        def _emit(self, binding, expr):
            var = self.builder_.emit(expr, name_hint=binding.var.name)
            self.set_var_remap(binding.var, var)
            return var

        def _emit_blocked(self, binding, blocked, cb: int) -> None:
            """Bind ``blocked`` (an expression or a bound var); the original var becomes
            its NCHW view, which dead-code elimination drops unless something uses it."""
            vb = blocked if isinstance(blocked, relax.Var) else \
                self.builder_.emit(blocked, name_hint=binding.var.name + "_b")
            v = self._emit(binding, relax.op.layout_transform(vb, cs._unblock_map(cb)))
            self.alias[v] = (vb, cb)

        def _rewrite_fft(self, binding, r, ins) -> bool:
            size, t = int(r[1]["slimfx.fft_size"]), int(r[1]["slimfx.tile"])
            if r[0] == "input":
                twin = self.alias.get(ins[0])
                if twin is None:
                    return False
                ph, pw = (int(p) for p in r[1]["slimfx.padding"])
                ho, wo = (int(p) for p in r[1]["slimfx.out_hw"])
                var = self.builder_.emit_te(
                    lambda d, tab: _fft_input_te(d, tab, size, t, ph, pw, ho, wo), twin[0],
                    ins[1], primfunc_name_hint="fft_input",
                    primfunc_attrs={_ROLE: "input_blocked"})
                self.set_var_remap(binding.var, var)
                return True
            n, co, ho, wo = cs._shape(binding.var)
            cb = wanted_block(binding.var, co)
            if not cb or co % cb:
                return False
            vb = self.builder_.emit_te(  # (M, liy, bias) or (M, liy)
                lambda mt, tab, *b: _fft_output_te(mt, b[0] if b else None, tab, size, t, n,
                                                   ho, wo, cb), *ins,
                primfunc_name_hint="fft_output",
                primfunc_attrs={"op_pattern": 4, _ROLE: "output_blocked", "slimfx.tile": t})
            self._emit_blocked(binding, vb, cb)
            return True

        def visit_var_binding_(self, binding) -> None:
            call = binding.value
            if not isinstance(binding.var, relax.DataflowVar) or not isinstance(call, relax.Call) \
                    or not self._rewrite(binding, call):
                super().visit_var_binding_(binding)

        def _rewrite(self, binding, call) -> bool:
            args = [self.visit_expr(a) for a in call.args]
            name = getattr(call.op, "name", "")
            t = _transform_block(call)
            if t is not None and t[0] == "unblock":
                v = self._emit(binding, relax.Call(call.op, args, call.attrs))
                self.alias[v] = (args[0], t[1])
                return True
            if t is not None and t[0] == "block":
                twin = self.alias.get(args[0])
                if twin is None or twin[1] != t[1]:
                    return False
                self.set_var_remap(binding.var, twin[0])
                return True
            r = role(call)
            if r is not None and "slimfx.fft_size" in r[1]:
                return self._rewrite_fft(binding, r, list(args[1].fields))
            if r is not None:
                ins = list(args[1].fields)
                m = int(r[1]["slimfx.tile"])
                at, _, bt = at_bt[m]
                if r[0] == "input":
                    twin = self.alias.get(ins[0])
                    if twin is None:
                        return False
                    ph, pw = (int(p) for p in r[1]["slimfx.padding"])
                    form = str(r[1].get("slimfx.weight_form", "u"))
                    var = self.builder_.emit_te(
                        lambda d: _winograd_input_te(d, bt, m, ph, pw, form), twin[0],
                        primfunc_name_hint="winograd_input",
                        primfunc_attrs={_ROLE: "input_blocked"})
                    self.set_var_remap(binding.var, var)
                    return True
                if r[0] == "gemm_output":  # (V, g[, bias]): the formed GEMM and the output
                    n, co, ho, wo = cs._shape(binding.var)
                    cb = wanted_block(binding.var, co)
                    if not cb or cb != int(cs._shape(ins[1])[-1]):  # a task's block: g's panel
                        return False
                    vb = self.builder_.emit_te(
                        lambda *a: _formed_output_te(*a, at=at, n=n, ho=ho, wo=wo, block=cb),
                        *ins, primfunc_name_hint="winograd_matmul_output",
                        primfunc_attrs={"op_pattern": 4, _ROLE: "gemm_output_blocked",
                                        "slimfx.tile": m})
                    self._emit_blocked(binding, vb, cb)
                    return True
                if r[0] == "output":
                    n, co, ho, wo = cs._shape(binding.var)
                    cb = wanted_block(binding.var, co)
                    if not cb or co % cb:
                        return False
                    vb = self.builder_.emit_te(  # (M, bias) or (M,)
                        lambda mt, *b: _winograd_output_te(mt, b[0] if b else None, at, n, ho,
                                                           wo, cb), *ins,
                        primfunc_name_hint="winograd_output",
                        primfunc_attrs={"op_pattern": 4, _ROLE: "output_blocked",
                                        "slimfx.tile": m})
                    self._emit_blocked(binding, vb, cb)
                    return True
                return False
            if name in _UNARY_OPS:
                twin = self.alias.get(args[0])
                if twin is None or not all(_is_scalar(a) for a in args[1:]):
                    return False
                self._emit_blocked(binding, relax.Call(call.op, [twin[0], *args[1:]],
                                                       call.attrs), twin[1])
                return True
            if name in _BINARY_OPS:
                a, b = (self.alias.get(x) for x in args)
                if a is not None and b is not None and a[1] == b[1]:
                    new = [a[0], b[0]]
                elif a is not None and _is_scalar(args[1]):
                    new = [a[0], args[1]]
                elif b is not None and _is_scalar(args[0]):
                    new = [args[0], b[0]]
                else:
                    return False
                cb = (a or b)[1]
                self._emit_blocked(binding, relax.Call(call.op, new, call.attrs), cb)
                return True
            if name in _POOL_OPS:
                twin = self.alias.get(args[0])
                at_ = call.attrs
                if twin is None or at_.layout != "NCHW" or at_.out_layout != "NCHW":
                    return False
                layout = f"NCHW{twin[1]}c"
                fn = relax.op.nn.max_pool2d if name.endswith("max_pool2d") else \
                    relax.op.nn.avg_pool2d
                pooled = fn(twin[0], at_.pool_size, at_.strides, at_.padding, at_.dilation,
                            at_.ceil_mode, at_.count_include_pad, layout, layout)
                self._emit_blocked(binding, pooled, twin[1])
                return True
            return False

    return relax.transform.DeadCodeElimination()(cs._rewrite_functions(mod, Rewriter()))


cs.POST_LAYOUT_PASSES.append(blocked_winograd)
