"""Rewrite rules as data: matching, bindings, rule sets, the fixed-point driver."""

import pytest
import torch
from torch import nn

import slimfx
from slimfx.errors import GraphError
from slimfx.ir import P, Rules, match, rewrite

aten = torch.ops.aten


class AddSelf(nn.Module):
    def forward(self, x, y):
        return torch.relu(x + x) + torch.relu(x + y)


def _graph():
    return slimfx.capture(AddSelf(), (torch.randn(3), torch.randn(3)))


def test_repeated_names_must_bind_the_same_node():
    g = _graph()
    pat = P(aten.add.Tensor, P.var("a"), P.var("a"), name="root")
    hits = [n for n in g.find() if match(pat, n)]
    assert [h.args[0].name for h in hits] == ["x"]  # x + x matches, x + y does not


def test_constants_alternatives_and_where():
    g = slimfx.capture(nn.Sequential(nn.Hardtanh(0.0, 6.0), nn.ReLU()), (torch.randn(4),))
    ht = next(g.find(aten.hardtanh.default))
    assert match(P(aten.hardtanh.default, P.any(), 0.0, 6.0), ht) is not None
    assert match(P(aten.hardtanh.default, P.any(), 0.0, 1.0), ht) is None
    assert match(P({aten.relu.default, aten.hardtanh.default}, name="n"), ht) == {"n": ht}
    assert match(P(aten.hardtanh.default, where=lambda n: len(n.users) > 1), ht) is None
    assert match(P(aten.hardtanh.default, P.param()), ht) is None  # its input is no parameter


def test_rewrite_to_fixed_point_and_numbers_match():
    # relu(relu(relu(x))) collapses in one driver call, whatever the depth.
    g = slimfx.capture(nn.Sequential(nn.ReLU(), nn.ReLU(), nn.ReLU()), (torch.randn(5),))
    rules = Rules([(P(aten.relu.default, P(aten.relu.default, P.var("x"))),
                    lambda rw, x: rw.call(aten.relu.default, x))])
    x = torch.randn(5)
    ref = g(x)
    assert rewrite(g, rules) >= 2
    assert [n.target for n in g.find()] == [aten.relu.default]
    torch.testing.assert_close(g(x), ref)
    g.lint()


def test_rule_sets_combine_in_order():
    first = Rules([(P(aten.relu.default), lambda rw: None)])  # never rewrites
    second = Rules([(P(aten.relu.default, P(aten.add.Tensor, P.var("a"), P.var("a"))),
                     lambda rw, a: rw.call(aten.relu.default, rw.call(aten.mul.Tensor, a, 2)))])
    both = first + second
    assert len(both) == 2
    g = _graph()
    assert rewrite(g, both) == 1
    assert aten.mul.Tensor in [n.target for n in g.find()]
    new = next(g.find(aten.mul.Tensor))
    assert new.name == "mul"  # named after the op, not "mul_tensor"


def test_non_converging_rules_fail_loudly():
    # relu(x) -> relu(x) as a fresh node: always matches again.
    rules = Rules([(P(aten.relu.default, P.var("x")), lambda rw, x: rw.call(aten.relu.default, x))])
    g = slimfx.capture(nn.ReLU(), (torch.randn(2),))
    with pytest.raises(GraphError, match="did not reach a fixed point after 5 sweeps"):
        rewrite(g, rules, max_iters=5)
