"""Tuning with MetaSchedule, records kept on disk and reused by later builds.

``slimfx.compile(model, x, tune=256, records="tuning/")`` tunes the model's hot kernels
(blocked convolutions, depthwise convolutions, matmuls) for ``256`` measured trials in
all, and keeps every measurement in a MetaSchedule JSON database in ``tuning/``.  A later
build with the same ``records`` folder looks its kernels up there first: a kernel that
has records is never tuned again, so rebuilding a tuned model does no tuning (seconds,
not minutes); ``tune=0`` with ``records`` only applies what is there.  One folder can
hold the records of many models and targets (records are keyed on the exact kernel and
the target).

Before tuning a kernel, its hand schedule (:mod:`slimfx.lowering.cpu_schedules`) is
measured and committed to the database as a record like any other, so a tuned schedule
replaces it only where it measured faster (up to measurement noise).
Kernels without records keep their hand schedule.

Options (:class:`TuneOptions`): ``trials`` (the global budget), ``trials_per_task``
(default: the budget spread over the tasks, at least one round each), ``trials_per_iter``
(candidates measured per round), ``kernels`` (which kernel kinds to tune), ``seed``,
``strategy`` (``"evolutionary"``, cost-model guided; ``"replay-trace"``, random samples,
cheap for tiny budgets),
``timeout_s`` (per candidate build/run) and ``verbose`` (progress on stdout).

Tuning and applying start from the same :func:`~slimfx.lowering.cpu_schedules.prepare`
output, so the records match (TVM keys them on the kernels' structure).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cpu_schedules import hand_schedule, kernel_kind
from .targets import LoweringError, TargetInfo

__all__ = ["TuneOptions", "TuneStats", "tune", "apply_records", "tunable_tasks"]


@dataclass(frozen=True)
class TuneOptions:
    """How to tune.  ``records`` is the database folder (created when missing)."""

    trials: int = 0
    records: str | Path | None = None
    trials_per_task: int | None = None
    trials_per_iter: int = 32
    kernels: tuple[str, ...] = ("conv", "dwconv", "matmul")
    seed: int | None = 0
    strategy: str = "evolutionary"
    timeout_s: float = 60.0
    verbose: bool = True

    def __post_init__(self) -> None:
        if self.trials < 0:
            raise LoweringError(f"tune: the trial budget must be >= 0, got {self.trials}")
        if self.trials > 0 and self.records is None:
            raise LoweringError("tune: tuning needs a records folder (records='dir') to keep "
                                "its results in")


@dataclass
class TuneStats:
    """What a tuning run did (recorded in the manifest under ``build.tuning``)."""

    tasks: int = 0  # tunable kernels in the model
    cached: int = 0  # of them, already in the records
    tuned: int = 0  # tuned in this run
    trials: int = 0  # budget spent in this run
    seconds: float = 0.0
    applied: int = 0  # kernels built from records
    names: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "cached": self.cached, "tuned": self.tuned,
                "trials": self.trials, "seconds": round(self.seconds, 2),
                "applied": self.applied}


# --------------------------------------------------------------------------- TVM quirks
def _frame_infos(frame) -> list:
    out = []
    while frame is not None:
        code = frame.f_code
        out.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name,
                                     None, None, positions=None))
        frame = frame.f_back
    return out


@contextlib.contextmanager
def _fast_tensor_intrin_import() -> Iterator[None]:
    """Import ``tvm.s_tir.tensor_intrin`` (which MetaSchedule imports) in seconds.

    It parses hundreds of TVMScript functions, each calling ``inspect.stack()``, which
    scans every loaded module per frame: 30-300 s in a process that has torch loaded.
    Frames without source context are enough for the parser.  The CUDA intrinsics are
    not loaded (slimfx tunes CPU targets): a stub module stands in for them.
    """
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        yield
        return
    stack, outer = inspect.stack, inspect.getouterframes
    inspect.stack = lambda context=1: _frame_infos(sys._getframe(1))  # noqa: ARG005
    inspect.getouterframes = lambda frame, context=1: _frame_infos(frame)  # noqa: ARG005
    name = "tvm.s_tir.tensor_intrin.cuda"
    sys.modules.setdefault(name, types.ModuleType(name, "CUDA intrinsics (not loaded by slimfx)"))
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
        yield
    finally:
        inspect.stack, inspect.getouterframes = stack, outer


def _ms_build(mod, target, _params):
    """MetaSchedule's default build without importing the tensor intrinsics in each worker
    (builder workers are fresh processes; that import alone overran the build timeout)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


@contextlib.contextmanager
def _progress(verbose: bool) -> Iterator[None]:
    """MetaSchedule prints its per-round task table (INFO) when verbose; else only warnings."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    old = logger.level
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)


# --------------------------------------------------------------------------- tasks
def tunable_tasks(mod, info: TargetInfo, kernels: tuple[str, ...]) -> list:
    """MetaSchedule's extracted tasks of ``mod`` whose kernel kind is in ``kernels``."""
    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(mod, info.tvm())
    return [t for t in tasks if kernel_kind(t.dispatched[0]["main"]) in kernels]


def _database(records: str | Path):
    from tvm.s_tir import meta_schedule as ms

    folder = Path(records)
    folder.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(folder), module_equality="structural")


def _measure_ms(func, info: TargetInfo) -> float:
    import numpy as np
    import tvm
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    lib = tvm.compile(tvm.IRModule({"main": func}), target=info.tvm())
    args = [tvm.runtime.tensor(np.random.default_rng(0).random(
        [int(s) for s in a.shape]).astype(a.dtype)) for a in ArgInfo.from_prim_func(func)]
    timer = lib.mod.time_evaluator("main", tvm.cpu(), number=3, repeat=1, min_repeat_ms=100)
    return float(timer(*args).mean)


def _commit_hand_schedule(db, task, info: TargetInfo) -> None:
    """Record the hand schedule of ``task`` with its measured time (the bar to beat)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    mod = task.dispatched[0]
    sch = hand_schedule(mod["main"], info)
    secs = _measure_ms(sch.mod["main"], info)
    workload = db.commit_workload(mod)
    db.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, workload, [tvm.tirx.FloatImm("float32", secs)], info.tvm(),
        ArgInfo.from_prim_func(mod["main"])))


def tune(mod, info: TargetInfo, options: TuneOptions,
         log: Callable[[str], None] = print) -> TuneStats:
    """Tune the kernels of ``mod`` (from ``prepare``) that have no records yet."""
    from tvm.s_tir import meta_schedule as ms

    if info.kind != "llvm":
        raise LoweringError(f"tuning supports LLVM (CPU) targets, not {info.kind}")
    if info.num_cores < 1:
        raise LoweringError("tuning needs 'num-cores' in the target")
    stats = TuneStats()
    t0 = time.perf_counter()
    db = _database(options.records)
    tasks = tunable_tasks(mod, info, options.kernels)
    stats.tasks = len(tasks)
    pending = [t for t in tasks if not db.has_workload(t.dispatched[0])]
    stats.cached = stats.tasks - len(pending)
    if not pending or options.trials <= 0:
        stats.seconds = time.perf_counter() - t0
        return stats
    per_task = options.trials_per_task or max(
        options.trials_per_iter, math.ceil(options.trials / len(pending)))
    budget = min(options.trials, per_task * len(pending))
    per_iter = min(options.trials_per_iter, per_task, budget)
    log(f"tuning {len(pending)} kernels ({stats.cached} already in {options.records}): "
        f"{budget} trials, up to {per_task} per kernel, {per_iter} per round")
    with _fast_tensor_intrin_import():
        for t in pending:
            _commit_hand_schedule(db, t, info)
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            pending, work_dir=str(options.records), seed=options.seed, strategy=options.strategy,
            num_threads=info.num_cores)
        with _progress(options.verbose):
            ms.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=str(options.records),
                max_trials_global=budget, max_trials_per_task=per_task,
                num_trials_per_iter=per_iter,
                builder=ms.builder.LocalBuilder(f_build=_ms_build, timeout_sec=options.timeout_s,
                                                max_workers=info.num_cores),
                runner=ms.runner.LocalRunner(timeout_sec=options.timeout_s),
                database=db)
    stats.tuned, stats.trials = len(pending), budget
    stats.names = [t.task_name for t in pending]
    stats.seconds = time.perf_counter() - t0
    log(f"tuned {len(pending)} kernels in {stats.seconds:.0f} s")
    return stats


def apply_records(mod, info: TargetInfo, records: str | Path):
    """``mod`` with every kernel that has records in ``records`` built from its best one.

    Returns ``(mod, n_applied)``; kernels without records are left unscheduled.
    """
    from tvm import relax, tirx
    from tvm.s_tir import meta_schedule as ms

    if not Path(records).is_dir():
        return mod, 0
    db = ms.database.JSONDatabase(work_dir=str(records), module_equality="structural")
    with info.tvm(), db:
        out = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    def scheduled(m) -> set[str]:
        return {gv.name_hint for gv, f in m.functions.items() if isinstance(f, tirx.PrimFunc)
                and f.attrs and f.attrs.get("tirx.is_scheduled")}

    return out, len(scheduled(out) - scheduled(mod))
