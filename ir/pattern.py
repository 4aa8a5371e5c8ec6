"""Local rewrites as data: ATen patterns, rule sets, and one fixed-point driver.

A rule is a pair ``(pattern, callback)``.  Names bound in the pattern arrive in the
callback as keyword arguments, after a :class:`Rewriter` that builds replacement nodes.
The callback returns the node that replaces the matched root, or ``None`` for "no
match".  Rule sets combine with ``+``; :func:`rewrite` applies them until nothing
matches, and fails loudly past an iteration limit.

>>> import torch, slimfx
>>> from slimfx.ir.pattern import P, Rules, rewrite
>>> aten = torch.ops.aten
>>> rules = Rules([
...     # relu(relu(x)) -> relu(x)
...     (P(aten.relu.default, P(aten.relu.default, P.var("x")), name="outer"),
...      lambda rw, outer, x: outer.args[0]),
... ])
>>> g = slimfx.capture(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.ReLU()), (torch.randn(3),))
>>> rewrite(g, rules)
1
>>> [n.target for n in g.find()]
[<OpOverload(op='aten.relu', overload='default')>]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from slimfx.errors import GraphError

from .graph import Graph

__all__ = ["P", "Rule", "Rules", "Rewriter", "match", "rewrite"]

_MISSING = object()


class P:
    """A pattern over FX nodes.

    ``P(target, *args, name=None, where=None)`` matches a ``call_function`` node whose
    target is ``target`` (or one of a tuple/set of targets; ``None`` matches any op) and
    whose leading positional arguments match ``args`` (patterns, or constants compared
    with ``==``).  Arguments beyond those given are not constrained.  ``name`` binds the
    matched node; ``where(node) -> bool`` adds a condition.

    Leaf patterns: ``P.var("x")`` matches any argument (node or constant) and binds it;
    ``P.any()`` matches anything without binding; ``P.param("w")`` matches a ``get_attr``
    node (a parameter or buffer) and binds it.
    """

    __slots__ = ("targets", "args", "name", "where", "kind")

    def __init__(self, target=None, *args, name: str | None = None,
                 where: Callable[[torch.fx.Node], bool] | None = None, _kind: str = "op"):
        if target is None or isinstance(target, (tuple, set, frozenset)):
            self.targets = None if target is None else frozenset(target)
        else:
            self.targets = frozenset([target])
        self.args = args
        self.name = name
        self.where = where
        self.kind = _kind

    @classmethod
    def var(cls, name: str, where=None) -> P:
        return cls(None, name=name, where=where, _kind="var")

    @classmethod
    def any(cls) -> P:
        return cls(None, _kind="var")

    @classmethod
    def param(cls, name: str | None = None, where=None) -> P:
        return cls(None, name=name, where=where, _kind="param")

    def __repr__(self) -> str:
        if self.kind == "var":
            return f"P.var({self.name!r})" if self.name else "P.any()"
        if self.kind == "param":
            return f"P.param({self.name!r})"
        tgt = "*" if self.targets is None else "|".join(sorted(map(str, self.targets)))
        return f"P({tgt}, {', '.join(map(repr, self.args))})"


def _bind(bindings: dict, name: str | None, value) -> bool:
    if name is None:
        return True
    prev = bindings.get(name, _MISSING)
    if prev is _MISSING:
        bindings[name] = value
        return True
    return prev is value or (not isinstance(prev, torch.fx.Node) and prev == value)


def _match(pat, value, bindings: dict) -> bool:
    if not isinstance(pat, P):
        return not isinstance(value, torch.fx.Node) and value == pat
    if pat.kind == "var":
        ok = pat.where is None or pat.where(value)
        return ok and _bind(bindings, pat.name, value)
    if not isinstance(value, torch.fx.Node):
        return False
    if pat.kind == "param":
        if value.op != "get_attr":
            return False
    else:
        if value.op != "call_function":
            return False
        if pat.targets is not None and value.target not in pat.targets:
            return False
        if len(pat.args) > len(value.args):
            return False
        for sub, arg in zip(pat.args, value.args):
            if not _match(sub, arg, bindings):
                return False
    if pat.where is not None and not pat.where(value):
        return False
    return _bind(bindings, pat.name, value)


def match(pattern: P, node: torch.fx.Node) -> dict[str, Any] | None:
    """Bindings if ``pattern`` matches at ``node``, else ``None``."""
    bindings: dict[str, Any] = {}
    return bindings if _match(pattern, node, bindings) else None


@dataclass(frozen=True)
class Rule:
    pattern: P
    fn: Callable[..., torch.fx.Node | None]
    name: str = ""

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", getattr(self.fn, "__name__", "rule"))


class Rules:
    """An ordered set of rewrite rules; ``Rules(a) + Rules(b)`` tries ``a``'s rules first."""

    def __init__(self, rules: Iterable[Rule | tuple] = ()):
        self.rules: list[Rule] = [r if isinstance(r, Rule) else Rule(*r) for r in rules]

    def __add__(self, other: Rules) -> Rules:
        return Rules(self.rules + other.rules)

    def __iter__(self):
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)


class Rewriter:
    """Passed to rule callbacks: builds nodes just before the matched root.

    New nodes inherit the matched root's provenance (module path, source line).
    """

    def __init__(self, graph: Graph, root: torch.fx.Node):
        self.graph = graph
        self.root = root

    def call(self, target, *args, **kwargs) -> torch.fx.Node:
        """Insert ``target(*args, **kwargs)`` before the root and return the node."""
        name = getattr(target, "_opname", None)  # aten.convolution.default -> "convolution"
        with self.graph.fx.inserting_before(self.root):
            node = self.graph.fx.create_node("call_function", target, args, kwargs, name=name)
        return self.graph.inherit(node, self.root)

    def param(self, name_hint: str, value: torch.Tensor, trainable: bool | None = None) -> torch.fx.Node:
        """Store a new parameter/buffer and return a ``get_attr`` node reading it."""
        node = self.graph.add_param(name_hint, value, before=self.root, trainable=trainable)
        return node


def rewrite(graph: Graph, rules: Rules, *, max_iters: int = 100) -> int:
    """Apply ``rules`` to ``graph`` in place until no rule matches; return the rewrite count.

    Each sweep visits nodes in order and applies the first matching rule per node; dead
    nodes are erased after each sweep.  Raises :class:`~slimfx.errors.GraphError` if the
    rules still match after ``max_iters`` sweeps (a rule set that does not converge).
    """
    total = 0
    for _ in range(max_iters):
        changed = 0
        fired: list[str] = []
        for node in list(graph.fx.nodes):
            if node.graph is not graph.fx or node.op != "call_function":
                continue  # erased during this sweep, or not an op
            for rule in rules:
                bindings = match(rule.pattern, node)
                if bindings is None:
                    continue
                repl = rule.fn(Rewriter(graph, node), **bindings)
                if repl is None or repl is node:
                    continue
                node.replace_all_uses_with(repl)
                if not node.users:  # replaced: gone even if torch deems the op impure
                    graph.fx.erase_node(node)
                changed += 1
                fired.append(rule.name)
                break
        if not changed:
            graph.gm.recompile()
            return total
        total += changed
        graph.fx.eliminate_dead_code()
    raise GraphError(f"rewrite did not reach a fixed point after {max_iters} sweeps; "
                     f"rules still firing: {sorted(set(fired))}")
