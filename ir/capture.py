"""Capture: ``nn.Module`` + example inputs -> one canonical :class:`~slimfx.ir.Graph`.

Built on ``torch.export`` in non-strict mode (which, unlike ``fx.symbolic_trace``, handles
third-party models with data-independent Python control flow, pytree inputs and
outputs).  The exported program is decomposed to core ATen except for
:data:`~slimfx.ir.ops.PRESERVED_OPS`, un-lifted so parameters live in the graph module,
and normalised:

* export's guard and metadata-assert nodes are removed;
* ``getitem(_native_batch_norm_legit_no_training(...), 0)`` becomes ``aten.batch_norm``
  and ``getitem(max_pool2d_with_indices(...), 0)`` becomes ``aten.max_pool2d``;
* placeholders are the flat tensor inputs; the output is a flat tuple;
* every node gets ``meta["module_path"]`` (the submodule it came from).

The model is captured in eval mode (dropout off, batch-norm running statistics) and is
left exactly as it was: its train/eval flags are restored and the graph owns copies of
the parameters.
"""

from __future__ import annotations

import copy
import operator
import traceback

import torch
import torch.fx
from torch.utils import _pytree as pytree

from slimfx.errors import CaptureError, node_context

from .graph import Graph
from .ops import PRESERVED_OPS, is_canonical, op_name
from .pattern import P, Rules, rewrite

__all__ = ["capture", "decomposition_table"]

aten = torch.ops.aten

# Meta keys kept from torch.export; the rest (fake tensors, export bookkeeping) are dropped.
_KEEP_META = ("stack_trace", "module_path", "module_type")

_single_user = lambda n: len(n.users) == 1  # noqa: E731

CANONICALIZE = Rules([
    # getitem(_native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps), 0)
    #   -> batch_norm(x, w, b, mean, var, training=False, momentum, eps, cudnn=False)
    (P(operator.getitem,
       P(aten._native_batch_norm_legit_no_training.default, name="bn", where=_single_user), 0),
     lambda rw, bn: rw.call(aten.batch_norm.default, *bn.args[:5], False, *bn.args[5:7], False)),
    # getitem(max_pool2d_with_indices(x, ...), 0) -> max_pool2d(x, ...)
    (P(operator.getitem,
       P(aten.max_pool2d_with_indices.default, name="pool", where=_single_user), 0),
     lambda rw, pool: rw.call(aten.max_pool2d.default, *pool.args)),
])


def decomposition_table() -> dict:
    """torch.export's core-ATen decomposition table, less the ops slimfx keeps whole."""
    table = torch.export.default_decompositions()
    for op in PRESERVED_OPS:
        table.pop(op, None)
    return table


def _user_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame outside torch and slimfx: the model's own line."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "/torch/" not in f.filename and "/slimfx/" not in f.filename
            and "/ir/capture.py" not in f.filename]
    if not user:
        return None
    f = user[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _module_path(node: torch.fx.Node) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, mtype = list(stack.values())[-1]
        return path, (mtype if isinstance(mtype, str) else getattr(mtype, "__qualname__", ""))
    if node.op == "get_attr":
        return node.target.rpartition(".")[0], ""
    return "", ""


def _normalize(gm: torch.fx.GraphModule) -> None:
    g = gm.graph
    for n in list(g.nodes):
        if n.op == "call_module" and n.target == "_guards_fn":
            g.erase_node(n)
        elif n.op == "call_function" and n.target in (
                aten._assert_tensor_metadata.default, aten._assert_scalar.default,
                aten.sym_constrain_range_for_size.default):
            g.erase_node(n)
    for attr in ("_guards_fn", "_in_spec", "_out_spec"):  # export's calling-convention leftovers
        if hasattr(gm, attr):
            delattr(gm, attr)
    for n in g.nodes:
        path, mtype = _module_path(n)
        meta = {k: n.meta[k] for k in _KEEP_META if k in n.meta}
        meta["module_path"], meta["module_type"] = path, mtype
        n.meta.clear()
        n.meta.update(meta)
    # Flat inputs, flat tuple output: drop export's pytree codegen.
    g._codegen = torch.fx.graph.CodeGen()
    out = next(n for n in reversed(g.nodes) if n.op == "output")
    flat = out.args[0]
    out.args = (tuple(flat) if isinstance(flat, (list, tuple)) else (flat,),)
    gm.recompile()


def capture(model: torch.nn.Module, example_inputs=(), example_kwargs: dict | None = None, *,
            name: str | None = None, verify: bool = True, atol: float = 1e-5) -> Graph:
    """Capture ``model`` into a canonical :class:`~slimfx.ir.Graph`.

    Parameters
    ----------
    model:
        Any ``torch.nn.Module``; left unmodified.
    example_inputs:
        A tensor or a tuple of positional arguments (tensors or pytrees of tensors).
        Shapes are fixed to these.
    example_kwargs:
        Keyword arguments, e.g. ``{"input_ids": ..., "attention_mask": ...}``.
    verify:
        Run the graph and the model on the example inputs and require the outputs to match
        within ``atol`` (relative to the output's magnitude).

    Raises
    ------
    CaptureError
        Naming the failing op or source line and the reason.

    Examples
    --------
    >>> import torch, slimfx
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> g = slimfx.capture(m, torch.randn(1, 3, 16, 16))
    >>> [i.op for i in g.layers()]
    ['aten.convolution', 'aten.batch_norm']
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture expects a torch.nn.Module, got {type(model).__name__}")
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    flat, in_spec = pytree.tree_flatten((args, kwargs))
    for i, t in enumerate(flat):
        if not isinstance(t, torch.Tensor):
            raise CaptureError(f"example input #{i} is a {type(t).__name__}; slimfx captures "
                               "tensor inputs only (bake other arguments into the model)")
    name = name or type(model).__name__

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        try:
            ep = torch.export.export(model, args, kwargs, strict=False)
            ep = ep.run_decompositions(decomposition_table())
        except Exception as e:  # torch raises many types; report them uniformly
            where = _user_frame(e)
            raise CaptureError(
                f"cannot capture {name}: {type(e).__name__}: {_first_line(e)}"
                + (f"\n  at {where}" if where else "")
                + "\n  (slimfx captures with torch.export: data-dependent Python control flow"
                  " and non-tensor outputs are the usual causes)") from e
        gm = copy.deepcopy(ep.module())  # own copies: passes must never touch the user's weights
        with torch.no_grad():
            expected = model(*args, **kwargs) if verify else None
    finally:
        for m, training in modes.items():
            m.train(training)

    _normalize(gm)
    out_spec = ep.call_spec.out_spec if getattr(ep, "call_spec", None) else None
    graph = Graph(gm, flat, in_spec=in_spec, out_spec=out_spec, name=name)
    rewrite(graph, CANONICALIZE)
    for n in gm.graph.nodes:
        if n.op == "call_function" and not is_canonical(n.target):
            raise CaptureError(f"cannot capture {name}: op {op_name(n.target)} has no "
                               "decomposition to slimfx's canonical op set" + node_context(n))
    graph.lint()
    outputs = graph.analyze()
    if verify:
        want = [t for t in pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
        if len(want) != len(outputs):
            raise CaptureError(f"captured {name} returns {len(outputs)} tensors, "
                               f"the model {len(want)}")
        for i, (a, b) in enumerate(zip(outputs, want)):
            err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
            scale = max(1.0, b.double().abs().max().item() if b.numel() else 0.0)
            if a.shape != b.shape or err > atol * scale:
                raise CaptureError(f"captured {name} does not reproduce the model: output #{i} "
                                   f"shape {tuple(a.shape)} vs {tuple(b.shape)}, max error {err:.3g}")
    return graph
