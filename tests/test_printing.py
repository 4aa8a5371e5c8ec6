"""IR listing, per-layer table and graph diff."""

import torch

import slimfx
from slimfx.ir import format_graph, layer_table


def test_format_graph_lists_every_op_with_types_and_paths(block_graph):
    text = format_graph(block_graph)
    assert text.startswith("graph ConvBnRelu(%x: f32[1,3,8,8]) {")
    line = next(ln for ln in text.splitlines() if "aten.convolution" in ln and "# conv2" in ln)
    assert line.strip().startswith("%convolution_1 = aten.convolution(%relu, %conv2_weight, None")
    assert line.rstrip().endswith(": f32[1,8,8,8]  # conv2")
    assert "param bn1.running_var : f32[8]" in text
    assert text.splitlines()[-2].strip() == "return (%linear,)"
    assert str(block_graph) == text


def test_layer_table_rows_and_totals(block_graph):
    lines = layer_table(block_graph).splitlines()
    assert lines[0].split() == ["#", "op", "module", "inputs", "output", "params", "MACs"]
    rows = [ln.split() for ln in lines[1:-1]]
    assert [r[2] for r in rows] == ["conv1", "bn1", "conv2", "bn2", "fc"]
    total = lines[-1].split()
    assert total[0] == "total"
    assert int(total[1].replace(",", "")) == sum(i.params for i in block_graph.layers())
    assert int(total[2].replace(",", "")) == block_graph.macs()
    every = layer_table(block_graph, all_nodes=True)
    assert "aten.relu" in every and "aten.relu" not in layer_table(block_graph)


def test_diff_of_a_pipeline(block_graph):
    after = slimfx.run_pipeline(block_graph, "fold-bn,dce")
    d = slimfx.diff(block_graph, after)
    assert sorted(d.removed) == ["batch_norm", "batch_norm_1", "convolution", "convolution_1"]
    assert len(d.added) == 2 and d.nodes_changed == 2 + 4 + len(d.changed)
    paths = [p for p, _, _ in d.modules]
    assert paths == ["bn1", "conv2", "bn2"]  # conv1 kept its params, ops and shape
    text = str(d)
    assert "params    900    844 0.938x" in text
    assert slimfx.diff(block_graph, block_graph.copy()).nodes_changed == 0


def test_summary(block_graph):
    s = block_graph.summary()
    assert s["inputs"] == ["f32[1,3,8,8]"] and s["outputs"] == ["f32[1,4]"]
    assert s["params"] == 900 and s["macs"] == block_graph.macs() == 50_720
    assert torch.Size([1, 4]) == block_graph(torch.randn(1, 3, 8, 8)).shape
