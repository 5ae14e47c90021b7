"""Models of the paper's comparison (small ones for CPU, the CIFAR classics for GPUs), a user's own, and the loss."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from . import usercode
from .config import ModelConfig
from .errors import ConfigError


def mlp(in_features: int, hidden: list[int], num_classes: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn1d(length: int, num_classes: int, batchnorm: bool = True, channels: int = 32) -> nn.Module:
    """Three strided 1-D convolutions, the usual MNIST-1D CNN, optionally with BatchNorm."""
    layers: list[nn.Module] = [nn.Unflatten(1, (1, length))]
    cin = 1
    for _ in range(3):
        layers.append(nn.Conv1d(cin, channels, 5, stride=2, padding=2, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm1d(channels))
        layers.append(nn.ReLU())
        cin = channels
    out_len = length
    for _ in range(3):
        out_len = (out_len + 1) // 2
    layers += [nn.Flatten(), nn.Linear(channels * out_len, num_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0, preact: bool = False):
        super().__init__()
        self.preact = preact
        self.bn1 = nn.BatchNorm2d(cin if preact else cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            proj: list[nn.Module] = [nn.Conv2d(cin, cout, 1, stride, bias=False)]
            if not preact:
                proj.append(nn.BatchNorm2d(cout))
            self.shortcut = nn.Sequential(*proj)

    def forward(self, x):
        if self.preact:  # wide ResNets use pre-activation blocks
            out = self.relu(self.bn1(x))
            shortcut = self.shortcut(out) if not isinstance(self.shortcut, nn.Identity) else x
            out = self.conv1(out)
            out = self.conv2(self.dropout(self.relu(self.bn2(out))))
            return out + shortcut
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. 2016's CIFAR ResNet (depth 6n+2) and Zagoruyko's WRN (depth 6n+4, width k)."""

    def __init__(self, depth: int, num_classes: int, width: int = 1, in_channels: int = 3, wide: bool = False):
        super().__init__()
        n = (depth - 4) // 6 if wide else (depth - 2) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.stem_bn: nn.Module = nn.Identity() if wide else nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for stage, cout in enumerate(widths):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (i == 0 and stage > 0) else 1, preact=wide))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head_bn: nn.Module = nn.BatchNorm2d(cin) if wide else nn.Identity()
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        out = self.stem(x)
        out = out if isinstance(self.stem_bn, nn.Identity) else self.relu(self.stem_bn(out))
        out = self.blocks(out)
        out = self.relu(self.head_bn(out)) if not isinstance(self.head_bn, nn.Identity) else out
        return self.fc(self.pool(out).flatten(1))


VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16_bn(num_classes: int, in_channels: int = 3) -> nn.Module:
    layers: list[nn.Module] = []
    cin = in_channels
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
            cin = v
    layers += [nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def build_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``train.loss``: cross-entropy, or a function of the user's, (outputs, labels) -> mean loss."""
    return nn.functional.cross_entropy if name == "cross_entropy" else usercode.resolve(name, "train.loss")


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A packaged model for this data's shape and classes, or the one a factory of the user's returns."""
    if usercode.is_import_path(cfg.name):
        model = usercode.resolve(cfg.name, "model.name")(cfg)
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"model.name = '{cfg.name}': the factory returned a {type(model).__name__}, not an nn.Module"
            )
        return model
    image = len(input_shape) == 3
    if cfg.name == "mlp":
        return mlp(math.prod(input_shape), cfg.hidden, num_classes)
    if cfg.name == "cnn1d":
        if len(input_shape) != 1:
            raise ConfigError(f"model.name = cnn1d: needs 1-D inputs, the data has shape {input_shape}")
        return cnn1d(input_shape[0], num_classes, cfg.batchnorm)
    if not image:
        raise ConfigError(
            f"model.name = {cfg.name}: needs images (cifar10/cifar100), the data has shape {input_shape}; "
            "use mlp or cnn1d"
        )
    if cfg.name.startswith("resnet"):
        return CifarResNet(int(cfg.name[6:]), num_classes, in_channels=input_shape[0])
    if cfg.name == "wrn16_4":
        return CifarResNet(16, num_classes, width=4, in_channels=input_shape[0], wide=True)
    return vgg16_bn(num_classes, input_shape[0])
