"""CUDA: builds with every kernel scheduled, kernels compiled ahead where no GPU driver is,
artifacts that TVM's runtime alone loads, targets and their errors.  Running needs a GPU
(``bench/cuda_check.py`` runs the artifacts on one); without one these tests check what a
build writes and what loading says."""

import hashlib
import os
import sys

import pytest
import torch
from conftest import ConvBnRelu, randomize_bn

import slimfx
from slimfx.lowering import LoweringError, gpu, resolve_target
from slimfx.lowering.targets import TargetInfo, _cuda_code_runs_on
from slimfx.runtime import ArtifactError, load, read_manifest
from slimfx.runtime.devices import cuda_device, provide_cuda_binaries

SM90 = {"kind": "cuda", "arch": "sm_90"}


def _cuda_compiler_here() -> bool:
    try:
        with gpu.cuda_compiler():
            return True
    except LoweringError:
        return False


needs_compiler = pytest.mark.skipif(not _cuda_compiler_here(),
                                    reason="no CUDA compiler here (nvcc, or NVRTC wheels)")


class FiveByFive(torch.nn.Module):
    """A 5x5 convolution for fft-conv: TVM's dlight reduction rule raises on its DFTs."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 5, padding=2)

    def forward(self, x):
        return torch.relu(self.conv(x))


@needs_compiler
def test_cuda_build_compiles_kernels_ahead_and_saves_them(tmp_path):
    import tvm_ffi

    torch.manual_seed(0)
    model = FiveByFive().eval()
    cm = slimfx.compile(model, torch.randn(1, 8, 12, 12), target=SM90, pipeline="fft-conv")
    kernels = cm.manifest["build"]["kernels"]
    assert "unscheduled" not in kernels and kernels.get("Fallback", 0) >= 1
    path = cm.save(tmp_path / "fft")
    manifest = read_manifest(path)
    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None:
        return  # a GPU driver is here: TVM compiled the kernels into model.so itself
    # No driver: TVM kept the CUDA source in the library; slimfx compiled it for sm_90.
    (digest, name), = manifest["device_code"].items()
    source = next(gpu._cuda_modules(cm._executable.mod)).inspect_source("")
    assert "__global__" in source and hashlib.sha256(source.encode()).hexdigest() == digest
    binary = (tmp_path / "fft" / name).read_bytes()
    assert binary[:4] in (b"\x7fELF", b"P\xedU\xba")  # a cubin (NVRTC) or a fatbin (nvcc)
    assert manifest["files"][name] == hashlib.sha256(binary).hexdigest()
    assert manifest["build"]["cuda_compiler"] in ("nvrtc", "nvcc")
    if cuda_device() is None:
        assert cm.parity is None and not cm.runnable_here
        with pytest.raises(ArtifactError, match="cannot run on this machine: this machine has "
                                                "no CUDA GPU"):
            load(path)
    else:  # pragma: no cover (a GPU: the kernels run from the saved binaries)
        x = torch.randn(1, 8, 12, 12)
        torch.testing.assert_close(load(path)(x), model(x), atol=1e-4, rtol=1e-4)


@needs_compiler
def test_cuda_build_schedules_winograd_with_float16_u():
    # the transform-domain GEMM widens float16 U as it loads it: dlight's matmul rule takes it
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU()).eval()
    cm = slimfx.compile(model, torch.randn(1, 16, 12, 12), target=SM90,
                        pipeline="winograd{tile=4,weight_dtype=float16}")
    kernels = cm.manifest["build"]["kernels"]
    assert "unscheduled" not in kernels and kernels.get("Matmul") == 1


@needs_compiler
def test_cuda_build_of_a_residual_network_schedules_every_kernel():
    torch.manual_seed(0)
    model = randomize_bn(ConvBnRelu()).eval()
    cm = slimfx.compile(model, torch.randn(1, 3, 8, 8), target=SM90, pipeline="fold-bn,dce")
    kernels = cm.manifest["build"]["kernels"]
    assert "unscheduled" not in kernels and sum(kernels.values()) >= 3
    assert cm.manifest["target"]["arch"] == "sm_90"
    assert cm.manifest["target"]["max_threads_per_block"] == 1024  # filled in, TVM would warn


def test_a_rule_that_raises_hands_the_kernel_to_the_next(monkeypatch):
    from tvm import relax, tirx
    from tvm.s_tir import dlight as dl

    from slimfx.lowering.relax import to_relax

    class Raises:
        def apply(self, func, target, tunable):
            raise AssertionError("a rule that misreads this kernel")

    class Declines:
        def apply(self, func, target, tunable):
            return None

    graph = slimfx.capture(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()),
                           torch.randn(1, 3, 8, 8))
    target = resolve_target(SM90)
    with target.tvm():
        mod = relax.transform.LegalizeOps()(to_relax(graph).mod)
    monkeypatch.setattr(gpu, "_rules", lambda: [Raises(), Declines(), dl.gpu.Fallback()])
    scheduled, taken = gpu.schedule(mod, target)
    assert set(taken) == {"Fallback"} and taken["Fallback"] >= 2
    funcs = [f for _, f in scheduled.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert funcs and all(f.attrs["tirx.is_scheduled"] for f in funcs)
    monkeypatch.setattr(gpu, "_rules", lambda: [Raises()])
    assert gpu.schedule(mod, target)[1] == {"unscheduled": taken["Fallback"]}


def test_cuda_compiler_says_what_is_missing(monkeypatch):
    monkeypatch.delenv("TVM_CUDA_COMPILE_MODE", raising=False)
    monkeypatch.setattr(gpu.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # NVRTC's Python bindings absent
    with pytest.raises(LoweringError, match=r'needs NVRTC .* or nvcc; install them with: '
                                            r'pip install "slimfx\[cuda\]"'):
        with gpu.cuda_compiler():
            pass
    monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "nvcc")
    with pytest.raises(LoweringError, match="TVM_CUDA_COMPILE_MODE=nvcc, but nvcc is not on"):
        with gpu.cuda_compiler():
            pass


@needs_compiler
def test_cuda_compiler_restores_the_environment(monkeypatch):
    monkeypatch.delenv("TVM_CUDA_COMPILE_MODE", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    with gpu.cuda_compiler() as mode:
        assert os.environ["TVM_CUDA_COMPILE_MODE"] == mode
        assert os.path.isfile(os.path.join(os.environ["CUDA_PATH"], "include", "cuda_runtime.h"))
    assert "TVM_CUDA_COMPILE_MODE" not in os.environ and "CUDA_PATH" not in os.environ


def test_cuda_targets():
    t = resolve_target("cuda")
    if cuda_device() is None:
        assert t.config["arch"] == "sm_80"
    assert t.config["host"] == {"kind": "llvm", "mtriple": host_target_triple()}  # any CPU
    assert t.config["thread_warp_size"] == 32
    d = resolve_target({"kind": "cuda", "arch": "sm_90"})
    assert d.config["max_shared_memory_per_block"] == 49152 and "host" not in d.config
    # cubin runs on the same major architecture, an equal or newer minor one
    assert _cuda_code_runs_on("sm_80", "sm_86") and _cuda_code_runs_on("sm_90", "sm_90")
    assert not _cuda_code_runs_on("sm_80", "sm_90") and not _cuda_code_runs_on("sm_86", "sm_80")
    assert not _cuda_code_runs_on("", "sm_90")
    info = TargetInfo.from_config(dict(SM90))  # as a manifest records it: no TVM needed
    if cuda_device() is None:
        assert info.local_device() is None
        assert info.why_not_here() == "this machine has no CUDA GPU"
    arm = TargetInfo.from_config({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})
    assert arm.why_not_here().startswith("it was built for aarch64-linux-gnu, this machine is")


def host_target_triple():
    from slimfx.lowering import host_target

    return host_target().triple


def test_provided_binaries_answer_tvms_compile_callback(monkeypatch):
    import tvm_ffi

    from slimfx.runtime import devices

    source = 'extern "C" __global__ void k(float* a) { a[threadIdx.x] = 1.0f; }'
    provide_cuda_binaries({hashlib.sha256(source.encode()).hexdigest(): b"\x7fELF kernels"})
    callback = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
    assert bytes(callback(source)) == b"\x7fELF kernels"  # as TVM calls it while loading
    monkeypatch.setattr(devices, "_PREVIOUS_COMPILER", [None])  # no TVM compiler either
    with pytest.raises(Exception, match="holds kernel source that no artifact compiled"):
        callback(source + " ")
