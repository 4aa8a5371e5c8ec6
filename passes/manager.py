"""The pass manager: runs passes, verifies each one, rolls back failures, feeds instruments.

After every pass that reports a change, the manager

1. lints the new graph (FX invariants, canonical op set, outputs keep their shapes);
2. runs it on the example inputs and compares with the graph before the pass: a lossless
   pass must match within its tolerance, a lossy pass has its error recorded;
3. on any failure (the pass raised, lint or verification failed) discards the pass's
   copy and raises :class:`~slimfx.errors.PassError` (or, with ``errors="skip"``,
   records the failure and continues from the graph before the pass).

Each pass works on its own copy, so the caller's graph (and model) are never modified.
The manager never prints: instruments (see :mod:`slimfx.passes.instruments`) do.

>>> import torch, slimfx
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
>>> pm = PassManager.from_pipeline("fold-bn,dce")
>>> g = pm.run(m, torch.randn(1, 3, 16, 16))
>>> [(r.name, r.modified, r.status) for r in pm.records]
[('fold-bn', True, 'ok'), ('dce', True, 'ok')]
>>> [i.op for i in g.layers()]
['aten.convolution']
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from slimfx.errors import GraphError, PassError, PipelineError, VerificationError
from slimfx.ir import Graph, capture

from .base import Pass, PassResult, get_pass, make_options
from .pipeline import parse_pipeline

__all__ = ["PassManager", "PassRecord", "Instrument", "run_pipeline", "output_error"]


class Instrument:
    """Hooks around passes (all optional), as in TVM's PassInstrument.

    ``should_run`` may skip a pass; the others observe.  ``run_after_pass`` receives the
    graph before and after the pass (the same object when the pass changed nothing or
    failed) and its :class:`PassRecord`.
    """

    def enter_pipeline(self, graph: Graph, passes: Sequence[Pass]) -> None: ...

    def should_run(self, graph: Graph, pass_: Pass) -> bool:
        return True

    def run_before_pass(self, graph: Graph, pass_: Pass) -> None: ...

    def run_after_pass(self, before: Graph, after: Graph, record: PassRecord) -> None: ...

    def exit_pipeline(self, graph: Graph, records: Sequence[PassRecord]) -> None: ...


@dataclass
class PassRecord:
    """What happened when one pass ran."""

    index: int
    name: str
    options: str
    status: Literal["ok", "skipped", "failed"] = "ok"
    modified: bool = False
    lossless: bool = True
    pass_s: float = 0.0  # time in the pass itself
    verify_s: float = 0.0  # lint + run + compare
    max_abs_error: float = 0.0  # vs the graph before the pass
    rel_error: float = 0.0  # ||after - before|| / ||before||, over all outputs
    stats: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def output_error(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> tuple[float, float, float]:
    """(max abs error, relative L2 error, max |want|) over all outputs."""
    max_abs, num, den, scale = 0.0, 0.0, 0.0, 0.0
    for a, b in zip(got, want):
        if not b.is_floating_point():
            if not torch.equal(a, b):
                max_abs = float("inf")
            continue
        d = (a.double() - b.double())
        if d.numel():
            max_abs = max(max_abs, d.abs().max().item())
            scale = max(scale, b.double().abs().max().item())
        num += d.pow(2).sum().item()
        den += b.double().pow(2).sum().item()
    rel = (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))
    return max_abs, rel, scale


def _as_pass(p) -> Pass:
    if isinstance(p, Pass):
        return p
    if isinstance(p, str):
        passes = parse_pipeline(p)
        if len(passes) != 1:
            raise PipelineError(f"{p!r} names {len(passes)} passes; give them as separate items")
        return passes[0]
    if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], dict):
        cls = get_pass(p[0])
        return cls(make_options(cls, p[1]))
    if isinstance(p, type) and issubclass(p, Pass):
        return p()
    if callable(p) and isinstance(getattr(p, "pass_class", None), type):
        return p.pass_class()  # a function registered with @register_pass
    raise PipelineError(f"not a pass: {p!r} (give a Pass, a registered name, or (name, options))")


class PassManager:
    """Run a pipeline of passes with verification, rollback and instruments.

    Parameters
    ----------
    passes:
        Pass instances, registered names (``"prune-channels{ratio=0.5}"`` works too),
        ``(name, {option: value})`` pairs, or a whole textual pipeline string.
    instruments:
        :class:`Instrument` objects (timing, printing, dumping, statistics).
    verify:
        Lint and numerically check every pass that changed the graph (default on).
    errors:
        ``"raise"`` (default): a failing pass raises :class:`PassError` after rollback.
        ``"skip"``: record the failure, keep the graph from before the pass, continue.
    """

    def __init__(self, passes: Iterable | str, *, instruments: Iterable[Instrument] = (),
                 verify: bool = True, errors: Literal["raise", "skip"] = "raise"):
        if isinstance(passes, str):
            self.passes = parse_pipeline(passes)
        else:
            self.passes = [_as_pass(p) for p in passes]
        if errors not in ("raise", "skip"):
            raise PipelineError(f"errors must be 'raise' or 'skip', got {errors!r}")
        self.instruments = list(instruments)
        self.verify = verify
        self.errors = errors
        self.records: list[PassRecord] = []
        self._check_requires()

    @classmethod
    def from_pipeline(cls, text: str, **kwargs) -> PassManager:
        """Build from a textual pipeline such as ``"fold-bn,dce"``."""
        return cls(parse_pipeline(text), **kwargs)

    def _check_requires(self) -> None:
        seen: set[str] = set()
        for p in self.passes:
            missing = [r for r in p.requires if r not in seen]
            if missing:
                raise PipelineError(f"pass '{p.name}' requires {', '.join(map(repr, missing))} "
                                    "earlier in the pipeline")
            seen.add(p.name)

    def run(self, graph: Graph | torch.nn.Module, example_inputs=None, example_kwargs=None) -> Graph:
        """Run the pipeline; returns a new graph (the input graph or model is not modified).

        ``graph`` may be an ``nn.Module``; it is captured with ``example_inputs`` first.
        """
        if isinstance(graph, torch.nn.Module):
            if example_inputs is None and not example_kwargs:
                raise PipelineError("running passes on an nn.Module needs example_inputs")
            graph = capture(graph, example_inputs if example_inputs is not None else (), example_kwargs)
        elif not isinstance(graph, Graph):
            raise PipelineError(f"PassManager.run expects a slimfx Graph or nn.Module, got {type(graph).__name__}")
        self.records = []
        current = graph
        current_out = current.analyze(force=True)  # weights may have changed (fine-tuning)
        out_shapes = [tuple(t.shape) for t in current_out]
        for inst in self.instruments:
            inst.enter_pipeline(current, self.passes)
        for i, p in enumerate(self.passes):
            rec = PassRecord(i, p.name, repr(p), lossless=p.lossless)
            self.records.append(rec)
            if not all(inst.should_run(current, p) for inst in self.instruments):
                rec.status = "skipped"
                for inst in self.instruments:
                    inst.run_after_pass(current, current, rec)
                continue
            for inst in self.instruments:
                inst.run_before_pass(current, p)
            try:
                after, after_out = self._run_one(p, current, current_out, out_shapes, rec)
            except PassError as e:
                rec.status, rec.error = "failed", str(e)
                for inst in self.instruments:
                    inst.run_after_pass(current, current, rec)
                if self.errors == "raise":
                    for inst in self.instruments:
                        inst.exit_pipeline(current, self.records)
                    raise
                continue
            for inst in self.instruments:
                inst.run_after_pass(current, after, rec)
            current, current_out = after, after_out
        for inst in self.instruments:
            inst.exit_pipeline(current, self.records)
        if current is graph:  # nothing changed: still hand back a graph the caller owns
            current = graph.copy()
        return current

    def _run_one(self, p: Pass, before: Graph, before_out, out_shapes, rec: PassRecord):
        work = before.copy()
        t0 = time.perf_counter()
        try:
            res = p.run(work)
        except Exception as e:  # any failure inside a pass rolls back
            node = getattr(e, "node", None)
            text = getattr(e, "message", None) if node is not None else None
            raise PassError(p.name, f"{type(e).__name__}: {text or e}", node=node, cause=e) from e
        finally:
            rec.pass_s = time.perf_counter() - t0
        if isinstance(res, PassResult):
            after, rec.modified, rec.stats = res.graph, bool(res.modified), dict(res.stats)
        elif isinstance(res, bool):
            after, rec.modified = work, res
        else:
            raise PassError(p.name, f"run() must return bool or PassResult, got {type(res).__name__}")
        if not rec.modified:
            return before, before_out
        t0 = time.perf_counter()
        try:
            after.gm.recompile()
            after_out = self._verify(p, after, before_out, out_shapes, rec)
        finally:
            rec.verify_s = time.perf_counter() - t0
        return after, after_out

    def _verify(self, p: Pass, after: Graph, before_out, out_shapes, rec: PassRecord):
        try:
            after.lint()
        except GraphError as e:
            raise VerificationError(p.name, f"the rewritten graph is malformed: {e}", cause=e) from e
        try:
            after_out = after.analyze(force=True)
        except Exception as e:
            raise VerificationError(p.name, f"the rewritten graph does not run: {type(e).__name__}: {e}",
                                    cause=e) from e
        shapes = [tuple(t.shape) for t in after_out]
        if shapes != out_shapes:
            raise VerificationError(p.name, f"model outputs changed shape: {out_shapes} -> {shapes}")
        if not self.verify:
            return after_out
        rec.max_abs_error, rec.rel_error, scale = output_error(after_out, before_out)
        limit = p.atol * max(1.0, scale)
        if p.lossless and not rec.max_abs_error <= limit:
            raise VerificationError(
                p.name, f"lossless pass changed the outputs: max abs error {rec.max_abs_error:.3g} "
                f"> tolerance {limit:.3g} (relative error {rec.rel_error:.3g})")
        if not p.lossless and not all(torch.isfinite(t).all() for t in after_out if t.is_floating_point()):
            raise VerificationError(p.name, "the rewritten graph produces non-finite outputs")
        return after_out


def run_pipeline(graph: Graph | torch.nn.Module, pipeline: str | Iterable, example_inputs=None,
                 **kwargs) -> Graph:
    """One-call form: ``run_pipeline(graph, "fold-bn,dce")`` -> new verified graph."""
    return PassManager(pipeline, **kwargs).run(graph, example_inputs)
