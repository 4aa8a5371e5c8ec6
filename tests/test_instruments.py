"""Each instrument's output."""

import io

import torch

import slimfx
from slimfx.passes import (
    DumpIR,
    PassManager,
    PrintAfter,
    PrintAfterChange,
    PrintBefore,
    SkipPasses,
    Statistics,
    Timing,
)

aten = torch.ops.aten


def test_timing_table(block_graph):
    buf = io.StringIO()
    t = Timing(file=buf)
    PassManager("fold-bn,dce,const-fold", instruments=[t]).run(block_graph)
    lines = buf.getvalue().splitlines()
    assert lines[0].split() == ["pass", "status", "pass", "ms", "verify", "ms"]
    assert [ln.split()[0] for ln in lines[1:]] == ["fold-bn", "dce", "const-fold", "total"]
    assert [r[0] for r in t.rows] == ["fold-bn", "dce", "const-fold"]
    assert all(p >= 0 and v >= 0 for _, p, v in t.rows)
    assert t.rows[2][2] == 0.0  # const-fold changed nothing: no verification run


def test_print_before_and_after_select_passes(block_graph):
    before, after = io.StringIO(), io.StringIO()
    PassManager("fold-bn,dce", instruments=[PrintBefore(["fold-bn"], file=before),
                                            PrintAfter(["fold-bn"], file=after)]).run(block_graph)
    b, a = before.getvalue(), after.getvalue()
    assert b.startswith("// ----- IR before fold-bn -----") and b.count("// -----") == 1
    assert "aten.batch_norm" in b and "aten.batch_norm" not in a
    assert a.startswith("// ----- IR after fold-bn -----")


def test_print_after_change_only_prints_changes(block_graph):
    buf = io.StringIO()
    PassManager("const-fold,fold-bn", instruments=[PrintAfterChange(file=buf)]).run(block_graph)
    text = buf.getvalue()
    assert "IR after fold-bn (changed)" in text and "const-fold" not in text
    assert "what fold-bn changed" in text and "nodes: 2 added, 4 removed" in text


def test_dump_ir_writes_one_file_per_pass(block_graph, tmp_path):
    PassManager("fold-bn,const-fold,dce", instruments=[DumpIR(tmp_path / "ir")]).run(block_graph)
    files = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert files == ["00-input.txt", "01-fold-bn.txt", "02-const-fold-unchanged.txt", "03-dce.txt",
                     "pipeline.txt"]
    assert "aten.batch_norm" in (tmp_path / "ir" / "00-input.txt").read_text()
    assert "aten.batch_norm" not in (tmp_path / "ir" / "01-fold-bn.txt").read_text()
    assert "status=ok modified=True" in (tmp_path / "ir" / "pipeline.txt").read_text()


def test_statistics_rows(block_graph):
    buf = io.StringIO()
    s = Statistics(file=buf)
    PassManager("fold-bn,dce", instruments=[s]).run(block_graph)
    fold, dce = s.rows
    bn_params = 2 * 4 * 8  # two BNs: weight, bias, running mean and var of 8 channels
    assert fold["params_before"] - fold["params_after"] == bn_params - 8  # conv2 gained a bias
    assert fold["macs_before"] == fold["macs_after"] == block_graph.macs()
    assert (fold["added"], fold["removed"]) == (2, 4)  # 2 new convs; 2 convs + 2 BNs gone
    assert fold["stats"] == {"folded": 2} and fold["max_abs_error"] < 1e-5
    assert dce["stats"]["params_removed"] > 0
    assert "fold-bn: folded=2" in buf.getvalue()


def test_skip_passes_via_should_run(block_graph):
    pm = PassManager("fold-bn,dce", instruments=[SkipPasses(["fold-bn"])])
    g = pm.run(block_graph)
    assert [r.status for r in pm.records] == ["skipped", "ok"]
    assert len(list(g.find(aten.batch_norm.default))) == 2


def test_instruments_see_failed_passes(block_graph):
    seen = []

    class Spy(slimfx.passes.Instrument):
        def run_after_pass(self, before, after, record):
            seen.append((record.name, record.status, before is after))

    @slimfx.register_pass("test-boom", replace=True)
    def boom(graph):
        raise RuntimeError("boom")

    pm = PassManager("fold-bn,test-boom", instruments=[Spy()], errors="skip")
    pm.run(block_graph)
    assert seen == [("fold-bn", "ok", False), ("test-boom", "failed", True)]
