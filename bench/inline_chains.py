"""Build time of kernels that chain polynomial functions, with and without the inline guard.

slimfx's CPU lowering gives ``exp``, ``erf``, ``tanh`` and ``sigmoid`` polynomial forms
that read their argument several times.  The hand schedules inline element-wise blocks
into their readers; without a guard each read got a copy of the whole upstream chain,
so a fused kernel of chained sigmoids grew exponentially.  ``cpu_schedules.
INLINE_COPY_LIMIT`` stops inlining a large expression into a block that reads it more
than once.  This builds chains of ``n`` alternating ``sigmoid`` / ``relu(x) * 0.5`` ops
(one fused kernel, 1x16x4x4), alone and after a conv or a linear layer, and prints the
schedule's and TVM's build seconds and the scheduled module's size, with the guard and,
for chains short enough to finish, without it (``--unguarded-max``).  A warm-up build
runs first, so no row pays the process's first-build cost.  Each build is checked
against PyTorch.

    python bench/inline_chains.py [--lengths 2,4,6,8,16] [--unguarded-max 6] [--anchored-max 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from ab import switched  # noqa: E402
from torch import nn  # noqa: E402

import slimfx  # noqa: E402
from slimfx.ir.printing import format_table  # noqa: E402
from slimfx.lowering import cpu_schedules  # noqa: E402


class Chain(nn.Module):
    def __init__(self, n: int, head: str):
        super().__init__()
        self.n = n
        self.head = {"none": nn.Identity(), "conv": nn.Conv2d(16, 16, 3, padding=1),
                     "linear": nn.Linear(4, 4)}[head]

    def forward(self, x):
        x = self.head(x)
        for i in range(self.n):
            x = torch.relu(x) * 0.5 if i % 2 else torch.sigmoid(x)
        return x


def build(n: int, head: str, guarded: bool) -> list[str]:
    torch.manual_seed(0)
    model, x = Chain(n, head).eval(), torch.randn(1, 16, 4, 4)
    size: dict[str, int] = {}
    schedule = cpu_schedules.schedule

    def measured(mod, info):
        out = schedule(mod, info)
        size["chars"] = len(out.script(show_meta=False))
        return out

    limit = cpu_schedules.INLINE_COPY_LIMIT if guarded else 1 << 62
    t0 = time.perf_counter()
    with switched(cpu_schedules, "INLINE_COPY_LIMIT", limit), \
            switched(cpu_schedules, "schedule", measured):
        cm = slimfx.compile(model, x, verbose=False)
    total = time.perf_counter() - t0
    torch.testing.assert_close(cm(x), model(x), atol=1e-5, rtol=1e-5)
    b = cm.manifest["build"]
    return [head, str(n), "on" if guarded else "off", f"{b['schedule_s']:.2f}",
            f"{b['build_s']:.2f}", f"{total:.2f}", f"{size['chars']:,}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2,4,6,8,16", help="chain lengths (ops)")
    ap.add_argument("--heads", default="none,conv,linear",
                    help="what runs before the chain, in the same kernel")
    ap.add_argument("--unguarded-max", type=int, default=6,
                    help="longest chain also built without the guard (8 took 276 s)")
    ap.add_argument("--anchored-max", type=int, default=8,
                    help="longest chain built after a conv or linear layer (16 after a conv "
                         "ran out of memory: the guard misses buffers that share a name)")
    args = ap.parse_args()
    build(2, "none", True)  # warm-up: the first build in a process pays TVM's start-up
    rows = []
    for head in args.heads.split(","):
        for n in (int(v) for v in args.lengths.split(",")):
            if head != "none" and n > args.anchored_max:
                continue
            for guarded in (False, True):
                if guarded or n <= args.unguarded_max:
                    rows.append(build(n, head, guarded))
                    print("  " + " ".join(rows[-1]), flush=True)
    print("\nchains of n alternating sigmoid / relu*0.5 ops in one kernel (after 'head'), "
          f"INLINE_COPY_LIMIT={cpu_schedules.INLINE_COPY_LIMIT} on/off")
    print(format_table(["head", "n", "guard", "schedule s", "TVM build s", "compile s",
                        "scheduled module chars"], rows, right={1, 3, 4, 5, 6}))


if __name__ == "__main__":
    main()
