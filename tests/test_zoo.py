"""Tests of the built-in model zoo (:mod:`slimfx.zoo`): shapes, capture, MACs, parameters."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import slimfx
from slimfx import zoo

NAMES = list(zoo.ZOO)


@functools.cache
def _captured(name: str) -> tuple[torch.nn.Module, torch.Tensor, slimfx.Graph]:
    """Build, seed and capture one zoo model once per test session (capture is the slow part)."""
    torch.manual_seed(0)
    model = zoo.get(name).eval()
    x = torch.randn(*zoo.INPUT_SHAPES[name])
    return model, x, slimfx.capture(model, x)


def test_registry_names():
    assert set(zoo.ZOO) == set(zoo.INPUT_SHAPES) == {
        "resnet18", "resnet50", "vgg11", "mobilenet_v2", "densenet", "vit", "small_resnet"}


def test_get_unknown_name_lists_known():
    with pytest.raises(KeyError, match="resnet18") as info:
        zoo.get("resnet19")
    assert "small_resnet" in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_output_shape(name):
    model, x, _ = _captured(name)
    with torch.no_grad():
        assert model(x).shape == (1, 10)


@pytest.mark.parametrize("name", NAMES)
def test_num_classes(name):
    torch.manual_seed(0)
    model = zoo.get(name, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(*zoo.INPUT_SHAPES[name])).shape == (1, 3)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_given_seed(name):
    torch.manual_seed(123)
    a = zoo.get(name).state_dict()
    torch.manual_seed(123)
    b = zoo.get(name).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", NAMES)
def test_capture_reproduces_model(name):
    model, x, graph = _captured(name)
    with torch.no_grad():
        want = model(x)
        got = graph(x)
    assert got.shape == want.shape == (1, 10)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_macs_and_params(name):
    model, _, graph = _captured(name)
    assert graph.macs() > 0
    # Graph.param_count() sums the elements of every tensor read by a get_attr node.  A
    # model captured in eval mode reads all parameters plus the BatchNorm running mean and
    # variance (floating-point buffers); BatchNorm's int64 ``num_batches_tracked`` is only
    # used in training, so it is never read and not counted.  No zoo model shares weights,
    # so nothing is counted twice.
    expected = (sum(p.numel() for p in model.parameters())
                + sum(b.numel() for b in model.buffers() if b.is_floating_point()))
    assert graph.param_count() == expected


def test_resnet18_stem_macs():
    _, x, graph = _captured("resnet18")
    stem = [i for i in graph.layers() if i.module_path == "conv1"]
    assert [i.op for i in stem] == ["aten.convolution"]
    conv = stem[0]
    # 7x7 stride-2 padding-3 conv, 3 -> 64 channels: 32x32 -> 16x16.
    h, w = x.shape[2] // 2, x.shape[3] // 2
    assert conv.shape == (1, 64, h, w)
    assert conv.macs == h * w * 64 * 3 * 7 * 7 == 2_408_448
    assert conv.params == 64 * 3 * 7 * 7


def test_resnet18_fc_macs():
    _, _, graph = _captured("resnet18")
    fc = [i for i in graph.layers() if i.module_path == "fc"]
    assert len(fc) == 1 and fc[0].op == "aten.linear"
    assert fc[0].macs == 512 * 10 and fc[0].params == 512 * 10 + 10


def test_small_resnet_macs_at_56():
    """The benchmark net: about 0.93 GMACs (1.87 GFLOP) at 1x3x56x56."""
    torch.manual_seed(0)
    graph = slimfx.capture(zoo.small_resnet().eval(), torch.randn(1, 3, 56, 56))
    hw = 56 * 56
    stem = hw * 64 * 3 * 9
    blocks = 4 * 2 * hw * 64 * 64 * 9  # 4 blocks x 2 convs, 3x3, 64 -> 64, stride 1
    fc = 64 * 10
    assert graph.macs() == stem + blocks + fc == 930_263_680
    assert math.isclose(2 * graph.macs() / 1e9, 1.87, rel_tol=0.01)
