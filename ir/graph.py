"""The slimfx IR: a runnable :class:`torch.fx.GraphModule` plus what is known about it.

A :class:`Graph` wraps one canonical FX graph (see :mod:`slimfx.ir.ops`) whose parameters
and buffers live in the graph module itself.  Its placeholders are the model's flattened
tensor inputs and its output node returns a flat tuple of tensors; ``in_spec`` and
``out_spec`` rebuild the model's own calling convention, so a ``Graph`` is callable like
the model it came from.

Per-node facts (shapes, dtypes, parameter counts, MACs) are an *analysis*: derived from
the graph by running it on its example inputs, cached, and recomputed when the graph
changes.  They are kept in ``node.meta["slimfx"]`` as a :class:`NodeInfo`.  The module
path a node came from is provenance, set at capture and kept in ``node.meta["module_path"]``.

>>> import torch, slimfx
>>> g = slimfx.capture(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()),
...                    (torch.randn(2, 4),))
>>> [(i.op, i.module_path, i.shape, i.params, i.macs) for i in g.layers()]
[('aten.linear', '0', (2, 3), 15, 24)]
>>> g(torch.ones(2, 4)).shape
torch.Size([2, 3])
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx
from torch.utils import _pytree as pytree

from slimfx.errors import GraphError

from .ops import is_canonical, macs_of, op_name

__all__ = ["Graph", "NodeInfo", "TensorSpec", "in_modules"]


def in_modules(path: str, modules) -> bool:
    """Whether module ``path`` is one of ``modules`` or a submodule of one.

    >>> in_modules("layer1.0.conv1", ["layer1"]), in_modules("layer10", ["layer1"])
    (True, False)
    """
    return any(path == m or path.startswith(m + ".") for m in modules)


class TensorSpec(NamedTuple):
    """Shape and dtype of one tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{_DTYPE_SHORT.get(self.dtype, str(self.dtype).removeprefix('torch.'))}" \
               f"[{','.join(map(str, self.shape))}]"


_DTYPE_SHORT = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "bool",
}


@dataclass(frozen=True)
class NodeInfo:
    """What the shape analysis knows about one node."""

    name: str
    kind: str  # fx node op: placeholder, get_attr, call_function, output
    op: str  # readable target name, e.g. "aten.convolution"
    module_path: str
    inputs: tuple[TensorSpec | None, ...]
    outputs: tuple[TensorSpec, ...]
    params: int  # parameter/buffer elements: an op's get_attr inputs, or a get_attr's own
    macs: int

    @property
    def shape(self) -> tuple[int, ...] | None:
        """Shape of the first output (``None`` when the node has no tensor output)."""
        return self.outputs[0].shape if self.outputs else None

    @property
    def dtype(self) -> torch.dtype | None:
        return self.outputs[0].dtype if self.outputs else None


def _spec_of(value) -> tuple[TensorSpec, ...]:
    leaves = pytree.tree_leaves(value)
    return tuple(TensorSpec(tuple(t.shape), t.dtype) for t in leaves if isinstance(t, torch.Tensor))


def _fetch_attr(root: torch.nn.Module, qualname: str):
    obj = root
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _set_attr(root: torch.nn.Module, qualname: str, value) -> None:
    *parents, last = qualname.split(".")
    mod = root
    for p in parents:
        if not hasattr(mod, p):
            mod.add_module(p, torch.nn.Module())
        mod = getattr(mod, p)
    if isinstance(value, torch.nn.Parameter):
        if last in mod._buffers:
            del mod._buffers[last]
        mod.register_parameter(last, value)
    else:
        if last in mod._parameters:
            del mod._parameters[last]
        mod.register_buffer(last, value)


def _del_attr(root: torch.nn.Module, qualname: str) -> None:
    *parents, last = qualname.split(".")
    mod = root
    for p in parents:
        mod = getattr(mod, p)
    delattr(mod, last)


@dataclass
class _Analysis:
    fingerprint: int
    outputs: tuple[torch.Tensor, ...]
    extra: dict = field(default_factory=dict)  # other cached analyses, keyed by name


class Graph:
    """A captured model: canonical FX graph, its parameters, example inputs, metadata.

    Parameters
    ----------
    gm:
        A ``GraphModule`` with flat tensor placeholders and a flat tuple output.
    example_inputs:
        Flat tuple of example tensors, one per placeholder.  Used by analyses and by the
        pass manager's verification; never modified.
    in_spec, out_spec:
        Pytree specs of the original model's ``(args, kwargs)`` and its output.
    name:
        A display name (the model class by default).
    """

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor], *,
                 in_spec: pytree.TreeSpec | None = None, out_spec: pytree.TreeSpec | None = None,
                 name: str = "graph"):
        self.gm = gm
        self.example_inputs = tuple(example_inputs)
        self.in_spec = in_spec
        self.out_spec = out_spec
        self.name = name
        self._analysis: _Analysis | None = None

    # ------------------------------------------------------------------ running
    def __call__(self, *args, **kwargs):
        """Run like the original model (same argument and output structure)."""
        if self.in_spec is not None:
            flat, spec = pytree.tree_flatten((args, kwargs))
            if spec != self.in_spec:
                raise GraphError(
                    f"{self.name}: inputs do not match the captured structure:\n"
                    f"  expected {self.in_spec}\n  got      {spec}")
        else:
            flat = list(args)
        out = self.run(*flat)
        if self.out_spec is not None:
            return pytree.tree_unflatten(list(out), self.out_spec)
        return out[0] if len(out) == 1 else out

    def run(self, *flat_inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run on flat inputs (one per placeholder); returns the flat output tuple."""
        n = len(self.placeholders)
        if len(flat_inputs) != n:
            raise GraphError(f"{self.name}: expected {n} inputs "
                             f"({', '.join(p.name for p in self.placeholders)}), got {len(flat_inputs)}")
        out = self.gm(*flat_inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    # ------------------------------------------------------------------ structure
    @property
    def fx(self) -> torch.fx.Graph:
        """The underlying :class:`torch.fx.Graph`."""
        return self.gm.graph

    @property
    def nodes(self) -> list[torch.fx.Node]:
        return list(self.gm.graph.nodes)

    @property
    def placeholders(self) -> list[torch.fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "placeholder"]

    @property
    def output_node(self) -> torch.fx.Node:
        return next(n for n in reversed(self.gm.graph.nodes) if n.op == "output")

    def find(self, target=None, *, module_path: str | None = None) -> Iterator[torch.fx.Node]:
        """Call-function nodes with this op target and/or module path."""
        for n in self.gm.graph.nodes:
            if n.op != "call_function":
                continue
            if target is not None and n.target != target:
                continue
            if module_path is not None and n.meta.get("module_path") != module_path:
                continue
            yield n

    def copy(self) -> Graph:
        """A deep copy: graph, parameters and metadata; example inputs are shared."""
        g = Graph(copy.deepcopy(self.gm), self.example_inputs, in_spec=self.in_spec,
                  out_spec=self.out_spec, name=self.name)
        return g

    # ------------------------------------------------------------------ parameters
    def param(self, node_or_name: torch.fx.Node | str) -> torch.Tensor:
        """The tensor behind a ``get_attr`` node (or a qualified attribute name)."""
        name = node_or_name.target if isinstance(node_or_name, torch.fx.Node) else node_or_name
        try:
            return _fetch_attr(self.gm, name)
        except AttributeError:
            raise GraphError(f"{self.name}: no parameter or buffer named '{name}'") from None

    def set_param(self, name: str, value: torch.Tensor, *, trainable: bool | None = None) -> None:
        """Create or replace the parameter/buffer ``name`` (dotted paths create submodules).

        ``trainable`` chooses parameter vs buffer; by default an existing attribute keeps
        its kind and a new one becomes a parameter if ``value`` is floating point.
        """
        if trainable is None:
            try:
                trainable = isinstance(_fetch_attr(self.gm, name), torch.nn.Parameter)
            except AttributeError:
                trainable = value.is_floating_point()
        value = value.detach()
        _set_attr(self.gm, name, torch.nn.Parameter(value, requires_grad=value.is_floating_point())
                  if trainable else value)

    def add_param(self, name_hint: str, value: torch.Tensor, *, before: torch.fx.Node,
                  trainable: bool | None = None) -> torch.fx.Node:
        """Store ``value`` under a fresh name and insert a ``get_attr`` node before ``before``."""
        base = re.sub(r"[^0-9a-zA-Z_.]", "_", name_hint).strip(".") or "param"
        name, i = base, 1
        while True:
            try:
                _fetch_attr(self.gm, name)
            except AttributeError:
                break
            name, i = f"{base}_{i}", i + 1
        self.set_param(name, value, trainable=trainable)
        with self.gm.graph.inserting_before(before):
            node = self.gm.graph.get_attr(name)
        node.meta["module_path"] = name.rpartition(".")[0]
        return node

    def remove_unused_params(self) -> list[str]:
        """Delete parameters and buffers that no ``get_attr`` node reads; returns their names."""
        used = {n.target for n in self.gm.graph.nodes if n.op == "get_attr"}
        state = [k for k, _ in self.gm.named_parameters(remove_duplicate=False)]
        state += [k for k, _ in self.gm.named_buffers(remove_duplicate=False)]
        removed = [k for k in state if k not in used]
        for k in removed:
            _del_attr(self.gm, k)
        return removed

    def param_count(self) -> int:
        """Elements of all parameters and buffers the graph reads."""
        total = 0
        for n in self.gm.graph.nodes:
            if n.op == "get_attr":
                v = self.param(n)
                if isinstance(v, torch.Tensor):
                    total += v.numel()
        return total

    def inherit(self, new: torch.fx.Node, old: torch.fx.Node) -> torch.fx.Node:
        """Give a node created by a rewrite the provenance (module path, source) of ``old``."""
        for key in ("module_path", "module_type", "stack_trace"):
            if key in old.meta:
                new.meta[key] = old.meta[key]
        return new

    @contextlib.contextmanager
    def batchnorm_training(self):
        """Run the graph's BatchNorms in training mode inside the block (fine-tuning).

        Batch statistics normalise, and the running statistics are updated in place, as
        ``nn.Module.train()`` does; the inference form returns on exit.  Fine-tuning a
        pruned graph with its pre-pruning statistics frozen recovers far worse.
        """
        nodes = [n for n in self.gm.graph.nodes if n.target is torch.ops.aten.batch_norm.default]
        for n in nodes:
            n.update_arg(5, True)  # batch_norm(x, w, b, mean, var, training, momentum, eps, cudnn)
        self.gm.recompile()
        try:
            yield self
        finally:
            for n in nodes:
                n.update_arg(5, False)
            self.gm.recompile()
            self._analysis = None  # the running statistics changed

    # ------------------------------------------------------------------ analyses
    def fingerprint(self) -> int:
        """A hash of the graph structure and parameter shapes; changes with any rewrite."""
        nodes = tuple((n.name, n.op, str(n.target), str(n.args), str(n.kwargs))
                      for n in self.gm.graph.nodes)
        state = tuple((k, tuple(v.shape), v.dtype) for k, v in self.gm.state_dict().items())
        return hash((nodes, state))

    def lint(self) -> None:
        """Check structure: FX invariants, canonical ops, get_attr targets exist.

        Raises :class:`~slimfx.errors.GraphError` naming the first bad node.
        """
        try:
            self.gm.graph.lint()
        except Exception as e:  # torch raises RuntimeError with its own message
            raise GraphError(f"{self.name}: FX lint failed: {e}") from e
        for n in self.gm.graph.nodes:
            if n.op == "call_function" and not is_canonical(n.target):
                raise GraphError(
                    f"{self.name}: op {op_name(n.target)} is not in slimfx's canonical op set "
                    "(core ATen, slimfx.ir.ops.PRESERVED_OPS, or a slimfx:: op); "
                    "use the torch.ops.aten overload a capture would produce", n)
            elif n.op in ("call_module", "call_method"):
                raise GraphError(f"{self.name}: {n.op} nodes are not canonical; "
                                 "use call_function nodes on ATen ops", n)
            elif n.op == "get_attr":
                try:
                    _fetch_attr(self.gm, n.target)
                except AttributeError:
                    raise GraphError(f"{self.name}: get_attr of missing attribute "
                                     f"'{n.target}'", n) from None

    def analyze(self, *, force: bool = False) -> tuple[torch.Tensor, ...]:
        """Run the shape analysis (if the graph changed) and return the example outputs.

        Annotates every node with ``node.meta["slimfx"] = NodeInfo(...)``.
        """
        fp = self.fingerprint()
        if self._analysis is not None and self._analysis.fingerprint == fp and not force:
            return self._analysis.outputs
        self.gm.recompile()
        specs: dict[torch.fx.Node, tuple[TensorSpec, ...]] = {}
        gm = self.gm

        class _Recorder(torch.fx.Interpreter):
            def run_node(self, n):
                result = super().run_node(n)
                specs[n] = _spec_of(result)
                return result

        with torch.no_grad():
            out = _Recorder(gm).run(*self.example_inputs)
        outputs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        for n in gm.graph.nodes:
            in_specs = []
            params = 0
            for a in n.all_input_nodes:
                s = specs.get(a, ())
                in_specs.append(s[0] if len(s) == 1 else None)
            # Positional shapes for the cost model: one entry per positional argument.
            pos_shapes = [(specs[a][0].shape if isinstance(a, torch.fx.Node) and len(specs.get(a, ())) == 1
                           else None) for a in n.args]
            if n.op == "get_attr":
                v = _fetch_attr(gm, n.target)
                params = v.numel() if isinstance(v, torch.Tensor) else 0
            elif n.op == "call_function":  # what the op reads through get_attr inputs
                params = sum(_fetch_attr(gm, a.target).numel() for a in n.all_input_nodes
                             if a.op == "get_attr")
            outs = specs.get(n, ())
            macs = 0
            if n.op == "call_function" and outs:
                macs = macs_of(n.target, pos_shapes, n.args, outs[0].shape)
            n.meta["slimfx"] = NodeInfo(
                name=n.name, kind=n.op,
                op=op_name(n.target) if n.op == "call_function" else n.op,
                module_path=n.meta.get("module_path", ""),
                inputs=tuple(in_specs), outputs=outs, params=params, macs=macs)
        self._analysis = _Analysis(fp, outputs)
        return outputs

    def info(self, node: torch.fx.Node) -> NodeInfo:
        """The analysis result for one node (recomputed if the graph changed).

        Checking for changes walks the graph: in a loop, call :meth:`infos` once instead.
        """
        self.analyze()
        return node.meta["slimfx"]

    def infos(self) -> list[NodeInfo]:
        """Analysis results for every node, in graph order."""
        self.analyze()
        return [n.meta["slimfx"] for n in self.gm.graph.nodes]

    def layers(self) -> list[NodeInfo]:
        """Compute nodes that own parameters or do MACs: the model's *layers*.

        A parameter read by two ops is counted in both rows.
        """
        return [i for i in self.infos() if i.kind == "call_function" and (i.params or i.macs)]

    def macs(self) -> int:
        """Total multiply-accumulates of one run on the example inputs."""
        return sum(i.macs for i in self.infos())

    def summary(self) -> dict[str, Any]:
        """Totals: parameters, MACs, node count, input and output specs."""
        self.analyze()
        return {
            "name": self.name,
            "params": self.param_count(),
            "macs": self.macs(),
            "nodes": sum(1 for n in self.gm.graph.nodes if n.op == "call_function"),
            "inputs": [str(p.meta["slimfx"].outputs[0]) for p in self.placeholders],
            "outputs": [str(s) for s in _spec_of(self._analysis.outputs)],
        }

    def cached(self, key: str, compute):
        """Cache another derived analysis until the graph changes (``compute(graph)``)."""
        self.analyze()
        extra = self._analysis.extra
        if key not in extra:
            extra[key] = compute(self)
        return extra[key]

    # ------------------------------------------------------------------ printing
    def __str__(self) -> str:
        from .printing import format_graph
        return format_graph(self)

    def __repr__(self) -> str:
        n = sum(1 for x in self.gm.graph.nodes if x.op == "call_function")
        return f"<slimfx.Graph {self.name}: {n} ops, {self.param_count():,} params>"
