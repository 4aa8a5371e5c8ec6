"""Build: IR -> Relax -> a program for a target, checked against PyTorch.

>>> import torch, slimfx
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
>>> cm = slimfx.compile(m, torch.randn(1, 3, 8, 8))
>>> cm.parity["max_abs_error"] < 1e-4
True
>>> cm(torch.randn(1, 3, 8, 8)).shape
torch.Size([1, 4, 6, 6])
"""

from __future__ import annotations

import time
from typing import Any

import torch

import slimfx
from slimfx.ir import Graph, capture
from slimfx.runtime.model import CompiledModel, io_specs

from . import legalize  # noqa: F401  (registers the legalize-tvm pass)
from .relax import to_relax
from .targets import LoweringError, resolve_target

__all__ = ["compile_graph", "build_relax"]


def build_relax(mod, target):
    """``relax.build`` for a resolved target (the one place the TVM build is called)."""
    from tvm import relax

    try:
        return relax.build(mod, target=target.tvm())
    except Exception as e:  # TVM raises many error types
        raise LoweringError(f"TVM build for {target.name} failed: {type(e).__name__}: {e}") from e


def _manifest(graph: Graph, prog, target, outputs) -> dict[str, Any]:
    import tvm

    return {
        "name": graph.name,
        "inputs": io_specs(prog.input_names, graph.example_inputs),
        "outputs": io_specs([f"output{i}" for i in range(len(outputs))], outputs),
        "params": list(prog.param_names),
        "param_shapes": [list(p.shape) for p in prog.params],
        "target": dict(target.config),
        "target_name": target.name,
        "versions": {"slimfx": slimfx.__version__, "tvm": tvm.__version__,
                     "torch": torch.__version__.split("+")[0]},
        "graph": graph.summary(),
    }


def compile_graph(model: Graph | torch.nn.Module, example_inputs=None, *, target="host",
                  pipeline: str | None = None, example_kwargs: dict | None = None,
                  check: bool = True, atol: float = 1e-4) -> CompiledModel:
    """Lower and build a graph (or a model, captured first) for ``target``.

    Parameters
    ----------
    model:
        A :class:`~slimfx.ir.Graph` or an ``nn.Module`` (then ``example_inputs`` are needed).
    target:
        ``"host"``, a preset name (see :mod:`slimfx.lowering.targets`), a TVM target dict.
    pipeline:
        Passes to run before lowering, e.g. ``"fold-bn,dce"``.
    check:
        Run the built program on the example inputs and require it to match the PyTorch
        graph within ``atol`` (relative to the output magnitude).  Recorded in
        ``compiled.parity``; skipped for targets this machine cannot run.
    """
    info = resolve_target(target)
    if isinstance(model, torch.nn.Module):
        if example_inputs is None and not example_kwargs:
            raise LoweringError("compiling an nn.Module needs example_inputs")
        graph = capture(model, example_inputs if example_inputs is not None else (), example_kwargs)
    elif isinstance(model, Graph):
        graph = model
    else:
        raise LoweringError(f"compile expects a slimfx Graph or an nn.Module, got {type(model).__name__}")
    if pipeline:
        graph = slimfx.run_pipeline(graph, pipeline)
    graph = slimfx.run_pipeline(graph, "legalize-tvm")  # verified lossless, like any pass
    expected = graph.analyze()
    t0 = time.perf_counter()
    prog = to_relax(graph)
    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ex = build_relax(prog.mod, info)
    build_s = time.perf_counter() - t0
    manifest = _manifest(graph, prog, info, expected)
    manifest["build"] = {"import_s": round(import_s, 3), "build_s": round(build_s, 3)}
    compiled = CompiledModel(ex, prog.params, manifest)
    if check and info.local_device() is not None:
        got = compiled.run_numpy(*graph.example_inputs)
        worst, limit = 0.0, 0.0
        for i, (a, b) in enumerate(zip(got, expected)):
            b = b.detach().numpy()
            err = float(abs(a.astype("float64") - b.astype("float64")).max()) if b.size else 0.0
            lim = atol * max(1.0, float(abs(b).max()) if b.size else 0.0)
            if not err <= lim:
                raise LoweringError(f"compiled {graph.name} disagrees with PyTorch at output #{i}: "
                                    f"max abs error {err:.3g} > {lim:.3g} (target {info.name})")
            worst, limit = max(worst, err), max(limit, lim)
        manifest["parity"] = {"max_abs_error": worst, "tolerance": limit}
    return compiled
