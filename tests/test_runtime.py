"""Runtime: run, benchmark, save/load (also in a new process), CPU thread count, aarch64
artifacts, RPC on loopback, and errors for bad artifacts and bad inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ConvBnRelu, randomize_bn
from torch import nn

import slimfx
from slimfx.lowering import LoweringError
from slimfx.runtime import ArtifactError, InputError, load, rpc, set_num_threads


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_bn(ConvBnRelu()).eval()


@pytest.fixture(scope="module")
def compiled(model):
    return slimfx.compile(model, torch.randn(1, 3, 8, 8), pipeline="fold-bn,dce")


@pytest.fixture(scope="module")
def artifact(compiled, tmp_path_factory):
    return Path(compiled.save(tmp_path_factory.mktemp("artifact") / "resnet_block"))


def test_torch_in_torch_out_numpy_in_numpy_out(compiled, model):
    x = torch.randn(1, 3, 8, 8)
    y = compiled(x)
    assert isinstance(y, torch.Tensor)
    torch.testing.assert_close(y, model(x), atol=1e-5, rtol=1e-5)
    z = compiled(x.numpy())
    assert isinstance(z, np.ndarray) and np.allclose(z, y.numpy())


def test_benchmark_statistics(compiled):
    lat = compiled.benchmark(repeat=7)
    assert lat.runs == 7 and 0 < lat.min_ms <= lat.median_ms <= lat.max_ms


def test_cold_benchmark_flushes_the_caches_before_each_run(monkeypatch):
    """A layer whose 16 MiB of weights stay cached run after run reads them from memory
    when timed cold; one call per run, never ``number`` > 1."""
    from slimfx.runtime import model as rm

    torch.manual_seed(0)
    big = slimfx.compile(nn.Linear(2048, 2048, bias=False).eval(), torch.randn(1, 2048))
    warm = big.benchmark(repeat=15)
    cold = big.benchmark(repeat=15, cold=True)
    assert cold.runs == 15 and 0 < cold.min_ms <= cold.median_ms <= cold.max_ms
    assert cold.median_ms > 1.2 * warm.median_ms, (cold, warm)  # ~4x measured
    with pytest.raises(ValueError, match="number=1"):
        big.benchmark(repeat=2, number=3, cold=True)
    # the per-kernel profile flushes the same way: the matmul kernel is the one that waits
    kernel = {cold: max(big.profile(repeat=15, cold=cold).kernels, key=lambda k: k.ms)
              for cold in (False, True)}
    assert kernel[True].name == kernel[False].name
    assert kernel[True].ms > 1.2 * kernel[False].ms, kernel
    monkeypatch.setattr(rm, "FLUSH_BYTES", 4 << 10)  # a flush the cache absorbs: warm again
    assert big.benchmark(repeat=15, cold=True).median_ms < cold.median_ms


def test_profile_names_every_kernel_and_sums_to_the_run(compiled):
    prof = compiled.profile(torch.randn(1, 3, 8, 8), repeat=3)
    names = [k.name for k in prof.kernels]
    assert prof.runs == 3 and len(names) == len(set(names))
    convs = [k for k in prof.kernels if "conv2d" in k.name]
    # two convolutions (the second with its residual add and ReLU fused), each once per run
    assert len(convs) == 2 and all(k.calls == 1 and k.ms > 0 for k in convs)
    assert "1x3x8x8" in " ".join(k.shapes for k in prof.kernels)  # the input's conversion
    assert [k.ms for k in prof.kernels] == sorted((k.ms for k in prof.kernels), reverse=True)
    assert 0 < prof.kernel_ms < 2 * prof.total_ms  # medians need not add up exactly
    text = prof.table(top=2)
    assert "more kernels" in text and "total" in text and convs[0].name in str(prof)
    with pytest.raises(ValueError, match="repeat"):
        compiled.profile(repeat=0)


def test_compiled_exec_mode_runs_saves_and_refuses_to_profile(model, tmp_path):
    x = torch.randn(1, 3, 8, 8)
    c = slimfx.compile(model, x, pipeline="fold-bn,dce", exec_mode="compiled")
    assert c.manifest["build"]["exec_mode"] == "compiled" and c.parity["max_abs_error"] < 1e-4
    torch.testing.assert_close(c(x), model(x), atol=1e-5, rtol=1e-5)
    again = load(c.save(tmp_path / "compiled_vm"))
    torch.testing.assert_close(again(x), model(x), atol=1e-5, rtol=1e-5)
    assert again.benchmark(x, repeat=2).runs == 2
    with pytest.raises(ArtifactError, match="exec_mode='compiled'"):
        again.profile(x)
    with pytest.raises(LoweringError, match="exec_mode must be one of bytecode, compiled"):
        slimfx.compile(model, x, exec_mode="jit")


def test_profile_detaches_its_instrument(compiled, monkeypatch):
    # A callback left on the VM (even a no-op one) costs a Python call per VM instruction:
    # a model profiled once then ran 10x slower on small inputs.
    vm, installed = compiled._vm, []
    real = vm.set_instrument
    monkeypatch.setattr(vm, "set_instrument", lambda f: (installed.append(f), real(f))[1])
    compiled.profile(torch.randn(1, 3, 8, 8), repeat=2)
    assert len(installed) == 2 and callable(installed[0]) and installed[-1] is None
    assert compiled(torch.randn(1, 3, 8, 8)).shape == (1, 4)


def test_artifact_layout_and_manifest(artifact, compiled):
    assert sorted(p.name for p in artifact.iterdir()) == ["manifest.json", "model.so", "params.npz"]
    m = json.loads((artifact / "manifest.json").read_text())
    assert m["format"] == "slimfx-artifact" and m["format_version"] == 1
    assert m["inputs"] == [{"name": "x", "shape": [1, 3, 8, 8], "dtype": "float32"}]
    assert m["outputs"] == [{"name": "output0", "shape": [1, 4], "dtype": "float32"}]
    assert m["versions"]["tvm"] and m["versions"]["slimfx"] == slimfx.__version__
    assert m["target"]["mcpu"] and m["parity"]["max_abs_error"] < 1e-4
    assert m["graph"]["macs"] == compiled.manifest["graph"]["macs"] > 0
    assert m["params"] == compiled.param_names and "conv1.weight" in m["params"]
    assert not any("running_mean" in p for p in m["params"])  # fold-bn ran before lowering


def _no_thread_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "TVM_THREAD_POOL_SPIN_COUNT")}


@pytest.mark.parametrize("runtime_only", [False, True])
def test_save_load_round_trip_in_a_new_process(artifact, model, tmp_path, runtime_only):
    # runtime_only: TVM's runtime library alone, as on a device without TVM's compiler
    x = torch.randn(1, 3, 8, 8)
    np.save(tmp_path / "x.npy", x.numpy())
    code = (
        "import sys, numpy as np, tvm, slimfx.runtime as rt\n"
        f"assert tvm.base._RUNTIME_ONLY is {runtime_only}\n"
        "from slimfx.lowering.targets import physical_cores\n"
        f"m = rt.load({str(artifact)!r})\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, m(np.load({str(tmp_path / 'x.npy')!r})))\n"
        "assert 'conftest' not in sys.modules  # the model's class was never needed\n"
        # every physical core (TVM alone would use half the logical CPUs on x86)
        "assert rt.num_threads() == physical_cores(), (rt.num_threads(), physical_cores())\n"
        # idle workers spin briefly, then sleep (TVM's default spins ~20 ms after a call)
        "import os; from slimfx.runtime.threads import SPIN_COUNT\n"
        "assert os.environ['TVM_THREAD_POOL_SPIN_COUNT'] == str(SPIN_COUNT)\n")
    env = {**_no_thread_env(), **({"TVM_USE_RUNTIME_LIB": "1"} if runtime_only else {})}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "y.npy")), model(x),
                               atol=1e-5, rtol=1e-5)


def test_user_thread_count_wins(artifact, tmp_path):
    code = (
        "import numpy as np, slimfx.runtime as rt\n"
        f"m = rt.load({str(artifact)!r})\n"
        "m(np.zeros((1, 3, 8, 8), 'float32'))\n"
        "assert rt.num_threads() == 1, rt.num_threads()\n"
        "import os; assert os.environ['TVM_THREAD_POOL_SPIN_COUNT'] == '0'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**_no_thread_env(), "TVM_NUM_THREADS": "1",
                            "TVM_THREAD_POOL_SPIN_COUNT": "0"})
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_set_num_threads_rejects(n):
    with pytest.raises(ValueError, match="n must be a positive int"):
        set_num_threads(n)


def test_loaded_model_saves_again(artifact, tmp_path):
    again = Path(load(artifact).save(tmp_path / "copy"))
    assert (again / "model.so").read_bytes() == (artifact / "model.so").read_bytes()
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype("float32")
    assert np.array_equal(load(again)(x), load(artifact)(x))


def _copy(artifact, tmp_path):
    dest = tmp_path / "a"
    dest.mkdir()
    for f in artifact.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def _edit_manifest(path, **changes):
    m = json.loads((path / "manifest.json").read_text())
    for k, v in changes.items():
        if k == "tvm":
            m["versions"]["tvm"] = v
        else:
            m[k] = v
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "manifest.json").unlink(), "is not a slimfx artifact: it has no manifest.json"),
    (lambda p: (p / "manifest.json").write_text("{not json"), "manifest.json is not valid JSON"),
    (lambda p: _edit_manifest(p, format="onnx"), "is not a slimfx artifact manifest"),
    (lambda p: _edit_manifest(p, format_version=99), "has format version 99"),
    (lambda p: _edit_manifest(p, tvm="0.1.0"), "was built with TVM 0.1.0"),
    (lambda p: (p / "model.so").write_bytes((p / "model.so").read_bytes()[:1000]),
     "model.so does not match its checksum"),
    (lambda p: (p / "params.npz").unlink(), "params.npz is missing"),
    (lambda p: _edit_manifest(p, files={}, param_shapes=[[1]] * 8), "has shape"),
])
def test_bad_artifacts_are_named(artifact, tmp_path, damage, message):
    path = _copy(artifact, tmp_path)
    damage(path)
    with pytest.raises(ArtifactError, match=message):
        load(path)


def test_missing_artifact_folder(tmp_path):
    with pytest.raises(ArtifactError, match="not a folder"):
        load(tmp_path / "nowhere")


@pytest.mark.parametrize("inputs, message", [
    ((), r"expected 1 inputs \(x: float32\[1,3,8,8\]\), got 0"),
    ((torch.randn(1, 3, 8, 9),), r"input 'x' has shape \(1, 3, 8, 9\), the model was built for \(1, 3, 8, 8\)"),
    ((torch.randn(1, 3, 8, 8).double(),), "input 'x' has dtype float64, the model was built for float32"),
    (([0.0] * 3,), "input 'x' must be a torch.Tensor or numpy array, got list"),
])
def test_bad_inputs_are_named(compiled, inputs, message):
    with pytest.raises(InputError, match=message):
        compiled(*inputs)


def test_aarch64_cross_compiled_artifact(model, tmp_path):
    cm = slimfx.compile(model, torch.randn(1, 3, 8, 8), target="aarch64")
    assert cm.parity is None and not cm.runnable_here
    path = Path(cm.save(tmp_path / "arm"))
    header = (path / "model.so").read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and header[4] == 2  # 64-bit ELF
    assert int.from_bytes(header[18:20], "little") == 183  # e_machine: EM_AARCH64
    assert json.loads((path / "manifest.json").read_text())["target"]["mtriple"] == "aarch64-linux-gnu"
    with pytest.raises(ArtifactError, match="cannot run on this machine: it was built for "
                                            "aarch64-linux-gnu, this machine is x86_64"):
        load(path)
    with pytest.raises(ArtifactError, match="cannot run on this machine: .*; run it on the device"):
        cm(torch.randn(1, 3, 8, 8))


def test_rpc_on_loopback(artifact, model):
    x = torch.randn(1, 3, 8, 8)
    with rpc.local_server() as (host, port):
        assert host == "127.0.0.1"
        remote_model = load(artifact, remote=rpc.connect(host, port))
        torch.testing.assert_close(remote_model(x), model(x), atol=1e-5, rtol=1e-5)
        lat = remote_model.benchmark(x, repeat=3)
        assert lat.runs == 3 and lat.median_ms > 0
        with pytest.raises(ArtifactError, match="RPC cannot be profiled"):
            remote_model.profile(x)
        del remote_model


def test_rpc_connect_error():
    with pytest.raises(rpc.RPCError, match="cannot connect to the RPC server at 127.0.0.1:1"):
        rpc.connect("127.0.0.1", 1, timeout_s=5)


def test_cli_compile_and_run(tmp_path, capsys):
    from slimfx.cli import main

    out = tmp_path / "cli_artifact"
    assert main(["compile", "slimfx.zoo:small_resnet", "--input-shape", "1,3,16,16",
                 "--pipeline", "fold-bn,dce", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "parity vs PyTorch: max abs error" in text and f"wrote {out}" in text
    assert main(["run", str(out), "--bench", "--repeat", "3", "--profile", "2"]) == 0
    text = capsys.readouterr().out
    assert "more kernels" in text and "argument shapes" in text
    assert "output0: float32[1,10]" in text and "latency: median" in text and "over 3 runs" in text
    assert main(["run", str(out), "--bench", "--cold", "--repeat", "2"]) == 0
    assert "latency (cold): median" in capsys.readouterr().out
    assert main(["run", str(out), "--profile", "2", "--cold", "--repeat", "2"]) == 0
    assert "more kernels" in capsys.readouterr().out
    assert main(["run", str(out), "--cold"]) == 2
    assert "--cold times --bench or --profile runs" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_cli_compile_passes_tuning_and_padding_options(tmp_path, monkeypatch, capsys):
    from slimfx.cli import main

    seen = {}

    def fake_compile(model, inputs, **kwargs):
        seen.update(kwargs)
        raise slimfx.SlimfxError("stop here")

    monkeypatch.setattr(slimfx, "compile", fake_compile)
    args = ["compile", "slimfx.zoo:small_resnet", "--input-shape", "1,3,16,16", "-o",
            str(tmp_path / "a")]
    assert main(args + ["--tune", "8", "--records", str(tmp_path / "rec"),
                        "--no-pad-channels", "--exec-mode", "compiled"]) == 2
    assert "stop here" in capsys.readouterr().err
    assert seen["tune"] == 8 and seen["records"] == str(tmp_path / "rec")
    assert seen["pad_channels"] is False and seen["exec_mode"] == "compiled"
    main(args)
    assert seen["tune"] == 0 and seen["records"] is None and seen["pad_channels"] is True
    assert seen["exec_mode"] == "bytecode"
