"""Devices a compiled model runs on, found with TVM's runtime alone.

A deployed model needs only TVM's runtime library (``TVM_USE_RUNTIME_LIB=1``, or a TVM
package without its compiler), not the compiler that built it.  TVM's Python package then
loads no device backends at import, so the CUDA runtime module (``libtvm_runtime_cuda``,
linked against ``libcudart.so.13``) is loaded here when a CUDA model is run.

>>> from slimfx.runtime.devices import cuda_device
>>> cuda_device() is None or cuda_device().exist
True
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import site
from pathlib import Path

__all__ = ["cuda_device", "cuda_arch", "load_cuda_runtime", "provide_cuda_binaries"]

_CUDART = "libcudart.so.13"  # what TVM 0.27's libtvm_runtime_cuda.so links against


def _preload_cudart() -> None:
    """Make ``libcudart.so.13`` resolvable: the system's, a pip wheel's (PyTorch's), or a
    CUDA toolkit's."""
    try:
        ctypes.CDLL(_CUDART, mode=ctypes.RTLD_GLOBAL)
        return
    except OSError:
        pass
    candidates = [lib for root in [*site.getsitepackages(), site.getusersitepackages()]
                  for lib in sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", _CUDART)))]
    for toolkit in (os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if toolkit:
            candidates.append(os.path.join(toolkit, "lib64", _CUDART))
    for lib in candidates:
        try:
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            return
        except OSError:
            continue


def load_cuda_runtime() -> bool:
    """Load TVM's CUDA runtime module if ``import tvm`` did not; whether it is loaded.

    It links against the GPU driver (``libcuda.so.1``), so it loads only where one is
    installed."""
    import tvm  # noqa: F401  (loads libtvm_runtime)
    from tvm.base import _LOADED_LIBS

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return True
    from tvm_ffi.libinfo import load_lib_ctypes

    _preload_cudart()
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir],
            mode="RTLD_LOCAL")
    except (OSError, RuntimeError):  # no CUDA runtime library here: no CUDA device either
        return False
    return True


def cuda_device():
    """The first CUDA GPU as a TVM device, or ``None`` where there is none."""
    import tvm

    if not load_cuda_runtime():
        return None
    dev = tvm.cuda(0)
    return dev if dev.exist else None


def cuda_arch(dev) -> str:
    """The GPU's architecture as CUDA names it (``"sm_90"`` on an H100/H200)."""
    return "sm_" + dev.compute_version.replace(".", "")


_BINARIES: dict[str, bytes] = {}  # SHA-256 of a CUDA source -> its compiled kernels
_PREVIOUS_COMPILER: list = []  # the callback that was registered before slimfx's, if any


def _compile_callback(source: str) -> bytes:
    binary = _BINARIES.get(hashlib.sha256(source.encode()).hexdigest())
    if binary is not None:
        return binary
    if _PREVIOUS_COMPILER and _PREVIOUS_COMPILER[0] is not None:
        return _PREVIOUS_COMPILER[0](source)
    raise RuntimeError("slimfx: a CUDA library holds kernel source that no artifact compiled, "
                       "and no CUDA compiler is registered (import TVM's compiler, or rebuild)")


def provide_cuda_binaries(binaries: dict[str, bytes]) -> None:
    """Give TVM the compiled kernels of CUDA sources, by the SHA-256 of each source.

    A CUDA program built where TVM's CUDA runtime does not load (no GPU driver) keeps its
    kernels as source, and TVM compiles that source when the library is loaded, through
    the ``tvm_callback_cuda_compile`` callback of TVM's compiler package.  slimfx builds
    the binaries ahead (:mod:`slimfx.lowering.gpu`) and answers that callback with them,
    so loading needs no CUDA compiler and no TVM compiler; other sources go to the
    callback that was registered before, if any.
    """
    import tvm_ffi

    if not _PREVIOUS_COMPILER:
        _PREVIOUS_COMPILER.append(
            tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True))
        tvm_ffi.register_global_func("tvm_callback_cuda_compile", _compile_callback,
                                     override=True)
    _BINARIES.update(binaries)
