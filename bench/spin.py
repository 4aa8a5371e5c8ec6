"""How long TVM's idle workers spin: latency and CPU burnt per call, by spin count.

TVM's thread pool reads ``TVM_THREAD_POOL_SPIN_COUNT`` once per process, so every setting
runs in its own process (one after another; read the ratios, on a shared machine).  Per
zoo model (batch 1, ``fold-bn,dce``): the median latency of back-to-back calls
(``CompiledModel.benchmark``), and, with ``--idle`` ms of sleep between calls (a server
answering requests, a camera's frames), the wall time and the process's CPU time per
call: what the workers spin after a call shows as CPU time beyond 2 x wall.

Settings: 0 (workers sleep between kernels), slimfx's default
(``slimfx.runtime.threads.SPIN_COUNT``), and TVM's own (300,000: what a process gets
with the variable unset and slimfx not setting it).

    python bench/spin.py [--models resnet18,mobilenet_v2] [--idle 20] [--calls 40]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, resource, statistics, sys, time, torch
import slimfx
from slimfx import zoo
name, calls, idle = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) / 1e3
torch.manual_seed(0)
x = torch.randn(1, 3, 224, 224)
cm = slimfx.compile(zoo.get(name).eval(), x, pipeline="fold-bn,dce", verbose=False)
xs = x.numpy()
hot = statistics.median(cm.benchmark(xs, repeat=20).median_ms for _ in range(5))
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
walls, c0 = [], cpu()
for _ in range(calls):
    t = time.perf_counter()
    cm.run_numpy(xs)
    walls.append(time.perf_counter() - t)
    time.sleep(idle)
print(json.dumps({"hot": hot, "wall": 1e3 * statistics.median(walls),
                  "cpu": 1e3 * (cpu() - c0) / calls,
                  "spin": os.environ.get("TVM_THREAD_POOL_SPIN_COUNT")}))
"""


def main() -> None:
    from slimfx.ir.printing import format_table
    from slimfx.runtime.threads import SPIN_COUNT

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--idle", type=float, default=20.0, help="ms of sleep between calls")
    ap.add_argument("--calls", type=int, default=40)
    args = ap.parse_args()
    settings = {"0": "0", f"slimfx {SPIN_COUNT}": str(SPIN_COUNT), "TVM 300000": "300000"}
    rows = []
    for name in args.models.split(","):
        res = {}
        for label, value in settings.items():
            env = {**os.environ, "TVM_THREAD_POOL_SPIN_COUNT": value}
            out = subprocess.run([sys.executable, "-c", CHILD, name, str(args.calls),
                                  str(args.idle)], env=env, capture_output=True, text=True,
                                 check=True).stdout
            res[label] = json.loads(out.strip().splitlines()[-1])
        base = res[f"slimfx {SPIN_COUNT}"]["hot"]
        for label, r in res.items():
            rows.append([name, label, f"{r['hot']:.3f}", f"{r['hot'] / base:.2f}x",
                         f"{r['wall']:.3f}", f"{r['cpu']:.2f}",
                         f"{max(0.0, r['cpu'] - 2 * r['wall']):.2f}"])
        print(f"... {name} done", flush=True)
    print(f"\n1x3x224x224, 2 threads; back-to-back: median of 5 x 20 runs; with {args.idle:g} ms "
          f"idle between {args.calls} calls: median wall and mean CPU time per call")
    print(format_table(["model", "spin count", "back-to-back ms", "vs slimfx", "idle-gap wall ms",
                        "CPU ms/call", "CPU beyond 2 x wall"], rows, right={2, 3, 4, 5, 6}))


if __name__ == "__main__":
    main()
