"""Channel-dependency analysis: coupled channels through adds, concats, splits, grouped
and depthwise convs, flatten -> linear, attention heads; blocking and explanations."""

import torch
import torch.nn.functional as F
from torch import nn

import slimfx
from slimfx.ir.channels import ChannelAnalysis

aten = torch.ops.aten


def _analyse(model, x, **kw):
    g = slimfx.capture(model.eval(), x)
    return g, ChannelAnalysis(g, **kw)


def _weight(g, path):
    conv = next(n for n in g.find() if n.meta.get("module_path") == path and
                n.target in (aten.convolution.default, aten.linear.default))
    return conv.args[1]


def _out_sets(ca, g, path):
    w = _weight(g, path)
    return [ca.set_of(w, 0, i) for i in range(ca.shape(w)[0])]


def _in_sets(ca, g, path):
    w = _weight(g, path)
    return [ca.set_of(w, 1, i) for i in range(ca.shape(w)[1])]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = self.a(x)
        z = self.b(y) + y  # a and b are aligned channel by channel
        return self.fc(self.c(z).mean((2, 3)))


def test_residual_add_aligns_trunk_and_branch():
    g, ca = _analyse(Residual(), torch.randn(1, 3, 8, 8))
    a, b, c_in = _out_sets(ca, g, "a"), _out_sets(ca, g, "b"), _in_sets(ca, g, "c")
    assert a == b == c_in and len(set(a)) == 8
    assert _out_sets(ca, g, "c") != a  # c's outputs are independent of the trunk
    assert all(s in ca.prunable for s in a)
    assert not any(s in ca.prunable for s in _out_sets(ca, g, "fc"))  # model output
    text = ca.explain(next(grp for grp in ca.groups() if a[0] in grp.sets))
    assert "residual add" in text and "conv out-channels" in text


class ConcatSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 10, 1)
        self.d1 = nn.Conv2d(3, 8, 1)
        self.d2 = nn.Conv2d(7, 8, 1)

    def forward(self, x):
        y = self.c(torch.cat([self.a(x), self.b(x)], 1))
        p, q = torch.split(y, [3, 7], dim=1)
        return self.d1(p) + self.d2(q)


def test_concat_offsets_and_split_parts():
    g, ca = _analyse(ConcatSplit(), torch.randn(1, 3, 4, 4))
    c_in = _in_sets(ca, g, "c")
    assert c_in[:4] == _out_sets(ca, g, "a") and c_in[4:] == _out_sets(ca, g, "b")
    c_out = _out_sets(ca, g, "c")
    assert _in_sets(ca, g, "d1") == c_out[:3] and _in_sets(ca, g, "d2") == c_out[3:]
    explained = ca.summary()
    assert "concat at offset 4" in explained and "split part 1 at offset 3" in explained


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # depthwise, multiplier 2
        self.gc = nn.Conv2d(16, 8, 1, groups=4)  # 4 groups of 4 in, 2 out
        self.fc = nn.Linear(8 * 2 * 2, 3)

    def forward(self, x):
        y = self.gc(self.dw(self.a(x)))
        return self.fc(torch.flatten(F.avg_pool2d(y, 2), 1))


def test_grouped_depthwise_and_flatten_linear():
    g, ca = _analyse(Grouped(), torch.randn(1, 3, 4, 4))
    a, dw = _out_sets(ca, g, "a"), _out_sets(ca, g, "dw")
    # Depthwise with multiplier 2: input channel i feeds outputs 2i and 2i+1.
    assert all(dw[2 * i] == dw[2 * i + 1] == a[i] for i in range(8))
    # A group of the grouped conv (4 inputs, 2 outputs) is one set: pruned whole.
    gc_out, gc_in = _out_sets(ca, g, "gc"), _in_sets(ca, g, "gc")
    assert not any(s in ca.prunable for s in gc_in)  # the weight's per-group input dim
    for k in range(4):
        assert gc_out[2 * k] == gc_out[2 * k + 1] == dw[4 * k] == dw[4 * k + 3]
    # flatten (8, 2, 2) -> 32 features: feature f belongs to channel f // 4.
    fc_in = _in_sets(ca, g, "fc")
    assert [fc_in[f] for f in range(32)] == [gc_out[f // 4] for f in range(32)]
    assert "view merges dims" in ca.summary() and "grouped conv (4 groups)" in ca.summary()


class Attention(nn.Module):
    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, 2)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.out(self.proj(y).mean(1))


def test_attention_heads_are_whole_sets():
    g, ca = _analyse(Attention(), torch.randn(1, 5, 16))
    proj_in = _in_sets(ca, g, "proj")
    heads = [proj_in[h * 4] for h in range(4)]
    assert all(proj_in[h * 4 + d] == heads[h] for h in range(4) for d in range(4))
    assert len(set(heads)) == 4 and all(h in ca.prunable for h in heads)
    # The fused qkv linear: q, k and v rows of a head belong to that head's set.
    qkv_out = _out_sets(ca, g, "qkv")
    for part in range(3):
        assert [qkv_out[part * 16 + h * 4] for h in range(4)] == heads


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=1))  # cumsum mixes channels


def test_unknown_op_blocks_and_is_reported():
    g, ca = _analyse(Unknown(), torch.randn(1, 3, 4, 4))
    assert not any(s in ca.prunable for s in _out_sets(ca, g, "a"))
    assert "aten.cumsum" in ca.unknown_ops
    assert "ops without a channel rule (their channels are kept): aten.cumsum (1x)" in ca.summary()


def test_exclude_by_module_path():
    g, ca = _analyse(Residual(), torch.randn(1, 3, 8, 8), exclude=["b"])
    assert not any(s in ca.prunable for s in _out_sets(ca, g, "a"))  # coupled to b
    assert all(s in ca.prunable for s in _out_sets(ca, g, "c"))
