"""Linking a built program into a shared library for the target's architecture."""

from __future__ import annotations

from .targets import LoweringError, TargetInfo

__all__ = ["fcompile_for"]


def fcompile_for(target: TargetInfo):
    """The ``fcompile`` for ``export_library``: ``None`` (the host compiler) for the host."""
    if target.kind != "llvm" or target.is_host:
        return None
    raise LoweringError(f"no cross toolchain for {target.triple}")
