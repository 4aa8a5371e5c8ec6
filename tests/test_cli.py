"""The command line: inspect, passes, and errors that name the bad argument."""

import subprocess
import sys
import textwrap

import pytest

from slimfx.cli import main


def test_inspect_zoo_model_with_pipeline(capsys, tmp_path):
    rc = main(["inspect", "slimfx.zoo:resnet18", "--input-shape", "1,3,32,32",
               "--pipeline", "fold-bn,dce", "--timing", "--stats", "--dump-ir", str(tmp_path / "ir"),
               "--draw", str(tmp_path / "g.svg"), "--draw", str(tmp_path / "g.dot")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "aten.convolution" in out and "layer4.1.conv2" in out
    assert "== what 'fold-bn,dce' changed ==" in out
    assert "fold-bn: folded=20" in out  # ResNet-18: 17 main-path BNs + 3 shortcut BNs
    assert (tmp_path / "ir" / "01-fold-bn.txt").exists()
    assert (tmp_path / "g.svg").read_text().lstrip().startswith("<svg")
    assert (tmp_path / "g.dot").read_text().startswith("digraph")
    assert "aten.batch_norm" not in (tmp_path / "g.dot").read_text()  # the final graph is drawn


def test_inspect_custom_file_pass_and_int_inputs(capsys, tmp_path):
    model_file = tmp_path / "mymodel.py"
    model_file.write_text(textwrap.dedent("""
        import torch
        import slimfx

        class Emb(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = torch.nn.Embedding(10, 4)
                self.fc = torch.nn.Linear(4, 2)

            def forward(self, ids):
                return torch.relu(torch.relu(self.fc(self.emb(ids))))

        def build():
            return Emb()

        @slimfx.register_pass("test-cli-count", replace=True)
        def count(graph):
            return False
        """))
    rc = main(["inspect", f"{model_file}:build", "--input-shape", "2,5:int64", "--all", "--ir",
               "--pipeline", "test-cli-count"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "%ids: i64[2,5]" in out and "aten.embedding" in out and "aten.relu" in out


def test_inspect_channel_groups(capsys):
    rc = main(["inspect", "slimfx.zoo:small_resnet", "--input-shape", "1,3,16,16",
               "--pipeline", "fold-bn,prune-channels{macs=0.5}", "--channels"])
    out = capsys.readouterr().out
    assert rc == 0 and "== channel groups" in out
    assert "residual add" in out and "conv out-channels" in out


def test_passes_lists_options(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "fold-bn  (lossless)" in out and "const-fold" in out
    # passes whose options make them lossy say which
    assert "winograd  (lossless; lossy with weight_dtype=float16)" in out
    assert "factorize  (lossless; lossy with rank other than full)" in out
    assert "max_growth: float = 1.0" in out


@pytest.mark.parametrize("argv, message", [
    (["inspect", "slimfx.zoo", "--input-shape", "1,3,8,8"], "must be MODULE:FACTORY"),
    (["inspect", "slimfx.zoo:nope", "--input-shape", "1,3,8,8"], "has no attribute 'nope'"),
    (["inspect", "no_such_module_xyz:f", "--input-shape", "1"], "cannot import module 'no_such_module_xyz'"),
    (["inspect", "slimfx.zoo:resnet18"], "give at least one --input-shape"),
    (["inspect", "slimfx.zoo:resnet18", "--input-shape", "1,x"], "bad --input-shape '1,x'"),
    (["inspect", "slimfx.zoo:resnet18", "--input-shape", "1,3:f13"], "bad dtype 'f13'"),
    (["inspect", "slimfx.zoo:resnet18", "--input-shape", "1,3,32,32", "--pipeline", "fold-bm"],
     "unknown pass 'fold-bm'; did you mean 'fold-bn'"),
])
def test_errors(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimfx: error:") and message in err


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "slimfx", "passes"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "dce" in r.stdout
