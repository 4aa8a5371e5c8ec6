"""A built-in model zoo: small, self-contained PyTorch models for tests and benchmarks.

Every architecture is written here in plain ``torch.nn`` (no torchvision), sized by a
width knob so tests can run tiny versions and benchmarks full-size ones.  All models
use PyTorch's default initialisation (BatchNorm: weight 1, bias 0, running mean 0,
running variance 1), so they are deterministic given :func:`torch.manual_seed`, and all
of them can be captured by :func:`slimfx.capture`.

>>> import torch
>>> from slimfx import zoo
>>> m = zoo.get("small_resnet").eval()
>>> m(torch.randn(*zoo.INPUT_SHAPES["small_resnet"])).shape
torch.Size([1, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ZOO",
    "INPUT_SHAPES",
    "get",
    "resnet18",
    "resnet50",
    "vgg11",
    "mobilenet_v2",
    "densenet",
    "vit",
    "small_resnet",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "VGG",
    "InvertedResidual",
    "MobileNetV2",
    "DenseNet",
    "ViT",
    "SmallResNet",
]


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1,
             groups: int = 1) -> list[nn.Module]:
    """A bias-free ``kernel x kernel`` convolution with "same" padding, then BatchNorm."""
    return [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]


# ---------------------------------------------------------------------------------------
# ResNet
# ---------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(*_conv_bn(cin, cout, 1, stride))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (x4) conv-BN layers with a shortcut."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(*_conv_bn(cin, cout, 1, stride))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ImageNet-style ResNet: 7x7/2 stem, max pool, four stages, global pool, fc.

    Parameters
    ----------
    block:
        :class:`BasicBlock` or :class:`Bottleneck`.
    layers:
        Blocks per stage.
    num_classes:
        Output classes.
    width:
        Channels of the stem and first stage; stage ``i`` has ``width * 2**i`` planes.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 num_classes: int = 10, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        stages = []
        for i, n in enumerate(layers):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if (i > 0 and j == 0) else 1))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 10, width: int = 64) -> nn.Module:
    """ResNet-18: :class:`BasicBlock` stages ``[2, 2, 2, 2]``."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, width)


def resnet50(num_classes: int = 10, width: int = 64) -> nn.Module:
    """ResNet-50: :class:`Bottleneck` stages ``[3, 4, 6, 3]`` (expansion 4)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, width)


class SmallResNet(nn.Module):
    """A ResNet-like net at one resolution: 3x3 stem, ``blocks`` basic blocks, pool, fc.

    With ``width=64, blocks=4`` on a 1x3x56x56 input this is about 0.93 GMACs.
    """

    def __init__(self, num_classes: int = 10, width: int = 64, blocks: int = 4):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, width, 3), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(*(BasicBlock(width, width) for _ in range(blocks)))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def small_resnet(num_classes: int = 10, width: int = 64, blocks: int = 4) -> nn.Module:
    """The benchmarks' "4-block 64-channel ResNet-like net" (:class:`SmallResNet`)."""
    return SmallResNet(num_classes, width, blocks)


# ---------------------------------------------------------------------------------------
# VGG
# ---------------------------------------------------------------------------------------
_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """VGG with BatchNorm: conv3x3-BN-ReLU features, 1x1 adaptive pool, MLP classifier.

    Parameters
    ----------
    cfg:
        Output channels per conv layer, ``"M"`` for a 2x2 max pool.
    num_classes:
        Output classes.
    hidden:
        Width of the classifier's hidden layer.
    """

    def __init__(self, cfg: Sequence[int | str], num_classes: int = 10, hidden: int = 512):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [*_conv_bn(cin, int(v), 3), nn.ReLU(inplace=True)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Sequential(
            nn.Linear(cin, hidden), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


def vgg11(num_classes: int = 10, width: int = 64) -> nn.Module:
    """VGG-11 with BatchNorm; every layer's channels scaled by ``width / 64``."""
    cfg = [v if v == "M" else max(1, int(v) * width // 64) for v in _VGG11]
    return VGG(cfg, num_classes, hidden=8 * width)


# ---------------------------------------------------------------------------------------
# MobileNetV2
# ---------------------------------------------------------------------------------------
def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to a multiple of ``divisor``, never going below 90% of ``v``."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int = 1,
                   groups: int = 1) -> nn.Sequential:
    return nn.Sequential(*_conv_bn(cin, cout, kernel, stride, groups), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear project; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(cin, hidden, 1))
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden), *_conv_bn(hidden, cout, 1)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al., 2018) with a width multiplier."""

    # expansion t, channels c, repeats n, first stride s
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0):
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [_conv_bn_relu6(3, cin, 3, 2)]
        for t, c, n, s in self.SETTINGS:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(_conv_bn_relu6(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 10, width_mult: float = 1.0) -> nn.Module:
    """MobileNetV2; channels scaled by ``width_mult`` and rounded to multiples of 8."""
    return MobileNetV2(num_classes, width_mult)


# ---------------------------------------------------------------------------------------
# DenseNet
# ---------------------------------------------------------------------------------------
class _DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (``bn_size * growth``) - BN-ReLU-3x3 conv (``growth``)."""

    def __init__(self, cin: int, growth_rate: int, bn_size: int = 4):
        super().__init__()
        mid = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, growth_rate, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(out)))


class _DenseBlock(nn.Module):
    """Dense layers, each fed the concatenation of the block input and all earlier outputs."""

    def __init__(self, num_layers: int, cin: int, growth_rate: int):
        super().__init__()
        self.layers = nn.ModuleList(
            _DenseLayer(cin + i * growth_rate, growth_rate) for i in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """BN-ReLU-1x1 conv-2x2 average pool."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                         nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2, 2))


class DenseNet(nn.Module):
    """DenseNet-BC for small images: 3x3 stem, dense blocks, compressing transitions.

    Parameters
    ----------
    num_classes:
        Output classes.
    growth_rate:
        Channels each dense layer adds.
    block_config:
        Dense layers per block.
    init_features:
        Stem output channels.
    compression:
        Channel reduction of each transition.
    """

    def __init__(self, num_classes: int = 10, growth_rate: int = 12,
                 block_config: Sequence[int] = (4, 4, 4), init_features: int = 24,
                 compression: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, init_features, 3, 1, 1, bias=False)]
        c = init_features
        for i, n in enumerate(block_config):
            layers.append(_DenseBlock(n, c, growth_rate))
            c += n * growth_rate
            if i != len(block_config) - 1:
                cout = int(c * compression)
                layers.append(_Transition(c, cout))
                c = cout
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def densenet(num_classes: int = 10, growth_rate: int = 12,
             block_config: Sequence[int] = (4, 4, 4), init_features: int = 24) -> nn.Module:
    """A small DenseNet-BC (:class:`DenseNet`)."""
    return DenseNet(num_classes, growth_rate, tuple(block_config), init_features)


# ---------------------------------------------------------------------------------------
# Vision Transformer
# ---------------------------------------------------------------------------------------
class _Attention(nn.Module):
    """Multi-head self-attention: one qkv projection, SDPA, an output projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small Vision Transformer (Dosovitskiy et al., 2021) classifying its class token.

    Parameters
    ----------
    num_classes:
        Output classes.
    image_size, patch_size:
        Square input side and patch side; ``image_size`` must be a multiple of ``patch_size``.
    dim, depth, heads, mlp_dim:
        Embedding width, number of blocks, attention heads, MLP hidden width.
    """

    def __init__(self, num_classes: int = 10, image_size: int = 32, patch_size: int = 4,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp_dim: int = 128):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of "
                             f"patch_size {patch_size}")
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*(_Block(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], 1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit(num_classes: int = 10, image_size: int = 32, patch_size: int = 4, dim: int = 64,
        depth: int = 4, heads: int = 4, mlp_dim: int = 128) -> nn.Module:
    """A small :class:`ViT`."""
    return ViT(num_classes, image_size, patch_size, dim, depth, heads, mlp_dim)


# ---------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------
#: Model factories by name; each takes ``num_classes`` plus a size knob.
ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vgg11": vgg11,
    "mobilenet_v2": mobilenet_v2,
    "densenet": densenet,
    "vit": vit,
    "small_resnet": small_resnet,
}

#: A small default input shape per model (``vit``'s matches its default ``image_size``).
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "resnet18": (1, 3, 32, 32),
    "resnet50": (1, 3, 32, 32),
    "vgg11": (1, 3, 32, 32),
    "mobilenet_v2": (1, 3, 32, 32),
    "densenet": (1, 3, 32, 32),
    "vit": (1, 3, 32, 32),
    "small_resnet": (1, 3, 32, 32),
}


def get(name: str, **kwargs) -> nn.Module:
    """Build the zoo model ``name`` with factory keyword arguments ``kwargs``.

    Raises
    ------
    KeyError
        If ``name`` is not in :data:`ZOO` (the message lists the known names).
    """
    try:
        factory = ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(sorted(ZOO))}") from None
    return factory(**kwargs)
