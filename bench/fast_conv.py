"""Compiled latency of direct vs Winograd F(2,3) / F(4,3) vs FFT convolution, per layer,
and whole models with ``select-conv-algo`` vs direct.

Each layer (one stride-1 conv, ``padding = k // 2``, batch 1 unless ``--batch``) is
compiled for the host once per algorithm; latencies are medians over rounds that alternate
the algorithms, so all see the same machine load; the ratio columns (direct / algorithm:
> 1 is faster) are what to read on a shared, noisy machine.  Whole models are compiled direct and with
``select-conv-algo{by=measure}`` (and ``by=model``) and timed the same way.

    python bench/fast_conv.py [--rounds 5] [--runs 10] [--quick] [--models resnet18,vgg11]
    python bench/fast_conv.py --layers 256x14x3,256x7x3 --models ''   # some grid points
    python bench/fast_conv.py --layers 256x14x3 --ab PACK_U --models ''  # U packed vs not
    python bench/fast_conv.py --ab ROW_TRANSFORMS --chain 4 --quick --models resnet18
    python bench/fast_conv.py --ab cpu_schedules.PREFETCH_NEXT_TASK --chain 4 --quick  # + direct
    python bench/fast_conv.py --chain 4 --fit   # refit select-conv-algo's cost model as MODEL
                                                # was; whole models timed with both constants
    python bench/fast_conv.py --chain 4 --warm --fit   # the same for MODEL_WARM (cold=false)
    python bench/fast_conv.py --warm       # layers timed warm (default: cold, as in a model)
    python bench/fast_conv.py --layers 256x14x3 --models '' --inside resnet18,resnet50 --size 224
    python bench/fast_conv.py --layers 64x56x3 --layouts  # Winograd blocked vs NCHW
    python bench/fast_conv.py --chain 4 --models ''      # each layer inside a chain of 4
    python bench/fast_conv.py --chain 4 --half   # also float16 U / spectra, and their error
    python bench/fast_conv.py --accuracy 0,1,2   # what float16 U costs a trained classifier
    python bench/fast_conv.py --errors 0,1,2     # one layer's error per algorithm (no timing)
    python bench/fast_conv.py --chain 4 --half --batch 4 --layers 256x7x3 --models ''

The header also prints the streaming floor: the F(4,3) GEMM kernel at one row reading a
256-channel ``U`` (9.4 MB) and a 56.6 MB buffer (an FFT spectrum's size), and per layer the
weight bytes each algorithm reads and the bandwidth that implies.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn

import slimfx
from slimfx import zoo
from slimfx.ir.printing import format_table
from slimfx.lowering import host_target
from slimfx.passes import fast_conv as fc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # ab.py
from ab import switched  # noqa: E402

#: (channels in = out, size, kernel): channels 16-256, sizes 7-112, kernels 3, 5, 7, 11; and
#: ResNet's 512-channel 7x7 layer, where F(2,3)'s transformed weights (16.8 MB) stream from memory.
GRID = [
    (16, 112, 3), (32, 56, 3), (64, 56, 3), (64, 28, 3), (128, 28, 3), (256, 14, 3),
    (256, 7, 3), (512, 7, 3),
    (16, 112, 5), (64, 56, 5), (128, 28, 5), (256, 14, 5),
    (16, 56, 7), (64, 28, 7), (128, 28, 7), (256, 7, 7),
    (16, 56, 11), (64, 28, 11), (128, 14, 11), (256, 14, 11),
]
QUICK = [(64, 56, 3), (128, 28, 3), (256, 14, 3), (64, 28, 7), (64, 28, 11)]


ALGO_NAMES = {"direct": "direct", "winograd2": "F(2,3)", "winograd4": "F(4,3)", "fft": "FFT",
              "winograd2h": "F(2,3) f16", "winograd4h": "F(4,3) f16", "ffth": "FFT f16"}
HALF_ALGOS = ("winograd2h", "winograd4h", "ffth")


def _algos(kernel: int, half: bool = False) -> list[str]:
    """The algorithms timed on a layer; ``half``: also those with float16 transformed
    weights (``winograd2h``, ``winograd4h``, ``ffth``: ``weight_dtype=float16``)."""
    if kernel != 3:
        return ["direct", "fft"] + (["ffth"] if half else [])
    return ["direct", "winograd2", "winograd4", "fft"] + (["winograd2h", "winograd4h"] if half else [])


def _pipeline(algo: str) -> str | None:
    if algo.endswith("h"):
        return fc._pipeline_of(algo[:-1], "float16")
    return fc._pipeline_of(algo)


def _time_rounds(models: dict, x, rounds: int, runs: int, cold: bool = False) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in models}
    xs = x.numpy()
    for cm in models.values():
        cm.benchmark(xs, repeat=2, warmup=2)
    for _ in range(rounds):
        for k, cm in models.items():
            times[k].append(cm.benchmark(xs, repeat=runs, warmup=1, cold=cold).median_ms)
    return {k: statistics.median(v) for k, v in times.items()}


def stream_gbps(ci: int, co: int, rounds: int, runs: int) -> tuple[float, float]:
    """``(ms, GB/s)``: the F(4,3) transform-domain GEMM kernel (its hand schedule) at one
    row, i.e. streaming a packed ``U`` of ``36 x ci x co`` floats once, with nothing to
    reuse: the floor of any F(4,3) layer of these channels, whatever its map."""
    import numpy as np
    import tvm
    from tvm import te

    from slimfx.lowering import cpu_schedules as cs
    from slimfx.lowering import fast_conv as lf

    info = host_target()
    nb = lf.gemm_panel(1, co)
    v = te.placeholder((36, 1, ci), name="v")
    u = te.placeholder((36, co // nb, ci, nb), name="u")
    out = lf._batch_gemm_te(v, u)
    func = cs.schedule_primfunc(te.create_prim_func([v, u, out]), info)
    assert func.attrs["slimfx.kernel"] == "winograd_gemm"
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=info.tvm()).jit()
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(np.random.rand(*(int(d) for d in t.shape)).astype("float32"), dev)
            for t in (v, u, out)]
    timer = lib.time_evaluator("main", dev, number=runs, repeat=rounds)
    ms = statistics.median(timer(*args).results) * 1e3
    return ms, 36 * ci * co * 4 / ms / 1e6


def weight_mb(algo: str, cin: int, size: int, k: int, batch: int = 1) -> float:
    """Bytes (MB) of the weights ``algo`` reads per call: direct ``k^2``, F(m,3)
    ``(m+2)^2``, or what the lowering reads instead (``weight_form``: ``3 (m+2)`` for
    ``H = G g``, 9 for ``g``), FFT ``2 N (N/2+1)`` floats per channel pair."""
    from slimfx.lowering import fast_conv as lf

    if algo == "direct":
        per = k * k
    elif algo.startswith("winograd"):
        m = int(algo[-1])
        per = lf.weights_per_pair(m, lf.weight_form(m, batch * -(-size // m) ** 2, cin * cin))
    else:
        n = fc.fft_plan(k, (size, size), (k // 2, k // 2), cin, cin)[0]
        per = 2 * n * (n // 2 + 1)
    return per * cin * cin * 4 / 1e6


def _layer(cin: int, k: int, chain: int) -> nn.Module:
    """One ``cin -> cin`` ``k x k`` 'same' conv, or ``chain`` of them with ReLUs between."""
    if chain > 1:
        return nn.Sequential(*[m for _ in range(chain)
                               for m in (nn.Conv2d(cin, cin, k, padding=k // 2), nn.ReLU())]).eval()
    return nn.Conv2d(cin, cin, k, padding=k // 2).eval()


def bench_switch(grid, module, flag: str, rounds: int, runs: int, cold: bool = True,
                 chain: int = 1) -> list[list]:
    """Each layer's F(2,3) / F(4,3) (3x3) or FFT (larger kernels) built with the lowering
    switch ``module.<flag>`` off and on (``PACK_U``: ``U`` as ``(alpha^2, Cin, Cout)``, the
    GEMM reading strided column blocks, vs packed in column panels), timed in the same
    interleaved rounds; direct convolution too where ``module`` is not
    ``slimfx.lowering.fast_conv`` (``cpu_schedules``' switches apply to it as well)."""
    from slimfx.lowering import fast_conv as lf

    rows = []
    for cin, size, k in grid:
        torch.manual_seed(0)
        conv = _layer(cin, k, chain)
        x = torch.randn(1, cin, size, size)
        algos = ([] if module is lf else ["direct"]) + (["winograd2", "winograd4"] if k == 3 else ["fft"])
        built = {}
        for label, on in (("off", False), ("on", True)):
            with switched(module, flag, on):
                for a in algos:
                    built[f"{a} {label}"] = slimfx.compile(
                        conv, x, pipeline=fc._pipeline_of(a), atol=fc.WINOGRAD_TOLERANCE[4],
                        verbose=False)
        ms = {key: t / chain for key, t in _time_rounds(built, x, rounds, runs, cold).items()}
        for a in algos:
            off, on = ms[f"{a} off"], ms[f"{a} on"]
            rows.append([f"{cin}", f"{size}", f"{k}x{k}", ALGO_NAMES[a], f"{off:.3f}", f"{on:.3f}",
                         f"{off / on:.2f}x"])
        print(f"... {flag} {cin}ch {size}x{size}: " + ", ".join(f"{a} {v:.3f}" for a, v in ms.items()),
              flush=True)
    return rows


def bench_switch_models(names, size: int, module, flag: str, rounds: int, runs: int) -> list[list]:
    """Whole models with ``select-conv-algo{by=model}``, built with the switch off and on."""
    rows = []
    for name in names:
        torch.manual_seed(0)
        x = torch.randn(1, 3, size, size)
        graph = slimfx.run_pipeline(slimfx.capture(zoo.get(name).eval(), x),
                                    "fold-bn,select-conv-algo{by=model},dce")
        built = {}
        for label, on in (("off", False), ("on", True)):
            with switched(module, flag, on):
                built[label] = slimfx.compile(graph, atol=fc.WINOGRAD_TOLERANCE[4], verbose=False)
        ms = _time_rounds(built, x, rounds, runs)
        rows.append([name, f"1x3x{size}x{size}", f"{ms['off']:.2f}", f"{ms['on']:.2f}",
                     f"{ms['off'] / ms['on']:.2f}x"])
        print(f"... {flag} {name}: off {ms['off']:.2f}, on {ms['on']:.2f}", flush=True)
    return rows


def bench_layers(grid, rounds: int, runs: int, measured: list | None = None,
                 cold: bool = True, chain: int = 1, half: bool = False,
                 batch: int = 1) -> list[list]:
    """One row per layer; ``measured`` (if given) collects ``(ConvParams, {algo: ms})``
    (float32 algorithms only).  ``half``: also Winograd and FFT with float16 transformed
    weights, with their compiled output's error against direct's (relative to direct's
    largest magnitude).
    ``batch``: the layers' batch size (Winograd's GEMMs get ``batch`` times the rows).
    ``cold``: caches flushed before each run, as ``select-conv-algo{by=measure}`` times.
    ``chain`` > 1: each layer timed as one of ``chain`` layers of its shape in sequence (with
    ReLU, their own weights; the chain's latency / ``chain``), as inside a model: its input
    comes from the layer before it, in cache and (Winograd, FFT) in the layout that layer
    wrote, and the layout transforms at the model's ends and the first kernel's wait for
    workers that slept through the cache flush are shared by the chain."""
    rows = []
    for cin, size, k in grid:
        torch.manual_seed(0)
        conv = _layer(cin, k, chain)
        x = torch.randn(batch, cin, size, size)
        built, errs = {}, {}
        for a in _algos(k, half):
            cm = slimfx.compile(conv, x, pipeline=_pipeline(a),
                                atol=fc.WINOGRAD_TOLERANCE[4], verbose=False)
            built[a], errs[a] = cm, cm.parity["max_abs_error"]
        ms = {a: t / chain for a, t in _time_rounds(built, x, rounds, runs, cold).items()}
        half_ms = {a: ms.pop(a) for a in list(ms) if a.endswith("h")}
        p = fc.ConvParams(cin, cin, k, (k // 2, k // 2), tuple(x.shape), tuple(x.shape))
        if measured is not None:
            measured.append((p, ms))
        model_pick = fc.choose({a: fc.estimate_ms(a, p, model=fc.MODEL if cold else fc.MODEL_WARM)
                                for a in _algos(k)},
                               fc.SelectOptions().margin)  # as select-conv-algo{by=model,cold=...}
        cells = []
        for a in ("winograd2", "winograd4", "fft"):
            cells += ([f"{ms[a]:.3f}", f"{ms['direct'] / ms[a]:.2f}x"] if a in ms else ["-", "-"])
        best = min(ms, key=ms.get)
        worst_err = max(v for a, v in errs.items() if a != "direct")
        # the bandwidth each algorithm would need to read its weights in its own time
        gbps = "/".join(f"{weight_mb(a, cin, size, k, batch) / ms[a]:.0f}" for a in ms)
        if half:
            y = torch.randn_like(x).numpy()
            want = built["direct"](y)
            for a in HALF_ALGOS:
                if a in half_ms:
                    cells += [f"{half_ms[a]:.3f}", f"{ms['direct'] / half_ms[a]:.2f}x",
                              f"{abs(built[a](y) - want).max() / abs(want).max():.1e}"]
                else:
                    cells += ["-", "-", "-"]
            # as select-conv-algo{by=model,weight_dtype=float16} decides, and what it measured
            times = {"direct": ms["direct"], **{a[:-1]: v for a, v in half_ms.items()}}
            pick = fc.choose({a: fc.estimate_ms(a, p, model=fc.MODEL if cold else fc.MODEL_WARM,
                                                weight_bytes=2 if a != "direct" else 4)
                              for a in times}, fc.SelectOptions().margin)
            fastest = min(times, key=times.get)
            cells += [f"{fastest} ({ms['direct'] / times[fastest]:.2f}x)",
                      f"{pick} ({ms['direct'] / times[pick]:.2f}x)"]
        rows.append([f"{cin}", f"{size}", f"{k}x{k}", f"{ms['direct']:.3f}", *cells, best,
                     model_pick, f"{worst_err:.1e}",
                     "/".join(f"{weight_mb(a, cin, size, k, batch):.1f}" for a in ms), gbps])
        print(f"... {cin}ch {size}x{size} k{k}: " + ", ".join(
            f"{a} {v:.3f}" for a, v in {**ms, **half_ms}.items()), flush=True)
    return rows


def fit_model(measured: list, warm: bool = False) -> tuple[dict, list[list]]:
    """Refit the cost model of ``select-conv-algo{by=model}`` (``fast_conv.MODEL``) to the
    measured layers: least squares on log(estimated / measured ms) over every (layer,
    algorithm), Nelder-Mead on the log of each constant (scipy, a bench extra).  Returns
    the fitted constants and, per layer, what the old and the new constants pick.

    Each layer here is compiled alone, so every algorithm's time also holds the layout
    conversions at the model's ends, the same for all of them; a fit-only term (ns per KiB
    of input and output) absorbs them.  Without it the fit charged them to the per-kernel
    overhead, which Winograd (3 kernels) and FFT (5) pay more times than direct: 0.10 ms
    per kernel instead of 0.05, and a 0.87x FFT pick at 128 channels 14x14 11x11."""
    import math

    import numpy as np
    from scipy.optimize import minimize

    keys = [*fc.MODEL, "frame_ns_per_kib"]
    old = dict(fc.MODEL_WARM if warm else fc.MODEL)
    t = host_target()

    def estimate(consts: dict, a: str, p) -> float:
        return fc.estimate_ms(a, p, vector_bits=t.vector_bits, cores=t.num_cores, model=consts)

    def frame_ms(consts: dict, p) -> float:
        kib = 4 * (math.prod(p.in_shape) + math.prod(p.out_shape)) / 1024
        return consts["frame_ns_per_kib"] * kib * 1e-6

    def loss(logs) -> float:
        consts = dict(zip(keys, np.exp(logs)))
        return sum((math.log(estimate(consts, a, p) + frame_ms(consts, p)) - math.log(ms)) ** 2
                   for p, times in measured for a, ms in times.items())

    # plausible ranges: efficiencies up to the peak, 0.5-200 bytes/ns/core, 0.1-500 us/kernel
    ranges = {"bytes_per_ns": (0.5, 200.0), "kernel_overhead_ms": (1e-4, 0.5),
              "frame_ns_per_kib": (1e-3, 1e4)}
    bounds = [tuple(math.log(b) for b in ranges.get(k, (1e-3, 1.0))) for k in keys]
    start = np.log([max(old.get(k, 10.0), 0.1) for k in keys])  # (a zero starts at 0.1)
    res = minimize(loss, start, method="Nelder-Mead", bounds=bounds,
                   options={"maxiter": 8000, "xatol": 1e-4, "fatol": 1e-7})
    fitted = dict(zip(keys, np.exp(res.x)))
    print(f"\ncost model fit: loss {loss(start):.2f} -> {res.fun:.2f} (layout conversions at "
          f"the ends: {fitted.pop('frame_ns_per_kib'):.0f} ns/KiB)")
    new = {k: float(f"{v:.3g}") for k, v in fitted.items()}

    def pick(consts: dict, p, times: dict) -> str:  # as select-conv-algo decides (margin)
        return fc.choose({a: estimate(consts, a, p) for a in times}, fc.SelectOptions().margin)

    rows = []
    for p, times in measured:
        fastest = min(times, key=times.get)
        picks = [pick(c, p, times) for c in (old, new)]
        rows.append([f"{p.cin}", f"{p.out_shape[-1]}", f"{p.kernel}x{p.kernel}", fastest,
                     *(f"{a} ({times['direct'] / times[a]:.2f}x)" for a in picks)])
    return new, rows


INSIDE_PIPES = {"direct": "fold-bn,dce", "winograd2": "fold-bn,winograd{tile=2},dce",
                "winograd4": "fold-bn,winograd{tile=4},dce"}


def _layer_ms(profile) -> dict[tuple[int, int], float]:
    """Milliseconds per call of each stride-1 3x3 layer shape (channels, map side) in a
    profile: a direct convolution's kernel, or the sum of a Winograd layer's three stages
    (input transform, GEMM, output transform, matched by the transformed input's shape).
    A stage's kernels of one shape (fused with a residual add or not) are pooled: their
    total time over their total calls."""
    def dims(shapes: str) -> list[list[int]]:
        return [[int(v) for v in t.split("x")] for t in shapes.split()]

    by_v: dict[str, tuple[int, int]] = {}  # a transformed input's shape -> its layer
    for k in profile.kernels:
        sh = dims(k.shapes) if k.shapes else []
        if k.name.startswith("winograd_input") and len(sh) == 2 and len(sh[0]) == 5:
            by_v[k.shapes.split()[1]] = (sh[0][1] * sh[0][4], sh[0][2])
    stages: dict[tuple, list[float]] = {}  # (layer, stage) -> [ms, calls]
    for k in profile.kernels:
        sh = dims(k.shapes) if k.shapes else []
        key = stage = None
        if "conv2d_nchwc" in k.name and len(sh) >= 2 and len(sh[1]) == 6 and sh[1][2] == 3 \
                and sh[0][2] == sh[-1][2]:  # 3x3, stride 1
            key, stage = (sh[0][1] * sh[0][4], sh[0][2]), "conv"
        elif "winograd" in k.name and len(sh) >= 2:
            stage = next((s for s in ("input", "matmul", "output") if s in k.name), None)
            key = by_v.get(k.shapes.split()[1 if stage == "input" else 0]) if stage else None
        if key is not None:
            acc = stages.setdefault((key, stage), [0.0, 0])
            acc[0] += k.ms
            acc[1] += k.calls
    out: dict[tuple[int, int], float] = {}
    for (key, _), (ms, calls) in stages.items():
        out[key] = out.get(key, 0.0) + ms / calls
    return out


def bench_inside(names, size: int, runs: int) -> list[list]:
    """Each stride-1 3x3 layer inside its model: the model compiled with every such layer
    direct, F(2,3) or F(4,3), profiled per kernel (``CompiledModel.profile``); ms per call.
    Inside a model a layer's (transformed) weights come from memory, as in the cold timings."""
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = zoo.get(name).eval()
        x = torch.randn(1, 3, size, size)
        graph = slimfx.capture(model, x)
        per = {}
        for algo, pipe in INSIDE_PIPES.items():
            cm = slimfx.compile(graph, pipeline=pipe, atol=fc.WINOGRAD_TOLERANCE[4], verbose=False)
            per[algo] = _layer_ms(cm.profile(x, repeat=runs))
        for c, side in sorted(per["direct"]):
            ms = {a: per[a].get((c, side)) for a in INSIDE_PIPES}
            cells = [f"{ms[a]:.3f}" if ms[a] else "-" for a in INSIDE_PIPES]
            ratios = [f"{ms['direct'] / ms[a]:.2f}x" if ms[a] else "-" for a in ("winograd2", "winograd4")]
            rows.append([name, f"{c}", f"{side}", *cells, *ratios])
        print(f"... {name} profiled", flush=True)
    return rows


def bench_layouts(names, size: int, rounds: int, runs: int) -> list[list]:
    """Whole models with ``select-conv-algo{by=model}``: Winograd in the blocked layout
    (the default) vs in NCHW with layout transforms around each op
    (``slimfx.lowering.fast_conv.BLOCKED``)."""
    from slimfx.lowering import fast_conv as lf

    rows = []
    for name in names:
        torch.manual_seed(0)
        model = zoo.get(name).eval()
        x = torch.randn(1, 3, size, size)
        graph = slimfx.run_pipeline(slimfx.capture(model, x),
                                    "fold-bn,select-conv-algo{by=model},dce")
        built = {}
        for blocked in (True, False):
            lf.BLOCKED = blocked
            try:
                built["blocked" if blocked else "nchw"] = slimfx.compile(
                    graph, atol=fc.WINOGRAD_TOLERANCE[4], verbose=False)
            finally:
                lf.BLOCKED = True
        ms = _time_rounds(built, x, rounds, runs)
        rows.append([name, f"1x3x{size}x{size}", f"{ms['nchw']:.2f}", f"{ms['blocked']:.2f}",
                     f"{ms['nchw'] / ms['blocked']:.2f}x"])
        print(f"... {name}: " + ", ".join(f"{a} {v:.2f}" for a, v in ms.items()), flush=True)
    return rows


def bench_models(names, size: int, rounds: int, runs: int, fitted: dict | None = None,
                 cold: bool = True, half: bool = False) -> list[list]:
    """Each model direct, with ``select-conv-algo{by=measure}`` and ``{by=model}``; not
    ``cold`` (``--warm``), also ``{by=model,cold=false}`` (:data:`MODEL_WARM`); with
    ``fitted`` constants (``--fit``) in place of the last one's; ``half``: also
    ``{by=model,weight_dtype=float16}`` (its output's error against direct's in the row); all
    timed in the same rounds."""
    rows = []
    by_model = "select-conv-algo{by=model}" if cold else "select-conv-algo{by=model,cold=false}"
    labels = [("direct", None), ("measure", "select-conv-algo{by=measure}"),
              ("model", "select-conv-algo{by=model}")]
    if not cold:
        labels.append(("warm", by_model))
    if fitted:
        labels.append(("fitted", by_model))
    if half:
        labels.append(("f16", by_model[:-1] + ",weight_dtype=float16}"))
    constants = "MODEL" if cold else "MODEL_WARM"
    for name in names:
        torch.manual_seed(0)
        model = zoo.get(name).eval()
        x = torch.randn(1, 3, size, size)
        graph = slimfx.run_pipeline(slimfx.capture(model, x), "fold-bn,dce")
        built, chosen = {}, {}
        for label, pipe in labels:
            t0 = time.perf_counter()
            pm = slimfx.PassManager(pipe) if pipe else None
            with switched(fc, constants, fitted if label == "fitted" else getattr(fc, constants)):
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
                     f"{ms['model']:.2f}", f"{ms['direct'] / ms['model']:.2f}x", chosen["model"]]
                    + [cell for extra in ("warm", "fitted", "f16") if extra in ms
                       for cell in (f"{ms[extra]:.2f}", f"{ms['direct'] / ms[extra]:.2f}x",
                                    chosen[extra])])
        if half:
            y = torch.randn_like(x).numpy()
            want = built["direct"](y)
            rows[-1].append(f"{abs(built['f16'](y) - want).max() / abs(want).max():.1e}")
        print(f"... {name}: " + ", ".join(f"{a} {v:.2f}" for a, v in ms.items()), flush=True)
    return rows


ACCURACY_ARMS = {  # the trained digit classifier, batch norms folded first
    "direct": "fold-bn,dce",
    "F(4,3)": "fold-bn,winograd{tile=4},dce",
    "F(2,3) f16 U": "fold-bn,winograd{tile=2,weight_dtype=float16},dce",
    "F(4,3) f16 U": "fold-bn,winograd{tile=4,weight_dtype=float16},dce",
}


def bench_accuracy(seeds, width: int) -> list[list]:
    """What float16 ``U`` costs a trained model: ``bench/prune_accuracy.py``'s DigitResNet
    trained on MNIST (its defaults) for each seed, every stride-1 3x3 layer replaced by
    Winograd; test accuracy of the compiled model (batch 1, every test image), its top-1
    disagreements with direct, and the logits' max error against direct's (relative to
    their largest magnitude)."""
    import prune_accuracy as pa

    rows = []
    for seed in seeds:
        args = pa.common_args("").parse_args(["--seed", str(seed), "--width", str(width)])
        pa.setup(args)
        model, (_, _, x_te, y_te), example, _, _ = pa.train_baseline(args)
        graph = slimfx.capture(model, example)
        logits = {}
        for arm, pipe in ACCURACY_ARMS.items():
            cm = slimfx.compile(slimfx.run_pipeline(graph, pipe), atol=fc.WINOGRAD_TOLERANCE[4],
                                verbose=False)
            logits[arm] = torch.stack([torch.as_tensor(cm(x_te[i:i + 1].numpy()))[0]
                                       for i in range(len(x_te))])
        ref = logits["direct"]
        for arm, out in logits.items():
            acc = 100.0 * (out.argmax(1) == y_te).float().mean().item()
            flips = int((out.argmax(1) != ref.argmax(1)).sum())
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            rows.append([str(seed), arm, f"{acc:.2f}", str(flips), f"{err:.1e}" if arm != "direct" else "-"])
        print(f"... seed {seed}: " + ", ".join(f"{r[1]} {r[2]}%" for r in rows[-len(logits):]),
              flush=True)
    return rows


ERROR_ARMS = {  # (row label, kernel, algorithm, weight dtype)
    "direct 3x3": (3, "direct", None), "F(2,3)": (3, "winograd2", None),
    "F(4,3)": (3, "winograd4", None), "direct 5x5": (5, "direct", None),
    "FFT 5x5": (5, "fft", None), "direct 3x3 f16 w": (3, "direct", torch.float16),
    "F(2,3) f16": (3, "winograd2", torch.float16), "F(4,3) f16": (3, "winograd4", torch.float16),
    "FFT 5x5 f16": (5, "fft", torch.float16),
}


def _op_output(algo: str, x: torch.Tensor, w: torch.Tensor, dtype) -> torch.Tensor:
    """One layer (stride 1, 'same' padding, no bias) through ``algo``'s PyTorch reference op
    in float32, its (transformed) weights rounded once to ``dtype`` (float32 if None)."""
    k = w.shape[-1]
    pad = [k // 2, k // 2]
    if algo == "direct":
        return torch.nn.functional.conv2d(x, w.to(dtype or torch.float32).float(), padding=k // 2)
    # what the passes store: U, or the spectrum of fft_plan's windows, rounded once
    p = fc.ConvParams(w.shape[1], w.shape[0], k, tuple(pad), tuple(x.shape), tuple(x.shape))
    value = fc._transformed(algo, w, p).to(dtype or torch.float32)
    if algo.startswith("winograd"):
        return torch.ops.slimfx.winograd_conv2d(x, value, None, pad, int(algo[-1]))
    return torch.ops.slimfx.fft_conv2d(x, value, None, pad, k, fc._fft_plan_of(p)[1])


def bench_errors(seeds, channels=(16, 32, 64, 128, 256), size: int = 28) -> list[list]:
    """One layer's error with each algorithm's PyTorch reference op (float32) against the
    same convolution in float64, relative to its largest output magnitude: N(0,1) inputs,
    Kaiming-scaled weights (std sqrt(2 / fan_in)), ``size`` x ``size`` maps, Cin = Cout;
    min and max over ``channels`` x ``seeds``, and each channel count's max over seeds (the
    table in :mod:`slimfx.passes.fast_conv`)."""
    import math

    errs: dict[str, dict[int, list[float]]] = {a: {c: [] for c in channels} for a in ERROR_ARMS}
    for c in channels:
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(1, c, size, size, generator=gen)
            for k in (3, 5):
                w = torch.randn(c, c, k, k, generator=gen) * math.sqrt(2 / (c * k * k))
                ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=k // 2)
                for arm, (kk, algo, dtype) in ERROR_ARMS.items():
                    if kk == k:
                        got = _op_output(algo, x, w, dtype).double()
                        errs[arm][c].append(float((got - ref).abs().max() / ref.abs().max()))
        print(f"... {c} channels: " + ", ".join(f"{a} {max(e[c]):.1e}" for a, e in errs.items()),
              flush=True)
    rows = []
    for arm, by_c in errs.items():
        every = [v for vs in by_c.values() for v in vs]
        rows.append([arm, f"{min(every):.1e}", f"{max(every):.1e}",
                     *(f"{max(by_c[c]):.1e}" for c in channels)])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    ap.add_argument("--runs", type=int, default=10, help="timed runs per algorithm and round")
    ap.add_argument("--quick", action="store_true", help=f"layers {QUICK} only")
    ap.add_argument("--layers", default="",
                    help="only these layers, 'CxSIZExK' comma-separated (e.g. 256x14x3,256x7x3)")
    ap.add_argument("--ab", metavar="SWITCH",
                    help="only time the grid's layers with F(2,3)/F(4,3) (3x3) or FFT, and --models with "
                         "select-conv-algo{by=model}, built with slimfx.lowering.fast_conv.SWITCH "
                         "off and on (PACK_U, FORM_U, FORM_ADDS, ROW_TRANSFORMS, STACK_ACCUMULATORS, "
                         "PAD_INLINE, BLOCKED); cpu_schedules.SWITCH (PREFETCH_NEXT_TASK) also times "
                         "direct convolution")
    ap.add_argument("--packing", action="store_true", help="the same as --ab PACK_U")
    ap.add_argument("--models", default="resnet18,vgg11", help="zoo models ('' for none)")
    ap.add_argument("--size", type=int, default=112, help="model input height/width")
    ap.add_argument("--layouts", action="store_true",
                    help="also time the models with Winograd in the blocked layout vs in NCHW")
    ap.add_argument("--warm", action="store_true",
                    help="time layers warm, run after run (default: caches flushed before each "
                         "run, as select-conv-algo measures and as a layer runs in a model)")
    ap.add_argument("--inside", default="",
                    help="zoo models whose stride-1 3x3 layers are also timed inside the model "
                         "(all direct / F(2,3) / F(4,3), per-kernel profile) at --size")
    ap.add_argument("--chain", type=int, default=1, metavar="N",
                    help="time each layer as one of N same-shape layers in sequence (the "
                         "chain's latency / N): its input from the layer before, as in a model")
    ap.add_argument("--fit", action="store_true",
                    help="refit select-conv-algo's cost model (fast_conv.MODEL) to the layers")
    ap.add_argument("--accuracy", default="", metavar="SEEDS",
                    help="only train bench/prune_accuracy.py's digit classifier with each seed "
                         "(e.g. 0,1,2) and report its compiled test accuracy direct, with F(4,3), "
                         "and with float16 U")
    ap.add_argument("--width", type=int, default=16, help="--accuracy: the classifier's width")
    ap.add_argument("--errors", default="", metavar="SEEDS",
                    help="one layer's error against float64 with each algorithm's reference op "
                         "(float32 and float16 weights), over channel counts, for these seeds")
    ap.add_argument("--batch", type=int, default=1,
                    help="the layers' batch size (default 1; the models stay at batch 1)")
    ap.add_argument("--half", action="store_true",
                    help="also Winograd and FFT with float16 transformed weights (weight_dtype=float16) "
                         "per layer, and select-conv-algo{by=model,weight_dtype=float16} per model, "
                         "with their errors")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    t = host_target()
    grid = QUICK if args.quick else GRID
    if args.layers:
        grid = [tuple(int(v) for v in spec.lower().split("x")) for spec in args.layers.split(",")]
        if any(len(g) != 3 for g in grid):
            ap.error(f"--layers takes CxSIZExK items, got {args.layers!r}")
    names = [m for m in args.models.split(",") if m]
    if args.errors:
        channels = (16, 32, 64, 128, 256)
        rows = bench_errors([int(v) for v in args.errors.split(",")], channels)
        print(f"\none layer's max error against float64, relative to its largest output "
              f"magnitude: PyTorch reference ops in float32 (f16: transformed weights, or direct's "
              f"weights, rounded to float16), N(0,1) inputs, Kaiming-scaled weights, 28x28 maps, "
              f"Cin = Cout = {'/'.join(map(str, channels))}, seeds {args.errors}")
        print(format_table(["algorithm", "min", "max", *(f"{c}ch" for c in channels)], rows,
                           right=set(range(1, 3 + len(channels)))))
        return
    if args.accuracy:
        rows = bench_accuracy([int(v) for v in args.accuracy.split(",")], args.width)
        print(f"\nDigitResNet (width {args.width}) trained on MNIST per seed, compiled for the "
              "host, 1,000 test images at batch 1; flips: top-1 predictions that differ from "
              "direct's; logit err: max |logits - direct's| / max |direct's|")
        print(format_table(["seed", "convolutions", "accuracy %", "flips", "logit err"], rows,
                           right={0, 2, 3, 4}))
        return
    if args.packing:
        args.ab = "PACK_U"
    if args.ab:
        from slimfx.lowering import cpu_schedules, fast_conv

        where, _, flag = args.ab.rpartition(".")
        module = {"": fast_conv, "fast_conv": fast_conv, "cpu_schedules": cpu_schedules}.get(where)
        if module is None or not isinstance(getattr(module, flag, None), bool) or not flag.isupper():
            ap.error(f"--ab {args.ab}: not a switch of slimfx.lowering.fast_conv or "
                     "slimfx.lowering.cpu_schedules")
        rows = bench_switch(grid, module, flag, args.rounds, args.runs, not args.warm, args.chain)
        mrows = bench_switch_models(names, args.size, module, flag, args.rounds, args.runs)
        print(f"\n{args.ab} off vs on, compiled latency in ms, medians of {args.rounds} alternating "
              f"rounds x {args.runs} runs; ratio = off / on (> 1: the switch is faster)"
              + (f"; each layer one of a chain of {args.chain}" if args.chain > 1 else ""))
        print(format_table(["C", "HxW", "kernel", "algorithm", "off", "on", "ratio"], rows,
                           right={0, 1, 4, 5, 6}))
        if mrows:
            print(format_table(["model", "input", "off", "on", "ratio"], mrows, right={2, 3, 4}))
        return
    measured: list = []
    layer_rows = bench_layers(grid, args.rounds, args.runs, measured, cold=not args.warm,
                              chain=args.chain, half=args.half, batch=args.batch)
    fit = fit_model(measured, warm=args.warm) if args.fit else None
    model_rows = bench_models(names, args.size, args.rounds, args.runs,
                              fitted=fit[0] if fit else None, cold=not args.warm, half=args.half)
    layout_rows = bench_layouts(names, args.size, args.rounds, args.runs) if args.layouts else []
    inside = [m for m in args.inside.split(",") if m]
    inside_rows = bench_inside(inside, args.size, args.runs) if inside else []
    s_ms, s_gbps = stream_gbps(256, 256, args.rounds, args.runs)
    b_ms, b_gbps = stream_gbps(256, 6 * 256, args.rounds, args.runs)  # 56.6 MB: the FFT's size
    print(f"\ntarget host ({t.config['mcpu']}, {t.num_cores} cores, {t.vector_bits}-bit vectors), "
          f"no tuning; medians of {args.rounds} alternating rounds x {args.runs} runs; "
          "ratio = direct / algorithm (> 1: faster than direct)")
    print("\nper layer (Cin = Cout, stride 1, 'same' padding), compiled latency in ms, "
          + ("warm (run after run)" if args.warm else
             f"cold (caches flushed: {slimfx.runtime.model.FLUSH_BYTES >> 20} MiB written before each run)")
          + (f"; each layer one of a chain of {args.chain} (the chain's latency / {args.chain})"
             if args.chain > 1 else "; each layer compiled alone")
          + (f"; batch {args.batch}" if args.batch > 1 else ""))
    print(f"streaming the packed F(4,3) weights of a 256-channel layer (9.4 MB) through the GEMM "
          f"kernel at one row (no reuse): {s_ms:.3f} ms = {s_gbps:.1f} GB/s, the floor of any "
          "F(4,3) layer of 256 channels")
    print(f"the same kernel streaming 56.6 MB (the size of a 256-channel N=14 FFT spectrum, 58.7 "
          f"MB): {b_ms:.3f} ms = {b_gbps:.1f} GB/s")
    half_cols = ["F(2,3)h", "ratio", "err", "F(4,3)h", "ratio", "err", "FFTh", "ratio", "err",
                 "f16 fastest", "f16 model picks"] if args.half else []
    print(format_table(["C", "HxW", "kernel", "direct", "F(2,3)", "ratio", "F(4,3)", "ratio",
                        "FFT", "ratio", *half_cols, "fastest", "model picks", "parity err",
                        "weights MB", "GB/s"],
                       layer_rows, right=set(range(0, 10 + len(half_cols)))
                       | {13 + len(half_cols), 14 + len(half_cols)}))
    print("weights MB: per call, each algorithm's (direct/F(2,3)/F(4,3)/FFT, or direct/FFT); "
          "GB/s: those bytes / its median time"
          + ("; F(m,3)h, FFTh: with float16 U / spectrum (half their bytes), err: the compiled "
             "output's max error against direct's, relative to direct's largest magnitude; f16 "
             "fastest / model picks: among direct and the float16 arms, the fastest measured and "
             "select-conv-algo{by=model,weight_dtype=float16}'s pick (its measured ratio)"
             if args.half else ""))
    if fit:
        print(f"\ncost model refitted to these layers: {'MODEL_WARM' if args.warm else 'MODEL'} = {fit[0]}")
        print(format_table(["C", "HxW", "kernel", "fastest", "old model picks", "fitted picks"],
                           fit[1], right={0, 1}))
    if model_rows:
        print("\nwhole model (fold-bn,dce first), compiled latency in ms; select-conv-algo "
              "by=measure and by=model" + (", by=model with cold=false" if args.warm else "")
              + (", the same with the fitted constants" if fit else "") + " vs direct")
        extra = (["warm", "ratio", "choices"] if args.warm else []) + \
            (["fitted", "ratio", "choices"] if fit else []) + \
            (["f16", "ratio", "choices", "f16 err"] if args.half else [])
        print(format_table(["model", "input", "direct", "measure", "ratio", "choices",
                            "select s", "model", "ratio", "choices", *extra], model_rows,
                           right={2, 3, 4, 6, 7, 8, 10, 11, 13, 14, 16, 17}))
    if inside_rows:
        print(f"\ninside the model (1x3x{args.size}x{args.size}; every stride-1 3x3 layer direct, "
              f"F(2,3) or F(4,3)), ms per call from a per-kernel profile of {args.runs} runs; "
              "ratio = direct / algorithm")
        print(format_table(["model", "C", "HxW", "direct", "F(2,3)", "F(4,3)", "F(2,3) ratio",
                            "F(4,3) ratio"], inside_rows, right=set(range(1, 8))))
    if layout_rows:
        print("\nWinograd's layout, whole model with select-conv-algo{by=model}, ms: NCHW with "
              "layout transforms vs the blocked layout; ratio = NCHW / blocked")
        print(format_table(["model", "input", "NCHW", "blocked", "ratio"], layout_rows,
                           right={2, 3, 4}))


if __name__ == "__main__":
    main()
