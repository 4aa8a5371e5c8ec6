"""slimfx's IR: capture, the :class:`Graph` wrapper, op set, patterns, printing, drawing."""

from . import draw
from .capture import capture, decomposition_table
from .graph import Graph, NodeInfo, TensorSpec, in_modules
from .ops import PRESERVED_OPS, is_canonical, macs_of, op_name, register_macs
from .pattern import P, Rewriter, Rule, Rules, match, rewrite
from .printing import GraphDiff, diff, format_graph, layer_table

__all__ = [
    "draw", "capture", "decomposition_table", "Graph", "NodeInfo", "TensorSpec", "in_modules",
    "PRESERVED_OPS",
    "is_canonical", "macs_of", "op_name", "register_macs", "P", "Rewriter", "Rule", "Rules",
    "match", "rewrite", "GraphDiff", "diff", "format_graph", "layer_table",
]
