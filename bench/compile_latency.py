"""Build time and latency of slimfx-compiled models vs PyTorch eager, per zoo model.

Every model is captured, cleaned ("fold-bn,dce") and built for the host with no tuning.
Latencies are medians over rounds that alternate eager and compiled runs, so both see
the same machine load; the ratio column is what to read on a shared, noisy machine.

    python bench/compile_latency.py [--size 64] [--rounds 5] [--runs 5] [--models a,b]
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
from slimfx.lowering import host_target


def _eager_ms(model, x, runs: int) -> list[float]:
    out = []
    with torch.no_grad():
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x)
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="input height/width")
    ap.add_argument("--rounds", type=int, default=5, help="alternating eager/compiled rounds")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per runner per round")
    ap.add_argument("--models", default=",".join(zoo.ZOO))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(host_target().num_cores)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        kw = {"image_size": args.size} if name == "vit" else {}
        model = zoo.get(name, **kw).eval()
        x = torch.randn(1, 3, args.size, args.size)
        t0 = time.perf_counter()
        cm = slimfx.compile(model, x, pipeline="fold-bn,dce")
        total_s = time.perf_counter() - t0
        eager, compiled = [], []
        _eager_ms(model, x, 2)  # warm-up
        for _ in range(args.rounds):
            eager += _eager_ms(model, x, args.runs)
            lat = cm.benchmark(x.numpy(), repeat=args.runs, warmup=1)
            compiled.append(lat.median_ms)
        e, c = statistics.median(eager), statistics.median(compiled)
        macs = cm.manifest["graph"]["macs"]
        rows.append([name, human(macs), f"{cm.manifest['build']['build_s']:.1f}", f"{total_s:.1f}",
                     f"{e:.2f}", f"{c:.2f}", f"{c / e:.2f}x", f"{2 * macs / c / 1e6:.1f}",
                     f"{cm.parity['max_abs_error']:.1e}"])
        print(f"... {name} done", flush=True)
    t = host_target()
    print(f"\ntarget host ({t.config['mcpu']}, {t.num_cores} cores, {t.vector_bits}-bit vectors), "
          f"input 1x3x{args.size}x{args.size}, no tuning; medians of {args.rounds} alternating rounds "
          f"x {args.runs} runs; torch threads {torch.get_num_threads()}")
    print(format_table(["model", "MACs", "TVM build s", "compile total s", "eager ms",
                        "compiled ms", "compiled/eager", "compiled GFLOP/s", "parity err"],
                       rows, right=set(range(1, 9))))


if __name__ == "__main__":
    main()
