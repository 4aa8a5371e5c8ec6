"""pad-channels: zero channels up to a multiple of 16, the same function (verified by the
pass manager and here), shape constants rewritten, unsafe groups left alone with a reason."""

import pytest
import torch
from conftest import randomize_bn
from torch import nn

import slimfx
from slimfx.errors import PipelineError
from slimfx.passes import PassManager
from slimfx.passes.pad_channels import ChannelPadding, PadOptions

aten = torch.ops.aten


def _pad(model, x, **opts):
    torch.manual_seed(0)
    model = randomize_bn(model).eval()
    g = slimfx.capture(model, x)
    pm = PassManager([ChannelPadding(PadOptions(**opts))])
    out = pm.run(g)
    rec = pm.records[0]
    assert rec.status == "ok" and rec.lossless
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=1e-5)
    return g, out, rec.stats


def _conv_channels(graph) -> list[tuple[int, int]]:
    """(in, out) channels of every convolution / linear, in graph order."""
    out = []
    for n in graph.fx.nodes:
        if n.target in (aten.convolution.default, aten.linear.default):
            w = graph.param(n.args[1])
            cin = graph.info(n.args[0]).shape[1 if n.target is aten.convolution.default else -1]
            out.append((int(cin), int(w.shape[0])))
    return out


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.c2, self.b2 = nn.Conv2d(12, 20, 3, padding=1, bias=False), nn.BatchNorm2d(20)
        self.c3 = nn.Conv2d(20, 5, 1)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        return self.c3(torch.relu(self.b2(self.c2(x))))


def test_conv_bn_relu_chain_widths_12_20():
    g, out, stats = _pad(Chain(), torch.randn(1, 3, 8, 8), max_growth=2)
    assert _conv_channels(out) == [(3, 16), (16, 32), (32, 5)]
    assert stats["padded"] == {"c1": "12 -> 16", "c2": "20 -> 32"}
    assert stats["left_alone"] == {"c3": "5: model output"}  # outputs never change shape
    assert stats["macs_after"] == out.macs() > stats["macs_before"] == g.macs()
    # The new filters are zero; BatchNorm's new channels have var 1, so they stay 0.
    w1 = out.param(next(n for n in out.fx.nodes if n.target is aten.convolution.default).args[1])
    assert w1[12:].abs().sum() == 0


def test_max_growth_and_exclude_leave_groups_alone():
    _, out, stats = _pad(Chain(), torch.randn(1, 3, 8, 8))  # 20 -> 32 is 1.6x > 1.5
    assert _conv_channels(out) == [(3, 16), (16, 20), (20, 5)]
    assert "max_growth" in stats["left_alone"]["c2"]
    _, out, stats = _pad(Chain(), torch.randn(1, 3, 8, 8), max_growth=2, exclude=("c1",))
    assert _conv_channels(out) == [(3, 12), (12, 32), (32, 5)]  # c1 keeps its shape
    assert "excluded layer c1" in stats["left_alone"]["c1"]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24)
        self.a = nn.Conv2d(24, 12, 3, padding=1)
        self.b = nn.Conv2d(12, 24, 3, padding=1)
        self.fc = nn.Linear(24, 3)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        y = torch.relu(self.b(torch.relu(self.a(y))) + y)
        return self.fc(y.mean((2, 3)))


def test_residual_add_pads_trunk_and_branch_together():
    _, out, stats = _pad(Residual(), torch.randn(1, 3, 8, 8))
    assert _conv_channels(out) == [(3, 32), (32, 16), (16, 32), (32, 3)]
    assert stats["padded"] == {"stem+b": "24 -> 32", "a": "12 -> 16"}


class Dense(nn.Module):
    """DenseNet-style: each layer's output concatenated to the trunk."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(24 + 12 * i), nn.ReLU(), nn.Conv2d(24 + 12 * i, 12, 3, padding=1))
            for i in range(3))
        self.trans = nn.Sequential(nn.BatchNorm2d(60), nn.ReLU(), nn.Conv2d(60, 30, 1),
                                   nn.AvgPool2d(2))
        self.fc = nn.Linear(30, 4)

    def forward(self, x):
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        y = self.trans(torch.cat(feats, 1))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def test_densenet_concat_offsets():
    _, out, stats = _pad(Dense(), torch.randn(1, 3, 8, 8))
    assert _conv_channels(out) == [(3, 32), (32, 16), (48, 16), (64, 16), (80, 32), (32, 4)]
    assert stats["padded"]["layers.0.2"] == "12 -> 16" and stats["padded"]["trans.2"] == "30 -> 32"
    cats = [out.info(n).shape[1] for n in out.fx.nodes if n.target is aten.cat.default]
    assert cats == [32, 48, 64, 80]  # the first cat has one input


class Chunky(nn.Module):
    """split, chunk and a slice of one conv's output, each part to its own consumer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 40, 1)
        self.p, self.q = nn.Conv2d(20, 8, 1), nn.Conv2d(20, 8, 1)
        self.b = nn.Conv2d(3, 24, 1)
        self.r, self.s = nn.Conv2d(12, 8, 1), nn.Conv2d(12, 8, 1)

    def forward(self, x):
        u, v = torch.split(self.a(x), [20, 20], dim=1)
        y = self.b(x)
        return self.p(u) + self.q(torch.relu(v)) + self.r(y[:, :12]) + self.s(y.chunk(2, 1)[1])


def test_split_chunk_and_slice_parts_are_padded_separately():
    _, out, stats = _pad(Chunky(), torch.randn(1, 3, 6, 6), max_growth=2)
    assert _conv_channels(out) == [(3, 64), (3, 32), (32, 8), (32, 8), (16, 8), (16, 8)]
    assert stats["padded"] == {"a[0:20]": "20 -> 32", "a[20:40]": "20 -> 32",
                               "b[0:12]": "12 -> 16", "b[12:24]": "12 -> 16"}


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw1, self.bn1 = nn.Conv2d(3, 24, 1), nn.BatchNorm2d(24)
        self.dw, self.bn2 = nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.BatchNorm2d(24)
        self.pw2 = nn.Conv2d(24, 40, 1)
        self.head = nn.Conv2d(40, 6, 1)

    def forward(self, x):
        y = torch.relu(self.bn1(self.pw1(x)))
        y = torch.relu(self.bn2(self.dw(y)))
        return self.head(torch.nn.functional.relu6(self.pw2(y)))


def test_depthwise_conv_gets_new_groups():
    _, out, stats = _pad(Depthwise(), torch.randn(1, 3, 6, 6))
    assert _conv_channels(out) == [(3, 32), (32, 32), (32, 48), (48, 6)]
    dw = [n for n in out.fx.nodes if n.target is aten.convolution.default][1]
    assert dw.args[8] == 32  # groups follow the channels
    assert stats["padded"] == {"pw1+dw": "24 -> 32", "pw2": "40 -> 48"}


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3)
        self.fc1 = nn.Linear(12 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 5)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc2(torch.relu(self.fc1(torch.flatten(y, 1))))


def test_flatten_linear_columns_follow_the_channels():
    _, out, stats = _pad(FlattenLinear(), torch.randn(1, 3, 6, 6))
    assert _conv_channels(out) == [(3, 16), (16 * 4 * 4, 32), (32, 5)]
    assert stats["padded"] == {"conv": "12 -> 16", "fc1": "24 -> 32"}


class ChannelNorm(nn.Module):
    """LayerNorm over the channels (ConvNeXt-style) and a softmax over channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.norm = nn.LayerNorm(12)
        self.b = nn.Conv2d(12, 24, 1)
        self.c = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        y = self.norm(self.a(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.c(torch.softmax(self.b(y), dim=1))


def test_channel_count_dependent_ops_are_left_alone_with_a_reason():
    g, out, stats = _pad(ChannelNorm(), torch.randn(1, 3, 5, 5))
    assert _conv_channels(out) == _conv_channels(g)
    assert "layer_norm over the channels" in stats["left_alone"]["a"]
    assert "softmax over the channels" in stats["left_alone"]["b"]
    assert stats["padded"] == {} and stats["macs_ratio"] == 1.0


@pytest.mark.parametrize("text, option", [
    ("pad-channels{multiple=0}", "multiple"),
    ("pad-channels{max_growth=0.5}", "max_growth"),
    ("pad-channels{max_growth=big}", "max_growth"),
    ("pad-channels{multiples=16}", "multiples"),
])
def test_option_errors_name_the_option(text, option):
    with pytest.raises(PipelineError, match=option):
        PassManager(text)


def test_pad_then_compile_matches():
    torch.manual_seed(0)
    model = randomize_bn(Dense()).eval()
    x = torch.randn(1, 3, 8, 8)
    cm = slimfx.compile(model, x, pipeline="fold-bn,pad-channels,dce")
    assert cm.parity["max_abs_error"] <= cm.parity["tolerance"]
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x), atol=1e-4, rtol=1e-4)


def test_compile_pads_automatically_unless_told_not_to():
    torch.manual_seed(0)
    model = randomize_bn(Dense()).eval()
    x = torch.randn(1, 3, 8, 8)
    cm = slimfx.compile(model, x, pipeline="fold-bn,dce")
    pad = cm.manifest["build"]["pad_channels"]
    assert pad["padded"]["layers.0.2"].startswith("12 -> ") and pad["macs_ratio"] > 1
    assert cm.parity["max_abs_error"] <= cm.parity["tolerance"]
    off = slimfx.compile(model, x, pipeline="fold-bn,dce", pad_channels=False)
    assert "pad_channels" not in off.manifest["build"]
    with torch.no_grad():
        torch.testing.assert_close(cm(x), off(x), atol=1e-4, rtol=1e-4)
    aligned = slimfx.compile(nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU()), x)
    assert "pad_channels" not in aligned.manifest["build"]  # nothing to pad: the pass never ran


def test_compile_pads_odd_widths_but_not_half_vectors_without_concat():
    from slimfx.lowering.cpu_schedules import vector_lanes
    from slimfx.lowering.targets import resolve_target

    lanes = vector_lanes(resolve_target("host"))
    x = torch.randn(1, 3, 6, 6)
    half = nn.Sequential(nn.Conv2d(3, 3 * lanes // 2, 3), nn.ReLU(), nn.Conv2d(3 * lanes // 2, 8, 1))
    assert "pad_channels" not in slimfx.compile(half, x).manifest["build"]
    odd = nn.Sequential(nn.Conv2d(3, lanes - 1, 3), nn.ReLU(), nn.Conv2d(lanes - 1, 8, 1))
    cm = slimfx.compile(odd, x)
    assert cm.manifest["build"]["pad_channels"]["padded"] == {"0": f"{lanes - 1} -> {lanes}"}


def test_transformer_hidden_width_is_left_alone():
    from slimfx import zoo

    torch.manual_seed(0)
    x = torch.randn(*zoo.INPUT_SHAPES["vit"])
    _, out, stats = _pad(zoo.get("vit"), x)
    assert stats["padded"] == {} and stats["macs_ratio"] == 1.0
