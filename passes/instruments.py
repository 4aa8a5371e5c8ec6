"""Ready-made instruments: timing, IR printing, dumping to a folder, statistics.

Each writes to ``file`` (``sys.stdout`` by default) or a folder; the pass manager itself
never prints.  ``passes`` (a collection of pass names) limits the printing instruments to
those passes.

>>> import io, torch, slimfx
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
>>> buf = io.StringIO()
>>> g = slimfx.run_pipeline(m, "fold-bn,dce", torch.randn(1, 3, 8, 8),
...                         instruments=[Statistics(file=buf)])
>>> print(buf.getvalue().splitlines()[0])
pass    status modified params before params after MACs before MACs after nodes +/-/~ max abs err
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TextIO

from slimfx.ir import Graph, diff, format_graph, layer_table
from slimfx.ir.printing import format_table

from .base import Pass
from .manager import Instrument, PassRecord

__all__ = ["Timing", "PrintBefore", "PrintAfter", "PrintAfterChange", "DumpIR", "Statistics",
           "SkipPasses"]


class _Printer(Instrument):
    def __init__(self, passes: Collection[str] | None = None, file: TextIO | None = None):
        self.passes = set(passes) if passes is not None else None
        self.file = file

    def _out(self) -> TextIO:
        return self.file if self.file is not None else sys.stdout

    def _selected(self, name: str) -> bool:
        return self.passes is None or name in self.passes


class Timing(_Printer):
    """Per-pass wall time (pass and verification separately), printed when the pipeline ends.

    The rows stay available as ``timing.rows`` after the run.
    """

    def __init__(self, file: TextIO | None = None):
        super().__init__(None, file)
        self.rows: list[tuple[str, float, float]] = []

    def exit_pipeline(self, graph: Graph, records: Sequence[PassRecord]) -> None:
        self.rows = [(r.name, r.pass_s, r.verify_s) for r in records]
        total_p = sum(r.pass_s for r in records)
        total_v = sum(r.verify_s for r in records)
        rows = [[r.name, r.status, f"{r.pass_s * 1e3:.1f}", f"{r.verify_s * 1e3:.1f}"] for r in records]
        rows.append(["total", "", f"{total_p * 1e3:.1f}", f"{total_v * 1e3:.1f}"])
        print(format_table(["pass", "status", "pass ms", "verify ms"], rows, right={2, 3}),
              file=self._out())


class PrintBefore(_Printer):
    """Print the IR before each (selected) pass."""

    def run_before_pass(self, graph: Graph, pass_: Pass) -> None:
        if self._selected(pass_.name):
            print(f"// ----- IR before {pass_!r} -----\n{format_graph(graph)}", file=self._out())


class PrintAfter(_Printer):
    """Print the IR after each (selected) pass."""

    def run_after_pass(self, before: Graph, after: Graph, record: PassRecord) -> None:
        if self._selected(record.name) and record.status == "ok":
            print(f"// ----- IR after {record.options} -----\n{format_graph(after)}", file=self._out())


class PrintAfterChange(_Printer):
    """Print the IR after a pass only if it changed the graph, followed by the diff."""

    def run_after_pass(self, before: Graph, after: Graph, record: PassRecord) -> None:
        if self._selected(record.name) and record.status == "ok" and record.modified:
            print(f"// ----- IR after {record.options} (changed) -----\n{format_graph(after)}\n"
                  f"// ----- what {record.name} changed -----\n{diff(before, after)}", file=self._out())


class DumpIR(Instrument):
    """Write the IR and layer table after every pass into ``folder``.

    Files: ``00-input.txt``, then ``NN-<pass>.txt`` per pass that ran (``-unchanged`` or
    ``-failed`` is appended when it did not change the graph), and ``pipeline.txt`` with
    the pass records.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def _write(self, name: str, graph: Graph, header: str) -> None:
        text = f"// {header}\n{format_graph(graph)}\n\n{layer_table(graph)}\n"
        (self.folder / name).write_text(text)

    def enter_pipeline(self, graph: Graph, passes: Sequence[Pass]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write("00-input.txt", graph, f"input graph {graph.name}")

    def run_after_pass(self, before: Graph, after: Graph, record: PassRecord) -> None:
        if record.status == "skipped":
            return
        suffix = "" if record.modified else ("-failed" if record.status == "failed" else "-unchanged")
        self._write(f"{record.index + 1:02d}-{record.name}{suffix}.txt", after,
                    f"after {record.options}: {record.status}"
                    + (f"\n// {record.error}" if record.error else ""))

    def exit_pipeline(self, graph: Graph, records: Sequence[PassRecord]) -> None:
        lines = [f"{r.index + 1:02d} {r.options} status={r.status} modified={r.modified} "
                 f"pass_ms={r.pass_s * 1e3:.1f} verify_ms={r.verify_s * 1e3:.1f} "
                 f"max_abs_error={r.max_abs_error:.3g} stats={r.stats}" for r in records]
        (self.folder / "pipeline.txt").write_text("\n".join(lines) + "\n")


class Statistics(_Printer):
    """Per pass: params and MACs before/after, nodes added/removed/changed, error, pass stats.

    Rows are kept as ``statistics.rows`` (dicts) and printed when the pipeline ends.
    """

    def __init__(self, file: TextIO | None = None):
        super().__init__(None, file)
        self.rows: list[dict] = []

    def enter_pipeline(self, graph: Graph, passes: Sequence[Pass]) -> None:
        self.rows = []

    def run_after_pass(self, before: Graph, after: Graph, record: PassRecord) -> None:
        d = diff(before, after)
        self.rows.append({
            "pass": record.name, "status": record.status, "modified": record.modified,
            "params_before": d.before["params"], "params_after": d.after["params"],
            "macs_before": d.before["macs"], "macs_after": d.after["macs"],
            "added": len(d.added), "removed": len(d.removed), "changed": len(d.changed),
            "max_abs_error": record.max_abs_error, "rel_error": record.rel_error,
            "stats": dict(record.stats),
        })

    def exit_pipeline(self, graph: Graph, records: Sequence[PassRecord]) -> None:
        table = [[r["pass"], r["status"], r["modified"], f"{r['params_before']:,}",
                  f"{r['params_after']:,}", f"{r['macs_before']:,}", f"{r['macs_after']:,}",
                  f"{r['added']}/{r['removed']}/{r['changed']}", f"{r['max_abs_error']:.2g}"]
                 for r in self.rows]
        lines = [format_table(["pass", "status", "modified", "params before", "params after",
                               "MACs before", "MACs after", "nodes +/-/~", "max abs err"],
                              table, right={3, 4, 5, 6})]
        for r in self.rows:
            if r["stats"]:
                lines.append(f"{r['pass']}: " + ", ".join(f"{k}={v}" for k, v in r["stats"].items()))
        print("\n".join(lines), file=self._out())


class SkipPasses(Instrument):
    """Skip the named passes (an example of ``should_run``; the record says 'skipped')."""

    def __init__(self, passes: Collection[str]):
        self.passes = set(passes)

    def should_run(self, graph: Graph, pass_: Pass) -> bool:
        return pass_.name not in self.passes
