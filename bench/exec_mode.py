"""The virtual machine's own cost per call: intermediates allocated per call or once at
load time (``slimfx.lowering.workspace``), and ``compile(exec_mode=...)``, the kernel
sequence interpreted (bytecode) or compiled.

Each model is built three times for the host (fast lowering, no tuning, batch 1):

- ``per-call``: TVM's default, every planned intermediate allocated (``alloc_storage``,
  ``alloc_tensor``) and released on every call, interpreted;
- ``bytecode``: slimfx's default, the intermediates allocated once when the model is loaded;
- ``compiled``: the same, with ``exec_mode="compiled"``;

and the three are timed in alternating rounds (latency: median over rounds of each round's
median).  The VM's work between kernels is about fixed per call, so the differences show
on small models and vanish on big ones.

    python bench/exec_mode.py [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from ab import switched  # noqa: E402
from prune_accuracy import DigitResNet  # noqa: E402

import slimfx  # noqa: E402
from slimfx import zoo  # noqa: E402
from slimfx.ir.printing import format_table  # noqa: E402
from slimfx.lowering import workspace  # noqa: E402

#: (label, intermediates allocated once, exec_mode)
ARMS = [("per-call", False, "bytecode"), ("bytecode", True, "bytecode"),
        ("compiled", True, "compiled")]


def models():
    """(name, module, input shape): from a 0.1 ms digit classifier to a ResNet-18."""
    return [("digit_resnet 28", DigitResNet(), (1, 1, 28, 28)),
            ("small_resnet 32", zoo.small_resnet(), (1, 3, 32, 32)),
            ("mobilenet_v2 64", zoo.mobilenet_v2(), (1, 3, 64, 64)),
            ("resnet18 112", zoo.resnet18(), (1, 3, 112, 112))]


def build(g, once: bool, mode: str):
    with switched(workspace, "PERSISTENT_WORKSPACE", once):
        return slimfx.compile(g, target="host", pipeline="fold-bn,dce", exec_mode=mode,
                              verbose=False)


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
        arms = {label: build(g, once, mode) for label, once, mode in ARMS}
        calls = {label: sum(k.calls for k in arms[label].profile(x, repeat=1).kernels)
                 for label, _, mode in ARMS if mode == "bytecode"}
        built.append((name, x, calls, arms))
    times = {(name, label): [] for name, *_ in built for label, *_ in ARMS}
    for _ in range(args.rounds):
        for name, x, _, arms in built:
            for label, c in arms.items():
                # ~2 ms of calls per timed run, whatever the model's size
                number = max(1, int(2.0 / max(c.benchmark(x, repeat=1, number=1).median_ms, 1e-3)))
                times[(name, label)].append(c.benchmark(x, repeat=10, number=number).median_ms)
    rows = []
    for name, _, calls, _ in built:
        per_call, byte, comp = (statistics.median(times[(name, label)]) for label, *_ in ARMS)
        rows.append([name, f"{calls['per-call']} -> {calls['bytecode']}", f"{per_call:.4f}",
                     f"{byte:.4f}", f"{comp:.4f}", f"{byte / per_call:.3f}",
                     f"{comp / per_call:.3f}"])
    print(f"latency: median of {args.rounds} alternating rounds of benchmark(repeat=10) "
          f"medians, TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}")
    print(format_table(["model", "VM calls per run", "per-call ms", "bytecode ms", "compiled ms",
                        "bytecode/per-call", "compiled/per-call"], rows,
                       right={1, 2, 3, 4, 5, 6}))


if __name__ == "__main__":
    main()
