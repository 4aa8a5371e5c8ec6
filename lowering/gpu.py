"""GPU (CUDA) builds: TVM's GPU schedules for every kernel, CUDA compiled without a toolkit.

TVM's CUDA pipeline schedules each fused kernel with the first of its ``dlight`` rules
that applies (matmul, GEMV, reduction, general reduction, and a fallback that binds the
spatial loops to threads).  A rule that *raises* on a kernel it misreads stops the whole
build there: the reduction rule asserts on the DFT kernels of slimfx's FFT convolution.
:func:`schedule` tries the rules in the same order but treats a rule that raises as one
that does not apply, so every kernel ends with the first rule that works, at worst the
fallback; which rule scheduled how many kernels is recorded in the manifest
(``manifest["build"]["kernels"]``, ``"unscheduled"`` for a kernel no rule took, which
then fails TVM's memory verification with the kernel named).

CUDA C is compiled by NVRTC, TVM's default, which needs the CUDA headers: a toolkit
(``CUDA_PATH``, ``nvcc`` on the ``PATH`` or ``/usr/local/cuda``) or the pip wheels of
``pip install "slimfx[cuda]"`` (NVRTC, the CUDA runtime headers, CCCL, ``cuda-bindings``),
which :func:`cuda_compiler` finds by itself; without NVRTC, a toolkit's ``nvcc`` compiles.  No GPU is needed to build; running
needs one whose architecture matches the target's ``arch``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import site
from collections import Counter
from pathlib import Path
from typing import Any

from .targets import LoweringError, TargetInfo

__all__ = ["build", "schedule", "cuda_compiler", "cuda_headers"]


def cuda_headers() -> str | None:
    """The CUDA root whose ``include/`` NVRTC compiles against, or ``None``.

    ``CUDA_PATH`` when set; else the first of the folder above ``nvcc`` on the ``PATH``,
    ``/usr/local/cuda`` and the ``nvidia/cu13`` folder of the CUDA 13 pip wheels that
    holds ``include/cuda_runtime.h`` (``nvcc`` may be a wrapper script elsewhere).
    """
    if os.environ.get("CUDA_PATH"):
        return os.environ["CUDA_PATH"]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    candidates += [Path(root, "nvidia", "cu13")
                   for root in [*site.getsitepackages(), site.getusersitepackages()]]
    for root in candidates:
        if (root / "include" / "cuda_runtime.h").is_file():
            return str(root)
    return None


@contextlib.contextmanager
def cuda_compiler():
    """While building: TVM's CUDA compiler chosen and pointed at the CUDA headers.

    NVRTC (TVM's default) where ``cuda-bindings`` and the headers are found (see
    :func:`cuda_headers`), else the toolkit's ``nvcc``; the user's
    ``TVM_CUDA_COMPILE_MODE`` and ``CUDA_PATH`` win.  A :class:`LoweringError` says what
    is missing.  The environment is restored afterwards.
    """
    hint = ('install them with: pip install "slimfx[cuda]" (NVRTC and the CUDA headers as '
            "wheels), or install the CUDA 13 toolkit")
    mode = os.environ.get("TVM_CUDA_COMPILE_MODE", "").lower()
    root = cuda_headers()
    try:
        from cuda.bindings import nvrtc  # noqa: F401

        has_nvrtc = True
    except ImportError:
        has_nvrtc = False
    if not mode:
        mode = "nvrtc" if has_nvrtc and root is not None else \
            "nvcc" if shutil.which("nvcc") else "nvrtc"
    if mode == "nvcc" and shutil.which("nvcc") is None:
        raise LoweringError("TVM_CUDA_COMPILE_MODE=nvcc, but nvcc is not on the PATH")
    if mode == "nvrtc" and not has_nvrtc:
        raise LoweringError(f"building for CUDA needs NVRTC (the cuda-bindings package) or "
                            f"nvcc; {hint}")
    if mode == "nvrtc" and root is None:
        raise LoweringError(f"building for CUDA needs the CUDA headers (cuda_runtime.h), "
                            f"found none; {hint}")
    keys = ("TVM_CUDA_COMPILE_MODE", "CUDA_PATH", "TVM_CUDA_NVRTC_EXTRA_OPTS")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["TVM_CUDA_COMPILE_MODE"] = mode
    if root is not None:
        os.environ["CUDA_PATH"] = root  # where TVM's compile call looks for the headers
        cccl = Path(root, "include", "cccl")  # the wheels' CCCL; a toolkit's TVM finds itself
        if mode == "nvrtc" and cccl.is_dir():
            os.environ["TVM_CUDA_NVRTC_EXTRA_OPTS"] = \
                f"{saved['TVM_CUDA_NVRTC_EXTRA_OPTS'] or ''} -I{cccl}".strip()
    try:
        yield mode
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rules():
    from tvm.s_tir import dlight as dl

    # TVM's CUDA pipeline's rules, in its order (tvm.relax.backend.cuda.pipeline).
    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
            dl.gpu.Fallback()]


def schedule(mod, target: TargetInfo) -> tuple[Any, dict[str, int]]:
    """Schedule every unscheduled kernel of ``mod`` with the first ``dlight`` GPU rule that
    applies without raising; a new module (``mod`` is not changed) and how many kernels
    each rule took."""
    import tvm
    from tvm import tirx

    rules = _rules()
    taken: Counter[str] = Counter()
    updates = {}
    with target.tvm():
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or func.attrs is not None and \
                    func.attrs.get("tirx.is_scheduled", False):
                continue
            for rule in rules:
                try:
                    space = rule.apply(func, tvm.target.Target.current(), False)
                except Exception:  # noqa: BLE001  (a rule that misreads a kernel: try the next)
                    continue
                if space is None:
                    continue
                sch = space[0] if isinstance(space, list) else space
                updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                taken[type(rule).__name__] += 1
                break
            else:
                taken["unscheduled"] += 1
    mod = mod.clone()  # the caller's module stays as it was
    for gv, func in updates.items():
        mod[gv] = func
    return mod, dict(sorted(taken.items()))


def build(mod, target: TargetInfo, *, exec_mode: str = "bytecode") -> tuple[Any, dict[str, Any]]:
    """Build a Relax module for a CUDA target: TVM's CUDA pipeline with :func:`schedule`
    in place of its scheduling pass.  Returns the executable and the manifest's facts."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda

    from slimfx.runtime.devices import load_cuda_runtime

    load_cuda_runtime()  # where it loads (a GPU driver is installed), TVM compiles the kernels
    t = target.tvm()
    with t:
        mod = tvm.ir.transform.Sequential(cuda.library_dispatch_passes(t) + [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ])(mod)
    mod, kernels = schedule(mod, target)
    with t:
        mod = tvm.ir.transform.Sequential(cuda.dataflow_lower_passes(t)
                                          + cuda.finalize_passes(t))(mod)
    with cuda_compiler() as compiler:
        ex = relax.build(mod, target=t, relax_pipeline=None, exec_mode=exec_mode)
        binaries = _compile_sources(ex, target, compiler)
    return ex, {"transform_params": None, "kernels": kernels, "cuda_compiler": compiler,
                "device_code": binaries}


def _cuda_modules(module):
    if module.kind == "cuda":
        yield module
    for m in module.imports:
        yield from _cuda_modules(m)


def _compile_sources(ex, target: TargetInfo, compiler: str) -> dict[str, bytes]:
    """Compile the CUDA source TVM left in the program, keyed by the source's SHA-256.

    TVM compiles CUDA kernels while building only where its CUDA runtime library loads,
    which needs the GPU driver (``libcuda.so.1``).  Elsewhere it keeps the CUDA source in
    the program and compiles it when the library is loaded, which would need a CUDA
    compiler and TVM's compiler on the GPU's machine.  slimfx compiles that source here,
    for the target's ``arch``, and the artifact carries the binary
    (:func:`slimfx.runtime.devices.provide_cuda_binaries` hands it to TVM at load time).
    """
    import tvm_ffi

    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None:
        return {}  # TVM's CUDA runtime is here: it compiled the kernels itself
    from tvm.support import nvcc

    arch = target.config.get("arch")
    if not arch:
        raise LoweringError("a CUDA target built on a machine without a GPU needs its 'arch', "
                            "e.g. {'kind': 'cuda', 'arch': 'sm_90'}")
    out = {}
    with target.tvm():
        for m in _cuda_modules(ex.mod):
            source = m.inspect_source("")
            fmt = "cubin" if compiler == "nvrtc" else "fatbin"
            binary = nvcc.compile_cuda(source, target_format=fmt, arch=arch, compiler=compiler)
            out[hashlib.sha256(source.encode()).hexdigest()] = bytes(binary)
    return out
