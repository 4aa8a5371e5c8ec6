"""Row reductions (layer norm, softmax over the last axis): slimfx's row schedule against
the generic one it replaced.

Each case is a one-op model compiled for the host twice, with
``cpu_schedules.ROW_REDUCTION`` on and off, and the two are timed in alternating rounds
(latency: median over rounds of each round's median; on a machine whose CPU is shared, the
minimum over rounds is printed too).  Shapes: ConvNeXt-T's channels-last layer norms at its
four stages, a ViT-B layer norm over 197 tokens, a softmax over attention-sized rows.

    python bench/row_reduction.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from ab import alternate, median_and_min, switched  # noqa: E402
from torch import nn  # noqa: E402

import slimfx  # noqa: E402
from slimfx.ir.printing import format_table  # noqa: E402
from slimfx.lowering import cpu_schedules  # noqa: E402

CASES = [("layer_norm", (1, 56, 56, 96)), ("layer_norm", (1, 28, 28, 192)),
         ("layer_norm", (1, 14, 14, 384)), ("layer_norm", (1, 7, 7, 768)),
         ("layer_norm", (1, 197, 768)), ("softmax", (1, 12, 128, 128))]


class _Op(nn.Module):
    def __init__(self, op: str, dim: int):
        super().__init__()
        self.op, self.norm = op, nn.LayerNorm(dim)

    def forward(self, x):
        return torch.softmax(x, -1) if self.op == "softmax" else self.norm(x)


def build(model, x, on: bool):
    with switched(cpu_schedules, "ROW_REDUCTION", on):
        return slimfx.compile(model, x, verbose=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7, help="alternating benchmark rounds")
    args = ap.parse_args()
    torch.manual_seed(0)
    built = []
    for op, shape in CASES:
        model, x = _Op(op, shape[-1]).eval(), torch.randn(shape)
        arms = {on: build(model, x, on) for on in (True, False)}
        kinds = {on: ",".join(sorted(c.manifest["build"]["kernels"])) for on, c in arms.items()}
        built.append((op, shape, x, arms, kinds))
    times = alternate({(i, on): (lambda c=c, x=x: c.benchmark(x, repeat=10, number=10).median_ms)
                       for i, (_, _, x, arms, _) in enumerate(built) for on, c in arms.items()},
                      args.rounds)
    rows = []
    for i, (op, shape, _, _, kinds) in enumerate(built):
        (new, new_min), (old, old_min) = (median_and_min(times[(i, on)]) for on in (True, False))
        rows.append([op, "x".join(map(str, shape)), kinds[True], f"{old:.4f}", f"{new:.4f}",
                     f"{old / new:.1f}x", f"{old_min / new_min:.1f}x"])
    print(f"latency: median of {args.rounds} alternating rounds of "
          "benchmark(repeat=10, number=10) medians (ms); threads: slimfx's default")
    print(format_table(["op", "shape", "kernel kinds", "generic ms", "row schedule ms",
                        "speedup", "speedup of minima"], rows, right={3, 4, 5, 6}))


if __name__ == "__main__":
    main()
