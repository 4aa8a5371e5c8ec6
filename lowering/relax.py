"""IR -> TVM Relax: the canonical graph becomes a Relax ``IRModule`` through TVM's own
``torch.export`` frontend, plus slimfx's lowerings for the ops TVM does not know.

The graph is exported again (it is plain ATen, so this is exact) with its parameters as
function inputs: the Relax ``main`` takes the model inputs first, then the parameters in
``RelaxProgram.param_names`` order.  Parameters stay out of the compiled code, so an
artifact stores them separately (and, for compressed weights, in their compact form).
Buffers (BatchNorm statistics that ``fold-bn`` could not fold, position ids) and tensor
constants the graph reads are passed the same way: TVM's frontend would bind them into
the module as constants, and its ``FoldConstant`` then compiles and runs one kernel per
folded op while building (seconds on a DenseNet); as parameters, their re-layouts run
once at load time in ``main_transform_params`` like the weights'.

A pass that introduces a ``slimfx::`` op supplies its Relax lowering with
:func:`register_lowering`, next to the op's PyTorch reference::

    @register_lowering(torch.ops.slimfx.my_op.default)
    def _lower(node, importer):
        x, w = importer.retrieve_args(node)[:2]
        return importer.block_builder.emit(relax.op.matmul(x, w))

>>> import torch, slimfx
>>> g = slimfx.capture(torch.nn.Linear(4, 2), (torch.randn(1, 4),))
>>> prog = to_relax(g)
>>> prog.input_names, prog.param_names
(['input_1'], ['weight', 'bias'])
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass

import torch

from slimfx.errors import node_context
from slimfx.ir import Graph, op_name

from .targets import LoweringError

__all__ = ["register_lowering", "lowerings", "to_relax", "RelaxProgram", "supported_ops"]

_LOWERINGS: dict[str, Callable] = {}


def _key(target) -> str:
    return target.__name__  # "convolution.default": how TVM's importer names ops


def register_lowering(*targets) -> Callable:
    """Register ``fn(node, importer) -> relax.Var`` as the Relax lowering of op ``targets``.

    ``importer`` is TVM's ``ExportedProgramImporter``: ``importer.retrieve_args(node)``
    gives the Relax values of the node's arguments and ``importer.block_builder`` emits.
    """

    def deco(fn: Callable) -> Callable:
        for t in targets:
            if not isinstance(t, torch._ops.OpOverload):
                raise LoweringError(f"register_lowering expects op overloads, got {t!r}")
            _LOWERINGS[_key(t)] = fn
        return fn

    return deco


def lowerings() -> dict[str, Callable]:
    """The registered slimfx lowerings by TVM op key."""
    return dict(_LOWERINGS)


def supported_ops() -> set[str]:
    """Op keys TVM's torch frontend converts, plus slimfx's own lowerings."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    return set(ExportedProgramImporter().create_convert_map()) | set(_LOWERINGS)


@dataclass
class RelaxProgram:
    """A Relax module with the calling convention of its ``main`` function."""

    mod: object  # tvm.IRModule, parameters as inputs after the model inputs
    params: list  # numpy arrays, in param_names order
    param_names: list[str]  # the graph's attribute names (e.g. "layer1.0.conv1.weight")
    input_names: list[str]


def _tensors_as_parameters(g: Graph) -> torch.fx.GraphModule:
    """A module running ``g``'s code whose every tensor attribute is a parameter.

    The tensors are shared (a buffer becomes a frozen ``nn.Parameter`` over the same
    storage); ``g`` is not modified.  Attributes no node reads (e.g. BatchNorm's
    ``num_batches_tracked``) are left out.
    """
    gm = g.gm
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = gm.graph._codegen  # the pytree calling convention of export's graphs
    root: dict[str, object] = {}
    for n in graph.nodes:
        if n.op == "get_attr":
            value = g.param(n.target)
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                value = torch.nn.Parameter(value, requires_grad=False)
            root[n.target] = value
        elif n.op == "call_module":
            root[n.target] = gm.get_submodule(n.target)
    return torch.fx.GraphModule(root, graph, class_name=type(gm).__name__)


_TARGET_KIND: contextvars.ContextVar[str] = contextvars.ContextVar("slimfx_target_kind",
                                                                   default="llvm")


def target_kind() -> str:
    """The kind of target (``"llvm"``, ``"cuda"``) :func:`to_relax` is lowering for, for a
    lowering whose form depends on it (Winograd's factored weights are CPU-only)."""
    return _TARGET_KIND.get()


def to_relax(graph: Graph, target_kind: str = "llvm") -> RelaxProgram:
    """Convert a canonical graph to a Relax ``IRModule`` (parameters as inputs), for a
    target of ``target_kind`` (``"llvm"``, ``"cuda"``; see :func:`target_kind`).

    Raises :class:`LoweringError` naming the node and op when an op has no lowering.
    """
    token = _TARGET_KIND.set(target_kind)
    try:
        return _to_relax(graph)
    finally:
        _TARGET_KIND.reset(token)


def _to_relax(graph: Graph) -> RelaxProgram:
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    known = supported_ops()
    for n in graph.fx.nodes:
        if n.op == "call_function" and _key(n.target) not in known:
            raise LoweringError(f"op {op_name(n.target)} cannot be lowered to TVM: neither TVM's "
                                "torch frontend nor a slimfx lowering (register_lowering) "
                                "handles it" + node_context(n))
    try:
        ep = torch.export.export(_tensors_as_parameters(graph), graph.example_inputs,
                                 strict=False)
    except Exception as e:
        raise LoweringError(f"re-exporting {graph.name} for lowering failed: {e}") from e
    sig = ep.graph_signature
    names = {spec.arg.name: spec.target for spec in sig.input_specs if spec.target is not None}
    state = {**ep.state_dict, **ep.constants}
    try:
        mod = from_exported_program(ep, keep_params_as_input=True, unwrap_unit_return_tuple=False,
                                    custom_convert_map=lowerings() or None,
                                    run_ep_decomposition=False)
    except Exception as e:  # TVM raises assertion/value errors of its own
        raise LoweringError(f"TVM could not import {graph.name}: {type(e).__name__}: {e}") from e
    main = mod["main"]
    n_inputs = len(graph.placeholders)
    arg_names = [p.name for p in main.params]
    # TVM names parameter vars after export's placeholders (p_conv1_weight, b_bn_running_mean).
    param_names, params = [], []
    for arg in arg_names[n_inputs:]:
        target = names.get(arg)
        if target is None:
            raise LoweringError(f"cannot match Relax parameter '{arg}' to a graph parameter")
        param_names.append(target)
        params.append(state[target].detach().cpu().contiguous().numpy())
    mod, _ = relax.frontend.detach_params(mod)  # the values travel in `params`, not the IR
    return RelaxProgram(mod, params, param_names, [p.name for p in graph.placeholders])
