"""Built-in passes: fold-bn (exact on the zoo), dce, const-fold."""

import pytest
import torch
from conftest import randomize_bn
from torch import nn

import slimfx
from slimfx import zoo
from slimfx.passes import PassManager

aten = torch.ops.aten


@pytest.fixture(scope="module")
def zoo_graphs():
    graphs = {}
    for name in zoo.ZOO:
        torch.manual_seed(0)
        model = randomize_bn(zoo.get(name)).eval()
        graphs[name] = (model, slimfx.capture(model, torch.randn(*zoo.INPUT_SHAPES[name])))
    return graphs


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_fold_bn_exact_on_the_zoo(zoo_graphs, name):
    model, g = zoo_graphs[name]
    pm = PassManager("fold-bn,dce")
    folded = pm.run(g)
    x = torch.randn(*zoo.INPUT_SHAPES[name])
    ref = model(x)
    out = folded(x)
    scale = max(1.0, ref.abs().max().item())
    assert (out - ref).abs().max().item() <= 1e-5 * scale  # on a fresh input, not only the example
    bns_before = len(list(g.find(aten.batch_norm.default)))
    bns_after = len(list(folded.find(aten.batch_norm.default)))
    assert pm.records[0].stats["folded"] == bns_before - bns_after
    if name == "densenet":
        # Pre-activation BNs (BN -> ReLU -> conv) have no conv before them: only the BNs
        # right after a conv fold.
        assert 0 < bns_after < bns_before
    elif name != "vit":
        assert bns_before > 0 and bns_after == 0
    # Storage really shrinks: the BN parameters and statistics are gone.
    stored = sum(v.numel() for v in folded.gm.state_dict().values())
    assert stored < sum(v.numel() for v in g.gm.state_dict().values()) or bns_before == 0


def test_fold_bn_linear_and_shared_conv_output():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 6)
            self.bn1d = nn.BatchNorm1d(6)

        def forward(self, x):
            y = self.conv(x)
            z = self.bn(y) + y  # conv output has two users: the BN cannot be folded into it
            return self.bn1d(self.fc(z.mean((2, 3))))

    m = randomize_bn(M()).eval()
    g = slimfx.run_pipeline(m, "fold-bn,dce", torch.randn(2, 3, 8, 8))
    bns = list(g.find(aten.batch_norm.default))
    assert [n.meta["module_path"] for n in bns] == ["bn"]  # bn1d folded into fc, bn kept
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(g(x), m(x), atol=1e-5, rtol=1e-5)


def test_fold_bn_conv_without_bias_gets_one(block_graph):
    g = slimfx.run_pipeline(block_graph, "fold-bn,dce")
    conv2 = next(n for n in g.find(aten.convolution.default) if n.meta["module_path"] == "conv2")
    assert conv2.args[2] is not None and g.param(conv2.args[2]).shape == (8,)
    assert "bn2.running_mean" not in g.gm.state_dict()


def test_dce_removes_dead_ops_and_params(block_graph):
    g = block_graph.copy()
    conv = next(g.find(aten.convolution.default))
    with g.fx.inserting_after(conv):
        g.fx.call_function(aten.sigmoid.default, (conv,))  # result unused
    extra = g.add_param("unused.weight", torch.randn(100), before=conv)  # read by nothing
    assert extra.users == {}
    pm = PassManager("dce")
    out = pm.run(g)
    assert not list(out.find(aten.sigmoid.default))
    assert "unused.weight" not in out.gm.state_dict()
    # unused.weight, plus the two BNs' num_batches_tracked counters that nothing reads
    assert pm.records[0].stats == {"nodes_removed": 2, "params_removed": 3}
    assert len(list(g.find(aten.sigmoid.default))) == 1  # the input graph kept its node


def test_const_fold_folds_weight_only_subgraphs_and_guards_growth():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 16))
            self.b = nn.Parameter(torch.randn(1, 16))

        def forward(self, x):
            w = (self.w * 0.5).t()  # weight-only: folded into one (16, 8) tensor
            big = self.b.expand(4096, 16)  # folding would store 64K elements for 16
            return x @ w, big[: x.shape[0]] + 0 * x.sum()

    m = M()
    x = torch.randn(4096, 16)
    pm = PassManager("const-fold,dce")
    g = pm.run(m, (x,))
    assert pm.records[0].stats == {"folded": 1, "skipped_growth": 1}
    ops = {str(n.target) for n in g.find()}
    assert "aten.t.default" not in ops and "aten.mul.Tensor" in ops  # 0 * x.sum() stays
    assert "aten.expand.default" in ops
    torch.testing.assert_close(g(x)[0], m(x)[0])


def test_const_fold_options_are_checked():
    with pytest.raises(slimfx.PipelineError, match="max_growth must be > 0"):
        PassManager("const-fold{max_growth=0}")
