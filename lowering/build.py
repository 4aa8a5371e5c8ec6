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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import slimfx
from slimfx.ir import Graph, capture
from slimfx.runtime.model import CompiledModel, io_specs

from . import (
    cpu_schedules,
    gpu,
    legalize,  # noqa: F401  (registers the legalize-tvm pass)
    tuning,
)
from .relax import to_relax
from .targets import LoweringError, TargetInfo, resolve_target
from .tuning import TuneOptions, TuneStats

__all__ = ["compile_graph", "build_relax"]

aten = torch.ops.aten

#: ``compile(exec_mode=...)``: TVM's VM interprets the kernel sequence or runs it compiled.
EXEC_MODES = ("bytecode", "compiled")

#: Ops that keep a model out of the blocked layouts (``cpu_schedules.blocked_layout_supported``
#: tests their Relax forms): padding channels would not buy vectors there.
_NO_BLOCKED_LAYOUT_OPS = frozenset({aten.layer_norm.default, aten.group_norm.default})


def _auto_pad(graph: Graph, info: TargetInfo) -> tuple[Graph, dict[str, Any] | None]:
    """``pad-channels{multiple=<vector width>}`` where it pays (``bench/pad_channels.py``):
    the model gets blocked layouts, and either it concatenates feature maps (then one
    channel block serves every convolution: DenseNet's 24 + 12k widths all ran 4 floats
    wide) and a convolution's width is not a multiple of the vector width, or a width is
    not even a multiple of half of it (blocks of a quarter vector or less; odd widths run
    scalar code).  Widths that are multiples of half a vector are otherwise left as they
    are: MobileNetV2's 24 -> 32 ran 0.89x as fast, the extra MACs cost more than the
    wider vectors gave."""
    lanes = cpu_schedules.vector_lanes(info)  # the width the blocked layouts use
    nodes = list(graph.fx.nodes)
    if any(n.target in _NO_BLOCKED_LAYOUT_OPS for n in nodes):
        return graph, None
    widths = [graph.param(n.args[1]).shape[0] for n in nodes
              if n.target is aten.convolution.default and n.args[1].op == "get_attr"]
    concat = any(n.target is aten.cat.default for n in nodes)
    unit = lanes if concat else max(lanes // 2, 1)
    if all(w % unit == 0 for w in widths):
        return graph, None
    # A graph the pass cannot pad (it failed verification, say) is compiled as it is.
    pm = slimfx.PassManager(f"pad-channels{{multiple={lanes}}}", errors="skip")
    padded = pm.run(graph)
    rec = pm.records[0]
    if rec.status != "ok" or not rec.modified:
        return graph, None
    return padded, {"multiple": lanes, "padded": rec.stats["padded"],
                    "macs_ratio": rec.stats["macs_ratio"]}


def build_relax(mod, target: TargetInfo, *, fast: bool = True, tune: TuneOptions | None = None,
                log: Callable[[str], None] = print,
                exec_mode: str = "bytecode") -> tuple[Any, dict[str, Any]]:
    """Build a Relax module (from :func:`to_relax`) for ``target``; the one place TVM builds.

    On a CUDA target, ``fast`` builds with TVM's GPU schedules, every kernel scheduled
    (:mod:`slimfx.lowering.gpu`).  With ``fast`` (the default) on an LLVM target, the module goes through
    :func:`~slimfx.lowering.cpu_schedules.prepare` (blocked layouts, weight transforms
    lifted into ``main_transform_params``, fusion), then kernels with tuning records
    (``tune.records``, tuned first when ``tune.trials`` > 0) are built from their best
    record and all others get slimfx's hand schedules.  Otherwise TVM's default pipeline
    (plain loops) builds it.

    Returns the executable and facts for the manifest: ``transform_params`` (the name of
    the function the runtime calls once on the parameters, or None), the kernel kinds,
    and tuning statistics.
    """
    from tvm import relax

    facts: dict[str, Any] = {"transform_params": None}
    try:
        if not fast or target.kind != "llvm":
            if tune is not None and tune.trials > 0:
                raise LoweringError("tuning needs the fast lowering (fast=True) and an LLVM target")
            if fast and target.kind == "cuda":
                return gpu.build(mod, target, exec_mode=exec_mode)
            return relax.build(mod, target=target.tvm(), exec_mode=exec_mode), facts
        import tvm

        t0 = time.perf_counter()
        mod = cpu_schedules.prepare(mod, target)
        if "main_transform_params" in [gv.name_hint for gv in mod.functions]:
            facts["transform_params"] = "main_transform_params"
        if tune is not None and tune.records is not None:
            stats = tuning.tune(mod, target, tune, log=log) if tune.trials > 0 else TuneStats()
            mod, stats.applied = tuning.apply_records(mod, target, tune.records)
            facts["tuning"] = stats.as_dict()
        mod = cpu_schedules.schedule(mod, target)
        kinds = cpu_schedules.kernel_kinds(mod)
        facts["kernels"] = {k: sum(1 for v in kinds.values() if v == k) for k in sorted(set(kinds.values()))}
        facts["serial_kernels"] = len(cpu_schedules.serial_kernels(mod))
        facts["schedule_s"] = round(time.perf_counter() - t0, 3)
        mod = tvm.ir.transform.Sequential(cpu_schedules.lower_passes(target))(mod)
        return relax.build(mod, target=target.tvm(), relax_pipeline=None,
                           exec_mode=exec_mode), facts
    except LoweringError:
        raise
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
                  check: bool = True, atol: float = 1e-4, fast: bool = True, tune: int = 0,
                  records: str | Path | None = None, tune_options: TuneOptions | None = None,
                  pad_channels: bool = True, exec_mode: str = "bytecode",
                  verbose: bool = True) -> CompiledModel:
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
    fast:
        Blocked layouts and hand schedules (:mod:`slimfx.lowering.cpu_schedules`) for LLVM
        targets; ``False`` builds TVM's plain loops (slow; for comparison).
    tune:
        MetaSchedule trial budget for the model's hot kernels (0: no tuning).  Needs
        ``records``.  See :mod:`slimfx.lowering.tuning`.
    records:
        Folder of the tuning database: read (kernels with records are built from their
        best one and never tuned again) and, when tuning, written.
    tune_options:
        Full :class:`~slimfx.lowering.tuning.TuneOptions`; ``tune``/``records`` override
        its ``trials``/``records`` when given.
    pad_channels:
        With ``fast`` on an LLVM target, run ``pad-channels{multiple=<vector width>}``
        (16 floats on AVX-512) after ``pipeline`` when it pays: zero channels, verified
        lossless, so the blocked layouts get whole vectors.  It runs when the model
        concatenates feature maps (one channel block then serves every convolution) and
        a convolution's output width is not a multiple of the vector width, or when a
        width is not a multiple of half of it (odd widths otherwise run scalar code).
        DenseNet 224x224 (growth 12, every convolution 4 floats wide): 3.4-4.6x faster
        for 1.36x the MACs; a ``round_to=1`` pruned ResNet: 4.5x faster; MobileNetV2's
        24 -> 32 alone was 0.89x, so multiples of half a vector are left alone
        (``bench/pad_channels.py``, ``bench/prune_widths.py``).  What it padded is in
        ``compiled.manifest["build"]["pad_channels"]``.  ``False`` keeps the widths.
        Models with LayerNorm / GroupNorm (kept in NCHW) are never padded, and a graph
        the pass fails on is compiled as it is.
    exec_mode:
        How the virtual machine runs the model's sequence of kernel calls: ``"bytecode"``
        (interpreted; :meth:`~slimfx.runtime.CompiledModel.profile` can time each kernel)
        or ``"compiled"`` (the sequence compiled to machine code with the kernels: less
        time between kernels, which matters on small models; no per-kernel profile).
        ``bench/exec_mode.py``.
    verbose:
        Print tuning progress.
    """
    if exec_mode not in EXEC_MODES:
        raise LoweringError(f"exec_mode must be one of {', '.join(EXEC_MODES)}, got {exec_mode!r}")
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
    padded = None
    if pad_channels and fast and info.kind == "llvm":
        graph, padded = _auto_pad(graph, info)
    graph = slimfx.run_pipeline(graph, "legalize-tvm")  # verified lossless, like any pass
    expected = graph.analyze()
    t0 = time.perf_counter()
    prog = to_relax(graph, info.kind)
    import_s = time.perf_counter() - t0
    opts = tune_options or TuneOptions()
    if tune or records is not None:
        opts = TuneOptions(**{**opts.__dict__, "trials": tune or opts.trials,
                              "records": records if records is not None else opts.records,
                              "verbose": verbose})
    t0 = time.perf_counter()
    ex, facts = build_relax(prog.mod, info, fast=fast,
                            tune=opts if opts.records is not None else None,
                            log=print if verbose else (lambda _msg: None), exec_mode=exec_mode)
    build_s = time.perf_counter() - t0
    device_code = facts.pop("device_code", None) or {}  # compiled CUDA kernels, by source
    manifest = _manifest(graph, prog, info, expected)
    manifest["build"] = {"import_s": round(import_s, 3), "build_s": round(build_s, 3),
                         "fast": fast and info.kind in ("llvm", "cuda"), "exec_mode": exec_mode,
                         **({"pad_channels": padded} if padded else {}),
                         **{k: v for k, v in facts.items() if k != "transform_params"}}
    if facts["transform_params"]:
        manifest["transform_params"] = facts["transform_params"]
    compiled = CompiledModel(ex, prog.params, manifest, device_code=device_code)
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
