"""Errors raised by slimfx.  Each one names what went wrong and where.

Every error derives from :class:`SlimfxError`, so ``except slimfx.SlimfxError`` catches
them all.  Errors about a graph node carry the node's name, the module path it came from
and, when known, the user's source line.
"""

from __future__ import annotations

import torch.fx

__all__ = [
    "SlimfxError",
    "CaptureError",
    "GraphError",
    "PassError",
    "PipelineError",
    "VerificationError",
    "node_context",
    "source_line",
]


class SlimfxError(Exception):
    """Base class of every slimfx error."""


class CaptureError(SlimfxError):
    """A model could not be captured into the slimfx IR."""


class GraphError(SlimfxError):
    """A graph is malformed (lint failure) or a request about it cannot be met.

    ``node`` is the offending :class:`torch.fx.Node` when there is one.
    """

    def __init__(self, message: str, node: torch.fx.Node | None = None):
        self.node = node
        self.message = message  # without the node context, for errors that wrap this one
        super().__init__(message + (node_context(node) if node is not None else ""))


class PipelineError(SlimfxError):
    """A textual pipeline or a pass option is invalid (unknown pass, option or value)."""


class PassError(SlimfxError):
    """A pass raised or failed verification.  The graph was rolled back.

    Attributes: ``pass_name``, ``node`` (may be ``None``) and ``cause``.
    """

    def __init__(self, pass_name: str, message: str, node: torch.fx.Node | None = None,
                 cause: BaseException | None = None):
        self.pass_name = pass_name
        self.node = node
        self.cause = cause
        text = f"pass '{pass_name}' failed: {message}"
        if node is not None:
            text += node_context(node)
        text += "\nThe graph was rolled back to its state before the pass."
        super().__init__(text)


class VerificationError(PassError):
    """A pass's output graph is malformed or does not match the graph before it."""


def source_line(node: torch.fx.Node) -> str | None:
    """The innermost user-code frame (``file:line`` and code) that produced ``node``.

    Frames inside torch itself are skipped, so the line points at the model's code.
    """
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    lines = trace.strip().splitlines()
    best = None
    for i, line in enumerate(lines):
        line = line.strip()
        if line.startswith("File ") and "/torch/" not in line:
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            best = f"{line[5:]}: {code}" if code else line[5:]
    return best


def node_context(node: torch.fx.Node) -> str:
    """A suffix naming a node, its module path and source line, for error messages."""
    parts = [f"\n  at node '{node.name}' ({node.op} {getattr(node.target, '__name__', node.target)})"]
    path = node.meta.get("module_path")
    if path:
        parts.append(f"\n  in module '{path}'")
    src = source_line(node)
    if src:
        parts.append(f"\n  from {src}")
    return "".join(parts)
