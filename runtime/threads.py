"""CPU threads of compiled models.

TVM's thread pool, unless ``TVM_NUM_THREADS`` (or ``OMP_NUM_THREADS``) says otherwise,
uses half of the logical CPUs on x86, assuming two hyper-threads per core.  On a cloud
machine whose vCPUs are whole cores (this project's 2-vCPU machines) that is one thread
of two: every compiled model ran at half speed while PyTorch and ONNX Runtime used both.
slimfx therefore sets the thread count itself, to this process's physical cores
(:func:`slimfx.lowering.targets.physical_cores`), the first time a compiled model runs on
the CPU, unless one of those variables is already set: a user's setting always wins.
It also sets how long TVM's idle workers spin before they sleep (:data:`SPIN_COUNT`,
unless ``TVM_THREAD_POOL_SPIN_COUNT`` is set).

``slimfx.runtime.set_num_threads(n)`` chooses another count; ``num_threads()`` reads it:

>>> from slimfx.runtime import num_threads
>>> num_threads() >= 1
True
"""

from __future__ import annotations

import os

__all__ = ["num_threads", "set_num_threads", "ensure_default", "SPIN_COUNT"]

_ENV = ("TVM_NUM_THREADS", "OMP_NUM_THREADS")

#: Iterations a TVM worker spins for its next task before it sleeps (TVM reads
#: ``TVM_THREAD_POOL_SPIN_COUNT`` once, when its pool first runs).  TVM's own default,
#: 300,000, keeps the workers busy for ~20 ms after every call; 0 puts them to sleep
#: between kernels, and waking them costs more than many kernels take.  A few thousand
#: spins cover the gaps between the kernels of a call and end soon after it
#: (``bench/spin.py``, at 224: back to back, ResNet-18 1.07x and MobileNetV2 1.36x
#: slower with 0, TVM's default within 2%; with 20 ms between calls, TVM's default burnt
#: 20-21 ms of CPU per call beyond the work, this 0.2-0.3 ms).
SPIN_COUNT = 3000


def _ffi(name: str):
    # before anything here can start TVM's pool (its workers read the spin count once)
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", str(SPIN_COUNT))
    import tvm  # noqa: F401  (loads the runtime library that registers the functions)
    import tvm_ffi

    return tvm_ffi.get_global_func(name)


def set_num_threads(n: int) -> None:
    """Run compiled models on ``n`` CPU threads (from this call on, in this process).

    Sets ``TVM_NUM_THREADS`` (read by every thread's pool when it starts) and reconfigures
    the calling thread's pool, which may already exist.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"set_num_threads: n must be a positive int, got {n!r}")
    os.environ["TVM_NUM_THREADS"] = str(n)
    _ffi("runtime.config_threadpool")(1, n)  # 1: TVM's "big cores" affinity mode, all here


def num_threads() -> int:
    """Threads the calling thread's pool runs parallel kernels on."""
    return int(_ffi("runtime.NumThreads")())




def ensure_default() -> int:
    """Set the thread count to the physical cores unless the user has set one, and the
    workers' spin count to :data:`SPIN_COUNT` unless the user has set one; the count."""
    if not any(os.environ.get(v) for v in _ENV):
        from slimfx.lowering.targets import physical_cores

        set_num_threads(physical_cores())
    return num_threads()
