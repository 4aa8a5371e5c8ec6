"""Does ``pad-channels`` pay?  Compiled latency of zoo models with and without padding
their channel counts to a multiple of 16 (full AVX-512 vectors in the blocked layout).

DenseNet's growth rate 12 gives widths 24 + 12k: a model that concatenates maps gets one
channel block for all its convolutions (``cpu_schedules._uniform_block``), here 4 floats;
padded, every width is a multiple of 16 for about 1.36x the MACs.  Each model is captured,
``fold-bn,dce`` run, and compiled for the host (fast lowering, no tuning, batch 1) as it
is and after ``pad-channels{multiple=16}`` (``slimfx.compile``'s own automatic padding off
for both: ``pad_channels=False``), then timed in alternating rounds.

    python bench/pad_channels.py [--models densenet] [--size 224] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from prune_accuracy import conv_widths  # noqa: E402

import slimfx  # noqa: E402
from slimfx import zoo  # noqa: E402
from slimfx.ir.printing import format_table  # noqa: E402


def widths(graph: slimfx.Graph) -> str:
    return " ".join(map(str, sorted(set(conv_widths(graph).values()))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="densenet", help="comma-separated zoo names")
    ap.add_argument("--size", type=int, default=224, help="input image side")
    ap.add_argument("--multiple", type=int, default=16)
    ap.add_argument("--max-growth", type=float, default=1.5)
    ap.add_argument("--rounds", type=int, default=7, help="alternating benchmark rounds")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--number", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    pad = f"pad-channels{{multiple={args.multiple},max_growth={args.max_growth:g}}}"
    table = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = zoo.get(name).eval()
        x = torch.randn(1, 3, args.size, args.size)
        g = slimfx.run_pipeline(slimfx.capture(model, x), "fold-bn,dce")
        pm = slimfx.PassManager(pad)
        padded = pm.run(g)
        stats = pm.records[0].stats
        models = [slimfx.compile(g, target="host", pad_channels=False, verbose=False),
                  slimfx.compile(padded, target="host", pad_channels=False, verbose=False)]
        times: list[list[float]] = [[], []]
        for k in range(args.rounds):
            for i in ((0, 1) if k % 2 == 0 else (1, 0)):
                times[i].append(models[i].benchmark(repeat=args.repeat, number=args.number,
                                                    warmup=2).median_ms)
        plain_ms, pad_ms = statistics.median(times[0]), statistics.median(times[1])
        table.append([f"{name} 1x3x{args.size}x{args.size}",
                      f"{widths(g)} -> {widths(padded)}", f"{padded.macs() / g.macs():.3f}",
                      f"{plain_ms:.2f}", f"{pad_ms:.2f}", f"{plain_ms / pad_ms:.2f}x"])
        if stats.get("left_alone"):
            print(f"{name}: left alone: " + "; ".join(f"{k} ({v})" for k, v in
                                                      stats["left_alone"].items()))
    print(f"{pad} after fold-bn; latency ms: median of {args.rounds} alternating rounds of "
          f"benchmark(repeat={args.repeat}, number={args.number}) medians, "
          f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}")
    print(format_table(["model", "conv widths plain -> padded", "MACs ratio", "latency plain",
                        "latency padded", "speedup"], table, right={2, 3, 4, 5}))


if __name__ == "__main__":
    main()
