"""Why ``prune-channels`` rounds widths to 16 by default: compiled latency of the same
network pruned to the same MACs with widths rounded to 1, 8 and 16.

DigitResNet (``bench/prune_accuracy.py``'s model, 1x1x28x28, random weights: latency does
not depend on them) is pruned once per ``round_to`` with the random criterion, compiled
for the host (fast lowering, no tuning, batch 1) and timed in alternating rounds; the
table gives each model's MACs and latency as ratios of the unpruned model's and the
speed efficiency (MACs ratio / latency ratio; 1.0 = latency falls as much as MACs).

Rows ``1+pad(g)``: the ``round_to=1`` model then ``pad-channels{multiple=16,max_growth=g}``
(zero channels up to the next multiple of 16 where that grows a width at most ``g``x):
can padding recover the speed that odd widths lose, after the fact?

    python bench/prune_widths.py [--keep 0.5,0.33] [--rounds 7] [--pad 1.5,3]
                                 [--exec-mode bytecode|compiled]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from prune_accuracy import DigitResNet, conv_widths  # noqa: E402

import slimfx  # noqa: E402
from slimfx.ir.printing import format_table  # noqa: E402
from slimfx.lowering.build import EXEC_MODES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", default="0.5,0.33", help="fractions of the MACs kept")
    ap.add_argument("--round-to", default="1,8,16", help="values of round_to compared")
    ap.add_argument("--pad", default="1.5,3",
                    help="max_growth values of pad-channels{multiple=16} applied to the "
                         "round_to=1 model ('' for none)")
    ap.add_argument("--rounds", type=int, default=7, help="alternating benchmark rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--exec-mode", default="bytecode", choices=EXEC_MODES,
                    help="compile(exec_mode=...) of every model (bench/exec_mode.py)")
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = slimfx.capture(DigitResNet().eval(), torch.randn(1, 1, 28, 28))
    rows = [("unpruned", "-", base)]
    for keep in args.keep.split(","):
        for rt in args.round_to.split(","):
            g = slimfx.run_pipeline(
                base, f"prune-channels{{macs={keep},round_to={rt},criterion=random}}")
            rows.append((keep, rt, g))
            if rt == "1":
                for mg in filter(None, args.pad.split(",")):
                    padded = slimfx.run_pipeline(
                        g, f"pad-channels{{multiple=16,max_growth={mg}}}")
                    rows.append((keep, f"1+pad({mg})", padded))
    # pad_channels=False: slimfx.compile would otherwise pad the odd widths itself.
    models = [slimfx.compile(g, target="host", pipeline="fold-bn,dce", pad_channels=False,
                             exec_mode=args.exec_mode)
              for *_, g in rows]
    times: list[list[float]] = [[] for _ in rows]
    for k in range(args.rounds):
        order = list(range(len(rows)))
        for i in order[k % len(order):] + order[:k % len(order)]:
            times[i].append(models[i].benchmark(repeat=10, number=20, warmup=3).median_ms)
    base_ms = statistics.median(times[0])
    table = []
    for (keep, rt, g), t in zip(rows, times):
        ms = statistics.median(t)
        mr, lr = g.macs() / base.macs(), ms / base_ms
        widths = sorted(set(conv_widths(g).values()))
        table.append([keep, rt, f"{mr:.3f}", f"{ms:.3f}", f"{lr:.3f}", f"{mr / lr:.2f}",
                      " ".join(map(str, widths))])
    print(f"DigitResNet 1x1x28x28, prune-channels{{criterion=random}}; latency: median of "
          f"{args.rounds} alternating rounds of benchmark(repeat=10, number=20) medians, "
          f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, exec_mode={args.exec_mode}")
    print(format_table(["MACs kept (asked)", "round_to", "MACs ratio", "latency ms", "lat ratio",
                        "speed eff", "layer widths"], table, right={2, 3, 4, 5}))


if __name__ == "__main__":
    main()
