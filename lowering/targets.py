"""Targets: the device a model is built for, as a TVM target dict plus what slimfx needs.

``resolve_target`` accepts ``"host"`` (this machine, with its CPU named so LLVM uses its
vector units: 4-6x faster than a generic x86 target), a preset name, a target dict, or a
``tvm.target.Target``.

Presets:

========================  ==============================================================
``x86-64-avx2``           x86-64 with AVX2/FMA (Haswell and later)
``x86-64-avx512``         x86-64 with AVX-512 (Skylake-SP and later)
``aarch64``               64-bit Arm, Cortex-A72-class, NEON (cross-compiled from x86)
``aarch64-cortex-a55``    little cores of phones
``cuda``                  NVIDIA GPU: this machine's (its architecture read from the
                          driver), else sm_80 (Ampere); host code for any CPU of this
                          machine's architecture.
                          Cross-build for another GPU with a dict:
                          ``{"kind": "cuda", "arch": "sm_90"}``
========================  ==============================================================

CUDA kernels are compiled for one architecture and run on GPUs of that major version
with an equal or higher minor version (sm_80 code runs on sm_86, not on sm_90).

>>> t = resolve_target("aarch64")
>>> t.triple, t.vector_bits, t.is_host
('aarch64-linux-gnu', 128, False)
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from slimfx.errors import SlimfxError

__all__ = ["TargetInfo", "PRESETS", "host_target", "resolve_target", "physical_cores",
           "LoweringError"]


class LoweringError(SlimfxError):
    """A graph, target or op cannot be lowered or built."""


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads counted once).

    Read from Linux's CPU topology; where it cannot be read, every logical CPU counts.
    (TVM's own default assumes every x86 core has two hyper-threads and halves the logical
    count: one thread on a 2-vCPU cloud machine whose vCPUs are separate cores.)
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for c in cpus:
        try:
            top = f"/sys/devices/system/cpu/cpu{c}/topology"
            with open(f"{top}/physical_package_id") as f1, open(f"{top}/core_id") as f2:
                cores.add((f1.read().strip(), f2.read().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


#: What every CUDA GPU since Volta offers (TVM warns and assumes them when they are absent).
_CUDA_LIMITS = {"max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
                "thread_warp_size": 32}

PRESETS: dict[str, dict[str, Any]] = {
    "x86-64-avx2": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"},
    "x86-64-avx512": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"},
    "aarch64": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
                "mattr": ["+neon"], "num-cores": 4},
    "aarch64-cortex-a55": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55",
                           "mattr": ["+neon"], "num-cores": 4},
    "cuda": {"kind": "cuda", "arch": "sm_80", **_CUDA_LIMITS},
}

@dataclass(frozen=True)
class TargetInfo:
    """A resolved target: the TVM dict, and facts slimfx uses (triple, cores, vectors)."""

    name: str
    config: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def triple(self) -> str:
        cfg = self.config if self.kind == "llvm" else self.config.get("host", {})
        return cfg.get("mtriple", "")

    @property
    def cpu(self) -> str:
        cfg = self.config if self.kind == "llvm" else self.config.get("host", {})
        return cfg.get("mcpu", "")

    @property
    def num_cores(self) -> int:
        cfg = self.config if self.kind == "llvm" else self.config.get("host", {})
        return int(cfg.get("num-cores", 1))

    @property
    def vector_bits(self) -> int:
        """SIMD register width in bits, from LLVM's features for this CPU (128 for NEON).

        An explicit ``"vector-width"`` in the target wins.  (TVM's ``llvm_get_vector_width``
        answers 512 for every x86 CPU, so it is not used.)
        """
        if "vector-width" in self.config:
            return int(self.config["vector-width"])
        if self.kind != "llvm":
            return 128
        from tvm.target import codegen

        features = set(codegen.llvm_get_cpu_features(self.tvm()))
        return 512 if "avx512f" in features else 256 if "avx" in features else 128

    @property
    def is_host(self) -> bool:
        """Whether code for this target runs on this machine (same architecture, CPU kind)."""
        return self.kind == "llvm" and self.triple.split("-")[0] == platform.machine()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TargetInfo:
        """A target dict as a manifest records it, taken as it is: no TVM compiler needed
        (a deployed model may have only TVM's runtime), nothing validated again."""
        return cls(config.get("tag") or config["kind"], dict(config))

    def local_device(self):
        """The device on this machine that runs code for this target, or ``None``."""
        import tvm

        if self.is_host:
            return tvm.cpu()
        if self.kind == "cuda":
            from slimfx.runtime.devices import cuda_arch, cuda_device

            dev = cuda_device()
            if dev is not None and _cuda_code_runs_on(self.config.get("arch", ""), cuda_arch(dev)):
                return dev
        return None

    def why_not_here(self) -> str:
        """Why code for this target cannot run on this machine (for error messages)."""
        if self.kind == "cuda":
            from slimfx.runtime.devices import cuda_arch, cuda_device

            dev = cuda_device()
            if dev is None:
                return "this machine has no CUDA GPU"
            return (f"it was built for {self.config.get('arch')} and this GPU is "
                    f"{cuda_arch(dev)}: rebuild with target={{'kind': 'cuda', 'arch': "
                    f"'{cuda_arch(dev)}'}} (or target='cuda' on this machine)")
        where = self.triple or self.kind
        return f"it was built for {where}, this machine is {platform.machine()}"

    def tvm(self):
        """The ``tvm.target.Target``."""
        import tvm

        return tvm.target.Target(self.config)


def _cuda_code_runs_on(built: str, gpu: str) -> bool:
    """Whether cubin for ``built`` (``"sm_80"``) runs on a GPU of architecture ``gpu``:
    the same major version, a minor version no lower."""
    try:
        b, g = int(built.removeprefix("sm_")), int(gpu.removeprefix("sm_"))
    except ValueError:
        return False
    return b // 10 == g // 10 and g % 10 >= b % 10


def _x86_cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@lru_cache(maxsize=1)
def host_target() -> TargetInfo:
    """This machine: its triple, LLVM's name for its CPU, and its core count."""
    from tvm.target import codegen

    machine = platform.machine()
    triple = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(machine)
    if triple is None:
        raise LoweringError(f"host architecture {machine!r} is not supported; "
                            f"name a target instead ({', '.join(PRESETS)})")
    cpu = codegen.llvm_get_system_cpu()
    if not codegen.llvm_is_valid_cpu(cpu, triple):
        # LLVM does not know this CPU by name: fall back on the features the kernel reports.
        flags = _x86_cpu_flags()
        cpu = "skylake-avx512" if "avx512f" in flags else "haswell" if "avx2" in flags else "generic"
    return TargetInfo("host", {"kind": "llvm", "mtriple": triple, "mcpu": cpu,
                               "num-cores": physical_cores()})


def resolve_target(target: str | dict | Any = "host") -> TargetInfo:
    """``"host"``, a preset name, a TVM target dict, or a ``tvm.target.Target``."""
    if isinstance(target, TargetInfo):
        return target
    if isinstance(target, str):
        if target == "host":
            return host_target()
        if target not in PRESETS:
            raise LoweringError(f"unknown target {target!r}; use 'host', one of "
                                f"{', '.join(PRESETS)}, or a TVM target dict")
        config = dict(PRESETS[target])
        if config["kind"] == "cuda":
            from slimfx.runtime.devices import cuda_arch, cuda_device

            dev = cuda_device()
            if dev is not None:  # this machine's GPU, as TVM's own target detection reads it
                config.update(arch=cuda_arch(dev),
                              max_shared_memory_per_block=dev.max_shared_memory_per_block,
                              max_threads_per_block=dev.max_threads_per_block,
                              thread_warp_size=dev.warp_size)
            # Host code (shape checks, kernel launches) for any CPU of this architecture:
            # the GPU's machine need not have the building machine's vector units.
            config["host"] = {"kind": "llvm", "mtriple": host_target().triple}
        else:
            config.setdefault("num-cores", physical_cores())
        return TargetInfo(target, config)
    if isinstance(target, dict):
        config = dict(target)
    elif hasattr(target, "export"):  # tvm.target.Target
        config = dict(target.export())
    else:
        raise LoweringError(f"target must be 'host', a preset name, a dict or a tvm Target, "
                            f"got {type(target).__name__}")
    if "kind" not in config:
        raise LoweringError(f"target dict needs a 'kind' (e.g. 'llvm'): {config}")
    if config["kind"] == "llvm":
        config.setdefault("num-cores", physical_cores())
    if config["kind"] == "cuda":
        for key, value in _CUDA_LIMITS.items():
            config.setdefault(key, value)
    try:
        import tvm

        tvm.target.Target(config)
    except Exception as e:  # TVM validates the keys
        raise LoweringError(f"invalid target {config}: {e}") from e
    return TargetInfo(config.get("tag") or config["kind"], config)
