"""Compiled latency of direct vs Winograd F(2,3) / F(4,3) vs FFT convolution, per layer,
and whole models with ``select-conv-algo`` vs direct.

Each layer (one stride-1 conv, ``padding = k // 2``, batch 1) is compiled for the host
once per algorithm; latencies are medians over rounds that alternate the algorithms, so
all see the same machine load; the ratio columns (direct / algorithm: > 1 is faster) are
what to read on a shared, noisy machine.  Whole models are compiled direct and with
``select-conv-algo{by=measure}`` (and ``by=model``) and timed the same way.

    python bench/fast_conv.py [--rounds 5] [--runs 10] [--quick] [--models resnet18,vgg11]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

import slimfx
from slimfx import zoo
from slimfx.ir.printing import format_table
from slimfx.lowering import host_target
from slimfx.passes import fast_conv as fc

#: (channels in = out, size, kernel): channels 16-256, sizes 7-112, kernels 3, 5, 7, 11.
GRID = [
    (16, 112, 3), (32, 56, 3), (64, 56, 3), (64, 28, 3), (128, 28, 3), (256, 14, 3),
    (256, 7, 3),
    (16, 112, 5), (64, 56, 5), (128, 28, 5), (256, 14, 5),
    (16, 56, 7), (64, 28, 7), (128, 28, 7), (256, 7, 7),
    (16, 56, 11), (64, 28, 11), (128, 14, 11), (256, 14, 11),
]
QUICK = [(64, 56, 3), (128, 28, 3), (256, 14, 3), (64, 28, 7), (64, 28, 11)]


def _algos(kernel: int) -> list[str]:
    return ["direct", "winograd2", "winograd4", "fft"] if kernel == 3 else ["direct", "fft"]


def _time_rounds(models: dict, x, rounds: int, runs: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in models}
    xs = x.numpy()
    for cm in models.values():
        cm.benchmark(xs, repeat=2, warmup=2)
    for _ in range(rounds):
        for k, cm in models.items():
            times[k].append(cm.benchmark(xs, repeat=runs, warmup=1).median_ms)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_layers(grid, rounds: int, runs: int) -> list[list]:
    rows = []
    for cin, size, k in grid:
        torch.manual_seed(0)
        conv = nn.Conv2d(cin, cin, k, padding=k // 2).eval()
        x = torch.randn(1, cin, size, size)
        built, errs = {}, {}
        for a in _algos(k):
            cm = slimfx.compile(conv, x, pipeline=fc._pipeline_of(a),
                                atol=fc.WINOGRAD_TOLERANCE[4], verbose=False)
            built[a], errs[a] = cm, cm.parity["max_abs_error"]
        ms = _time_rounds(built, x, rounds, runs)
        p = fc.ConvParams(cin, cin, k, (k // 2, k // 2), tuple(x.shape), tuple(x.shape))
        model_pick = min(_algos(k), key=lambda a: fc.estimate_ms(a, p))
        cells = []
        for a in ("winograd2", "winograd4", "fft"):
            cells += ([f"{ms[a]:.3f}", f"{ms['direct'] / ms[a]:.2f}x"] if a in ms else ["-", "-"])
        best = min(ms, key=ms.get)
        worst_err = max(v for a, v in errs.items() if a != "direct")
        rows.append([f"{cin}", f"{size}", f"{k}x{k}", f"{ms['direct']:.3f}", *cells, best,
                     model_pick, f"{worst_err:.1e}"])
        print(f"... {cin}ch {size}x{size} k{k}: " + ", ".join(f"{a} {v:.3f}" for a, v in ms.items()),
              flush=True)
    return rows


def bench_models(names, size: int, rounds: int, runs: int) -> list[list]:
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = zoo.get(name).eval()
        x = torch.randn(1, 3, size, size)
        graph = slimfx.run_pipeline(slimfx.capture(model, x), "fold-bn,dce")
        built, chosen = {}, {}
        for label, pipe in (("direct", None), ("measure", "select-conv-algo{by=measure}"),
                            ("model", "select-conv-algo{by=model}")):
            t0 = time.perf_counter()
            pm = slimfx.PassManager(pipe) if pipe else None
            g = pm.run(graph) if pm else graph
            if pm:
                picks = [c["choice"] for c in pm.records[0].stats["choices"].values()]
                chosen[label] = ",".join(f"{picks.count(a)} {a}" for a in sorted(set(picks)))
                chosen[label + "_s"] = time.perf_counter() - t0
            built[label] = slimfx.compile(g, atol=fc.WINOGRAD_TOLERANCE[4], verbose=False)
        ms = _time_rounds(built, x, rounds, runs)
        rows.append([name, f"1x3x{size}x{size}", f"{ms['direct']:.2f}",
                     f"{ms['measure']:.2f}", f"{ms['direct'] / ms['measure']:.2f}x",
                     chosen["measure"], f"{chosen['measure_s']:.0f}",
                     f"{ms['model']:.2f}", f"{ms['direct'] / ms['model']:.2f}x", chosen["model"]])
        print(f"... {name}: " + ", ".join(f"{a} {v:.2f}" for a, v in ms.items()), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    ap.add_argument("--runs", type=int, default=10, help="timed runs per algorithm and round")
    ap.add_argument("--quick", action="store_true", help=f"layers {QUICK} only")
    ap.add_argument("--models", default="resnet18,vgg11", help="zoo models ('' for none)")
    ap.add_argument("--size", type=int, default=112, help="model input height/width")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    t = host_target()
    layer_rows = bench_layers(QUICK if args.quick else GRID, args.rounds, args.runs)
    model_rows = bench_models([m for m in args.models.split(",") if m], args.size, args.rounds,
                              args.runs)
    print(f"\ntarget host ({t.config['mcpu']}, {t.num_cores} cores, {t.vector_bits}-bit vectors), "
          f"no tuning; medians of {args.rounds} alternating rounds x {args.runs} runs; "
          "ratio = direct / algorithm (> 1: faster than direct)")
    print("\nper layer (Cin = Cout, stride 1, 'same' padding), compiled latency in ms")
    print(format_table(["C", "HxW", "kernel", "direct", "F(2,3)", "ratio", "F(4,3)", "ratio",
                        "FFT", "ratio", "fastest", "model picks", "parity err"],
                       layer_rows, right=set(range(0, 10))))
    if model_rows:
        print("\nwhole model (fold-bn,dce first), compiled latency in ms; select-conv-algo "
              "by=measure and by=model vs direct")
        print(format_table(["model", "input", "direct", "measure", "ratio", "choices",
                            "select s", "model", "ratio", "choices"], model_rows,
                           right={2, 3, 4, 6, 7, 8}))


if __name__ == "__main__":
    main()
