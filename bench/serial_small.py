"""Small kernels on one thread or in parallel: where handing work to the thread pool pays.

slimfx's hand schedules run the outer loops of every kernel in parallel.  For a kernel of
a few microseconds, waking the pool's workers and joining them costs about as much as
the work: pruned small models (the digit classifier of ``bench/prune_accuracy.py``, whose
convolutions have 16-64 channels on 4x4-28x28 maps) spent most of their time there.
A kernel's schedule drops its ``parallel`` loops when it has fewer than
``cpu_schedules.SERIAL_BELOW`` loop iterations (its largest block's: one per multiply-add
of a convolution) and fewer than ``SERIAL_MAX_ELEMENTS`` elements in the buffers it reads
and writes, or fewer than ``SERIAL_REUSED_ELEMENTS`` where it does ``SERIAL_MIN_REUSE`` or
more iterations per element of its largest buffer.

Part 1 builds single 3x3 convolutions (with bias and ReLU) of growing size twice, all
parallel (``SERIAL_BELOW=0``) and all serial (both thresholds huge), and times the two
builds in alternating rounds: the ratio says where the crossover is on this machine.
Part 2 builds whole models with every kernel parallel and with the default thresholds:
the digit classifier before and after pruning to half its MACs (random weights; widths
as ``prune-channels`` gives them), and zoo models at small inputs.  Each build is checked
against PyTorch.  Medians over rounds of each round's median, and the ratio of the medians.

    python bench/serial_small.py [--rounds 9] [--no-layers] [--no-models]
                                 [--candidate BELOW,ELEMENTS[,REUSED]] [--zoo NAME:SIZE,...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from ab import alternate, switched  # noqa: E402
from torch import nn  # noqa: E402

import slimfx  # noqa: E402
from slimfx import zoo  # noqa: E402
from slimfx.ir.printing import format_table, human  # noqa: E402
from slimfx.lowering import cpu_schedules  # noqa: E402
from slimfx.passes.prune import ChannelPruning, PruneOptions  # noqa: E402

#: (channels in = out, feature map side) of the single 3x3 convolutions
LAYERS = [(16, 4), (16, 7), (32, 4), (16, 14), (32, 7), (64, 4), (32, 14), (64, 7),
          (16, 28), (128, 4), (64, 14), (128, 7), (32, 28), (64, 28)]
#: (SERIAL_BELOW, SERIAL_MAX_ELEMENTS, SERIAL_REUSED_ELEMENTS) of each variant built
PARALLEL, SERIAL = (0, 0, 0), (1 << 62, 1 << 62, 1 << 62)
DEFAULT = (cpu_schedules.SERIAL_BELOW, cpu_schedules.SERIAL_MAX_ELEMENTS,
           cpu_schedules.SERIAL_REUSED_ELEMENTS)


def conv_layer(c: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU())


def digit_models():
    """The digit classifier of bench/prune_accuracy.py and its prune to half the MACs."""
    from prune_accuracy import DigitResNet

    torch.manual_seed(0)
    x = torch.randn(1, 1, 28, 28)
    graph = slimfx.capture(DigitResNet().eval(), (x,))
    opts = PruneOptions(macs=0.5, criterion="l1", normalize="mean", strategy="global",
                        round_to=16)
    pruned = slimfx.PassManager([ChannelPruning(opts)]).run(graph)
    return [("digit resnet", graph, x), ("digit resnet pruned 2x", pruned, x)]


ZOO_MODELS = "small_resnet:32,mobilenet_v2:64,resnet18:64"


def zoo_models(spec: str = ZOO_MODELS):
    """Zoo models at their input sizes, ``NAME:SIZE`` comma-separated."""
    torch.manual_seed(0)
    pairs = [(name, int(size)) for name, size in (item.split(":") for item in spec.split(","))]
    return [(f"zoo {name} {size}x{size}", zoo.get(name).eval(), torch.randn(1, 3, size, size))
            for name, size in pairs]


def build(model, x, variant: tuple[int, int, int]):
    below, elements, reused = variant
    with switched(cpu_schedules, "SERIAL_BELOW", below), \
            switched(cpu_schedules, "SERIAL_MAX_ELEMENTS", elements), \
            switched(cpu_schedules, "SERIAL_REUSED_ELEMENTS", reused):
        cm = slimfx.compile(model, x, pipeline="fold-bn,dce", verbose=False)
    ref = (model.gm if isinstance(model, slimfx.Graph) else model)(x)
    if isinstance(ref, (tuple, list)):  # a captured graph returns a tuple of outputs
        (ref,) = ref
    torch.testing.assert_close(cm(x), ref, atol=1e-3, rtol=1e-3)
    return cm


def timed(cases, variants, rounds: int):
    """``{(label, variant): [ms per round]}`` for every case built as every variant."""
    runs = {}
    for label, model, x in cases:
        for t in variants:
            cm = build(model, x, t)
            runs[(label, t)] = lambda cm=cm, x=x: cm.benchmark(x, repeat=200, warmup=10).median_ms
    return alternate(runs, rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9, help="alternating benchmark rounds")
    ap.add_argument("--no-layers", action="store_true", help="skip the single convolutions")
    ap.add_argument("--no-models", action="store_true", help="skip the whole models")
    ap.add_argument("--zoo", default=ZOO_MODELS, metavar="NAME:SIZE,...",
                    help="zoo models timed whole, with their input sizes")
    ap.add_argument("--candidate", default="", metavar="BELOW,ELEMENTS[,REUSED]",
                    help="also build the models with these thresholds (SERIAL_BELOW, "
                         "SERIAL_MAX_ELEMENTS and SERIAL_REUSED_ELEMENTS, the last the "
                         "default's if not given; e.g. 1048576,16384,0) and compare them with "
                         "the default in the same rounds")
    args = ap.parse_args()
    candidate = tuple(int(v) for v in args.candidate.split(",")) if args.candidate else None
    if candidate is not None and len(candidate) not in (2, 3):
        ap.error("--candidate takes BELOW,ELEMENTS[,REUSED]: two or three integers")
    if candidate is not None and len(candidate) == 2:
        candidate += (DEFAULT[2],)
    med = statistics.median
    if not args.no_layers:
        torch.manual_seed(0)
        cases = [(f"conv3x3 {c}ch {s}x{s}", conv_layer(c).eval(), torch.randn(1, c, s, s))
                 for c, s in LAYERS]
        times = timed(cases, (PARALLEL, SERIAL), args.rounds)
        rows = []
        for (label, _, _), (c, s) in zip(cases, LAYERS):
            par, ser = med(times[(label, PARALLEL)]), med(times[(label, SERIAL)])
            elements = 2 * c * s * s + 9 * c * c + c  # input, output, weight, bias
            rows.append([label, human(c * c * 9 * s * s), human(elements), f"{1e3 * par:.1f}",
                         f"{1e3 * ser:.1f}", f"{par / ser:.2f}x"])
        print(f"\nsingle convolutions, {args.rounds} alternating rounds (us: whole model call, "
              "layout transforms at the ends included)")
        print(format_table(["layer", "iterations", "elements", "parallel us", "serial us",
                            "serial speedup"], rows, right={1, 2, 3, 4, 5}))
    if not args.no_models:
        cases = digit_models() + zoo_models(args.zoo)
        variants = (PARALLEL, DEFAULT) + ((candidate,) if candidate else ())
        times = timed(cases, variants, args.rounds)
        rows = []
        for label, _, x in cases:
            par, new = med(times[(label, PARALLEL)]), med(times[(label, DEFAULT)])
            rows.append([label, "x".join(map(str, x.shape)), f"{par:.4f}", f"{new:.4f}",
                         f"{par / new:.2f}x"])
            if candidate:
                cand = med(times[(label, candidate)])
                rows[-1] += [f"{cand:.4f}", f"{new / cand:.2f}x"]
        print(f"\nwhole models, every kernel parallel vs the default (serial below "
              f"{DEFAULT[0]:,} iterations and {DEFAULT[1]:,} elements, or {DEFAULT[2]:,} "
              f"elements at {cpu_schedules.SERIAL_MIN_REUSE} iterations per element of the "
              "largest buffer)"
              + (f" vs the candidate ({candidate[0]:,}, {candidate[1]:,}, {candidate[2]:,})"
                 if candidate else "")
              + f", {args.rounds} alternating rounds")
        print(format_table(["model", "input", "parallel ms", "default ms", "speedup"]
                           + (["candidate ms", "default / candidate"] if candidate else []),
                           rows, right={2, 3, 4, 5, 6}))
        digit = {lab: (med(times[(lab, PARALLEL)]), med(times[(lab, DEFAULT)]))
                 for lab, _, _ in cases[:2]}
        (bp, bd), (pp, pd) = digit.values()
        g, p = cases[0][1], cases[1][1]
        mr = p.macs() / g.macs()
        print(f"digit resnet pruned to MACs ratio {mr:.3f}: latency ratio {pp / bp:.3f} (speed "
              f"eff {mr / (pp / bp):.2f}) all parallel, {pd / bd:.3f} (speed eff "
              f"{mr / (pd / bd):.2f}) with the default")


if __name__ == "__main__":
    main()
