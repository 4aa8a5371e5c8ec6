"""prune-channels on 200 random models: every budget and criterion keeps them runnable.

``random_model(seed)`` builds a small random DAG (convs with BN and activations, residual
adds, concats, splits and chunks, depthwise and grouped convs, pooling, a mean or flatten
head with one or two linears) from ``random.Random(seed)``: a failure names its seed, and
``random_model(seed)`` rebuilds the model that failed (``slimfx.capture(*random_model(s))``
gives the same graph as the tests use).

torch.export takes 2-3 s per model here, so the graphs are built by :func:`lower`
straight from the model's program; :func:`test_lowering_matches_capture` checks, on
models that together use every feature, that this is exactly what ``slimfx.capture``
produces.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import operator
import random
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn
from torch import nn
from torch.utils import _pytree as pytree

import slimfx
from slimfx.ir.channels import ChannelAnalysis
from slimfx.passes.prune import (
    DATA_CRITERIA,
    ChannelPruning,
    PruneOptions,
    _Estimator,
    _plan,
    _removal,
    apply_pruning,
)

N_SEEDS = 200
BATCH = 20  # seeds per test case
SEEDS = list(range(N_SEEDS))
BATCHES = [SEEDS[i:i + BATCH] for i in range(0, N_SEEDS, BATCH)]

aten = torch.ops.aten
_ACTS = {
    "relu": F.relu,
    "relu6": F.relu6,
    "gelu": F.gelu,
    "sigmoid": torch.sigmoid,
    "hardswish": F.hardswish,
}


# ============================================================================ the generator
class RandomNet(nn.Module):
    """Interprets ``program``: a list of ``(op, *args)`` whose tensor arguments are indices
    of earlier values (value 0 is the input, value ``k`` the result of instruction ``k-1``)."""

    def __init__(self, program: list[tuple], layers: dict[str, nn.Module]):
        super().__init__()
        self.program = program
        self.layers = nn.ModuleDict(layers)

    def forward(self, x):
        return self.values(x)[-1]

    def values(self, x) -> list:
        """Every value of the program (value 0 is ``x``)."""
        vals = [x]
        for op, *args in self.program:
            if op == "layer":
                name, src = args
                v = self.layers[name](vals[src])
            elif op == "act":
                kind, src = args
                v = _ACTS[kind](vals[src])
            elif op == "add":
                a, b = args
                v = vals[a] + vals[b]
            elif op == "cat":
                (srcs,) = args
                v = torch.cat([vals[i] for i in srcs], 1)
            elif op == "split":
                src, sizes = args
                v = torch.split(vals[src], sizes, 1)
            elif op == "chunk":
                src, n = args
                v = torch.chunk(vals[src], n, 1)
            elif op == "part":
                src, i = args
                v = vals[src][i]
            elif op == "mean":
                (src,) = args
                v = vals[src].mean((2, 3))
            elif op == "flatten":
                (src,) = args
                v = torch.flatten(vals[src], 1)
            else:
                raise ValueError(op)
            vals.append(v)
        return vals

    def extra_repr(self) -> str:
        return "\n".join(f"%{k + 1} = {ins}" for k, ins in enumerate(self.program))


class _Builder:
    """Emits instructions and layers, tracking each value's (channels, spatial size)."""

    def __init__(self, rng: random.Random, c_in: int, size: int):
        self.rng = rng
        self.program: list[tuple] = []
        self.layers: dict[str, nn.Module] = {}
        self.shape: list[tuple[int, int] | None] = [(c_in, size)]  # None: a tuple (split)

    def emit(self, ins: tuple, shape) -> int:
        self.program.append(ins)
        self.shape.append(shape)
        return len(self.shape) - 1

    def layer(self, module: nn.Module, src: int, shape) -> int:
        name = f"l{len(self.layers)}"
        self.layers[name] = module
        return self.emit(("layer", name, src), shape)

    def channels(self) -> int:
        return self.rng.randint(4, 24)

    def act(self, src: int) -> int:
        return self.emit(("act", self.rng.choice(list(_ACTS)), src), self.shape[src])

    def conv(self, src: int, c_out: int, *, k: int | None = None, stride: int = 1,
             groups: int = 1, bn: bool | None = None, act: bool | None = None) -> int:
        rng = self.rng
        c, h = self.shape[src]
        k = rng.choice([1, 3, 3]) if k is None else k
        if h < 2 * stride:
            stride = 1
        bias = rng.random() < 0.5
        m = nn.Conv2d(c, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=bias)
        out = self.layer(m, src, (c_out, (h + 2 * (k // 2) - k) // stride + 1))
        if (rng.random() < 0.7) if bn is None else bn:
            out = self.layer(nn.BatchNorm2d(c_out), out, self.shape[out])
        if (rng.random() < 0.7) if act is None else act:
            out = self.act(out)
        return out

    def pool(self, src: int, *, shrink: bool | None = None) -> int:
        c, h = self.shape[src]
        shrink = (self.rng.random() < 0.5 if shrink is None else shrink) and h >= 2
        cls = self.rng.choice([nn.AvgPool2d, nn.MaxPool2d])
        if shrink:
            return self.layer(cls(2, 2), src, (c, h // 2))
        return self.layer(cls(3, 1, 1), src, (c, h))

    def depthwise(self, src: int, *, stride: int = 1) -> int:
        c, _ = self.shape[src]
        mult = self.rng.choice([1, 1, 2])
        return self.conv(src, c * mult, k=3, stride=stride, groups=c)

    def grouped(self, src: int) -> int:
        c, _ = self.shape[src]
        gs = [g for g in (2, 4) if c % g == 0]
        if not gs:
            return self.conv(src, self.channels())
        g = self.rng.choice(gs)
        c_out = g * self.rng.randint(max(1, 4 // g), 24 // g)
        return self.conv(src, c_out, groups=g)

    def branch(self, src: int, c_out: int | None = None) -> int:
        """A short op sequence on ``src`` keeping its spatial size (``c_out`` channels if given)."""
        c, _ = self.shape[src]
        choices = ["conv", "conv", "dw", "pool", "act", "id"]
        kind = self.rng.choice(choices if c_out in (None, c) else ["conv"])
        if kind == "conv":
            return self.conv(src, self.channels() if c_out is None else c_out)
        if kind == "dw":
            return self.conv(src, c, k=3, groups=c)
        if kind == "pool":
            return self.pool(src, shrink=False)
        if kind == "act":
            return self.act(src)
        return src

    # ------------------------------------------------------------------ blocks
    def earlier(self, shape) -> list[int]:
        """Earlier tensor values (not the input) that match ``shape`` ((C, H), or H)."""
        return [i for i, s in enumerate(self.shape) if i > 0 and s is not None and
                (s == shape if isinstance(shape, tuple) else s[1] == shape)]

    def block(self, x: int) -> int:
        rng = self.rng
        c, h = self.shape[x]
        kind = rng.choice(["conv", "residual", "residual", "cat", "split", "split", "dw",
                           "grouped", "pool"])
        if kind == "conv":
            return self.conv(x, self.channels(), stride=2 if rng.random() < 0.25 else 1)
        if kind == "residual":
            y = self.conv(x, rng.choice([c, self.channels()]))
            if rng.random() < 0.5:
                y = self.conv(y, c)
            elif self.shape[y][0] != c:
                y = self.conv(y, c, k=1)
            same = [i for i in self.earlier((c, h)) if i not in (x, y)]
            r = rng.random()
            if r < 0.5:
                other = x  # the block input itself
            elif r < 0.75 and same:
                other = rng.choice(same)  # an earlier value of the same shape
            else:
                other = self.branch(x, c)
            out = self.emit(("add", y, other) if rng.random() < 0.5 else ("add", other, y),
                            (c, h))
            return self.act(out) if rng.random() < 0.5 else out
        if kind == "cat":
            parts = [self.branch(x) for _ in range(rng.randint(2, 3))]
            same = [i for i in self.earlier(h) if i not in parts]
            if same and rng.random() < 0.3:  # a skip connection from further back
                parts.insert(rng.randint(0, len(parts)), rng.choice(same))
            return self.emit(("cat", parts), (sum(self.shape[p][0] for p in parts), h))
        if kind == "split" and c >= 2:
            n = rng.randint(2, min(3, c))
            if rng.random() < 0.5:
                sizes = [len(t) for t in torch.arange(c).chunk(n)]
                sp = self.emit(("chunk", x, n), None)
            else:
                cuts = sorted(rng.sample(range(1, c), n - 1))
                sizes = [b - a for a, b in zip([0, *cuts], [*cuts, c])]
                sp = self.emit(("split", x, sizes), None)
            parts = [self.emit(("part", sp, i), (s, h)) for i, s in enumerate(sizes)]
            if rng.random() < 0.5:  # different ops per part, then concat
                outs = [self.branch(p) for p in parts]
                return self.emit(("cat", outs), (sum(self.shape[o][0] for o in outs), h))
            t = self.channels()  # different ops per part to equal channels, then add
            outs = [self.branch(p, t) for p in parts]
            out = outs[0]
            for o in outs[1:]:
                out = self.emit(("add", out, o), (t, h))
            return out
        if kind == "dw":
            return self.depthwise(x, stride=2 if rng.random() < 0.25 else 1)
        if kind == "grouped":
            return self.grouped(x)
        return self.pool(x)

    def head(self, x: int, classes: int) -> int:
        rng = self.rng
        if rng.random() < 0.5:
            v = self.emit(("mean", x), None)
            feat = self.shape[x][0]
        else:
            while self.shape[x][1] > 4:  # flatten a small map: flatten->linear coupling
                x = self.pool(x, shrink=True)
            c, h = self.shape[x]
            v = self.emit(("flatten", x), None)
            feat = c * h * h
        if rng.random() < 0.5:
            hidden = self.channels()
            v = self.layer(nn.Linear(feat, hidden), v, None)
            if rng.random() < 0.7:
                v = self.emit(("act", rng.choice(list(_ACTS)), v), None)
            feat = hidden
        return self.layer(nn.Linear(feat, classes), v, None)


def random_model(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """A random small CNN (a DAG) and an example input, both fixed by ``seed``."""
    rng = random.Random(seed)
    torch.manual_seed(seed)  # the layers' initial weights
    size = rng.choice([8, 12, 16, 16])
    b = _Builder(rng, 3, size)
    x = b.conv(0, b.channels(), k=3)  # stem
    for _ in range(rng.randint(3, 8)):
        x = b.block(x)
    b.head(x, rng.randint(3, 10))
    model = RandomNet(b.program, b.layers)
    randomize_bn(model, seed).eval()
    return model, torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ============================================================================ lowering
def _call(g: torch.fx.Graph, target, args: tuple) -> torch.fx.Node:
    """A call_function node named as torch.export names it (``convolution_3``)."""
    name = getattr(target, "_opname", None) or target.__name__
    return g.create_node("call_function", target, args, name=name)


def _hardswish(g: torch.fx.Graph, x):  # as torch.export decomposes F.hardswish
    t = _call(g, aten.add.Tensor, (x, 3))
    t = _call(g, aten.clamp.default, (t, 0))
    t = _call(g, aten.clamp.default, (t, None, 6))
    t = _call(g, aten.mul.Tensor, (x, t))
    return _call(g, aten.div.Tensor, (t, 6))


_ACT_OPS = {
    "relu": lambda g, x: _call(g, aten.relu.default, (x,)),
    "relu6": lambda g, x: _call(g, aten.hardtanh.default, (x, 0, 6)),
    "gelu": lambda g, x: _call(g, aten.gelu.default, (x,)),
    "sigmoid": lambda g, x: _call(g, aten.sigmoid.default, (x,)),
    "hardswish": _hardswish,
}


def lower(model: RandomNet, example: torch.Tensor) -> slimfx.Graph:
    """The graph ``slimfx.capture(model, example)`` produces, built directly from the program.

    torch.export takes seconds per model here, too slow for hundreds of models;
    :func:`test_lowering_matches_capture` checks that both give the same graph.
    """
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        real = model.values(example)
    g = torch.fx.Graph()
    vals: list = [g.placeholder("x")]

    def call(target, args, path=None, mtype=None):
        n = _call(g, target, args)
        if path is not None:
            n.meta.update(module_path=path, module_type=mtype)
        return n

    def param(path, attr):
        n = g.get_attr(f"{path}.{attr}")
        n.meta.update(module_path=path, module_type="")
        return n

    for op, *args in model.program:
        if op == "layer":
            name, src = args
            m, x, path = model.layers[name], vals[src], f"layers.{name}"
            mtype = f"{type(m).__module__}.{type(m).__qualname__}"
            if isinstance(m, nn.Conv2d):
                b = param(path, "bias") if m.bias is not None else None
                v = call(aten.convolution.default,
                         (x, param(path, "weight"), b, list(m.stride), list(m.padding),
                          list(m.dilation), False, [0, 0], m.groups), path, mtype)
            elif isinstance(m, nn.BatchNorm2d):
                v = call(aten.batch_norm.default,
                         (x, *(param(path, a) for a in ("weight", "bias", "running_mean",
                                                        "running_var")),
                          False, m.momentum, m.eps, False), path, mtype)
            elif isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)):
                k, s, p = m.kernel_size, m.stride, m.padding
                target = aten.avg_pool2d.default if isinstance(m, nn.AvgPool2d) \
                    else aten.max_pool2d.default
                v = call(target, (x, [k, k], [s, s]) + (([p, p],) if p else ()), path, mtype)
            elif isinstance(m, nn.Linear):
                v = call(aten.linear.default,
                         (x, param(path, "weight"), param(path, "bias")), path, mtype)
            else:
                raise TypeError(m)
        elif op == "act":
            kind, src = args
            v = _ACT_OPS[kind](g, vals[src])
        elif op == "add":
            v = call(aten.add.Tensor, (vals[args[0]], vals[args[1]]))
        elif op == "cat":
            v = call(aten.cat.default, ([vals[i] for i in args[0]], 1))
        elif op in ("split", "chunk"):
            v = call(aten.split_with_sizes.default,
                     (vals[args[0]], [t.shape[1] for t in real[len(vals)]], 1))
        elif op == "part":
            v = call(operator.getitem, (vals[args[0]], args[1]))
        elif op == "mean":
            v = call(aten.mean.dim, (vals[args[0]], [2, 3]))
        else:  # flatten
            shape = real[args[0]].shape
            v = call(aten.view.default, (vals[args[0]], [shape[0], math.prod(shape[1:])]))
        vals.append(v)
    g.output((vals[-1],))
    for n in g.nodes:  # ops of the model's own forward
        if n.op == "call_function" and "module_path" not in n.meta:
            n.meta.update(module_path="", module_type=f"{__name__}.{RandomNet.__qualname__}")
    gm = torch.fx.GraphModule(model, g)
    out = real[-1]
    graph = slimfx.Graph(gm, (example,), in_spec=pytree.tree_flatten(((example,), {}))[1],
                         out_spec=pytree.tree_flatten(out)[1], name="RandomNet")
    graph.lint()
    graph.analyze()
    return graph


# ============================================================================ helpers
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only contend (6x slower on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.cache
def model_and_graph(seed: int) -> tuple[RandomNet, torch.Tensor, slimfx.Graph]:
    model, x = random_model(seed)
    return model, x, lower(model, x)


def fresh_input(graph: slimfx.Graph, seed: int) -> torch.Tensor:
    shape = graph.example_inputs[0].shape
    return torch.randn(*shape, generator=torch.Generator().manual_seed(10_000 + seed))


def features(model: RandomNet) -> set[str]:
    """What a random model exercises (to check that the generator covers everything)."""
    out = set()
    for op, *args in model.program:
        out.add(op)
        if op == "act":
            out.add(args[0])
        elif op == "layer":
            m = model.layers[args[0]]
            out.add(type(m).__name__)
            if isinstance(m, nn.Conv2d):
                if m.groups == m.in_channels and m.groups > 1:
                    out.add("depthwise" + ("x2" if m.out_channels == 2 * m.in_channels else ""))
                elif m.groups > 1:
                    out.add(f"groups={m.groups}")
                if m.stride[0] == 2:
                    out.add("conv stride 2")
            elif isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)):
                out.add(f"{type(m).__name__} stride {m.stride}")
        elif op == "cat":
            out.add(f"cat of {len(args[0])}")
    if sum(1 for ins in model.program if ins[0] == "layer"
           and isinstance(model.layers[ins[1]], nn.Linear)) == 2:
        out.add("two linears")
    return out


ALL_FEATURES = {
    "layer", "act", "add", "cat", "split", "chunk", "part", "mean", "flatten", *_ACTS,
    "Conv2d", "BatchNorm2d", "AvgPool2d", "MaxPool2d", "Linear", "depthwise", "depthwisex2",
    "groups=2", "groups=4", "conv stride 2", "AvgPool2d stride 1", "AvgPool2d stride 2",
    "MaxPool2d stride 1", "MaxPool2d stride 2", "cat of 2", "cat of 3", "cat of 4",
    "two linears",
}


def _signature(graph: slimfx.Graph) -> list[tuple]:
    """The call_function nodes of a graph, independent of node names."""
    index: dict = {}

    def arg(a):
        if isinstance(a, torch.fx.Node):
            return (f"param {a.target}" if a.op == "get_attr" else
                    "input" if a.op == "placeholder" else f"%{index[a]}")
        if isinstance(a, (list, tuple)):
            return type(a)(arg(x) for x in a)
        return repr(a)

    out = []
    for n in graph.fx.nodes:
        if n.op == "call_function":
            out.append((str(n.target), arg(n.args), arg(tuple(n.kwargs.items())),
                        n.meta.get("module_path"), n.meta.get("module_type")))
            index[n] = len(index)
    return out


# ============================================================================ the generator
def test_generator_is_deterministic_and_covers_every_op():
    m1, x1 = random_model(7)
    m2, x2 = random_model(7)
    assert m1.program == m2.program and torch.equal(x1, x2)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(),
                                                 m2.state_dict().values()))
    seen = set().union(*(features(model_and_graph(s)[0]) for s in SEEDS))
    assert ALL_FEATURES <= seen, f"never generated: {sorted(ALL_FEATURES - seen)}"


def test_lowering_matches_capture():
    """``lower`` builds exactly the graph ``slimfx.capture`` would (on models that together
    use every feature), so the fast path tests what users get."""
    todo, chosen = set(ALL_FEATURES), []
    while todo:  # greedy cover, deterministic
        best = max(SEEDS, key=lambda s: (len(features(model_and_graph(s)[0]) & todo), -s))
        chosen.append(best)
        todo -= features(model_and_graph(best)[0])
    assert len(chosen) <= 8
    for seed in chosen:
        model, x, lowered = model_and_graph(seed)
        captured = slimfx.capture(model, x)
        assert _signature(captured) == _signature(lowered), f"seed {seed}"
        assert (captured.in_spec, captured.out_spec) == (lowered.in_spec, lowered.out_spec)
        assert {n.target for n in captured.fx.nodes if n.op == "get_attr" and n.users} == \
            {n.target for n in lowered.fx.nodes if n.op == "get_attr"}, f"seed {seed}"
        x2 = fresh_input(lowered, seed)
        torch.testing.assert_close(lowered(x2), captured(x2), msg=f"seed {seed}")
        ca, cb = ChannelAnalysis(captured), ChannelAnalysis(lowered)
        assert [(len(g.sets), sorted(g.layers)) for g in ca.groups()] == \
            [(len(g.sets), sorted(g.layers)) for g in cb.groups()], f"seed {seed}"


# ============================================================================ alignment
_GROUP_SIZES: dict[int, list[int]] = {}


def group_sizes(seed: int) -> list[int]:
    """Prunable channel sets per group of model ``seed`` (cached)."""
    if seed not in _GROUP_SIZES:
        ca = ChannelAnalysis(model_and_graph(seed)[2].copy())
        _GROUP_SIZES[seed] = [len(g.sets) for g in ca.groups()]
    return _GROUP_SIZES[seed]


def _record(graph: slimfx.Graph, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor value of a run, by node name."""
    vals: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                vals[n.name] = out
            return out

    with torch.no_grad():
        Recorder(graph.gm).run(x)
    return vals


@pytest.mark.parametrize("seeds", BATCHES, ids=[f"seeds{b[0]}-{b[-1]}" for b in BATCHES])
def test_coupled_channels_stay_aligned(seeds):
    """Remove one channel set from every group: each member (node, dim) of a set loses
    exactly that set's elements, and what is left computes exactly what it computed
    before, given a reference copy with the removed channels' contributions zeroed."""
    checked = 0
    for seed in seeds:
        _, _, graph = model_and_graph(seed)
        work = graph.copy()
        ca = ChannelAnalysis(work)
        groups = ca.groups()
        _GROUP_SIZES[seed] = [len(g.sets) for g in groups]
        assert set().union(*(g.sets for g in groups)) == ca.prunable, \
            f"seed {seed}: prunable channel sets that no group offers to the pruner"
        rng = random.Random(seed)
        removed: set[int] = set()
        for group in groups:
            for r in rng.sample(group.sets, len(group.sets)):
                trial = removed | {r}
                # Emptying a tensor is prevented by the selection, not by apply_pruning.
                if all(ca.keep_mask(n, d, trial).any() for n, d, _ in ca.members(r)):
                    removed = trial
                    break
        if not removed:
            continue
        masks = {(n.name, d): ca.keep_mask(n, d, removed) for n, d in ca.dims}
        lost = defaultdict(set)
        for r in removed:
            for n, d, i in ca.members(r):
                lost[(n.name, d)].add(i)
        for key, m in masks.items():
            assert set(np.nonzero(~m)[0].tolist()) == lost.get(key, set()), f"seed {seed}: {key}"

        # The reference: the original graph with every weight slice that the removed
        # channels feed (conv in-channels, linear in-features) zeroed.
        ref = graph.copy()
        for n in ref.fx.nodes:
            p = ref.param(n) if n.op == "get_attr" else None
            if p is None or p.dim() < 2:
                continue
            with torch.no_grad():
                for d in range(p.dim()):
                    gone = np.nonzero(~masks[(n.name, d)])[0]
                    if len(gone):
                        p.index_fill_(d, torch.from_numpy(gone), 0.0)
        apply_pruning(ca, removed)
        work.lint()
        x = fresh_input(graph, seed)
        want, got = _record(ref, x), _record(work, x)
        assert got.keys() == want.keys(), f"seed {seed}: nodes lost"
        for name, t in got.items():
            expect = want[name]
            for d in range(expect.dim()):
                m = masks.get((name, d))
                if m is not None and not m.all():
                    expect = expect.index_select(d, torch.from_numpy(np.nonzero(m)[0]))
            assert t.shape == expect.shape, f"seed {seed}: {name} {tuple(t.shape)} vs " \
                f"{tuple(expect.shape)} after removing {sorted(removed)}"
            scale = max(1.0, expect.abs().max().item()) if expect.numel() else 1.0
            torch.testing.assert_close(t, expect, atol=1e-4 * scale, rtol=1e-4,
                                       msg=lambda m, w=f"seed {seed}: {name}": f"{w}: {m}")
        checked += len(removed)
    assert checked >= 2 * len(seeds), f"only {checked} channel sets checked"


# ============================================================================ budgets
BUDGETS = ({"macs": 0.5}, {"params": 0.6}, {"ratio": 0.3})
FREE_CRITERIA = ("l1", "l2", "bn_scale", "random")
MODES = (("global", "mean"), ("global", "none"), ("uniform", "mean"), ("uniform", "none"))
MIN_RATIO = 0.05


def runs_for(seed: int) -> list[PruneOptions]:
    """The option sets tried on model ``seed``: each budget with a data-free criterion, and
    (on every fourth seed) a data criterion with one budget.  Criterion, strategy and
    normalisation rotate with the seed so that every combination is tried on several
    models (a run takes ~0.25 s: every combination on every model would take an hour)."""
    out = []
    for i, budget in enumerate(BUDGETS):
        strategy, normalize = MODES[(seed // len(FREE_CRITERIA) + i) % len(MODES)]
        out.append(PruneOptions(criterion=FREE_CRITERIA[(seed + i) % len(FREE_CRITERIA)],
                                strategy=strategy, normalize=normalize, round_to=1,
                                min_ratio=MIN_RATIO, seed=seed, **budget))
    if seed % 4 == 0:  # the data criteria on every fourth model
        t, k = seed // 4, len(DATA_CRITERIA)
        strategy, normalize = MODES[(t // (k * len(BUDGETS))) % len(MODES)]
        out.append(PruneOptions(criterion=DATA_CRITERIA[t % k], strategy=strategy,
                                normalize=normalize, round_to=1, min_ratio=MIN_RATIO,
                                seed=seed, **BUDGETS[(t // k) % len(BUDGETS)]))
    return out


def _kind(opts: PruneOptions) -> str:
    return next(k for k in ("macs", "params", "ratio") if getattr(opts, k) is not None)


def test_every_combination_is_tried():
    tried = [(o.criterion, _kind(o), o.strategy, o.normalize) for s in SEEDS for o in runs_for(s)]
    every = set(itertools.product(FREE_CRITERIA + DATA_CRITERIA, ("macs", "params", "ratio"),
                                  ("global", "uniform"), ("mean", "none")))
    assert set(tried) == every
    assert min(tried.count(c) for c in every if c[0] in FREE_CRITERIA) >= 4
    assert all({_kind(o) for o in runs_for(s)} == {"macs", "params", "ratio"} for s in SEEDS)


def data_for(graph: slimfx.Graph, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(20_000 + seed)
    classes = graph.analyze()[0].shape[1]
    shape = graph.example_inputs[0].shape
    return [(torch.randn(*shape, generator=gen), torch.tensor([k % classes]))
            for k in range(2)]


def _floor(graph: slimfx.Graph, opts: PruneOptions, data) -> tuple[float, float]:
    """(MACs, params) ratios when only the constraints (min_ratio, never emptying a
    tensor) stop the pruning: every set the selection may take is taken."""
    ca = ChannelAnalysis(graph.copy(), exclude=opts.exclude)
    plan = _plan(ca, opts, data, F.cross_entropy)
    removed = _removal(plan, [len(g.sets) for g in plan.groups])
    est = _Estimator(ca)
    return (est.macs(removed) / est.macs(set()), est.param_count(removed) / est.param_count(set()))


@pytest.mark.parametrize("seeds", BATCHES, ids=[f"seeds{b[0]}-{b[-1]}" for b in BATCHES])
def test_random_models_prune_to_every_budget(seeds):
    """Every run: verified by the pass manager (lint, runs, output shapes kept), MACs and
    parameters do not grow and match the pass's estimate, the output on a fresh input is
    finite, and the budget is met unless the constraints stop it."""
    failures: list[str] = []
    tally: dict[str, list] = defaultdict(list)
    for seed in seeds:
        model, x, graph = model_and_graph(seed)
        x2 = fresh_input(graph, seed)
        ref = graph(x2)
        torch.testing.assert_close(ref, model(x2), msg=f"seed {seed}: lowering")
        base_out = [tuple(t.shape) for t in graph.analyze(force=True)]
        base_macs, base_params = graph.macs(), graph.param_count()
        sizes = group_sizes(seed)
        data = data_for(graph, seed)
        for opts in runs_for(seed):
            kind = _kind(opts)
            target = getattr(opts, kind)
            where = (f"seed {seed}, {opts.criterion} {opts.strategy}/{opts.normalize} "
                     f"{kind}={target}")
            kw = {"data": data, "loss_fn": F.cross_entropy} \
                if opts.criterion in DATA_CRITERIA else {}
            pm = slimfx.PassManager([ChannelPruning(opts, **kw)])
            try:
                new = pm.run(graph)
            except slimfx.PassError as e:
                failures.append(f"{where}: {e}")
                continue
            rec = pm.records[0]
            problems = []
            try:
                new.lint()
            except slimfx.GraphError as e:
                problems.append(f"lint: {e}")
            out = new(x2)
            shapes = [tuple(t.shape) for t in new.analyze()]
            if shapes != base_out or out.shape != ref.shape:
                problems.append(f"output shapes changed: {base_out} -> {shapes}")
            if not torch.isfinite(out).all():
                problems.append("non-finite output on a fresh input")
            macs, params = new.macs() / base_macs, new.param_count() / base_params
            if macs > 1 or params > 1:
                problems.append(f"grew: MACs x{macs:.4f}, params x{params:.4f}")
            if rec.modified:
                if not any(n > 1 for n in sizes):
                    problems.append("modified a model with nothing to prune")
                st = rec.stats
                for key, got in (("macs", macs), ("params", params)):
                    if abs(st[f"{key}_ratio"] - got) > 1e-3 or \
                            abs(st[f"est_{key}_ratio"] - got) > 1e-3:
                        problems.append(f"{key} ratio {got:.4f}, but the stats say "
                                        f"{st[f'{key}_ratio']} (estimated "
                                        f"{st[f'est_{key}_ratio']})")
            elif macs != 1 or params != 1:
                problems.append("not modified, yet MACs or params changed")
            tally["modified"].append(rec.modified)
            if kind == "ratio":
                removed = rec.stats.get("sets_removed", 0)
                allowed = round(target * sum(sizes)) if opts.strategy == "global" \
                    else sum(round(target * n) for n in sizes)
                if removed > allowed:
                    problems.append(f"removed {removed} channel sets, more than {allowed}")
                tally["ratio"].append(removed / max(allowed, 1))
            else:
                got = macs if kind == "macs" else params
                if got <= target + 1e-3:
                    tally["reached"].append(got / target)
                else:  # allowed only when the constraints stop the pruning
                    tally["stopped"].append(where)
                    floor = _floor(graph, opts, kw.get("data"))[kind == "params"]
                    if abs(got - floor) > 1e-3:
                        problems.append(f"missed the budget ({got:.4f} > {target}), yet the "
                                        f"constraints allow {floor:.4f}")
            failures += [f"{where}: {p}" for p in problems]
        assert (graph.macs(), graph.param_count()) == (base_macs, base_params), \
            f"seed {seed}: the input graph was modified"
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:30])
    n, budget_runs = len(tally["modified"]), len(tally["reached"]) + len(tally["stopped"])
    summary = (f"{n} runs, {sum(tally['modified'])} modified; budget met in "
               f"{len(tally['reached'])} of {budget_runs} (stopped by constraints: "
               f"{tally['stopped']}), achieved/target median "
               f"{np.median(tally['reached']):.3f}; ratio: removed/allowed median "
               f"{np.median(tally['ratio']):.3f}")
    print(summary)
    # Pruning really happens, and approaches the budget (steps are coarse: one channel
    # set of a tiny model can hold a third of its MACs).
    assert sum(tally["modified"]) >= 0.9 * n, summary
    assert len(tally["stopped"]) <= 0.15 * budget_runs, summary
    assert np.median(tally["reached"]) >= 0.85 and np.median(tally["ratio"]) >= 0.85, summary
