"""Capture time and pass-manager overhead per zoo model.

For each model: median over --repeat runs of
  capture      slimfx.capture (torch.export + decomposition + normalisation + verify)
  export       torch.export.export alone (what capture builds on)
  pipeline     PassManager("fold-bn,const-fold,dce").run, split into the time spent in
               the passes themselves and the manager's overhead (copies, lint, running
               and comparing the graph after each pass)
  forward      one eager forward of the model on the same input (the unit that each
               verification costs)

    python bench/capture_overhead.py [--size 224] [--repeat 3] [--models resnet18,vit]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import slimfx
from slimfx import zoo
from slimfx.ir.printing import format_table, human
from slimfx.passes import PassManager

PIPELINE = "fold-bn,const-fold,dce"


def _median_time(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224, help="input height/width for the CNNs")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--models", default=",".join(zoo.ZOO))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        kwargs = {"image_size": args.size} if name == "vit" else {}
        if name == "vit":
            kwargs["patch_size"] = max(4, args.size // 14)
        model = zoo.get(name, **kwargs).eval()
        x = torch.randn(1, 3, args.size, args.size)
        with torch.no_grad():
            t_fwd, _ = _median_time(lambda m=model, x=x: m(x), max(args.repeat, 5))
        t_exp, _ = _median_time(lambda m=model, x=x: torch.export.export(m, (x,), strict=False),
                                args.repeat)
        t_cap, graph = _median_time(lambda m=model, x=x: slimfx.capture(m, x), args.repeat)
        pass_s, total_s = [], []
        for _ in range(args.repeat):
            pm = PassManager(PIPELINE)
            t0 = time.perf_counter()
            pm.run(graph)
            total_s.append(time.perf_counter() - t0)
            pass_s.append(sum(r.pass_s for r in pm.records))
        t_total, t_pass = statistics.median(total_s), statistics.median(pass_s)
        s = graph.summary()
        rows.append([name, s["nodes"], human(s["params"]), human(s["macs"]),
                     f"{t_fwd * 1e3:.1f}", f"{t_exp:.2f}", f"{t_cap:.2f}", f"{t_cap / t_exp:.2f}x",
                     f"{t_total * 1e3:.0f}", f"{t_pass * 1e3:.0f}", f"{(t_total - t_pass) * 1e3:.0f}",
                     f"{(t_total - t_pass) / t_fwd:.1f}"])
        print(f"... {name} done", flush=True)
    print(f"\ninput 1x3x{args.size}x{args.size}, pipeline '{PIPELINE}', medians of {args.repeat} runs, "
          f"{torch.get_num_threads()} threads")
    print(format_table(
        ["model", "ops", "params", "MACs", "forward ms", "export s", "capture s", "capture/export",
         "pipeline ms", "in passes ms", "manager ms", "manager/forward"],
        rows, right=set(range(1, 12))))


if __name__ == "__main__":
    main()
