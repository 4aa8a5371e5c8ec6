"""The compiled, runnable model.

A :class:`CompiledModel` holds a built TVM program, its parameters and a manifest that
describes inputs, outputs and target.  Call it with torch tensors or numpy arrays; it
returns the same kind (one array, or a tuple for several outputs).  ``benchmark`` times
it; ``save`` writes a self-contained artifact folder that :func:`slimfx.runtime.load`
reads back without the model's Python class and without unpickling anything.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from slimfx.errors import SlimfxError

__all__ = ["CompiledModel", "IOSpec", "Latency", "Profile", "KernelTime", "InputError",
           "ArtifactError"]


class InputError(SlimfxError, ValueError):
    """Inputs given to a compiled model do not match what it was built for."""


class ArtifactError(SlimfxError):
    """An artifact folder is missing, corrupt, or from another version."""


@dataclass(frozen=True)
class IOSpec:
    """Name, shape and dtype of one model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: "float32", "int64", ...

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}[{','.join(map(str, self.shape))}]"

    @classmethod
    def from_json(cls, d: dict) -> IOSpec:
        return cls(str(d["name"]), tuple(int(s) for s in d["shape"]), str(d["dtype"]))


#: Bytes written before each run of ``benchmark(cold=True)``: more than the last-level cache
#: holds of one model's data on the CPUs slimfx is measured on.
FLUSH_BYTES = 256 << 20


def _cache_flusher():
    """A function that writes every line of a :data:`FLUSH_BYTES` buffer: after it, the
    caches hold none of a model's data (``benchmark(cold=True)``, ``profile(cold=True)``)."""
    buf = np.ones(FLUSH_BYTES // 4, dtype=np.float32)

    def flush() -> None:
        nonlocal buf
        buf += 1.0

    return flush


@dataclass(frozen=True)
class Latency:
    """Latency statistics over ``runs`` timed runs, in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float
    runs: int

    def __str__(self) -> str:
        return (f"median {self.median_ms:.3f} ms, min {self.min_ms:.3f} ms, "
                f"max {self.max_ms:.3f} ms over {self.runs} runs")


@dataclass(frozen=True)
class KernelTime:
    """One kernel's share of a :class:`Profile`: median milliseconds per model run."""

    name: str
    calls: int  # calls per model run
    ms: float  # median over the profiled runs of the summed time of its calls in one run
    shapes: str = ""  # argument shapes of its first call (inputs, then outputs)


@dataclass(frozen=True)
class Profile:
    """Where a compiled model's time goes, kernel by kernel (:meth:`CompiledModel.profile`).

    ``total_ms`` is the median wall time of a run as the profiler saw it (timing each call
    adds a few microseconds per kernel); ``overhead_ms`` is what no kernel accounts for:
    the virtual machine's own work between kernels (allocation, shape checks, calls).
    """

    kernels: tuple[KernelTime, ...]  # slowest first
    total_ms: float
    runs: int

    @property
    def kernel_ms(self) -> float:
        return sum(k.ms for k in self.kernels)

    @property
    def overhead_ms(self) -> float:
        return max(0.0, self.total_ms - self.kernel_ms)

    def table(self, top: int | None = None) -> str:
        """A text table: kernel, calls, ms, share of the run; ``top`` rows at most."""
        from slimfx.ir.printing import format_table

        def row(name, calls, ms, shapes=""):
            return [name, str(calls), f"{ms:.3f}", f"{100 * ms / self.total_ms:.1f}%", shapes]

        rows = [row(k.name, k.calls, k.ms, k.shapes) for k in self.kernels[:top]]
        rest = self.kernels[top:] if top is not None else ()
        if rest:
            rows.append(row(f"({len(rest)} more kernels)", sum(k.calls for k in rest),
                            sum(k.ms for k in rest)))
        rows.append(row("(between kernels)", "", self.overhead_ms))
        rows.append(row("total", sum(k.calls for k in self.kernels), self.total_ms))
        return format_table(["kernel", "calls", "ms", "share", "argument shapes"], rows)

    def __str__(self) -> str:
        return self.table()


def _np_dtype_name(t) -> str:
    if isinstance(t, torch.Tensor):
        return str(t.dtype).removeprefix("torch.")
    return np.dtype(t.dtype).name


class CompiledModel:
    """A program built for a target, with its parameters; runnable where the target is.

    Not built directly: :func:`slimfx.compile` and :func:`slimfx.runtime.load` make one.
    """

    def __init__(self, executable, params: Sequence[np.ndarray], manifest: dict[str, Any], *,
                 device=None, library_path: str | None = None,
                 device_code: dict[str, bytes] | None = None):
        self._executable = executable  # relax.Executable or a loaded runtime.Module
        # CUDA kernels compiled by slimfx for a library that holds their source, by the
        # source's SHA-256 (slimfx.lowering.gpu); saved beside the library.
        self._device_code = dict(device_code or {})
        self._params = [np.ascontiguousarray(p) for p in params]
        self.manifest = manifest
        self.inputs = [IOSpec.from_json(d) for d in manifest["inputs"]]
        self.outputs = [IOSpec.from_json(d) for d in manifest["outputs"]]
        self._device = device
        self._library_path = library_path
        self._vm = None
        self._device_params = None

    # ------------------------------------------------------------------ facts
    @property
    def target(self) -> dict:
        return self.manifest["target"]

    @property
    def parity(self) -> dict | None:
        """``{"max_abs_error": ..., "tolerance": ...}`` from the check at compile time."""
        return self.manifest.get("parity")

    @property
    def param_names(self) -> list[str]:
        return list(self.manifest["params"])

    @property
    def runnable_here(self) -> bool:
        from slimfx.lowering.targets import TargetInfo

        return self._device is not None or TargetInfo.from_config(self.target).local_device() is not None

    def __repr__(self) -> str:
        ins = ", ".join(map(str, self.inputs))
        outs = ", ".join(map(str, self.outputs))
        return f"<CompiledModel ({ins}) -> ({outs}) for {self.target.get('mtriple', self.target['kind'])}>"

    # ------------------------------------------------------------------ running
    def _ensure_vm(self):
        if self._vm is not None:
            return self._vm
        import tvm
        from tvm.runtime.vm import VirtualMachine  # tvm.relax's, without TVM's compiler

        from slimfx.lowering.targets import TargetInfo

        info = TargetInfo.from_config(self.target)
        dev = self._device if self._device is not None else info.local_device()
        if dev is None:
            raise ArtifactError(
                f"this model cannot run on this machine: {info.why_not_here()}; run it on "
                "the device through RPC "
                "(slimfx.runtime.load(path, remote=slimfx.runtime.rpc.connect(host, port)))")
        if dev.dlpack_device_type() == 1:  # kDLCPU: all physical cores unless the user says
            from .threads import ensure_default

            ensure_default()
        self._vm = VirtualMachine(self._executable, dev)
        self._device_params = [tvm.runtime.tensor(p, device=dev) for p in self._params]
        self._dev = dev
        transform = self.manifest.get("transform_params")
        if transform:  # weight re-layouts lifted out of main: run them once, here
            self._vm.set_input(transform, *self._device_params)
            self._vm.invoke_stateful(transform)
            out = self._vm.get_outputs(transform)
            self._device_params = [out] if hasattr(out, "numpy") else list(out)
        return self._vm

    def _check_inputs(self, args: Sequence) -> list[np.ndarray]:
        if len(args) != len(self.inputs):
            want = ", ".join(map(str, self.inputs))
            raise InputError(f"expected {len(self.inputs)} inputs ({want}), got {len(args)}")
        arrays = []
        for spec, a in zip(self.inputs, args):
            if isinstance(a, torch.Tensor):
                arr = a.detach().cpu().contiguous().numpy()
            elif isinstance(a, np.ndarray):
                arr = np.ascontiguousarray(a)
            else:
                raise InputError(f"input '{spec.name}' must be a torch.Tensor or numpy array, "
                                 f"got {type(a).__name__}")
            if tuple(arr.shape) != spec.shape:
                raise InputError(f"input '{spec.name}' has shape {tuple(arr.shape)}, "
                                 f"the model was built for {spec.shape}")
            if arr.dtype.name != spec.dtype:
                raise InputError(f"input '{spec.name}' has dtype {_np_dtype_name(a)}, "
                                 f"the model was built for {spec.dtype}")
            arrays.append(arr)
        return arrays

    def run_numpy(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """Run on numpy arrays; returns a tuple of numpy arrays (one per output)."""
        self._set_inputs(arrays)
        self._vm.invoke_stateful("main")
        out = self._vm.get_outputs("main")
        outs = [out] if hasattr(out, "numpy") else list(out)
        return tuple(o.numpy() for o in outs)

    def _set_inputs(self, arrays) -> None:
        # set_input/invoke_stateful/get_outputs work the same locally and over RPC (where a
        # direct call returns an opaque handle for tuple outputs).
        import tvm

        vm = self._ensure_vm()
        args = [tvm.runtime.tensor(a, device=self._dev) for a in self._check_inputs(arrays)]
        vm.set_input("main", *args, *self._device_params)

    def __call__(self, *inputs):
        """Run: torch tensors in, torch tensors out; numpy in, numpy out."""
        arrays = self._check_inputs(inputs)
        outs = self.run_numpy(*arrays)
        if any(isinstance(i, torch.Tensor) for i in inputs):
            outs = tuple(torch.from_numpy(o) for o in outs)
        return outs[0] if len(outs) == 1 else outs

    def benchmark(self, *inputs, repeat: int = 20, number: int = 1, warmup: int = 3,
                  cold: bool = False) -> Latency:
        """Time ``repeat`` runs (each the mean of ``number`` calls) after ``warmup`` calls.

        Uses TVM's time evaluator on the model's device, so remote (RPC) runs are timed on
        the device, not across the network.  Inputs default to zeros of the right shape.

        ``cold``: before each run (``number`` must be 1), write :data:`FLUSH_BYTES` of
        memory so the caches hold none of the model's weights, as for a layer inside a
        model larger than the caches (the weights then come from memory; a model timed
        warm, run after run, keeps them cached).  Local CPU models only.
        """
        if not inputs:
            inputs = tuple(np.zeros(s.shape, dtype=s.dtype) for s in self.inputs)
        self._set_inputs(inputs)
        if cold:
            self._check_cold(number)
        for _ in range(warmup):
            self._vm.invoke_stateful("main")
        if cold:
            return self._benchmark_cold(repeat)
        timer = self._vm.time_evaluator("invoke_stateful", self._dev, number=number, repeat=repeat)
        times = [t * 1e3 for t in timer("main").results]
        return Latency(statistics.median(times), min(times), max(times), len(times))

    def _check_cold(self, number: int) -> None:
        if self._device is not None or self._dev.dlpack_device_type() != 1:  # kDLCPU
            raise ArtifactError("benchmark(cold=True) flushes this machine's CPU caches: it "
                                "times local CPU models only")
        if number != 1:
            raise ValueError(f"benchmark(cold=True) times one call per run (number=1), got number={number}")

    def _benchmark_cold(self, repeat: int) -> Latency:
        import time

        flush = _cache_flusher()
        times = []
        for _ in range(repeat):
            flush()
            t0 = time.perf_counter()
            self._vm.invoke_stateful("main")
            times.append((time.perf_counter() - t0) * 1e3)
        return Latency(statistics.median(times), min(times), max(times), len(times))

    def profile(self, *inputs, repeat: int = 10, warmup: int = 2, cold: bool = False) -> Profile:
        """Time every kernel call of ``repeat`` runs; the medians per kernel, slowest first.

        Each call the virtual machine makes (a compiled kernel or one of its builtins) is
        timed by an instrument around it; calls with the same symbol are summed per run.
        Local devices only (the instrument is a Python callback).  Inputs default to zeros.
        ``cold``: the caches flushed before each run, as ``benchmark(cold=True)`` does, so
        each kernel's share of a model's time with its weights coming from memory shows.
        """
        import time

        if self._device is not None:
            raise ArtifactError("profile() times kernels with a Python callback on this "
                                "machine; a model running through RPC cannot be profiled "
                                "(use benchmark())")
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        if self.manifest.get("build", {}).get("exec_mode") == "compiled":
            raise ArtifactError("profile() times the kernel calls of the interpreted VM; this "
                                "model was built with exec_mode='compiled', whose calls cannot "
                                "be instrumented (rebuild with exec_mode='bytecode', the "
                                "default, to profile it)")
        if cold:
            self._check_cold(1)
        if not inputs:
            inputs = tuple(np.zeros(s.shape, dtype=s.dtype) for s in self.inputs)
        self._set_inputs(inputs)
        vm = self._vm
        flush = _cache_flusher() if cold else None
        for _ in range(warmup):
            vm.invoke_stateful("main")
        per_run: list[dict[str, float]] = []
        counts: dict[str, int] = {}
        shapes: dict[str, str] = {}
        started: list[float] = []
        clock = time.perf_counter

        def instrument(func, symbol, before, ret, *args) -> int:
            if before:
                started.append(clock())
            else:
                dt = clock() - started.pop()
                run = per_run[-1]
                run[symbol] = run.get(symbol, 0.0) + dt
                if len(per_run) == 1:
                    counts[symbol] = counts.get(symbol, 0) + 1
                    if symbol not in shapes:
                        shapes[symbol] = " ".join(
                            "x".join(map(str, a.shape)) for a in args if hasattr(a, "shape"))
            return 0

        totals = []
        vm.set_instrument(instrument)
        try:
            for _ in range(repeat):
                if flush is not None:
                    flush()
                per_run.append({})
                t0 = clock()
                vm.invoke_stateful("main")
                totals.append(clock() - t0)
        finally:
            vm.set_instrument(None)  # a no-op callback would still cost a Python call per op
        kernels = [KernelTime(name, calls,
                              1e3 * statistics.median(r.get(name, 0.0) for r in per_run),
                              shapes.get(name, ""))
                   for name, calls in counts.items()]
        kernels.sort(key=lambda k: -k.ms)
        return Profile(tuple(kernels), 1e3 * statistics.median(totals), repeat)

    # ------------------------------------------------------------------ saving
    def save(self, path, *, index_coding: str = "bitpack") -> str:
        """Write the artifact folder (library, parameters, manifest); returns its path.

        ``index_coding`` (``bitpack``, ``huffman`` or ``none``) chooses how codebook
        indices (``uint8`` parameters of shared weights) are stored.
        """
        from .artifact import save

        return save(self, path, index_coding=index_coding)


def io_specs(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> list[dict]:
    """Manifest entries for tensors."""
    return [asdict(IOSpec(n, tuple(t.shape), _np_dtype_name(t))) for n, t in zip(names, tensors)]
