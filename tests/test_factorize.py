"""factorize: exact at full rank (SVD and Tucker-2, conv and linear), ranks by energy and
ratio, what is skipped and why, ranks as prunable channel groups (also on a blocked
residual trunk), and the factorized, rank-pruned graph compiled."""

import math

import pytest
import torch
from torch import nn

import slimfx
from slimfx.errors import PassError, PipelineError
from slimfx.ir.channels import ChannelAnalysis
from slimfx.passes import PassManager
from slimfx.passes.factorize import Factorize, FactorizeOptions, svd_factors, tucker2_factors
from slimfx.passes.prune import ChannelPruning, PruneOptions

aten = torch.ops.aten


def _run(graph, **opts):
    pm = PassManager([Factorize(FactorizeOptions(**opts))])
    out = pm.run(graph)
    return out, pm.records[0]


def _weights(g, path):
    """Weight shapes of the layers whose module path is ``path`` or under it ("": all)."""
    return [tuple(g.param(n.args[1]).shape) for n in g.find()
            if n.target in (aten.convolution.default, aten.linear.default)
            and (not path or n.meta.get("module_path") == path
                 or n.meta.get("module_path", "").startswith(path + "."))]


class Mixed(nn.Module):
    """A strided, padded, dilated conv with bias; a 1-D conv; a linear on a 3-D tensor."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(6, 12, 3, stride=2, padding=2, dilation=2)
        self.b = nn.Conv1d(12, 10, 5, padding=2)
        self.fc = nn.Linear(10, 7)

    def forward(self, x):
        y = torch.relu(self.a(x))            # (1, 12, 5, 5)
        z = self.b(y.flatten(2))             # (1, 10, 25)
        return self.fc(z.transpose(1, 2))    # (1, 25, 7)


@pytest.mark.parametrize("form", ["svd", "tucker2"])
def test_full_rank_reproduces_every_layer(form):
    torch.manual_seed(0)
    m = Mixed().eval()
    x = torch.randn(1, 6, 9, 9)
    g = slimfx.capture(m, x)
    f, rec = _run(g, form=form)
    assert rec.status == "ok" and rec.lossless and rec.max_abs_error <= 1e-4
    assert rec.stats["factorized"] == 3
    torch.testing.assert_close(f(x), m(x), atol=1e-5, rtol=1e-5)
    if form == "svd":  # k x k Cin -> R, 1 x 1 R -> Cout, R = min(Cout, Cin*k*k)
        assert _weights(f, "a") == [(12, 6, 3, 3), (12, 12, 1, 1)]
    else:  # 1 x 1 Cin -> R1, k x k R1 -> R2, 1 x 1 R2 -> Cout
        assert _weights(f, "a") == [(6, 6, 1, 1), (12, 6, 3, 3), (12, 12, 1, 1)]
    assert _weights(f, "b")[-1] == (10, 10, 1)
    assert _weights(f, "fc") == [(7, 10), (7, 7)]
    names = [n.meta["module_path"] for n in f.find() if n.target is aten.linear.default]
    assert names == ["fc.f0", "fc.f1"]
    assert not any(n.startswith("a.weight") for n, _ in f.gm.named_parameters())  # old weight gone


def test_truncated_rank_by_energy_and_ratio_reports_its_error():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 48, 3, padding=1)
    x = torch.randn(1, 32, 8, 8)
    g = slimfx.capture(conv.eval(), x)
    s = torch.linalg.svdvals(conv.weight.detach().double().reshape(48, -1))
    energy = (s ** 2).cumsum(0) / (s ** 2).sum()
    want = int((energy < 0.8).sum()) + 1
    f, rec = _run(g, rank="energy", energy=0.8)
    assert not rec.lossless and rec.status == "ok" and rec.max_abs_error > 0
    layer = rec.stats["layers"][0]
    assert layer["rank"] == [want] and layer["full_rank"] == [48]
    tail = math.sqrt(float((s[want:] ** 2).sum() / (s ** 2).sum()))
    assert layer["weight_error"] == pytest.approx(tail, abs=1e-6)
    assert _weights(f, "")[0] == (want, 32, 3, 3)
    # the output error matches the weight error's order of magnitude (same input)
    with torch.no_grad():
        rel = float((f(x) - conv(x)).norm() / (conv(x) - conv.bias[:, None, None]).norm())
    assert 0.2 * tail < rel < 2 * tail
    f, rec = _run(g, rank="ratio", ratio=0.3, round_to=8)
    assert rec.stats["layers"][0]["rank"] == [16]  # ceil(0.3 * 48) = 15, rounded up to 16


def test_layers_that_would_not_get_cheaper_are_skipped_and_listed():
    m = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                      nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1, groups=4),
                      nn.ConvTranspose2d(64, 8, 2, stride=2))
    x = torch.randn(1, 3, 8, 8)
    g = slimfx.capture(m.eval(), x)
    f, rec = _run(g, rank="ratio", ratio=0.5)
    skipped = rec.stats["skipped"]
    assert "grouped" in skipped["4"] and "transposed" in skipped["5"]
    # per output pixel: conv 0 at rank 14 costs 14 * (27 + 64) = 1274 < 27 * 64 = 1728;
    # conv 2 at rank 32 costs 32 * (576 + 64) = 20480 < 576 * 64 = 36864
    assert {d["layer"] for d in rec.stats["layers"]} == {"0", "2"}
    f, rec = _run(g, rank="ratio", ratio=0.9)  # 58 * (576 + 64) > 576 * 64: dearer
    assert "2" in rec.stats["skipped"] and "break-even rank 57.6" in rec.stats["skipped"]["2"]
    f, rec = _run(g, rank="full", exclude=("0",))
    assert rec.stats["skipped"]["0"] == "excluded" and rec.stats["macs_ratio"] > 1  # full rank costs more


def test_options_are_checked_by_name():
    with pytest.raises(PipelineError, match="energy must be in"):
        PassManager("factorize{rank=energy,energy=0}")
    with pytest.raises(PipelineError, match="form"):
        PassManager("factorize{form=cp}")


def test_factor_maths():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    a, b, s, err = svd_factors(w)
    assert err == 0 and torch.allclose(torch.einsum("or,r...->o...", b, a), w, atol=1e-5)
    # the balanced split: rank channel r has norm sqrt(s_r) in both factors
    torch.testing.assert_close(a.reshape(8, -1).norm(dim=1).double(), s.sqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(b.norm(dim=0).double(), s.sqrt(), rtol=1e-5, atol=0)
    first, core, last, _, _, err = tucker2_factors(w, 2, 3)
    assert first.shape == (2, 4, 1, 1) and core.shape == (3, 2, 3, 3) and last.shape == (8, 3, 1, 1)
    assert 0 < err < 1


def test_rank_pruning_with_l2_is_the_best_low_rank_approximation():
    """Pruning the rank group by weight norm keeps the largest singular values: the result
    is the truncated SVD (Eckart-Young optimal), whatever layer it sits in."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1, bias=False)
    x = torch.randn(1, 16, 6, 6)
    g = slimfx.capture(conv.eval(), x)
    f = slimfx.run_pipeline(g, "factorize")
    pm = PassManager([ChannelPruning(PruneOptions(ratio=0.5, criterion="l2", round_to=1,
                                                  normalize="none"))])
    p = pm.run(f)
    kept = _weights(p, "")
    assert kept == [(12, 16, 3, 3), (24, 12, 1, 1)]
    w = conv.weight.detach()
    a, b, s, err = svd_factors(w, 12)
    approx = torch.einsum("or,r...->o...", b, a)
    ref = torch.nn.functional.conv2d(x, approx, padding=1)
    torch.testing.assert_close(p(x), ref, atol=1e-5, rtol=1e-4)


class BlockedTrunk(nn.Module):
    """A residual block on the model input: conv b writes into the trunk, whose channels
    are fixed by the input and the output, so channel pruning cannot narrow b."""

    def __init__(self, c=32):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


def test_ranks_prune_on_a_blocked_residual_trunk():
    torch.manual_seed(0)
    m = BlockedTrunk().eval()
    x = torch.randn(1, 32, 8, 8)
    g = slimfx.capture(m, x)
    # channel pruning alone: only a's outputs (= b's inputs) can go
    ca = ChannelAnalysis(g)
    w_b = next(n.args[1] for n in g.find(aten.convolution.default) if n.meta["module_path"] == "b")
    assert not any(ca.set_of(w_b, 0, i) in ca.prunable for i in range(32))
    f = slimfx.run_pipeline(g, "factorize")
    ca = ChannelAnalysis(f)
    w_f0 = next(n.args[1] for n in f.find(aten.convolution.default) if n.meta["module_path"] == "b.f0")
    assert all(ca.set_of(w_f0, 0, i) in ca.prunable for i in range(32))
    group = next(grp for grp in ca.groups() if ca.set_of(w_f0, 0, 0) in grp.sets)
    assert "b.f0" in ca.explain(group) and "b.f1" in ca.explain(group)
    alone = slimfx.run_pipeline(g, "prune-channels{macs=0.4,round_to=8}")
    ranked = slimfx.run_pipeline(f, f"prune-channels{{macs={0.4 * g.macs() / f.macs():.4f},round_to=8}}")
    assert _weights(alone, "a")[0][0] < 32 and _weights(alone, "b")[0][0] == 32  # only a narrows
    assert ranked.macs() <= 0.4 * g.macs()
    assert _weights(ranked, "b")[0][0] < 32  # b's rank was pruned; its output stays 32 wide
    assert ranked(x).shape == m(x).shape


def test_factorize_then_prune_compiles_with_parity():
    from slimfx import zoo

    torch.manual_seed(0)
    m = zoo.get("small_resnet").eval()
    x = torch.randn(1, 3, 16, 16)
    g = slimfx.capture(m, x)
    small = slimfx.run_pipeline(g, "fold-bn,factorize{round_to=8},prune-channels{macs=0.4,round_to=8},dce")
    assert small.macs() < 0.5 * g.macs()
    cm = slimfx.compile(small)
    torch.testing.assert_close(cm(x), small(x), atol=1e-4, rtol=1e-4)


def test_prune_only_the_ranks():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    x = torch.randn(1, 8, 6, 6)
    f = slimfx.run_pipeline(slimfx.capture(m.eval(), x), "factorize")
    p = slimfx.run_pipeline(f, "prune-channels{ratio=0.5,strategy=uniform,only=[*.f0]}")
    # the ranks shrink (conv 0: full rank min(32, 72) = 32 -> 16); the 32 channels between
    # the two original layers stay
    assert _weights(p, "0") == [(16, 8, 3, 3), (32, 16, 1, 1)]
    assert _weights(p, "2") == [(16, 32, 3, 3), (32, 16, 1, 1)]
    with pytest.raises(PassError, match=r"matches no prunable group.*0\.f1"):
        slimfx.run_pipeline(f, "prune-channels{ratio=0.5,only=[head*]}")
