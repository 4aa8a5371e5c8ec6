"""CUDA: build here (no GPU needed), run on a GPU machine with TVM's runtime alone.

Two steps, because the GPU machine need not have slimfx's build dependencies:

    python bench/cuda_check.py build --out cuda_art --arch sm_90     # here
    python bench/cuda_check.py run --dir cuda_art                     # on the GPU machine

``build`` compiles each case below for ``{"kind": "cuda", "arch": ...}`` and saves its
artifact, with the input and the PyTorch output of the rewritten graph (CPU, float32)
and of the original model.  ``run`` loads every artifact with :func:`slimfx.load`
(``TVM_USE_RUNTIME_LIB=1`` works: no TVM compiler, no CUDA compiler), runs it on the GPU,
checks it against the stored outputs with the tolerance ``slimfx.compile`` uses (1e-4
relative to the output's largest magnitude),
and times it (TVM's time evaluator, median of 30 runs) against PyTorch eager on the same
GPU, interleaved in rounds: float32, TF32 off, and with cuDNN's TF32 / autotuning on.
PyTorch always runs the original model, so for the rewritten cases (pruned, factorized,
shared, Winograd, FFT) the last column, against the case's first build, is the one that
says what the rewrite bought.

Cases keep their parameters small (ResNet-18 at a quarter of its width, MobileNetV2 at half) so that the artifacts travel
to a GPU machine in a few tens of MB; compute stays that of 224x224 images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

#: name -> (zoo factory, factory kwargs, input shape, pipeline, relative tolerance)
CASES = {
    "resnet18_w16": ("resnet18", {"width": 16}, (1, 3, 224, 224), "fold-bn,dce", 1e-4),
    "mobilenet_v2_half": ("mobilenet_v2", {"width_mult": 0.5}, (1, 3, 224, 224), "fold-bn,dce", 1e-4),
    "vit": ("vit", {}, (1, 3, 32, 32), "dce", 1e-4),
    "small_resnet_direct": ("small_resnet", {"width": 32}, (1, 3, 56, 56), "fold-bn,dce", 1e-4),
    "small_resnet_winograd2": ("small_resnet", {"width": 32}, (1, 3, 56, 56),
                               "fold-bn,winograd{tile=2},dce", 1e-4),
    "small_resnet_winograd4": ("small_resnet", {"width": 32}, (1, 3, 56, 56),
                               "fold-bn,winograd{tile=4},dce", 1e-4),
    "small_resnet_fft": ("small_resnet", {"width": 32}, (1, 3, 56, 56),
                         "fold-bn,fft-conv{min_kernel=3},dce", 1e-4),
    "resnet18_w16_pruned": ("resnet18", {"width": 16}, (1, 3, 224, 224),
                            "fold-bn,prune-channels{macs=0.5},dce", 1e-4),
    "resnet18_w16_factorized": ("resnet18", {"width": 16}, (1, 3, 224, 224),
                                "fold-bn,factorize,dce", 1e-4),
    "resnet18_w16_shared": ("resnet18", {"width": 16}, (1, 3, 224, 224),
                            "fold-bn,share-weights{bits=4},dce", 1e-4),
}


def _model(name: str):
    """The case's model with Kaiming-normal weights and random BatchNorm scales, shifts
    and statistics, so that no layer is an identity and activations do not die out (with
    PyTorch's defaults MobileNetV2's output is its classifier's bias, whatever the
    input, and its parity check would prove nothing)."""
    from slimfx import zoo

    factory, kwargs, shape, _, _ = CASES[name]
    torch.manual_seed(0)
    model = zoo.get(factory, **kwargs).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
                fan_in = m.weight[0].numel()  # Kaiming: the signal keeps its scale
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model, shape


def build(out: Path, arch: str, names: list[str]) -> None:
    import slimfx

    out.mkdir(parents=True, exist_ok=True)
    target = {"kind": "cuda", "arch": arch}
    for name in names:
        model, shape = _model(name)
        pipeline = CASES[name][3]
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        t0 = time.perf_counter()
        graph = slimfx.run_pipeline(model, pipeline, x)
        cm = slimfx.compile(graph, target=target, verbose=False)
        folder = Path(cm.save(out / name))
        with torch.no_grad():
            np.savez(folder / "check.npz", x=x.numpy(), graph=graph(x).numpy(),
                     model=model(x).numpy())
        b = cm.manifest["build"]
        print(f"{name}: {time.perf_counter() - t0:.1f} s, kernels {b['kernels']}, "
              f"{sum(f.stat().st_size for f in folder.iterdir()) / 1e6:.1f} MB", flush=True)


def _torch_ms(model, x, rounds: int, tf32: bool) -> float:
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = tf32
    with torch.no_grad():
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def run(folder: Path, rounds: int) -> int:
    import tvm

    import slimfx
    from slimfx.ir.printing import format_table

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (PyTorch sees no GPU)"
    print(f"GPU: {gpu}; torch {torch.__version__}, TVM {tvm.__version__}"
          f" (runtime only: {tvm.base._RUNTIME_ONLY})", flush=True)
    rows, failures = [], 0
    base_ms = {}
    for art in sorted(p for p in folder.iterdir() if (p / "manifest.json").is_file()):
        name = art.name
        try:
            cm = slimfx.load(art)
            ref = np.load(art / "check.npz")
            got = cm.run_numpy(ref["x"])[0]
            want = ref["graph"]
            err = float(np.abs(got.astype(np.float64) - want).max())
            tol = CASES[name][4] * max(1.0, float(np.abs(want).max()))
            err_model = float(np.abs(got.astype(np.float64) - ref["model"]).max())
            ok = err <= tol
            failures += not ok
            model, _ = _model(name)
            model = model.cuda()
            xc = torch.from_numpy(ref["x"]).cuda()
            slim, strict, fast = [], [], []
            for _ in range(3):  # interleaved: slimfx, eager fp32, eager TF32 + cuDNN autotune
                slim.append(cm.benchmark(ref["x"], repeat=rounds).median_ms)
                strict.append(_torch_ms(model, xc, rounds, tf32=False))
                fast.append(_torch_ms(model, xc, rounds, tf32=True))
            s, e, f = (statistics.median(v) for v in (slim, strict, fast))
            family = name.split("_")[0] + ("_w16" if "_w16" in name else "")
            base_ms.setdefault(family, s)
            rows.append([name, json.dumps(cm.manifest["build"].get("kernels", {})),
                         f"{np.abs(want).max():.2f}", f"{err:.2e} / {tol:.1e}",
                         "ok" if ok else "FAIL", f"{err_model:.1e}",
                         f"{s:.3f}", f"{e:.3f}", f"{f:.3f}", f"{s / e:.2f}x",
                         f"{base_ms[family] / s:.2f}x"])
        except Exception as exc:  # one broken case must not hide the others
            failures += 1
            traceback.print_exc()
            rows.append([name, "-", "-", f"ERROR {type(exc).__name__}: {str(exc)[:80]}", "FAIL"]
                        + ["-"] * 6)
        print(rows[-1], flush=True)
    print(format_table(["case", "kernels by rule", "max |y|", "max err / tol", "parity", "err vs model",
                        "slimfx ms", "torch fp32 ms (original model)", "torch tf32 ms",
                        "slimfx/torch fp32",
                        "speed-up vs first of family"], rows))
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--arch", default="sm_90")
    b.add_argument("--cases", default=",".join(CASES))
    r = sub.add_parser("run")
    r.add_argument("--dir", type=Path, required=True)
    r.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)
    if args.cmd == "build":
        build(args.out, args.arch, [c for c in args.cases.split(",") if c])
        return 0
    return 1 if run(args.dir, args.rounds) else 0


if __name__ == "__main__":
    sys.exit(main())
