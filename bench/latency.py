"""Latency of slimfx-compiled zoo models vs PyTorch eager, torch.compile and ONNX Runtime.

Per model (batch 1, plus one batch-8 row): median latency of PyTorch eager,
torch.compile, ONNX Runtime (``pip install -e ".[bench]"``; with its workers sleeping
between kernels, and with its default spinning workers, timed with a pause after it so
the spinning does not reach the next runner), slimfx untuned (hand
schedules), slimfx with fast convolutions (``select-conv-algo{by=model}`` in the
pipeline: Winograd / FFT where the cost model says they beat direct convolution; no
tuning), and slimfx tuned (that same build, its direct convolutions and matmuls tuned
by MetaSchedule with ``--trials`` per model, records in ``--records``, reused by later
runs; plain ``fold-bn,dce`` with ``--no-fast-conv``), all timed in one process in
alternating rounds so they see the same machine load; then the best slimfx over the
faster of the two ONNX Runtime settings, and that model's GFLOP/s (direct-convolution FLOPs) as a fraction of this
machine's large-GEMM GFLOP/s (torch matmul).  Compiled models use every physical core (``slimfx.runtime``), as do
PyTorch and ONNX Runtime here.

    python bench/latency.py                                  # every model, no tuning
    python bench/latency.py --models resnet18,small_resnet --trials 256 --records tuning/
    python bench/latency.py --models small_resnet --rounds 3 --no-batch8
    python bench/latency.py --models "" --hf regnet_y_400mf,efficientnet_b0 --no-batch8
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

import slimfx
from slimfx import zoo
from slimfx.ir.printing import format_table
from slimfx.lowering import host_target

#: Realistic input sizes per zoo model (image side).
SIZES = {"resnet18": 224, "resnet50": 224, "vgg11": 224, "mobilenet_v2": 224,
         "densenet": 224, "vit": 224, "small_resnet": 56}
#: The pipeline of the fast-conv and tuned builds.
FAST_PIPELINE = "fold-bn,select-conv-algo{by=model},dce"
CNNS = ("resnet18", "resnet50", "vgg11", "mobilenet_v2", "densenet", "small_resnet")


class _Tensor(torch.nn.Module):
    """A transformers model returning one tensor (``logits`` or ``last_hidden_state``).

    Its convolutions and linears are re-initialized (Kaiming normal) and its BatchNorm
    statistics estimated on random images: with transformers' std-0.02 initialization
    and unit running variances the activations of a deep network shrink layer after layer
    into subnormal floats, which every runner computes 10-100x slower (EfficientNet-B0:
    260-300 ms in eager, ONNX Runtime and slimfx alike, instead of a few ms).
    """

    def __init__(self, model: torch.nn.Module, field: str, size: int = 224):
        super().__init__()
        self.model, self.field = model, field
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # a plain average over the batches below
        model.train()
        with torch.no_grad():
            for _ in range(2):
                model(pixel_values=torch.randn(4, 3, size, size))
        model.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(pixel_values=x), self.field)


def _regnet_y_400mf():
    from transformers import RegNetConfig, RegNetForImageClassification

    return _Tensor(RegNetForImageClassification(RegNetConfig(
        embedding_size=32, hidden_sizes=[48, 104, 208, 440], depths=[1, 3, 6, 6],
        groups_width=8, layer_type="y")), "logits")


def _efficientnet_b0():
    from transformers import EfficientNetConfig, EfficientNetModel

    # the base model: the classification head's pooling is degenerate at random weights
    return _Tensor(EfficientNetModel(EfficientNetConfig(
        width_coefficient=1.0, depth_coefficient=1.0, image_size=224, hidden_dim=1280)),
        "last_hidden_state")


def _convnext_tiny():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    return _Tensor(ConvNextForImageClassification(ConvNextConfig(
        hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3])), "logits")


#: Third-party architectures (``--hf``), random weights from a config (no download):
#: RegNetY-400MF (grouped convolutions, 8 channels per group), EfficientNet-B0,
#: ConvNeXt-T (layer norms: the model stays NCHW, its convolutions blocked one by one).
HF = {"regnet_y_400mf": _regnet_y_400mf, "efficientnet_b0": _efficientnet_b0,
      "convnext_tiny": _convnext_tiny}


def gemm_gflops(n: int = 2048, runs: int = 5) -> float:
    """GFLOP/s of a large float32 torch matmul on this machine (the roofline we compare to)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(ts) / 1e9


def _timer(fn: Callable[[], object], runs: int) -> Callable[[], list[float]]:
    def run() -> list[float]:
        out = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    return run


def _ort_session(model: torch.nn.Module, x: torch.Tensor, folder: str, spinning: bool = False):
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    path = os.path.join(folder, "model.onnx")
    if not os.path.exists(path):
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = host_target().num_cores
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: sess.run(None, feed)


def _then_idle(run: Callable[[], list[float]], seconds: float = 0.05) -> Callable[[], list[float]]:
    """``run``, then a pause (not timed) that lets a spinning thread pool go to sleep
    before the next runner is timed."""
    def timed_then_idle() -> list[float]:
        out = run()
        time.sleep(seconds)
        return out

    return timed_then_idle


def bench_model(name: str, batch: int, args) -> tuple[list[str], list[str]]:
    size = args.size or SIZES.get(name, 224)
    torch.manual_seed(0)
    kw = {"image_size": size} if name == "vit" else {}
    model = (HF[name]() if name in HF else zoo.get(name, **kw)).eval()
    x = torch.randn(batch, 3, size, size)
    log = []
    runners: dict[str, Callable[[], list[float]]] = {}
    with torch.no_grad():
        runners["eager"] = _timer(lambda: model(x), args.runs)
        if not args.no_torch_compile:
            compiled = torch.compile(model)
            compiled(x)
            runners["torch.compile"] = _timer(lambda: compiled(x), args.runs)
    tmp = tempfile.mkdtemp(prefix="slimfx-bench-")
    ort_run = _ort_session(model, x, tmp)
    if ort_run is not None:
        runners["onnxruntime"] = _timer(ort_run, args.runs)
        # ONNX Runtime's default: its workers spin for work (faster where kernels are short;
        # the pause after it keeps the spinning off the next runner's clock)
        runners["onnxruntime spinning"] = _then_idle(
            _timer(_ort_session(model, x, tmp, spinning=True), args.runs))
    t0 = time.perf_counter()
    untuned = slimfx.compile(model, x, pipeline="fold-bn,dce", verbose=False)
    log.append(f"untuned build {time.perf_counter() - t0:.1f} s")
    xn = x.numpy()
    runners["slimfx"] = lambda: [untuned.benchmark(xn, repeat=args.runs, warmup=0).median_ms]
    pipeline = "fold-bn,dce" if args.no_fast_conv else FAST_PIPELINE
    if not args.no_fast_conv:
        t0 = time.perf_counter()
        fast = slimfx.compile(model, x, pipeline=FAST_PIPELINE, verbose=False)
        log.append(f"fast-conv build {time.perf_counter() - t0:.1f} s")
        runners["slimfx fast-conv"] = lambda: [fast.benchmark(xn, repeat=args.runs,
                                                              warmup=0).median_ms]
    tuned = None
    if args.trials > 0 or args.records:
        t0 = time.perf_counter()
        tuned = slimfx.compile(model, x, pipeline=pipeline, tune=args.trials,
                               records=args.records, verbose=args.verbose)
        t = tuned.manifest["build"].get("tuning", {})
        log.append(f"tuned build {time.perf_counter() - t0:.1f} s (budget {args.trials}; "
                   f"{t.get('tuned', 0)} kernels tuned in {t.get('seconds', 0):.0f} s, "
                   f"{t.get('cached', 0)} from records, {t.get('applied', 0)} applied)")
        runners["slimfx tuned"] = lambda: [tuned.benchmark(xn, repeat=args.runs,
                                                           warmup=0).median_ms]
    for run in runners.values():  # warm-up
        run()
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.rounds):  # alternating rounds
        for k, run in runners.items():
            samples[k] += run()
    med = {k: statistics.median(v) for k, v in samples.items()}
    best = min(med[k] for k in ("slimfx", "slimfx fast-conv", "slimfx tuned") if k in med)
    flops = 2 * untuned.manifest["graph"]["macs"]
    gflops = flops / best / 1e6

    def cell(k: str) -> str:
        return f"{med[k]:.2f}" if k in med else "-"

    ort = min((med[k] for k in ("onnxruntime", "onnxruntime spinning") if k in med), default=None)
    ratio = f"{best / ort:.2f}x" if ort else "-"
    row = [name, f"{batch}x3x{size}x{size}", f"{flops / 1e9:.2f}", cell("eager"),
           cell("torch.compile"), cell("onnxruntime"), cell("onnxruntime spinning"), cell("slimfx"),
           cell("slimfx fast-conv"), cell("slimfx tuned"),
           ratio, f"{gflops:.1f}", f"{gflops / args.gemm:.0%}"]
    return row, log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(zoo.ZOO), help="comma-separated zoo names")
    ap.add_argument("--hf", default="", help="comma-separated third-party models: "
                    + ", ".join(HF) + " (needs transformers)")
    ap.add_argument("--size", type=int, default=0, help="input side for every model "
                    "(default: realistic per model, e.g. 224; small_resnet 56)")
    ap.add_argument("--trials", type=int, default=0, help="MetaSchedule budget per model")
    ap.add_argument("--records", default=None, help="tuning records folder (reused)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per runner per round")
    ap.add_argument("--batch8", default="resnet18",
                    help="model for the batch-8 row ('' for none)")
    ap.add_argument("--no-batch8", action="store_true", help="no batch-8 row")
    ap.add_argument("--no-torch-compile", action="store_true")
    ap.add_argument("--no-fast-conv", action="store_true",
                    help="no column with select-conv-algo in the pipeline")
    ap.add_argument("--verbose", action="store_true", help="show tuning progress")
    args = ap.parse_args()
    if args.trials > 0 and not args.records:
        args.records = "tuning-records"
    warnings.filterwarnings("ignore")
    torch.set_num_threads(host_target().num_cores)
    args.gemm = gemm_gflops()
    jobs = [(m, 1) for m in [*args.models.split(","), *args.hf.split(",")] if m]
    if args.batch8 and not args.no_batch8:
        jobs.append((args.batch8, 8))
    rows = []
    for name, batch in jobs:
        try:
            row, log = bench_model(name, batch, args)
        except Exception as e:  # noqa: BLE001  (one model failing must not lose the table)
            row, log = [name, f"batch {batch}", "-", *["-"] * 10], [f"FAILED: {e}"[:300]]
        rows.append(row)
        print(f"... {name} batch {batch}: " + "; ".join(log), flush=True)
    t = host_target()
    print(f"\nhost {t.config['mcpu']}, {t.num_cores} cores, {t.vector_bits}-bit vectors; "
          f"torch GEMM {args.gemm:.1f} GFLOP/s; medians (ms) of {args.rounds} alternating "
          f"rounds x {args.runs} runs; tuning budget {args.trials} trials/model"
          + (f", records {args.records}" if args.records else ""))
    print("ORT: workers sleep between kernels (allow_spinning=0); ORT spin: its default, "
          "spinning; best/ORT: the best slimfx build over the faster ORT of the two. slimfx "
          "runs with its runtime's default (workers spin briefly: slimfx.runtime.threads)")
    print(format_table(["model", "input", "GFLOP", "eager", "torch.compile", "ORT", "ORT spin",
                        "slimfx", "slimfx fast-conv", "slimfx tuned", "best/ORT", "GFLOP/s",
                        "of GEMM"], rows, right=set(range(2, 13))))
    np.set_printoptions()


if __name__ == "__main__":
    main()
