"""Register tiles of the hand-scheduled blocked convolution: which shape is fastest.

The CPU conv schedule (``slimfx.lowering.cpu_schedules``) accumulates a tile of
``pixels x vectors`` output-channel vectors in registers.  This compares tile shapes on
ResNet-50's convolution layers (batch 1, host target, no tuning), timing only the
convolution kernel (TVM's VM instrument around each call, so the layout transforms at
the ends of a one-layer model are not counted), in alternating rounds; and, with
``--models``, whole zoo models built with the default tile and with the 14 x 1 row tile.

Columns: GFLOP/s of the convolution per tile shape ``(pixels, vectors)``; ``default`` is
what ``_conv_tile`` chooses.  Each shape is capped by the row's divisors (``(7, 2)`` on a
14-wide map is 7 x 2, on a 12-wide one 6 x 2).

    python bench/conv_tiles.py [--rounds 3] [--tiles 14x1,7x2,4x4] [--models resnet50]
    python bench/conv_tiles.py --ab SQUARE_TILES --rounds 5 --models resnet50,mobilenet_v2
    python bench/conv_tiles.py --blocked-reduction --rounds 5 --models resnet50,resnet18
    python bench/conv_tiles.py --ab SHORT_ROW_TILES --rounds 7 --layers "80,80,4,3;48,48,7,3"
    python bench/conv_tiles.py --ab TILES_PER_TASK=32 --layers "1024,256,14,1"
    python bench/conv_tiles.py --ab PREFETCH_NEXT_TASK --stack 24 --layers "2048,512,7,1"
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import slimfx
from slimfx import zoo
from slimfx.ir.printing import format_table
from slimfx.lowering import cpu_schedules
from slimfx.lowering.targets import host_target

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # ab.py

#: (in channels, out channels, feature map side, kernel): ResNet-50's layer shapes.
LAYERS = [(64, 256, 56, 1), (256, 64, 56, 1), (512, 128, 28, 1), (1024, 256, 14, 1),
          (256, 1024, 14, 1), (2048, 512, 7, 1), (64, 64, 56, 3), (128, 128, 28, 3),
          (256, 256, 14, 3), (512, 512, 7, 3)]
#: More layers for the --ab comparisons: ResNet's wider maps, MobileNetV2's 1x1 layers.
EXTRA_LAYERS = [(128, 128, 56, 3), (256, 256, 28, 3), (144, 24, 56, 1),
                (384, 64, 28, 1), (32, 192, 28, 1), (80, 80, 28, 1), (240, 80, 14, 1),
                (80, 240, 14, 1), (24, 144, 56, 1), (80, 80, 14, 3),
                (128, 128, 56, 3, 2), (256, 256, 28, 3, 2), (512, 512, 14, 3, 2),  # stride 2
                # pruned widths (odd multiples of 16) on short rows
                (80, 80, 4, 3), (112, 112, 4, 3), (48, 48, 7, 3), (48, 80, 7, 3, 2), (80, 80, 7, 3),
                (48, 48, 14, 3)]

_DEFAULT_TILE = cpu_schedules._conv_tile


def _tile_fn(shape: tuple[int, int] | None):
    if shape is None:
        return _DEFAULT_TILE
    px, vecs = shape

    def tile(ow: int, occ: int, lanes: int, long_reduction: bool = False,
             pointwise: bool = False, strided: bool = False,
             depthwise: bool = False) -> tuple[int, int]:
        return (cpu_schedules._largest_divisor(ow, px),
                cpu_schedules._largest_divisor(occ, vecs))

    return tile


def _build(graph, shape):
    cpu_schedules._conv_tile = _tile_fn(shape)
    try:
        return slimfx.compile(graph, target="host", pipeline="fold-bn,dce")
    finally:
        cpu_schedules._conv_tile = _DEFAULT_TILE


#: Kernels that _conv_seconds times: the convolution and what the lowering puts in front
#: of it (the subsampling copy of a strided 1x1 convolution), not the layout transforms at
#: the ends of a one-layer model.
TIMED_KERNELS = ("conv2d", "strided_slice")


def _conv_seconds(compiled, x, calls: int = 15) -> float:
    """Median over ``calls`` model calls of the seconds its convolution kernels took."""
    compiled(x)
    vm = compiled._ensure_vm()
    total = [0.0]
    start = [0.0]

    def instrument(func, symbol, before, ret, *args) -> int:
        if any(name in symbol for name in TIMED_KERNELS):
            if before:
                start[0] = time.perf_counter()
            else:
                total[0] += time.perf_counter() - start[0]
        return 0

    times: list[float] = []
    vm.set_instrument(instrument)
    try:
        for _ in range(calls):
            total[0] = 0.0
            compiled(x)
            times.append(total[0])
    finally:
        vm.set_instrument(lambda *a: 0)
    return statistics.median(times)


class _Stack(torch.nn.Module):
    """``copies`` convolutions of one shape, each with its own weights, on one input, their
    outputs summed: each convolution reads its weights from memory, as inside a model
    (a layer compiled alone keeps them in cache from call to call), and its input from
    cache."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, copies: int):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
                                         for _ in range(copies))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.convs[0](x)
        for conv in self.convs[1:]:
            y = y + conv(x)
        return torch.relu(y)


def _layer(cin: int, cout: int, side: int, k: int, stride: int = 1, copies: int = 1):
    """One convolution with ReLU, "same" padding (or ``copies`` of it: :class:`_Stack`),
    captured: (graph, input)."""
    if copies > 1:
        m = _Stack(cin, cout, k, stride, copies).eval()
    else:
        m = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2),
                                torch.nn.ReLU()).eval()
    x = torch.randn(1, cin, side, side)
    return slimfx.capture(m, x), x


def _model(name: str) -> torch.nn.Module:
    """A zoo model for 224x224 inputs, or one of bench/latency.py's transformers models
    (efficientnet_b0, ...)."""
    if hasattr(zoo, name):
        return zoo.get(name, **({"image_size": 224} if name == "vit" else {})).eval()
    from latency import HF

    if name not in HF:
        raise SystemExit(f"--models: {name!r} is neither a zoo model nor one of {', '.join(HF)}")
    return HF[name]().eval()


def _shape_name(shape) -> str:
    return "default" if shape is None else f"{shape[0]}x{shape[1]}"


#: --ab switches: the module-level flag of cpu_schedules and its "off" value.
SWITCHES = {"BLOCK_REDUCTION_ABOVE": 0, "SQUARE_TILES": False, "ODD_CHUNK_TILES": False,
            "STRIDED_PAD_INLINE": False, "SHORT_ROW_TILES": False,
            "SUBSAMPLE_STRIDED_POINTWISE": False, "PREFETCH_NEXT_TASK": False,
            "ROW_PARTITION": False}


def _tile_desc(cin: int, cout: int, side: int, k: int, stride: int = 1) -> str:
    """The register tile (pixels x vectors) the schedule picks for a ResNet-style layer
    with a ``side`` x ``side`` output, the weight KiB one tile streams, and whether it
    blocks the reduction."""
    cb, ib = cpu_schedules.channel_block(cout, 16), cpu_schedules.channel_block(cin, 16)
    px, vecs = cpu_schedules.conv_tile_plan(cout // cb, side, cb, cin // ib, k, k, ib, 16, stride)
    kib = k * k * cin * vecs * cb * 4 // 1024
    blocked = cpu_schedules.blocked_reduction_plan(cout // cb, side, side, cb, cin // ib, k, k,
                                                   ib, px, vecs)
    return f"{px}x{vecs}, {kib} KiB{' blocked' if blocked else ''}"


def switch_ab(args) -> None:
    """Each layer and model built with a lowering switch on (its default) and off, timed
    in alternating rounds."""
    from ab import alternate, switched

    flag, _, value = args.ab.partition("=")
    if value:  # another value of a numeric setting, e.g. TILES_PER_TASK=32
        if not isinstance(getattr(cpu_schedules, flag, None), int) \
                or isinstance(getattr(cpu_schedules, flag), bool):
            raise SystemExit(f"--ab {args.ab}: {flag!r} is not a numeric cpu_schedules setting")
        try:
            off_value = int(value, 0)
        except ValueError:
            raise SystemExit(f"--ab {args.ab}: {value!r} is not an integer") from None
    elif flag not in SWITCHES:
        raise SystemExit(f"--ab: unknown switch {flag!r}; one of {', '.join(SWITCHES)}")
    else:
        off_value = SWITCHES[flag]
    rows = []
    specs = LAYERS + EXTRA_LAYERS
    if args.layers:
        specs = [tuple(int(v) for v in spec.split(",")) for spec in args.layers.split(";")]
    for cin, cout, side, k, stride in [(*spec, 1)[:5] for spec in specs]:
        g, x = _layer(cin, cout, side, k, stride, args.stack)
        on = slimfx.compile(g, target="host", pipeline="fold-bn,dce")
        out = (side - 1) // stride + 1  # 'same' padding
        tile_on = _tile_desc(cin, cout, out, k, stride)
        with switched(cpu_schedules, flag, off_value):
            off = slimfx.compile(g, target="host", pipeline="fold-bn,dce")
            tile_off = _tile_desc(cin, cout, out, k, stride)
        on(x), off(x)  # warm up
        secs = alternate({key: (lambda cm=cm, x=x: _conv_seconds(cm, x))
                          for key, cm in (("on", on), ("off", off))}, args.rounds)
        gflop = 2 * cin * cout * k * k * out * out * args.stack / 1e9
        a, b = statistics.median(secs["off"]), statistics.median(secs["on"])
        rows.append([f"{cin}->{cout} {side}x{side} k{k}" + (f" s{stride}" if stride > 1 else ""),
                     tile_off, tile_on,
                     f"{gflop / a:.0f}", f"{gflop / b:.0f}", f"{a / b:.2f}x"])
        print(" ".join(rows[-1]), flush=True)
    print(f"\n{flag}: convolution kernel GFLOP/s off ({flag}={off_value}) and on (default), "
          f"medians of {args.rounds} alternating rounds x 15 calls; tile: pixels x vectors, "
          "weight KiB a tile streams"
          + (f"; {args.stack} copies of each layer, weights from memory" if args.stack > 1 else
             "; each layer alone, its weights in cache"))
    print(format_table(["layer", "tile off", "tile on", "off", "on", "speedup"], rows))
    mrows = []
    for name in [m for m in args.models.split(",") if m]:
        model = _model(name)
        x = torch.randn(1, 3, 224, 224)
        g = slimfx.capture(model, x)
        built = {}
        for pipe in ("fold-bn,dce", "fold-bn,select-conv-algo{by=model},dce"):
            built[(pipe, "on")] = slimfx.compile(g, target="host", pipeline=pipe)
            with switched(cpu_schedules, flag, off_value):
                built[(pipe, "off")] = slimfx.compile(g, target="host", pipeline=pipe)
        ms = alternate({k: (lambda cm=cm, x=x: cm.benchmark(x, repeat=10).median_ms)
                        for k, cm in built.items()}, args.rounds)
        for pipe in ("fold-bn,dce", "fold-bn,select-conv-algo{by=model},dce"):
            a, b = statistics.median(ms[(pipe, "off")]), statistics.median(ms[(pipe, "on")])
            mrows.append([name, pipe, f"{a:.2f}", f"{b:.2f}", f"{a / b:.2f}x"])
            print(" ".join(mrows[-1]), flush=True)
    if mrows:
        print(f"\nwhole models, 1x3x224x224, ms (medians of {args.rounds} rounds x 10 runs)")
        print(format_table(["model", "pipeline", "off", "on", "speedup"], mrows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tiles", default="14x1,7x2,4x4,12x2",
                    help="tile shapes compared with the default, PIXELSxVECTORS")
    ap.add_argument("--models", default="",
                    help="zoo models (or bench/latency.py's transformers ones with --ab) timed "
                         "whole: default vs 14x1")
    ap.add_argument("--ab", metavar="SWITCH[=VALUE]",
                    help="instead: a lowering switch on vs off, per layer and for --models: "
                         + ", ".join(SWITCHES) + "; or a numeric setting (TILES_PER_TASK, "
                         "REDUCTION_BLOCK_BYTES, ...) at its default vs VALUE ('off')")
    ap.add_argument("--layers", default="",
                    help="with --ab: these layers instead of the built-in list, "
                         "'CIN,COUT,SIDE,K[,STRIDE];...'")
    ap.add_argument("--stack", type=int, default=1, metavar="N",
                    help="with --ab: time N copies of each layer (own weights, one input, "
                         "summed), so each reads its weights from memory as in a model")
    ap.add_argument("--blocked-reduction", action="store_const", dest="ab",
                    const="BLOCK_REDUCTION_ABOVE", help="the same as --ab BLOCK_REDUCTION_ABOVE")
    args = ap.parse_args()
    if args.ab:
        switch_ab(args)
        return
    shapes = [None] + [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",") if t]
    torch.manual_seed(0)
    rows = []
    for cin, cout, side, k in LAYERS:
        g, x = _layer(cin, cout, side, k)
        built = {s: _build(g, s) for s in shapes}
        secs: dict = {s: [] for s in shapes}
        for _ in range(args.rounds):
            for s, cm in built.items():
                secs[s].append(_conv_seconds(cm, x))
        gflop = 2 * cin * cout * k * k * side * side / 1e9
        rows.append([f"{cin}->{cout} {side}x{side} k{k}",
                     *(f"{gflop / statistics.median(secs[s]):.0f}" for s in shapes)])
        print(" ".join(rows[-1]), flush=True)
    t = host_target()
    print(f"\nhost {t.config['mcpu']}, {t.num_cores} cores; convolution kernel GFLOP/s, "
          f"medians of {args.rounds} alternating rounds x 15 calls")
    print(format_table(["layer", *map(_shape_name, shapes)], rows))

    if args.models:
        mrows = []
        for name in args.models.split(","):
            model = getattr(zoo, name)().eval()
            x = torch.randn(1, 3, 224, 224)
            g = slimfx.capture(model, x)
            built = {s: _build(g, s) for s in (None, (14, 1))}
            ms: dict = {s: [] for s in built}
            for _ in range(args.rounds):
                for s, cm in built.items():
                    ms[s].append(cm.benchmark(x, repeat=10).median_ms)
            d, r = statistics.median(ms[None]), statistics.median(ms[(14, 1)])
            mrows.append([name, f"{r:.2f}", f"{d:.2f}", f"{r / d:.2f}x"])
        print(f"\nwhole models, 1x3x224x224, ms (medians of {args.rounds} rounds x 10 runs)")
        print(format_table(["model", "14x1", "default", "speedup"], mrows))


if __name__ == "__main__":
    main()
