"""Lowering: zoo and transformers models build for the host and match PyTorch to 1e-4;
targets; the custom-op lowering hook; errors naming the node and op."""

import pytest
import torch
from conftest import randomize_bn
from test_capture import HF

import slimfx
from slimfx import zoo
from slimfx.lowering import (
    PRESETS,
    LoweringError,
    host_target,
    register_lowering,
    resolve_target,
    to_relax,
)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_compiles_for_host_and_matches(name):
    torch.manual_seed(0)
    model = randomize_bn(zoo.get(name)).eval()
    x = torch.randn(*zoo.INPUT_SHAPES[name])
    cm = slimfx.compile(model, x, pipeline="fold-bn,dce")
    assert cm.parity["max_abs_error"] <= cm.parity["tolerance"]
    y = torch.randn(*zoo.INPUT_SHAPES[name])  # a fresh input, not the one checked at build
    ref = model(y)
    assert (cm(y) - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("name", list(HF))
def test_transformers_compile_for_host_and_match(name):
    torch.manual_seed(0)
    factory, args, kwargs = HF[name]
    model = factory().eval()
    g = slimfx.capture(model, args, kwargs)
    cm = slimfx.compile(g, pipeline="fold-bn,const-fold,dce")
    assert cm.parity["max_abs_error"] <= cm.parity["tolerance"]
    flat = [*args, *kwargs.values()]
    outs = cm(*flat)
    outs = outs if isinstance(outs, tuple) else (outs,)
    ref = [t for t in model(*args, **kwargs).to_tuple() if isinstance(t, torch.Tensor)]
    assert len(outs) == len(ref)
    for a, b in zip(outs, ref):
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("affine", [True, False])
def test_unfolded_batch_norm_lowers_exactly(affine):
    # TVM 0.27 misreads aten.batch_norm's arguments; slimfx lowers it itself.
    model = randomize_bn(torch.nn.Sequential(torch.nn.BatchNorm2d(4, affine=affine))).eval()
    x = torch.randn(2, 4, 5, 5)
    cm = slimfx.compile(model, x)
    torch.testing.assert_close(cm(x), model(x), atol=1e-5, rtol=1e-5)


class _Stats(torch.nn.Module):
    """A BatchNorm fold-bn cannot fold (after a concat) and a plain tensor constant."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.scale = torch.linspace(0.5, 2.0, 8).reshape(1, 8, 1, 1)  # not a buffer

    def forward(self, x):
        return torch.relu(self.bn(torch.cat([self.conv(x), x], 1))) * self.scale


def test_buffers_and_constants_are_passed_as_parameters():
    # TVM's frontend binds buffers and constants into the module; FoldConstant would then
    # compile one kernel per folded op. slimfx passes them like weights instead.
    model = randomize_bn(_Stats()).eval()
    x = torch.randn(1, 3, 8, 8)
    g = slimfx.run_pipeline(slimfx.capture(model, x), "fold-bn,dce")
    buffers = dict(g.gm.named_buffers())
    prog = to_relax(g)
    stats = [n for n in prog.param_names if n.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 and "scale" in prog.param_names
    assert "num_batches_tracked" not in " ".join(prog.param_names)  # read by no node
    assert len(prog.param_names) == len(prog.mod["main"].params) - 1
    assert dict(g.gm.named_buffers()).keys() == buffers.keys()  # the graph is unchanged
    cm = slimfx.compile(g)
    assert set(stats) <= set(cm.manifest["params"])
    y = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(cm(y), model(y), atol=1e-5, rtol=1e-5)


def test_host_target_names_the_cpu():
    t = host_target()
    assert t.config["kind"] == "llvm" and t.config["mtriple"] == "x86_64-linux-gnu"
    assert t.config["mcpu"] not in ("", "generic") and t.num_cores >= 1
    assert t.is_host and t.vector_bits in (128, 256, 512)
    t.tvm()  # TVM accepts it


def test_presets_and_bad_targets():
    for name in PRESETS:
        info = resolve_target(name)
        info.tvm()
    assert resolve_target("x86-64-avx512").vector_bits == 512
    assert not resolve_target("aarch64").is_host
    assert resolve_target("cuda").config["host"]["kind"] == "llvm"
    with pytest.raises(LoweringError, match="unknown target 'arm'"):
        resolve_target("arm")
    with pytest.raises(LoweringError, match="needs a 'kind'"):
        resolve_target({"mcpu": "znver4"})
    with pytest.raises(LoweringError, match="invalid target"):
        resolve_target({"kind": "llvm", "no-such-key": 1})


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("slimfx::test_triple", mutates_args=())
def triple_op(x: torch.Tensor) -> torch.Tensor:
    return x * 3


@triple_op.register_fake
def _(x):
    return torch.empty_like(x)


aten = torch.ops.aten


def _graph_with_custom_op():
    g = slimfx.capture(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()),
                       (torch.randn(2, 4),))
    relu = next(g.find(aten.relu.default))
    with g.fx.inserting_after(relu):
        t = g.fx.call_function(torch.ops.slimfx.test_triple.default, (relu,))
    g.inherit(t, relu)
    relu.replace_all_uses_with(t)
    t.args = (relu,)
    g.gm.recompile()
    g.lint()  # slimfx:: ops are canonical
    return g


def test_unlowerable_op_is_named(monkeypatch):
    from slimfx.lowering import relax as lowering_relax

    monkeypatch.setattr(lowering_relax, "_LOWERINGS", {})
    with pytest.raises(LoweringError) as e:
        to_relax(_graph_with_custom_op())
    msg = str(e.value)
    assert "op slimfx.test_triple cannot be lowered" in msg
    assert "at node 'test_triple" in msg and "module '1'" in msg


def test_custom_op_lowering_hook(monkeypatch):
    from tvm import relax

    from slimfx.lowering import relax as lowering_relax

    monkeypatch.setattr(lowering_relax, "_LOWERINGS", {})

    @register_lowering(torch.ops.slimfx.test_triple.default)
    def _lower(node, importer):
        (x,) = importer.retrieve_args(node)
        return importer.block_builder.emit(relax.op.multiply(x, relax.const(3.0, "float32")))

    g = _graph_with_custom_op()
    cm = slimfx.compile(g)
    x = torch.randn(2, 4)
    torch.testing.assert_close(cm(x), g(x), atol=1e-5, rtol=1e-5)
    assert cm.parity["max_abs_error"] < 1e-5


def test_compile_argument_errors():
    with pytest.raises(LoweringError, match="needs example_inputs"):
        slimfx.compile(torch.nn.ReLU())
    with pytest.raises(LoweringError, match="expects a slimfx Graph or an nn.Module"):
        slimfx.compile("model.pt")
