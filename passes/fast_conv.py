"""Fast convolution algorithms: ``winograd``, ``fft-conv`` and ``select-conv-algo``.

Two ``slimfx::`` ops replace a direct ``aten.convolution`` where the algorithm applies
(stride 1, dilation 1, groups 1, square kernel, 2-D), each with a PyTorch reference, a
shape function, a MAC model and a TVM lowering (:mod:`slimfx.lowering.fast_conv`):

``slimfx::winograd_conv2d(x, u, bias, padding, tile)``
    Winograd minimal filtering F(m x m, 3 x 3) (Lavin & Gray), ``m = tile`` in {2, 4}:
    each ``alpha x alpha`` input tile (``alpha = m + 2``) is transformed (``B^T d B``),
    multiplied element-wise with the transformed filter and summed over input channels
    (one GEMM per transform point), and transformed back (``A^T M A``) to an ``m x m``
    output tile.  ``u = G g G^T`` is computed once, by the pass, in float64, and stored as
    a parameter of shape ``(alpha, alpha, Cout, Cin)``.  Multiplies per output: F(2,3)
    16/4 = 4 instead of 9, F(4,3) 36/16 = 2.25 instead of 9.
``slimfx::fft_conv2d(x, w_hat, bias, padding, kernel, tile)``
    Overlap-save FFT convolution: the padded input is cut into ``N x N`` tiles
    (``N = tile + kernel - 1``, overlapping by ``kernel - 1``), transformed with a real 2-D
    FFT, multiplied with the filter's (conjugated) spectrum and summed over input
    channels, transformed back; each tile yields ``tile x tile`` outputs.  ``w_hat``
    (``(2, N, N/2+1, Cin, Cout)``: real and imaginary part) is computed by the pass.  On
    a map that one tile covers, ``N`` may be smaller: the window leaves out the padding on
    one side, which its circular correlation wraps onto the zero padding on the other
    (:func:`fft_wraps`; a 7x7 kernel on a 7x7 map: ``N = 10``, not 14).

Numerics (one layer's max error relative to its largest output magnitude, against
float64, on N(0,1) inputs and Kaiming-scaled weights, 28x28 maps, Cin = Cout = 16 to 256,
3 seeds; ``bench/fast_conv.py --errors 0,1,2``; FFT on 5x5 kernels):

============  ===================  =====================================================
algorithm     max rel. error        verification tolerance (pass manager)
============  ===================  =====================================================
direct        2.6e-7 - 5.0e-7       -
F(2x2,3x3)    1.4e-7 - 7.7e-7       ``WINOGRAD_TOLERANCE[2]`` = 1e-5
F(4x4,3x3)    9.6e-7 - 4.7e-6       ``WINOGRAD_TOLERANCE[4]`` = 1e-4
FFT           1.5e-7 - 3.3e-7       ``FFT_TOLERANCE`` = 1e-5
F(2,3) f16    2.8e-4 - 4.2e-4       lossy, recorded; bound ``HALF_ERROR["winograd2"]`` = 1e-3
F(4,3) f16    1.9e-3 - 2.5e-3       lossy, recorded; bound ``HALF_ERROR["winograd4"]`` = 5e-3
FFT f16       1.6e-4 - 2.2e-4       lossy, recorded; bound ``HALF_ERROR["fft"]`` = 1e-3
============  ===================  =====================================================

``weight_dtype=float16`` (all three passes) stores the transformed weights (``U``, the
spectrum) in float16; the arithmetic stays float32.  Rounding the weights alone costs a
direct convolution 1.6e-4 - 2.4e-4 here; F(2,3) and FFT about as much, but F(4,3) 10x
more: its output transform (entries up to 8) amplifies the rounding error of ``U``, which,
unlike the exact ``U``, does not cancel.

F(4,3)'s error is about 6x F(2,3)'s and grows with the input channels: its transforms
have larger, non-integer entries that amplify rounding (points 0, +-1, 1/2, -2, after
Barabasz et al.; Lavin's 0, +-1, +-2 measure 3x worse here).  It grows further with
depth, so the pass manager checks F(4,3) at 1e-4 and F(2,3) at 1e-5 (relative to the
output's magnitude).  Each substituted layer's own error against direct convolution (on
the layer's input in the example run) is in the pass statistics (``layers``).

``select-conv-algo{by=measure|model}`` chooses, per convolution, among direct, F(2,3),
F(4,3) and FFT: ``by=measure`` compiles the layer alone with each candidate for the
target and times it (medians of interleaved rounds); ``by=model`` uses
:func:`estimate_ms`, an analytic cost model.  Only a choice faster than direct by at
least ``margin`` is applied; choices and times are in the statistics.

>>> import torch, slimfx
>>> m = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
>>> g = slimfx.run_pipeline(m, "winograd{tile=4}", torch.randn(1, 8, 10, 10))
>>> [i.op for i in g.layers()]
['slimfx.winograd_conv2d']
>>> torch.allclose(g(torch.ones(1, 8, 10, 10)), m(torch.ones(1, 8, 10, 10)), atol=1e-4)
True
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import torch
import torch.fx
import torch.nn.functional as F

from slimfx.errors import GraphError
from slimfx.ir import Graph, register_macs

from .base import Pass, PassResult, register_pass

__all__ = [
    "winograd_matrices", "winograd_conv2d", "fft_conv2d", "fft_tile", "fft_plan", "fft_wraps",
    "fft_spectrum", "winograd_filter", "estimate_ms", "conv_params", "WINOGRAD_TOLERANCE",
    "FFT_TOLERANCE", "WinogradOptions", "FFTConvOptions", "SelectOptions", "choose",
]

aten = torch.ops.aten

#: Verification tolerance (relative to the output magnitude) per Winograd tile size.
WINOGRAD_TOLERANCE = {2: 1e-5, 4: 1e-4}
#: Verification tolerance of FFT convolution.
FFT_TOLERANCE = 1e-5
#: Error bound (relative to the output magnitude) of one layer whose transformed weights
#: are stored in float16 (``weight_dtype=float16``: lossy, recorded by the pass, not verified).
HALF_ERROR = {"winograd2": 1e-3, "winograd4": 5e-3, "fft": 1e-3}

#: Interpolation points of F(m, 3) (the point at infinity is implied).  F(4, 3) uses
#: Barabasz et al.'s points, which halve the error of Lavin's 0, +-1, +-2.
_POINTS = {2: (0, 1, -1), 4: (0, -1, 1, Fraction(1, 2), -2)}


# --------------------------------------------------------------------------- transforms
def _poly_mul(a: list, b: list) -> list:
    out = [Fraction(0)] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] += x * y
    return out


def winograd_matrices(tile: int, kernel: int = 3, dtype=torch.float64):
    """``(A^T, G, B^T)`` of Winograd F(tile, kernel) for correlation (Toom-Cook).

    ``y = A^T [(G g) * (B^T d)]`` computes the ``tile`` outputs of a 1-D correlation of
    ``alpha = tile + kernel - 1`` inputs ``d`` with ``g``; the 2-D algorithm nests it.
    Shapes: ``A^T`` (tile, alpha), ``G`` (alpha, kernel), ``B^T`` (alpha, alpha).  Built
    exactly in rationals.

    >>> at, g, bt = winograd_matrices(2)
    >>> bt.tolist()
    [[-1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, -1.0, 1.0, 0.0], [0.0, -1.0, 0.0, 1.0]]
    >>> d, w = torch.randn(4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    >>> torch.allclose(at @ ((g @ w) * (bt @ d)), torch.stack([d[i:i + 3] @ w for i in (0, 1)]))
    True
    """
    if tile not in _POINTS or kernel != 3:
        raise ValueError(f"Winograd F({tile},{kernel}) is not supported: tile 2 or 4, kernel 3")
    pts = [Fraction(p) for p in _POINTS[tile]]
    alpha = tile + kernel - 1
    # Evaluation at each finite point and at infinity (the leading coefficient).
    at = [[p ** i for p in pts] + [Fraction(int(i == tile - 1))] for i in range(tile)]
    g = []
    bt = []
    for k, p in enumerate(pts):
        others = [q for j, q in enumerate(pts) if j != k]
        denom = math.prod((p - q for q in others), start=Fraction(1))
        g.append([p ** j / denom for j in range(kernel)])
        poly = [Fraction(1)]
        for q in others:
            poly = _poly_mul(poly, [-q, Fraction(1)])
        bt.append(poly + [Fraction(0)] * (alpha - len(poly)))
    g.append([Fraction(int(j == kernel - 1)) for j in range(kernel)])
    poly = [Fraction(1)]
    for q in pts:
        poly = _poly_mul(poly, [-q, Fraction(1)])
    bt.append(poly)

    def t(rows):
        return torch.tensor([[float(v) for v in r] for r in rows], dtype=dtype)

    return t(at), t(g), t(bt)


def winograd_filter(weight: torch.Tensor, tile: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``U = G g G^T`` of a ``(Cout, Cin, 3, 3)`` weight, as ``(alpha, alpha, Cout, Cin)``.

    Computed in float64 and rounded once to ``dtype`` (default: the weight's dtype).
    """
    _, g, _ = winograd_matrices(tile, weight.shape[-1])
    u = torch.einsum("ai,ocij,bj->aboc", g, weight.double(), g)
    return u.to(dtype or weight.dtype).contiguous()


#: ``weight_dtype=float16`` keeps a layer direct when rounding its transformed weights to
#: float16 costs more than this, relative to their largest magnitude (a normal float16
#: rounds within 2^-11; more means values out of float16's range: overflow, or a layer
#: whose weights are all so small that they fall to float16's subnormals).
HALF_MAX_ERROR = 2.0 ** -10

WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def half_problem(values: torch.Tensor, what: str = "U") -> str | None:
    """Why transformed weights ``values`` (float64) cannot be stored in float16, or ``None``.

    >>> half_problem(winograd_filter(torch.randn(8, 8, 3, 3) * 0.1, 4, torch.float64)) is None
    True
    >>> half_problem(winograd_filter(torch.full((8, 8, 3, 3), 1e5), 4, torch.float64))
    'float16 U out of range: max |U| 3.48e+05 (float16 holds up to 65504)'
    """
    top = values.abs().max().item()
    if top > torch.finfo(torch.float16).max:
        return f"float16 {what} out of range: max |{what}| {top:.3g} (float16 holds up to 65504)"
    err = (values.half().double() - values).abs().max().item() / max(top, 1e-300)
    if err > HALF_MAX_ERROR:
        return (f"float16 {what} loses precision: rounding error {err:.2g} of max |{what}| "
                f"{top:.3g} (> {HALF_MAX_ERROR:.2g}; weights too small for float16)")
    return None


def fft_spectrum(weight: torch.Tensor, size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The conjugated real 2-D spectrum of a ``(Cout, Cin, k, k)`` weight, zero-padded to
    ``size x size``: ``(2, size, size // 2 + 1, Cin, Cout)`` (real part, imaginary part).

    Correlating with ``weight`` is multiplying by this spectrum (the correlation theorem).
    Computed in float64 and rounded once to ``dtype`` (default: the weight's dtype).
    """
    spec = torch.fft.rfft2(weight.double(), s=(size, size)).conj()  # Cout, Cin, N, N/2+1
    out = torch.stack([spec.real, spec.imag]).permute(0, 3, 4, 2, 1)
    return out.to(dtype or weight.dtype).contiguous()


#: FFT sizes: ``N + 2 = 2 (N/2 + 1)`` real spectrum values per row, a multiple of 8 so the
#: matrix DFTs vectorize; a matrix DFT of these sizes costs about ``3 N^3`` per tile.
FFT_SIZES = (6, 14, 22, 30)


def fft_tile(kernel: int, out_h: int, out_w: int, cin: int = 64, cout: int = 64) -> int:
    """The output tile of FFT convolution for a layer: the one the cost model prefers.

    ``N = tile + kernel - 1`` is one of :data:`FFT_SIZES`; the cost per layer is the
    spectral product (4 real MACs per complex bin and channel pair) plus the transforms
    of each input and output channel (weighted 4x: they are bound by memory, not MACs),
    plus reading the stored spectrum once (it grows with ``N^2``; 8 bytes per complex
    weight, stored as a ``(Re, Im)`` pair).

    >>> fft_tile(5, 56, 56), fft_tile(11, 56, 56), fft_tile(3, 7, 7)
    (10, 20, 4)
    """
    best, best_cost = None, math.inf
    for size in FFT_SIZES:
        t = size - kernel + 1
        if t < 2:
            continue
        tiles = math.ceil(out_h / t) * math.ceil(out_w / t)
        half = size // 2 + 1
        cost = (tiles * (4 * size * half * cin * cout + 4 * 3 * size ** 3 * (cin + cout))
                + 8 * size * half * cin * cout)  # the spectrum is read once per call
        if cost < best_cost:
            best, best_cost = t, cost
    if best is None:
        raise ValueError(f"FFT convolution supports kernels up to {FFT_SIZES[-1] - 1}, "
                         f"got {kernel}")
    return best


def fft_wraps(size: int, tile: int, kernel: int, in_hw, padding) -> bool:
    """Whether one ``size x size`` window, whose circular correlation wraps around, computes
    a whole ``tile x tile`` output exactly: the output fits one tile (``tile`` covers it)
    and ``size >= in + pad`` along each axis.

    Overlap-save needs ``size >= tile + kernel - 1``: the window holds the input and the
    padding on both sides.  With one window per axis, the padding on the right may be left
    out: a product that wraps past the window's end reads the padding on its left, zero
    like the padding it stands for (the output ``i`` reads ``(i + t) mod N``, ``t <
    kernel``; past the end, ``i + t - N < pad`` when ``N >= in + pad``).  A 7x7 map under a
    7x7 kernel takes ``N = 10``, not 14: a spectrum of 60 bins per channel pair, not 112.

    >>> fft_wraps(10, 7, 7, (7, 7), (3, 3)), fft_wraps(9, 7, 7, (7, 7), (3, 3))
    (True, False)
    >>> fft_wraps(14, 8, 7, (7, 7), (3, 3)), fft_wraps(10, 4, 7, (7, 7), (3, 3))
    (False, False)
    """
    h, w = in_hw
    ph, pw = padding
    ho, wo = _out_size(h, ph, kernel), _out_size(w, pw, kernel)
    return (kernel <= size < tile + kernel - 1 and max(ho, wo) <= tile <= size
            and size >= h + ph and size >= w + pw)


def fft_plan(kernel: int, in_hw, padding, cin: int = 64, cout: int = 64) -> tuple[int, int]:
    """``(N, tile)`` of FFT convolution for a layer: one window that wraps around
    (:func:`fft_wraps`; ``N`` even) where it is no larger than :func:`fft_tile`'s
    overlap-save windows, else those.  One window no larger does no more work on any count
    (transforms, products, spectrum); a larger one may still win on transforms, but reads
    a larger spectrum: one of ``N = 16`` at 256 channels 14x14 5x5 ran slower than four
    of 14, so the plan does not trade the one for the other.

    >>> fft_plan(7, (7, 7), (3, 3)), fft_plan(11, (14, 14), (5, 5)), fft_plan(5, (14, 14), (2, 2))
    ((10, 7), (20, 14), (14, 10))
    """
    (h, w), (ph, pw) = in_hw, padding
    ho, wo = _out_size(h, ph, kernel), _out_size(w, pw, kernel)
    t = fft_tile(kernel, ho, wo, cin, cout)
    tile = max(ho, wo)
    size = max(h + ph, w + pw, kernel, tile)
    size += size % 2
    if size <= t + kernel - 1 and fft_wraps(size, tile, kernel, in_hw, padding):
        return size, tile
    return t + kernel - 1, t


# --------------------------------------------------------------------------- the ops
def _out_size(size: int, pad: int, kernel: int) -> int:
    return size + 2 * pad - kernel + 1


def _input_tiles(x: torch.Tensor, padding: list[int], kernel: int, tile: int, size: int):
    """Overlapping ``size`` x ``size`` input windows, ``tile`` apart, covering the output
    of a stride-1 ``kernel`` convolution (padded up to whole tiles): (windows
    ``(n, ci, th, tw, size, size)``, (ho, wo), (th, tw))."""
    h, w = x.shape[2:]
    ph, pw = padding
    ho, wo = _out_size(h, ph, kernel), _out_size(w, pw, kernel)
    th, tw = -(-ho // tile), -(-wo // tile)
    xp = F.pad(x, (pw, pw + tw * tile - wo, ph, ph + th * tile - ho))
    return xp.unfold(2, size, tile).unfold(3, size, tile), (ho, wo), (th, tw)


@torch.library.custom_op("slimfx::winograd_conv2d", mutates_args=())
def winograd_conv2d(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None,
                    padding: list[int], tile: int) -> torch.Tensor:
    """Winograd F(tile x tile, 3 x 3) convolution (stride 1): the PyTorch reference.

    ``u`` is the transformed filter ``(alpha, alpha, Cout, Cin)`` (:func:`winograd_filter`).
    """
    at, _, bt = (m.to(x.dtype) for m in winograd_matrices(tile, u.shape[0] - tile + 1))
    u = u.to(x.dtype)  # stored in float16 with weight_dtype=float16: computed in x's dtype
    alpha, m = u.shape[0], tile
    n = x.shape[0]
    d, (ho, wo), (th, tw) = _input_tiles(x, padding, alpha - m + 1, m, alpha)  # alpha x alpha
    v = torch.einsum("ai,ncyxij,bj->abncyx", bt, d, bt)
    mm = torch.einsum("aboc,abncyx->abnoyx", u, v)
    y = torch.einsum("ia,abnoyx,jb->noyixj", at, mm, at)
    y = y.reshape(n, -1, th * m, tw * m)[:, :, :ho, :wo]
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    return y.contiguous()


@winograd_conv2d.register_fake
def _(x, u, bias, padding, tile):
    r = u.shape[0] - tile + 1
    return x.new_empty((x.shape[0], u.shape[2], _out_size(x.shape[2], padding[0], r),
                        _out_size(x.shape[3], padding[1], r)))


@torch.library.custom_op("slimfx::fft_conv2d", mutates_args=())
def fft_conv2d(x: torch.Tensor, w_hat: torch.Tensor, bias: torch.Tensor | None,
               padding: list[int], kernel: int, tile: int) -> torch.Tensor:
    """Overlap-save FFT convolution (stride 1): the PyTorch reference (``torch.fft``).

    ``w_hat`` is the filter spectrum ``(2, N, N/2+1, Cin, Cout)`` (:func:`fft_spectrum`);
    ``N x N`` windows, ``tile`` apart, each giving a ``tile x tile`` block of the output:
    ``N >= tile + kernel - 1``, or one window that wraps around (:func:`fft_wraps`).
    """
    size = w_hat.shape[1]
    if size < tile + kernel - 1 and not fft_wraps(size, tile, kernel, x.shape[2:], padding):
        raise ValueError(f"FFT convolution: windows of {size} hold neither a tile of {tile} "
                         f"and a kernel of {kernel} (overlap-save) nor, in one window that "
                         f"wraps around, a {tuple(x.shape[2:])} input padded by {list(padding)}")
    w_hat = w_hat.to(x.dtype)  # stored in float16 with weight_dtype=float16
    n = x.shape[0]
    d, (ho, wo), (th, tw) = _input_tiles(x, padding, kernel, tile, size)  # N x N windows
    spec = torch.fft.rfft2(d)
    w_c = torch.complex(w_hat[0], w_hat[1])
    prod = torch.einsum("ncyxuv,uvco->noyxuv", spec, w_c)
    y = torch.fft.irfft2(prod, s=(size, size))[..., :tile, :tile]  # n, co, th, tw, T, T
    y = y.permute(0, 1, 2, 4, 3, 5).reshape(n, -1, th * tile, tw * tile)[:, :, :ho, :wo]
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    return y.contiguous()


@fft_conv2d.register_fake
def _(x, w_hat, bias, padding, kernel, tile):
    return x.new_empty((x.shape[0], w_hat.shape[4], _out_size(x.shape[2], padding[0], kernel),
                        _out_size(x.shape[3], padding[1], kernel)))


@register_macs(torch.ops.slimfx.winograd_conv2d.default)
def _winograd_macs(in_shapes, args, out_shape):
    # Transform-domain GEMM plus the separable transforms as dense matrix products.
    u = in_shapes[1]
    alpha, m = u[0], args[4]
    n, co, ho, wo = out_shape
    ci = u[3]
    tiles = n * -(-ho // m) * -(-wo // m)
    return tiles * (alpha * alpha * ci * co + ci * 2 * alpha ** 3 + co * (m * alpha * alpha + m * m * alpha))


@register_macs(torch.ops.slimfx.fft_conv2d.default)
def _fft_macs(in_shapes, args, out_shape):
    # Complex spectral product (4 real MACs per complex MAC) plus matrix DFTs per axis.
    w = in_shapes[1]
    size, half, ci, co = w[1], w[2], w[3], w[4]
    t = args[5]
    n, _, ho, wo = out_shape
    tiles = n * -(-ho // t) * -(-wo // t)
    dft = size * size * 2 * half + 2 * size * 2 * size * half  # along x, then along y
    return tiles * (4 * size * half * ci * co + (ci + co) * dft)


# --------------------------------------------------------------------------- matching
@dataclass(frozen=True)
class ConvParams:
    """What the algorithms need to know about one ``aten.convolution`` node."""

    cin: int
    cout: int
    kernel: int
    padding: tuple[int, int]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


def conv_params(graph: Graph, node: torch.fx.Node) -> tuple[ConvParams | None, str]:
    """``(params, "")`` if ``node`` is a convolution the fast algorithms can replace, else
    ``(None, reason)``."""
    x, w, b, stride, padding, dilation, transposed, _out_pad, groups = node.args[:9]
    if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
        return None, "weight is not a parameter"
    if b is not None and not (isinstance(b, torch.fx.Node) and b.op == "get_attr"):
        return None, "bias is not a parameter"
    wt = graph.param(w)
    if wt.dim() != 4:
        return None, f"{wt.dim() - 2}-D convolution (only 2-D)"
    if transposed:
        return None, "transposed convolution"
    if groups != 1:
        return None, f"groups={groups}"
    if list(stride) != [1, 1]:
        return None, f"stride {list(stride)}"
    if list(dilation) != [1, 1]:
        return None, f"dilation {list(dilation)}"
    if wt.shape[2] != wt.shape[3]:
        return None, f"non-square kernel {tuple(wt.shape[2:])}"
    if not wt.is_floating_point():
        return None, f"dtype {wt.dtype}"
    info = node.meta["slimfx"]
    return ConvParams(wt.shape[1], wt.shape[0], wt.shape[2], tuple(int(p) for p in padding),
                      tuple(info.inputs[0].shape), tuple(info.shape)), ""


def _convs(graph: Graph):
    graph.analyze()
    return list(graph.find(aten.convolution.default))


def _layer_name(node: torch.fx.Node) -> str:
    return node.meta.get("module_path") or node.name


def _conv_inputs(graph: Graph, nodes) -> dict[str, torch.Tensor]:
    """The input of each node in ``nodes`` on the example inputs (one run)."""
    wanted = {n.args[0] for n in nodes}
    seen: dict[str, torch.Tensor] = {}

    class _Rec(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                seen[n.name] = out
            return out

    with torch.no_grad():
        _Rec(graph.gm).run(*graph.example_inputs)
    return {n.name: seen[n.args[0].name] for n in nodes}


def _error(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    d = (got.double() - want.double()).abs()
    scale = max(want.abs().max().item(), 1e-30)
    return {"max_abs_error": d.max().item(), "rel_error": d.max().item() / scale}


def _transformed(algo: str, weight: torch.Tensor, p: ConvParams,
                 tile: int | None = None) -> torch.Tensor:
    """What ``algo`` ("winograd2", "winograd4", "fft") stores in place of ``weight``, in
    float64: Winograd's ``U``, or the FFT spectrum (of ``tile``, or :func:`fft_plan`'s)."""
    if algo.startswith("winograd"):
        return winograd_filter(weight, int(algo[-1]), torch.float64)
    return fft_spectrum(weight, _fft_plan_of(p, tile)[0], torch.float64)


def _fft_plan_of(p: ConvParams, tile: int | None = None) -> tuple[int, int]:
    """``(N, tile)``: overlap-save windows of ``tile`` where one is given, else
    :func:`fft_plan`'s."""
    if tile:
        return tile + p.kernel - 1, tile
    return fft_plan(p.kernel, p.in_shape[2:], p.padding, p.cin, p.cout)


def _half_problem_of(algo: str, exact: torch.Tensor) -> str | None:
    """Why ``algo``'s transformed weights ``exact`` (:func:`_transformed`) cannot be
    float16 (``None``: they can)."""
    return half_problem(exact, "U" if algo.startswith("winograd") else "spectrum")


def _substitute(graph: Graph, node: torch.fx.Node, algo: str, p: ConvParams, x_in=None,
                tile: int | None = None, weight_dtype: str = "float32",
                exact: torch.Tensor | None = None) -> dict:
    """Replace conv ``node`` by ``algo`` ("winograd2", "winograd4", "fft"); returns its
    record.  ``weight_dtype``: the dtype its transformed weights are stored in, rounded
    once from ``exact`` (:func:`_transformed`, computed here unless the caller has it)."""
    w_node, b_node = node.args[1], node.args[2]
    w = graph.param(w_node)
    path = _layer_name(node)
    if algo not in ALGOS:
        raise GraphError(f"unknown convolution algorithm {algo!r}", node)
    if exact is None:
        exact = _transformed(algo, w, p, tile)
    value = exact.to(WEIGHT_DTYPES[weight_dtype] if weight_dtype != "float32" else w.dtype)
    if algo.startswith("winograd"):
        t = int(algo[-1])
        new_w = graph.add_param(f"{path}.winograd_u", value, before=node)
        target = torch.ops.slimfx.winograd_conv2d.default
        args = (node.args[0], new_w, b_node, list(p.padding), t)
        record = {"algo": f"winograd F({t},3)"}
    else:  # fft
        size, t = _fft_plan_of(p, tile)
        if value.shape[1] != size:
            raise GraphError(f"spectrum of {value.shape[1]} points, the plan is {size}", node)
        new_w = graph.add_param(f"{path}.fft_spectrum", value, before=node)
        target = torch.ops.slimfx.fft_conv2d.default
        args = (node.args[0], new_w, b_node, list(p.padding), p.kernel, t)
        record = {"algo": f"fft N={size} tile={t}"}
    with graph.fx.inserting_before(node):
        new = graph.fx.call_function(target, args)
    graph.inherit(new, node)
    node.replace_all_uses_with(new)
    graph.fx.erase_node(node)
    record["weight_dtype"] = str(value.dtype).removeprefix("torch.")
    record["params"] = [w.numel(), value.numel()]
    record["bytes"] = [w.numel() * w.element_size(), value.numel() * value.element_size()]
    if x_in is not None:
        with torch.no_grad():
            b = graph.param(b_node) if b_node is not None else None
            direct = F.conv2d(x_in, w, b, padding=p.padding)
            exact = F.conv2d(x_in.double(), w.double(), None if b is None else b.double(),
                             padding=p.padding)
            got = target(x_in, value, b, *args[3:])
        record.update(_error(got, direct))
        record["direct_vs_float64"] = _error(direct, exact)["rel_error"]
        record["vs_float64"] = _error(got, exact)["rel_error"]
    return record


def _finish(graph: Graph, records: dict, skipped: dict) -> PassResult:
    if records:
        graph.fx.eliminate_dead_code()
        graph.remove_unused_params()
        graph.gm.recompile()
    return PassResult(graph, bool(records), {"replaced": len(records), "layers": records,
                                             "skipped": skipped})


def _check_exclude(graph: Graph, exclude) -> None:
    paths = {n.meta.get("module_path") for n in graph.find()}
    for e in exclude:
        if e not in paths:
            raise GraphError(f"exclude names module '{e}', which is not in {graph.name} "
                             f"(modules with convolutions: "
                             f"{sorted(_layer_name(n) for n in _convs(graph))})")


def _substitute_all(graph: Graph, exclude, reject, algo: str, tile: int | None = None,
                    weight_dtype: str = "float32") -> PassResult:
    """Replace every eligible convolution by ``algo``: those ``conv_params`` accepts, that
    ``reject(params)`` does not refuse (it returns the reason), that are not excluded and,
    with ``weight_dtype=float16``, whose transformed weights fit float16; the others are
    listed with their reason."""
    _check_exclude(graph, exclude)
    eligible, skipped = [], {}
    for node in _convs(graph):
        p, why = conv_params(graph, node)
        if p is not None:
            why = reject(p)
            p = p if why is None else None
        if _layer_name(node) in exclude:
            p, why = None, "excluded"
        exact = None
        if p is not None and weight_dtype == "float16":
            exact = _transformed(algo, graph.param(node.args[1]), p, tile)
            why = _half_problem_of(algo, exact)
            p = p if why is None else None
        if p is None:
            skipped[_layer_name(node)] = why
        else:
            eligible.append((node, p, exact))
    inputs = _conv_inputs(graph, [n for n, _, _ in eligible]) if eligible else {}
    records = {_layer_name(node): _substitute(graph, node, algo, p, inputs[node.name], tile=tile,
                                              weight_dtype=weight_dtype, exact=exact)
               for node, p, exact in eligible}
    return _finish(graph, records, skipped)


# --------------------------------------------------------------------------- winograd
@dataclass(frozen=True)
class WinogradOptions:
    """Options of ``winograd``.

    Attributes
    ----------
    tile: output tile ``m`` of F(m x m, 3 x 3): 2 or 4.
    exclude: module paths of convolutions to keep direct.
    weight_dtype: the dtype the transformed filter ``U`` is stored (and read) in:
        ``float32``, or ``float16``, half the bytes, which is what a batch-1 layer with many
        channels and few tiles waits for (its ``U`` serves each tile once); the arithmetic
        stays float32.  Lossy: the pass is then not verified at the tile's tolerance but
        reports its error (per layer 4e-4 of the output's magnitude with F(2,3), 2e-3 with
        F(4,3): the module's table).  A layer whose ``U`` does not fit float16
        (:func:`half_problem`) stays direct, with the reason in ``skipped``.
    """

    tile: Literal[2, 4] = 4
    exclude: tuple[str, ...] = ()
    weight_dtype: Literal["float32", "float16"] = "float32"


class _TransformedWeights(Pass):
    """A pass that stores transformed weights in its ``weight_dtype`` option: lossless in
    float32; float16 rounds them, so the pass is lossy (its error recorded, not verified)."""

    lossy_when = "weight_dtype=float16"

    def __init__(self, options=None, **kw):
        super().__init__(options, **kw)
        self.lossless = self.options.weight_dtype == "float32"


@register_pass("winograd")
class WinogradPass(_TransformedWeights):
    """Replace 3x3 stride-1 convolutions by Winograd F(tile x tile, 3 x 3).

    Lossless (verified at the tile's tolerance); lossy with weight_dtype=float16."""

    Options = WinogradOptions

    @property
    def atol(self) -> float:  # the manager checks this pass at its tile's tolerance
        return WINOGRAD_TOLERANCE[self.options.tile]

    def run(self, graph: Graph) -> PassResult:
        def reject(p):
            return f"kernel {p.kernel}x{p.kernel} (Winograd F(m,3) needs 3x3)" if p.kernel != 3 else None

        return _substitute_all(graph, self.options.exclude, reject, f"winograd{self.options.tile}",
                               weight_dtype=self.options.weight_dtype)


# --------------------------------------------------------------------------- fft
@dataclass(frozen=True)
class FFTConvOptions:
    """Options of ``fft-conv``.

    Attributes
    ----------
    min_kernel: the smallest kernel size replaced (5: FFT loses to direct on 3x3).
    tile: output tile per FFT block (``N = tile + kernel - 1``); 0 lets :func:`fft_plan`
        choose per layer (overlap-save tiles, or one window that wraps around on a small map).
    exclude: module paths of convolutions to keep direct.
    weight_dtype: the dtype the filter spectrum is stored (and read) in: ``float32``, or
        ``float16``, half the bytes, which a small map with many channels waits for (one
        tile: each spectrum value is read for one multiply-add); lossy, as ``winograd``'s.
    """

    min_kernel: int = 5
    tile: int = 0
    exclude: tuple[str, ...] = ()
    weight_dtype: Literal["float32", "float16"] = "float32"

    def __post_init__(self):
        if self.min_kernel < 2:
            raise ValueError(f"min_kernel must be at least 2, got {self.min_kernel}")
        if self.tile < 0:
            raise ValueError(f"tile must be positive (or 0 for automatic), got {self.tile}")


@register_pass("fft-conv", lossless=True, atol=FFT_TOLERANCE)
class FFTConvPass(_TransformedWeights):
    """Replace stride-1 convolutions with kernels of min_kernel and up by FFT convolution.

    Lossless (verified at :data:`FFT_TOLERANCE`); lossy with weight_dtype=float16."""

    Options = FFTConvOptions

    def run(self, graph: Graph) -> PassResult:
        k = self.options.min_kernel

        def reject(p):
            return f"kernel {p.kernel} < min_kernel {k}" if p.kernel < k else None

        return _substitute_all(graph, self.options.exclude, reject, "fft",
                               tile=self.options.tile or None,
                               weight_dtype=self.options.weight_dtype)


# --------------------------------------------------------------------------- selection
ALGOS = ("winograd2", "winograd4", "fft")

#: Cost-model constants (``by=model``), fitted to per-layer timings of the fast lowering
#: on a 2-core Zen 4 host that TVM names ``znver4`` (``bench/fast_conv.py --chain 4 --fit``:
#: 20 layers, 5 rounds, each layer one of four of its shape in sequence with the caches
#: flushed before each run, so its input comes from the layer before and its weights from
#: memory, as in a model): the share of the target's peak FLOP/s each kind of kernel
#: reaches (direct conv, transform-domain GEMM, Winograd transforms, FFT transforms), the
#: bandwidth in bytes per ns per core of the weights and transform passes, a fixed overhead
#: per kernel, and the share of a direct convolution's weight reads hidden behind its
#: compute (it reuses each weight over the whole map and prefetches the next task's; the
#: transform-domain GEMMs, whose weights serve few tiles, pay their full reads).  They are
#: fitted to the current kernels (FFT's fused transforms, :func:`fft_plan`'s windows).  In
#: the fit's run they pick no layer slower than direct, and six more faster ones than the
#: constants fitted before (on a 2-core ``rocketlake``, FFT composed of matrix DFTs): F(4,3)
#: at 32 channels 56x56 (1.97x) and at 256 and 512 channels 7x7 (1.31x, 1.52x), FFT at 16
#: channels 56x56 7x7 and 11x11 (1.61x, 1.62x) and at 256 channels 14x14 5x5 (1.43x).
#: Whole models at 112 in that run: ResNet-18 1.37x faster than direct with them, 1.27x
#: with the constants before; VGG-11 2.44x against 2.19x.
MODEL = {"direct_eff": 0.655, "gemm_eff": 0.994, "transform_eff": 1.0, "dft_eff": 0.372,
         "bytes_per_ns": 21.9, "kernel_overhead_ms": 0.011, "direct_overlap": 0.264}

#: The same constants fitted, on the ``rocketlake`` host, to layers timed warm, run after run
#: with their weights in cache (``bench/fast_conv.py --chain 4 --warm --fit``), for
#: ``cold=false``: a model that
#: fits the last-level cache and runs repeatedly.  There F(2,3) wins on 256 and 512
#: channels at 7x7 (1.43x, 1.54x warm; 0.94x, 0.91x flushed) and F(4,3) on 256 at 14x14;
#: the efficiencies and overhead of that fit sit at their bounds (1.0, 0.1 us per kernel).
#: Whole models run after run on a host with a large L3 (``--warm --models ...``): ResNet-18
#: (46 MB of weights) 1.26x faster than direct at 112 and 1.51x at 224 with these, 1.17x and
#: 1.48x with the cold constants fitted there; ResNet-50 (100 MB) 1.13x against 1.17x, its
#: weights not cached.
MODEL_WARM = {"direct_eff": 0.832, "gemm_eff": 1.0, "transform_eff": 1.0, "dft_eff": 0.146,
              "bytes_per_ns": 27.6, "kernel_overhead_ms": 0.0001, "direct_overlap": 0.83}


def choose(times: dict[str, float], margin: float) -> str:
    """``select-conv-algo``'s decision from each algorithm's time (measured or estimated):
    the fastest other than ``"direct"``, where direct takes at least ``margin`` times as long.

    >>> choose({"direct": 1.0, "winograd2": 0.9, "fft": 0.97}, 1.05), choose({"direct": 1.0, "fft": 0.8}, 1.05)
    ('winograd2', 'fft')
    >>> choose({"direct": 1.0, "winograd4": 0.97}, 1.05)  # within the margin: direct stays
    'direct'
    """
    best = min((a for a in times if a != "direct"), key=times.__getitem__, default="direct")
    return best if times["direct"] >= margin * times[best] else "direct"


def estimate_ms(algo: str, p: ConvParams, *, vector_bits: int = 512, cores: int = 2,
                ghz: float = 2.5, blocked: bool = True, model: dict | None = None,
                weight_bytes: int = 4) -> float:
    """Estimated latency (ms) of one convolution with ``algo`` ("direct", "winograd2",
    "winograd4", "fft") on a CPU with ``vector_bits``-wide FMA vectors and ``cores``.

    The model counts the FLOPs of each stage (direct: the convolution; otherwise input
    transform, transform-domain GEMM, output transform) at the stage's efficiency in
    :data:`MODEL`, plus the bytes moved by the transform stages and of the (transformed)
    weights at the bandwidth in :data:`MODEL`, plus a fixed overhead per kernel launched;
    ``direct_overlap`` of the shorter of a direct convolution's compute and weight-read times
    is hidden behind the other.
    Transformed weights are larger than the direct ones (F(4,3): 4x, FFT: ``2 N (N/2+1) / k^2``),
    which decides small feature maps with many channels.  ``blocked``: a CPU target, where
    F(4,3) on few tiles reads ``H`` (half of ``U``) or ``g`` (a quarter; ``weight_form``)
    and FFT's transforms are fused kernels
    (its forward transform also copies its input, padded, channels last); elsewhere FFT
    uses matrix DFTs.
    ``model`` replaces :data:`MODEL`'s constants (``bench/fast_conv.py --fit`` tries some).
    ``weight_bytes``: bytes per element of the transformed weights (2 with
    ``weight_dtype=float16``).

    >>> p = ConvParams(64, 64, 3, (1, 1), (1, 64, 56, 56), (1, 64, 56, 56))
    >>> estimate_ms("winograd4", p) < estimate_ms("direct", p)
    True
    """
    M = MODEL if model is None else model
    peak = 2 * (vector_bits // 32) * 2 * ghz * 1e6 * cores  # FLOP per ms: 2 FMA ports
    n, co, ho, wo = p.out_shape
    ci, k = p.cin, p.kernel
    bw = M["bytes_per_ns"] * 1e6 * cores
    if algo == "direct":
        compute = 2 * n * co * ho * wo * ci * k * k / (M["direct_eff"] * peak)
        read = 4 * k * k * ci * co / bw
        return compute + read - M.get("direct_overlap", 0.0) * min(compute, read) + M["kernel_overhead_ms"]
    if algo.startswith("winograd"):
        m = int(algo[-1])
        if k != 3:
            return math.inf
        alpha = m + 2
        bins, per_tile_in, per_tile_out = alpha * alpha, 2 * alpha ** 3, m * alpha * alpha + m * m * alpha
        tiles = n * -(-ho // m) * -(-wo // m)
        gemm = 2 * tiles * bins * ci * co
        weights = weight_bytes * bins * ci * co  # the transformed filter, read once per call
        from slimfx.lowering.fast_conv import weight_form, weights_per_pair

        form = weight_form(m, tiles, ci * co, "float32" if weight_bytes == 4 else "float16",
                           cpu=blocked)
        weights = weights * weights_per_pair(m, form) // bins
        if form == "h":  # the GEMM reads H = G g (alpha x 3 per channel pair) and forms each
            # U vector from it once per 8-row tile, with 4/3 vector operations on average
            gemm += 2 * (4 / 3) * -(-tiles // 8) * bins * ci * co
        elif form == "g":  # it reads g (3 x 3) and forms each U vector once (one row tile),
            # with about 2 vector operations (H's share included)
            gemm += 2 * 2 * bins * ci * co
    elif algo == "fft":
        size, t = _fft_plan_of(p)
        half = size // 2 + 1
        bins = 2 * size * half
        if blocked:  # CPU: the fused transforms (slimfx.lowering.fast_conv.FUSED_FFT), per
            # tile and channel: forward, the y-DFT's rows u <= N/2 and the x-DFT's partial
            # sums; inverse, per kept row the y-inverse, then the x-inverse of the kept columns
            per_tile_in = 2 * size * size * half + 4 * size * half * half
            per_tile_out = 4 * t * size * half + 2 * t * t * half
        else:  # matrix DFTs
            per_tile_in = per_tile_out = 3 * size ** 3
        tiles = n * -(-ho // t) * -(-wo // t)
        gemm = 2 * tiles * size * half * 4 * ci * co
        weights = weight_bytes * size * half * 2 * ci * co  # (Re, Im) pairs per frequency
    else:
        raise ValueError(f"unknown algorithm {algo!r}: direct, {', '.join(ALGOS)}")
    transform = 2 * tiles * (ci * per_tile_in + co * per_tile_out)
    traffic = 4 * tiles * bins * (ci + co) * 2  # transformed input and output, written and read
    launches = 3
    if algo == "fft" and blocked:  # the fused forward transform's padded copy of the input
        traffic += 4 * 2 * tiles * ci * t * t
    eff = M["transform_eff"] if algo != "fft" else M["dft_eff"]
    return (gemm / (M["gemm_eff"] * peak) + transform / (eff * peak)
            + (traffic + weights) / bw + launches * M["kernel_overhead_ms"])


@dataclass(frozen=True)
class SelectOptions:
    """Options of ``select-conv-algo``.

    Attributes
    ----------
    by: ``measure`` (compile and time each candidate for ``target``) or ``model``
        (:func:`estimate_ms`).
    algos: the candidates besides direct (``winograd2``, ``winograd4``, ``fft``).
    target: where to measure (a :func:`slimfx.compile` target), and whose vector width
        and cores the model assumes.
    margin: a candidate replaces direct only if direct takes at least ``margin`` times as long.
    repeat: timed runs per candidate and round (``by=measure``); 3 rounds are interleaved.
    exclude: module paths of convolutions to keep direct.
    cold: time each layer (``by=measure``, CPU targets) with the caches flushed before every
        run, so its weights come from memory as inside a model larger than the caches.
        Timed warm, run after run, a layer keeps its transformed weights cached and Winograd
        looks faster than it is in the model: F(4,3) on 256 channels at 14x14 measured 1.54x
        faster than direct warm (``bench/fast_conv.py --warm``), 1.00x cold (the default)
        and 1.03x inside ResNet-50 at 224 (``bench/fast_conv.py --inside resnet50 --size
        224``), while F(2,3) measured 1.53x warm, 1.15x cold and 1.37x in the model.
        With ``by=model``: the constants fitted cold (:data:`MODEL`) or warm
        (:data:`MODEL_WARM`, for a model that stays in the last-level cache between runs).
    weight_dtype: the dtype of the candidates' transformed weights (``winograd``'s and
        ``fft-conv``'s option of that name): ``float16`` halves the bytes they stream,
        measured or modelled so, and makes the pass lossy (its error reported, not
        verified).  A choice whose transformed weights do not fit float16 gives way to the
        next best (the reasons in the layer's ``not_float16``).
    """

    by: Literal["measure", "model"] = "measure"
    algos: tuple[str, ...] = ALGOS
    target: str = "host"
    margin: float = 1.05
    repeat: int = 10
    exclude: tuple[str, ...] = ()
    cold: bool = True
    weight_dtype: Literal["float32", "float16"] = "float32"

    def __post_init__(self):
        bad = [a for a in self.algos if a not in ALGOS]
        if bad:
            raise ValueError(f"unknown algorithm(s) {bad} in algos: choose from {', '.join(ALGOS)}")
        if self.margin < 1.0:
            raise ValueError(f"margin must be >= 1 (only choices faster than direct), got {self.margin}")
        if self.repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {self.repeat}")


def _applicable(algo: str, p: ConvParams) -> bool:
    if algo.startswith("winograd"):
        return p.kernel == 3
    return 3 <= p.kernel < FFT_SIZES[-1]


#: Measured latencies (ms) by (target, algorithm, layer signature): layers of the same
#: shape are measured once per process.
_MEASURED: dict[tuple, float] = {}


def _pipeline_of(algo: str, weight_dtype: str = "float32") -> str | None:
    if algo == "direct":
        return None
    if algo.startswith("winograd"):
        return f"winograd{{tile={algo[-1]},weight_dtype={weight_dtype}}}"
    return f"fft-conv{{min_kernel=2,weight_dtype={weight_dtype}}}"


def measure_layer(p: ConvParams, algos, target: str = "host", repeat: int = 10,
                  rounds: int = 3, cold: bool = False,
                  weight_dtype: str = "float32") -> dict[str, float]:
    """Median compiled latency (ms) of one convolution of shape ``p`` with each algorithm,
    in context: between two 1x1 convolutions, as a layer sits between others in a model.

    Each candidate is compiled in that frame (random weights of the layer's shape) with
    :func:`slimfx.compile`; rounds alternate the candidates so all see the same load.  The
    frame matters on CPU targets: direct convolutions and the transforms of Winograd and
    FFT run in the blocked ``NCHW{c}c`` layout like their neighbours.  A layer compiled
    alone gets it backwards (there
    the direct layer pays the conversions at the model's ends), and picked Winograd on
    ResNet-18 layers that made the whole model slower (0.93x, ``bench/fast_conv.py``,
    before Winograd read the blocked layout).  The times
    include the frame's two 1x1 convolutions, the same for every candidate.  ``cold``: the
    caches flushed before each run (``CompiledModel.benchmark(cold=True)``).
    ``weight_dtype``: the candidates' transformed weights in that dtype.
    """
    import slimfx

    key = (target, cold, weight_dtype, p.cin, p.cout, p.kernel, p.padding, p.in_shape)
    todo = [a for a in algos if (*key, a) not in _MEASURED]
    if todo:
        gen = torch.Generator().manual_seed(0)
        conv = torch.nn.Conv2d(p.cin, p.cout, p.kernel, padding=p.padding)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (p.cin * p.kernel ** 2) ** -0.5)
        frame = torch.nn.Sequential(torch.nn.Conv2d(p.cin, p.cin, 1), conv,
                                    torch.nn.Conv2d(p.cout, p.cout, 1)).eval()
        x = torch.randn(p.in_shape, generator=gen)
        built = {a: slimfx.compile(frame, x, target=target, pipeline=_pipeline_of(a, weight_dtype),
                                   verbose=False) for a in todo}
        for a, ms in _alternate(built, [x.numpy()], repeat, rounds, cold).items():
            _MEASURED[(*key, a)] = ms
    return {a: _MEASURED[(*key, a)] for a in algos}


def measure_models(graphs: dict[str, Graph], target: str = "host", repeat: int = 10,
                   rounds: int = 3) -> dict[str, float]:
    """Median compiled latency (ms) of each graph, in rounds that alternate them."""
    import slimfx

    built = {k: slimfx.compile(g, target=target, check=False, verbose=False)
             for k, g in graphs.items()}
    xs = [x.detach().numpy() for x in next(iter(graphs.values())).example_inputs]
    return _alternate(built, xs, repeat, rounds)


def _alternate(built: dict, inputs, repeat: int, rounds: int,
               cold: bool = False) -> dict[str, float]:
    """Median latency (ms) of each compiled model over ``rounds`` that alternate them."""
    import statistics

    times: dict[str, list[float]] = {k: [] for k in built}
    for _ in range(rounds):
        for k, cm in built.items():
            times[k].append(cm.benchmark(*inputs, repeat=repeat, warmup=2, cold=cold).median_ms)
    return {k: statistics.median(v) for k, v in times.items()}


@register_pass("select-conv-algo")
class SelectConvAlgo(_TransformedWeights):
    """Choose direct, Winograd or FFT per convolution by measuring (or a cost model).

    Lossless (verified at its algorithms' loosest tolerance); lossy with
    weight_dtype=float16."""

    Options = SelectOptions

    @property
    def atol(self) -> float:  # the loosest tolerance among the algorithms it may apply
        tols = [WINOGRAD_TOLERANCE[int(a[-1])] if a.startswith("winograd") else FFT_TOLERANCE
                for a in self.options.algos]
        return max(tols, default=FFT_TOLERANCE)

    def run(self, graph: Graph) -> PassResult:
        from slimfx.lowering.targets import resolve_target

        opts = self.options
        _check_exclude(graph, opts.exclude)
        info = resolve_target(opts.target)
        if opts.by == "measure" and info.local_device() is None:
            raise GraphError(f"select-conv-algo cannot measure on target '{info.name}' from this "
                             "machine; use by=model (or run it where the target is)")
        choices, skipped, planned = {}, {}, []
        t0 = time.perf_counter()
        for node in _convs(graph):
            name = _layer_name(node)
            p, why = conv_params(graph, node)
            if name in opts.exclude:
                p, why = None, "excluded"
            cands = [a for a in opts.algos if p is not None and _applicable(a, p)]
            if p is None or not cands:
                skipped[name] = why or "no applicable algorithm"
                continue
            if opts.by == "measure":
                times = measure_layer(p, ["direct", *cands], opts.target, opts.repeat,
                                      cold=opts.cold and info.kind == "llvm",
                                      weight_dtype=opts.weight_dtype)
            else:
                times = {a: estimate_ms(a, p, vector_bits=info.vector_bits, cores=info.num_cores,
                                        blocked=info.kind == "llvm",
                                        model=MODEL if opts.cold else MODEL_WARM,
                                        weight_bytes=WEIGHT_DTYPES[opts.weight_dtype].itemsize)
                         for a in ["direct", *cands]}
            chosen, unfit, exact = choose(times, opts.margin), {}, None
            while chosen != "direct" and opts.weight_dtype == "float16":
                # the choice's transformed weights out of float16's range: the next best
                exact = _transformed(chosen, graph.param(node.args[1]), p)
                unfit[chosen] = _half_problem_of(chosen, exact)
                if unfit[chosen] is None:
                    del unfit[chosen]
                    break
                chosen, exact = choose({a: t for a, t in times.items() if a not in unfit},
                                       opts.margin), None
            choices[name] = {"choice": chosen, "ms": {a: round(t, 4) for a, t in times.items()},
                             "speedup": round(times["direct"] / times[chosen], 3)}
            if unfit:
                choices[name]["not_float16"] = unfit
            if chosen != "direct":
                planned.append((node, p, chosen, exact))
        before = graph.copy() if planned and opts.by == "measure" else None
        inputs = _conv_inputs(graph, [n for n, *_ in planned]) if planned else {}
        records = {}
        for node, p, algo, exact in planned:
            records[_layer_name(node)] = _substitute(graph, node, algo, p, inputs[node.name],
                                                     weight_dtype=opts.weight_dtype, exact=exact)
        result = _finish(graph, records, skipped)
        if before is not None:
            # Layers are timed in a frame, not in their model (residual adds and ReLUs fuse
            # into a direct convolution's epilogue, not into Winograd's): the whole model
            # must be faster too, else every layer stays direct.
            ms = measure_models({"direct": before, "selected": graph}, opts.target, opts.repeat)
            result.stats["model_ms"] = {k: round(v, 4) for k, v in ms.items()}
            if ms["direct"] < opts.margin * ms["selected"]:
                for c in choices.values():
                    c["choice"], c["speedup"] = "direct", 1.0
                model_ms, result = result.stats["model_ms"], _finish(before, {}, skipped)
                result.stats["model_ms"] = model_ms
                result.stats["rolled_back"] = (
                    f"the selected model measured {ms['selected']:.3f} ms vs "
                    f"{ms['direct']:.3f} ms direct: every layer kept direct")
        result.stats["choices"] = choices
        result.stats["by"] = opts.by
        result.stats["select_s"] = round(time.perf_counter() - t0, 2)
        return result
