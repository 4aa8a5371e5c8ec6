"""Linking a built program into a shared library for the target's architecture.

For the host, TVM's default (the system C compiler) links.  For another architecture a
cross linker is needed: a system ``<triple>-gcc`` when one is installed
(``apt-get install gcc-aarch64-linux-gnu``), otherwise ``zig cc`` from the ``ziglang``
wheel, which slimfx depends on so that ``pip install`` alone is enough.  zig builds its
libc stubs for a new triple once (about 40 s), cached in ``~/.cache/zig``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

from .targets import LoweringError, TargetInfo

__all__ = ["fcompile_for", "cross_linker"]


def cross_linker(triple: str) -> list[str]:
    """The command that links shared objects for ``triple``."""
    gcc = shutil.which(f"{triple}-gcc")
    if gcc:
        return [gcc]
    if importlib.util.find_spec("ziglang") is not None:
        return [sys.executable, "-m", "ziglang", "cc", "-target", triple]
    raise LoweringError(f"no linker for {triple}: install the ziglang wheel (a slimfx dependency) "
                        f"or a cross compiler ({triple}-gcc)")


def fcompile_for(target: TargetInfo):
    """The ``fcompile`` for ``export_library``: ``None`` (the host compiler) for the host."""
    if target.kind != "llvm" or target.is_host:
        return None
    linker = cross_linker(target.triple)

    def fcompile(output, objects, options=None, **_kwargs):
        cmd = [*linker, "-shared", "-fPIC", "-o", output, *objects, *(options or [])]
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if r.returncode != 0:
            raise LoweringError(f"linking for {target.triple} failed ({' '.join(cmd[:6])} ...):\n"
                                f"{r.stdout}{r.stderr}")

    fcompile.output_format = "so"
    return fcompile
