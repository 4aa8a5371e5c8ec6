"""Matmuls whose row count has no small divisor (ViT's 197 tokens, a prime): ragged row
tiles against the divisor-sized tiles they replaced.

slimfx's matmul schedule tiles rows by a divisor of the row count (up to 4, or 8 when
every batch shares the weight).  197 rows only divide by 1: every weight vector loaded
fed one FMA.  With ``cpu_schedules.RAGGED_ROWS`` the tile is 4 rows and the last tile
is partial (its rows past the end are masked).  Each case is compiled for the host both
ways and the two builds are timed in alternating rounds (median over rounds of each
round's median, and the ratio of the minima: the machine's CPU is shared).  Cases:
ViT-B/16's four linear layers at 197 tokens, and the zoo ViT at 224x224 (patch 4: 3,137
tokens, also a prime).

    python bench/matmul_rows.py [--rounds 7] [--no-model]
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
from slimfx import zoo  # noqa: E402
from slimfx.ir.printing import format_table  # noqa: E402
from slimfx.lowering import cpu_schedules  # noqa: E402

#: (label, model factory, input shape)
LINEARS = [("ViT-B qkv", lambda: nn.Linear(768, 2304), (1, 197, 768)),
           ("ViT-B proj", lambda: nn.Linear(768, 768), (1, 197, 768)),
           ("ViT-B fc1", lambda: nn.Linear(768, 3072), (1, 197, 768)),
           ("ViT-B fc2", lambda: nn.Linear(3072, 768), (1, 197, 3072))]
MODEL = ("zoo vit 224", lambda: zoo.vit(image_size=224), (1, 3, 224, 224))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7, help="alternating benchmark rounds")
    ap.add_argument("--no-model", action="store_true", help="only the single linear layers")
    args = ap.parse_args()
    torch.manual_seed(0)
    cases = LINEARS + ([] if args.no_model else [MODEL])
    built, runs = [], {}
    for label, factory, shape in cases:
        model, x = factory().eval(), torch.randn(shape)
        for ragged in (True, False):
            with switched(cpu_schedules, "RAGGED_ROWS", ragged):
                cm = slimfx.compile(model, x, verbose=False)
            torch.testing.assert_close(cm(x), model(x), atol=1e-3, rtol=1e-3)
            runs[(label, ragged)] = (lambda cm=cm, x=x: cm.benchmark(x, repeat=10, number=5)
                                     .median_ms)
        built.append((label, shape))
    times = alternate(runs, args.rounds)
    rows = []
    for label, shape in built:
        (new, new_min), (old, old_min) = (median_and_min(times[(label, r)]) for r in (True, False))
        rows.append([label, "x".join(map(str, shape)), f"{old:.3f}", f"{new:.3f}",
                     f"{old / new:.2f}x", f"{old_min / new_min:.2f}x"])
    print(f"latency: median of {args.rounds} alternating rounds of benchmark(repeat=10, "
          "number=5) medians (ms); threads: slimfx's default")
    print(format_table(["case", "input", "divisor rows ms", "ragged rows ms", "speedup",
                        "speedup of minima"], rows, right={2, 3, 4, 5}))


if __name__ == "__main__":
    main()
