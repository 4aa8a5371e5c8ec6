"""Capture: canonical form, metadata, third-party models, errors, and the model left alone."""

import pytest
import torch
from conftest import ConvBnRelu, randomize_bn
from torch import nn

import slimfx
from slimfx.errors import CaptureError
from slimfx.ir import is_canonical

aten = torch.ops.aten


def test_canonical_ops_and_metadata(block_model):
    g = slimfx.capture(block_model, torch.randn(1, 3, 8, 8))
    ops = [n.target for n in g.find()]
    assert all(is_canonical(t) for t in ops)
    assert ops.count(aten.convolution.default) == 2
    assert ops.count(aten.batch_norm.default) == 2  # normalised from _native_batch_norm_legit
    conv = next(g.find(aten.convolution.default, module_path="conv2"))
    info = g.info(conv)
    assert info.shape == (1, 8, 8, 8) and info.dtype == torch.float32
    assert info.macs == 8 * 8 * 8 * 8 * 9  # out elements x Cin x 3x3
    assert info.module_path == "conv2"
    layer = {i.module_path: i for i in g.layers()}
    assert layer["conv2"].params == 8 * 8 * 9  # no bias
    assert layer["fc"].params == 8 * 4 + 4 and layer["fc"].macs == 32
    assert g.param_count() == sum(p.numel() for p in block_model.parameters()) + 4 * 8  # + BN stats


def test_graph_is_runnable_and_callable_like_the_model(block_model):
    x = torch.randn(1, 3, 8, 8)
    g = slimfx.capture(block_model, x)
    y = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(g(y), block_model(y))
    torch.testing.assert_close(g.gm(y)[0], block_model(y))  # the GraphModule: flat tuple out


def test_model_left_untouched():
    model = randomize_bn(ConvBnRelu()).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = slimfx.capture(model, torch.randn(2, 3, 8, 8))
    assert all(m.training for m in model.modules())  # train flags restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # BN statistics not updated by capture
    # The graph owns its weights: editing them does not reach the model.
    g.param("conv1.weight").data.zero_()
    assert not torch.equal(model.conv1.weight, torch.zeros_like(model.conv1.weight))


def test_kwargs_and_pytree_outputs():
    class Two(nn.Module):
        def forward(self, x, *, scale):
            return {"sum": x + scale, "prod": (x * scale, x - scale)}

    g = slimfx.capture(Two(), (torch.ones(2),), {"scale": torch.full((2,), 3.0)})
    out = g(torch.ones(2), scale=torch.full((2,), 2.0))
    assert set(out) == {"sum", "prod"}
    torch.testing.assert_close(out["prod"][1], torch.full((2,), -1.0))
    with pytest.raises(slimfx.GraphError, match="do not match the captured structure"):
        g(torch.ones(2))


def test_data_dependent_control_flow_names_the_source_line():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent: torch.export cannot trace this
                return x * 2
            return x

    with pytest.raises(CaptureError) as e:
        slimfx.capture(Branchy(), torch.randn(3))
    msg = str(e.value)
    assert "Branchy" in msg and "test_capture.py" in msg and "if x.sum() > 0" in msg


def test_bad_arguments():
    with pytest.raises(CaptureError, match="expects a torch.nn.Module"):
        slimfx.capture(lambda x: x, torch.randn(1))
    with pytest.raises(CaptureError, match="example input #1 is a int"):
        slimfx.capture(nn.ReLU(), (torch.randn(1), 3))


def test_capture_verifies_against_the_model(monkeypatch):
    # A model whose eager result differs from what it exports is caught by verification.
    class Liar(nn.Module):
        def forward(self, x):
            if torch.compiler.is_exporting():
                return x + 1
            return x

    with pytest.raises(CaptureError, match="does not reproduce the model"):
        slimfx.capture(Liar(), torch.randn(3))


# --------------------------------------------------------------------------- transformers
transformers = pytest.importorskip("transformers")


def _hf_models():
    T = transformers
    img64 = (torch.randn(1, 3, 64, 64),)
    return {
        "resnet": (lambda: T.ResNetForImageClassification(T.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)),
            img64, {}),
        "mobilenet_v2": (lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
            depth_multiplier=0.35, image_size=64, num_labels=10)), img64, {}),
        "convnext": (lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
            hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)), img64, {}),
        # grouped convolutions, 8 channels per group
        "regnet": (lambda: T.RegNetForImageClassification(T.RegNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1],
            groups_width=8, num_labels=10)), img64, {}),
        # depthwise convs, squeeze-excite, SiLU; the base model: the classification head
        # pools a 2x2 map with a hidden_dim-wide window, and its logits are all zero here
        "efficientnet": (lambda: T.EfficientNetModel(T.EfficientNetConfig(
            image_size=64, width_coefficient=0.25, depth_coefficient=0.3, hidden_dim=320)),
            img64, {}),
        "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            image_size=32, patch_size=8, num_labels=10)), (torch.randn(1, 3, 32, 32),), {}),
        "bert": (lambda: T.BertModel(T.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)),
            (), {"input_ids": torch.randint(0, 100, (1, 16)),
                 "attention_mask": torch.ones(1, 16, dtype=torch.long)}),
    }


HF = _hf_models()


@pytest.mark.parametrize("name", list(HF))
def test_capture_transformers(name):
    torch.manual_seed(0)
    factory, args, kwargs = HF[name]
    model = factory().eval()
    g = slimfx.capture(model, args, kwargs)
    assert all(is_canonical(n.target) for n in g.find())
    out, ref = g(*args, **kwargs), model(*args, **kwargs)
    assert type(out) is type(ref)  # the model's own output class comes back
    for key in ref.keys():
        torch.testing.assert_close(out[key], ref[key], atol=1e-5, rtol=1e-5)
    assert g.macs() > 0
    layers = g.layers()
    assert layers and all(i.module_path for i in layers)  # every layer knows where it came from
    # The standard cleanup pipeline is verified lossless on each of them.
    g2 = slimfx.run_pipeline(g, "fold-bn,const-fold,dce")
    for key in ref.keys():
        torch.testing.assert_close(g2(*args, **kwargs)[key], ref[key], atol=1e-5, rtol=1e-5)
