"""The pass manager: verification, rollback, lossy reporting, requirements."""

import pytest
import torch
from conftest import ConvBnRelu, randomize_bn

import slimfx
from slimfx.errors import PassError, PipelineError, VerificationError
from slimfx.passes import Pass, PassManager, PassResult, register_pass

aten = torch.ops.aten


def _snapshot(graph):
    return str(graph.gm.code), {k: v.clone() for k, v in graph.gm.state_dict().items()}


def _same(graph, snap):
    code, state = snap
    assert str(graph.gm.code) == code
    now = graph.gm.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)


@register_pass("test-raise-midway", replace=True)
def raise_midway(graph):
    """Edits the graph, then fails: the edit must not survive."""
    conv = next(graph.find(aten.convolution.default))
    graph.param(conv.args[1]).data.mul_(0)  # in-place damage to a weight
    conv.args = (conv.args[0], conv.args[1], None, *conv.args[3:])
    raise slimfx.GraphError("cannot handle this conv", conv)


@register_pass("test-scale-output", replace=True)
def scale_output(graph):
    """A 'lossless' pass that is not: multiplies the output by 1.01."""
    out = graph.output_node
    (y,) = out.args[0]
    with graph.fx.inserting_before(out):
        z = graph.fx.call_function(aten.mul.Tensor, (y, 1.01))
    out.args = ((z,),)
    return True


@register_pass("test-scale-output-lossy", lossless=False, replace=True)
def scale_output_lossy(graph):
    return scale_output(graph)


@register_pass("test-noncanonical", replace=True)
def noncanonical(graph):
    out = graph.output_node
    (y,) = out.args[0]
    with graph.fx.inserting_before(out):
        z = graph.fx.call_function(torch.relu, (y,))  # a Python function, not an ATen overload
    out.args = ((z,),)
    return True


@register_pass("test-reshape-output", replace=True)
def reshape_output(graph):
    out = graph.output_node
    (y,) = out.args[0]
    with graph.fx.inserting_before(out):
        z = graph.fx.call_function(aten.view.default, (y, [-1]))
    out.args = ((z,),)
    return True


def test_raising_pass_is_rolled_back_and_names_pass_and_node(block_graph):
    snap = _snapshot(block_graph)
    with pytest.raises(PassError) as e:
        PassManager(["fold-bn", "test-raise-midway"]).run(block_graph)
    msg = str(e.value)
    assert "pass 'test-raise-midway' failed" in msg
    assert "cannot handle this conv" in msg and "at node 'convolution" in msg
    assert "module 'conv1'" in msg and "conftest.py" in msg  # the model's source line
    assert "rolled back" in msg and msg.count("at node") == 1
    _same(block_graph, snap)  # neither fold-bn's nor the failing pass's edits leaked


def test_lossless_pass_that_changes_numbers_fails_verification(block_graph):
    snap = _snapshot(block_graph)
    with pytest.raises(VerificationError, match="lossless pass changed the outputs"):
        PassManager(["test-scale-output"]).run(block_graph)
    _same(block_graph, snap)


def test_lossy_pass_reports_its_error(block_graph):
    pm = PassManager(["test-scale-output-lossy"])
    g = pm.run(block_graph)
    (rec,) = pm.records
    assert rec.status == "ok" and rec.modified and not rec.lossless
    ref = block_graph.run(*block_graph.example_inputs)[0]
    assert rec.max_abs_error == pytest.approx(0.01 * ref.abs().max().item(), rel=1e-3)
    assert rec.rel_error == pytest.approx(0.01, rel=1e-3)
    torch.testing.assert_close(g.run(*g.example_inputs)[0], ref * 1.01)


def test_lint_rejects_non_canonical_ops(block_graph):
    with pytest.raises(VerificationError, match=r"op relu is not in slimfx's canonical op set"):
        PassManager(["test-noncanonical"]).run(block_graph)


def test_output_shapes_may_not_change(block_graph):
    with pytest.raises(VerificationError, match=r"model outputs changed shape: \[\(1, 4\)\] -> \[\(4,\)\]"):
        PassManager(["test-reshape-output"]).run(block_graph)


def test_skip_mode_records_failure_and_continues(block_graph):
    pm = PassManager(["test-scale-output", "fold-bn", "dce"], errors="skip")
    g = pm.run(block_graph)
    assert [r.status for r in pm.records] == ["failed", "ok", "ok"]
    assert "lossless pass changed the outputs" in pm.records[0].error
    assert not list(g.find(aten.batch_norm.default))
    torch.testing.assert_close(g.run(*g.example_inputs), block_graph.run(*block_graph.example_inputs))


def test_running_on_a_module_leaves_it_untouched():
    model = randomize_bn(ConvBnRelu()).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = slimfx.run_pipeline(model, "fold-bn,dce", torch.randn(1, 3, 8, 8))
    assert not list(g.find(aten.batch_norm.default))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert isinstance(model.bn1, torch.nn.BatchNorm2d)


def test_unchanged_pipeline_still_returns_a_separate_graph(block_graph):
    g = slimfx.run_pipeline(block_graph, "const-fold")
    assert g is not block_graph and g.gm is not block_graph.gm


def test_requires_is_checked_before_running():
    @register_pass("test-needs-fold", requires=("fold-bn",), replace=True)
    def needs(graph):
        return False

    with pytest.raises(PipelineError, match="'test-needs-fold' requires 'fold-bn' earlier"):
        PassManager("dce,test-needs-fold")
    PassManager("fold-bn,test-needs-fold")  # fine


def test_class_pass_with_pass_result_stats(block_graph):
    @register_pass("test-count", replace=True)
    class Count(Pass):
        def run(self, graph):
            return PassResult(graph, False, {"convs": len(list(graph.find(aten.convolution.default)))})

    pm = PassManager([Count()])
    pm.run(block_graph)
    assert pm.records[0].stats == {"convs": 2} and not pm.records[0].modified


def test_bad_pass_items():
    with pytest.raises(PipelineError, match="not a pass"):
        PassManager([42])
    with pytest.raises(PipelineError, match="errors must be"):
        PassManager("dce", errors="ignore")
    with pytest.raises(PipelineError, match="needs example_inputs"):
        PassManager("dce").run(torch.nn.ReLU())


def test_pass_returning_wrong_type_is_an_error(block_graph):
    @register_pass("test-bad-return", replace=True)
    def bad(graph):
        return graph

    with pytest.raises(PassError, match="must return bool or PassResult, got Graph"):
        PassManager(["test-bad-return"]).run(block_graph)
