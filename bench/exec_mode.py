"""``compile(exec_mode=...)``: the VM's kernel sequence interpreted (bytecode) or compiled.

Each model is built twice for the host (fast lowering, no tuning, batch 1), once per
``exec_mode``, and the two are timed in alternating rounds (latency: median over rounds
of each round's median).  The time the interpreter spends between kernels is about
fixed per kernel call, so the difference shows on small models and vanishes on big ones.

    python bench/exec_mode.py [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from prune_accuracy import DigitResNet  # noqa: E402

import slimfx  # noqa: E402
from slimfx import zoo  # noqa: E402
from slimfx.ir.printing import format_table  # noqa: E402
from slimfx.lowering.build import EXEC_MODES  # noqa: E402


def models():
    """(name, module, input shape): from a 0.1 ms digit classifier to a ResNet-18."""
    return [("digit_resnet 28", DigitResNet(), (1, 1, 28, 28)),
            ("small_resnet 32", zoo.small_resnet(), (1, 3, 32, 32)),
            ("mobilenet_v2 64", zoo.mobilenet_v2(), (1, 3, 64, 64)),
            ("resnet18 112", zoo.resnet18(), (1, 3, 112, 112))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7, help="alternating benchmark rounds")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    built = []
    for name, module, shape in models():
        x = torch.randn(shape)
        g = slimfx.capture(module.eval(), x)
        per_mode = {m: slimfx.compile(g, target="host", pipeline="fold-bn,dce", exec_mode=m,
                                      verbose=False) for m in EXEC_MODES}
        calls = sum(k.calls for k in per_mode["bytecode"].profile(x, repeat=1).kernels)
        built.append((name, x, calls, per_mode))
    times = {(name, m): [] for name, _, _, per_mode in built for m in per_mode}
    for _ in range(args.rounds):
        for name, x, _, per_mode in built:
            for m, c in per_mode.items():
                # ~2 ms of calls per timed run, whatever the model's size
                number = max(1, int(2.0 / max(c.benchmark(x, repeat=1, number=1).median_ms, 1e-3)))
                times[(name, m)].append(c.benchmark(x, repeat=10, number=number).median_ms)
    rows = []
    for name, _, calls, _ in built:
        b, c = (statistics.median(times[(name, m)]) for m in EXEC_MODES)
        rows.append([name, str(calls), f"{b:.4f}", f"{c:.4f}", f"{c / b:.3f}",
                     f"{(b - c) * 1e3 / calls:.2f}"])
    print(f"latency: median of {args.rounds} alternating rounds of benchmark(repeat=10) "
          f"medians, TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}")
    print(format_table(["model", "VM calls", "bytecode ms", "compiled ms",
                        "compiled/bytecode", "us saved per call"], rows, right={1, 2, 3, 4, 5}))


if __name__ == "__main__":
    main()
