"""ResNet (He et al., 2015): an image classifier of residual stages, in plain PyTorch.

Each stage is a run of residual blocks, `y = relu(branch(x) + shortcut(x))`; the width doubles
and the side halves (stride 2 on the stage's first block) from the second stage on. Choices:

- `block="basic"` (two 3x3 convs, ResNet-18/34) or `"bottleneck"` (1x1 reduce, 3x3, 1x1 expand
  by 4, ResNet-50+). The bottleneck strides on its 3x3 conv, not the first 1x1 ("ResNet v1.5",
  torchvision's layout): a strided 1x1 discards 3/4 of its input, the 3x3 sees all of it, for
  about +0.5% top-1 at 4.1 instead of 3.8 GMACs. Parameter counts equal torchvision's.
- The shortcut is the identity unless the shape changes, then a projection (1x1 conv + BN, the
  paper's option B). Convs carry no bias: the BatchNorm after each one has its own.
- `stem="imagenet"` (7x7/2 conv, 3x3/2 max-pool: 224 → 56) or `"small"` (one 3x3/1 conv, no
  pool) for 32x32-class inputs, where a 4x early downsampling would leave too little image.
- Init as torchvision: Kaiming normal (fan_out, relu) convs, BN weight 1 bias 0, and the last
  BN of every residual branch zero (Goyal et al., 2017), so each block starts as relu of its
  shortcut and a deep net trains like a shallow one early on.
- Inputs are pixels in [0, 1]; the model normalises with the config's per-channel `mean`/`std`
  (train-split statistics) in `forward`, so a model folder is self-contained for serving. They
  are non-persistent buffers: the config carries them, the weights file does not.

`feature_maps` (last stage, for Grad-CAM), `features` (pooled) and `forward` (logits) share one
code path. `freeze_backbone` trains only the classifier, BatchNorm statistics included frozen.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

BLOCKS = ("basic", "bottleneck")
STEMS = ("imagenet", "small")


@dataclass
class ResNetConfig:
    n_classes: int = 10
    block: str = "basic"  # basic (2 x 3x3) | bottleneck (1x1, 3x3, 1x1, expansion 4)
    layers: list[int] = field(default_factory=lambda: [2, 2, 2, 2])  # blocks per stage
    width: int = 64  # channels of the first stage; doubles each stage
    stem: str = "imagenet"  # imagenet: 7x7/2 conv + 3x3/2 max-pool | small: 3x3/1 conv
    in_channels: int = 3
    image_size: int = 224  # the training input side, for flops_per_image
    dropout: float = 0.0  # before the classifier
    mean: list[float] = field(default_factory=list)  # per channel; [] means 0.5 each
    std: list[float] = field(default_factory=list)  # per channel; [] means 0.5 each

    def __post_init__(self) -> None:
        if self.block not in BLOCKS:
            raise ValueError(f"ResNetConfig.block must be one of {BLOCKS}, got {self.block!r}")
        if self.stem not in STEMS:
            raise ValueError(f"ResNetConfig.stem must be one of {STEMS}, got {self.stem!r}")
        if not self.layers or any(n < 1 for n in self.layers):
            raise ValueError(f"ResNetConfig.layers needs >= 1 stage of >= 1 block, got "
                             f"{self.layers}")
        for name in ("n_classes", "width", "in_channels", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ResNetConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ResNetConfig.dropout must be in [0, 1), got {self.dropout}")
        # [0, 1] → [-1, 1] when the train-split statistics are not given
        self.mean = list(self.mean) if self.mean else [0.5] * self.in_channels
        self.std = list(self.std) if self.std else [0.5] * self.in_channels
        for name in ("mean", "std"):
            if len(getattr(self, name)) != self.in_channels:
                raise ValueError(f"ResNetConfig.{name} has {len(getattr(self, name))} values "
                                 f"for in_channels={self.in_channels}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"ResNetConfig.std must be > 0 per channel, got {self.std}")


PRESETS: dict[str, dict] = {
    "resnet18": {"block": "basic", "layers": [2, 2, 2, 2]},
    "resnet34": {"block": "basic", "layers": [3, 4, 6, 3]},
    "resnet50": {"block": "bottleneck", "layers": [3, 4, 6, 3]},
}


def preset(name: str, **overrides) -> ResNetConfig:
    """The config of a published architecture (ImageNet stem, width 64), `overrides` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown ResNet preset {name!r}; known: {', '.join(PRESETS)}")
    base = {k: list(v) if isinstance(v, list) else v for k, v in PRESETS[name].items()}
    return ResNetConfig(**{**base, **overrides})


def conv_side(side: int, conv: nn.Conv2d | nn.MaxPool2d) -> int:
    """The output side of a square conv or pool on a square input of `side`."""
    k, s, p, d = (v if isinstance(v, int) else v[0]
                  for v in (conv.kernel_size, conv.stride, conv.padding, conv.dilation))
    return (side + 2 * p - d * (k - 1) - 1) // s + 1


def conv_macs(conv: nn.Conv2d, side: int) -> tuple[int, int]:
    """(multiply-accumulates, output side) of `conv` on a square input of `side`."""
    out = conv_side(side, conv)
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return out * out * conv.out_channels * conv.in_channels // conv.groups * k, out


def conv_bn(c_in: int, c_out: int, k: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(c_in, c_out, k, stride, padding=k // 2, bias=False), nn.BatchNorm2d(c_out)


class Block(nn.Module):
    """What both blocks share: `forward = relu(branch(x) + shortcut(x))`, a projection shortcut
    when the shape changes, and MACs counted over `convs` (the branch, in order)."""

    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(*conv_bn(c_in, c_out, 1, stride))
        self.relu = nn.ReLU(inplace=True)

    def convs(self) -> list[nn.Conv2d]:
        raise NotImplementedError

    def last_bn(self) -> nn.BatchNorm2d:
        raise NotImplementedError

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.branch(x) + self.shortcut(x))

    def macs(self, side: int) -> tuple[int, int]:
        total, out = 0, side
        for conv in self.convs():
            m, out = conv_macs(conv, out)
            total += m
        if not isinstance(self.shortcut, nn.Identity):
            total += conv_macs(self.shortcut[0], side)[0]
        return total, out


class BasicBlock(Block):
    """Two 3x3 convs; the first one strides."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__(c_in, planes, stride)
        self.conv1, self.bn1 = conv_bn(c_in, planes, 3, stride)
        self.conv2, self.bn2 = conv_bn(planes, planes, 3)

    def convs(self) -> list[nn.Conv2d]:
        return [self.conv1, self.conv2]

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class Bottleneck(Block):
    """1x1 down to `planes`, 3x3 (strided: v1.5), 1x1 up to 4 x planes."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__(c_in, planes * self.expansion, stride)
        self.conv1, self.bn1 = conv_bn(c_in, planes, 1)
        self.conv2, self.bn2 = conv_bn(planes, planes, 3, stride)
        self.conv3, self.bn3 = conv_bn(planes, planes * self.expansion, 1)

    def convs(self) -> list[nn.Conv2d]:
        return [self.conv1, self.conv2, self.conv3]

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        return self.bn3(self.conv3(h))


def init_weights(module: nn.Module) -> None:
    """As torchvision with zero_init_residual=True; a classifier keeps nn.Linear's init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, Block):
            nn.init.zeros_(m.last_bn().weight)  # the block starts as relu(shortcut(x))


class ResNet(nn.Module):
    """Logits (B, n_classes) of pixels (B, C, H, W) in [0, 1]. On CUDA the input is made
    channels-last (NHWC, the layout cuDNN's fastest convs use); the trainer puts the model's
    weights channels-last too on CUDA, as `channels_last` asks."""

    channels_last = True

    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.cfg = cfg
        self.frozen = False
        w = cfg.width
        if cfg.stem == "imagenet":
            conv, bn = conv_bn(cfg.in_channels, w, 7, stride=2)
            self.stem = nn.Sequential(conv, bn, nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        else:
            self.stem = nn.Sequential(*conv_bn(cfg.in_channels, w, 3), nn.ReLU(inplace=True))
        block = BasicBlock if cfg.block == "basic" else Bottleneck
        c_in, stages = w, []
        for i, n in enumerate(cfg.layers):
            planes = w * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(c_in, planes, stride=2 if i > 0 and j == 0 else 1))
                c_in = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self._out_channels = c_in
        self.drop = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(c_in, cfg.n_classes)
        shape = (1, cfg.in_channels, 1, 1)  # float even when JSON gave ints ([0, 0, 0])
        for name in ("mean", "std"):
            stats = torch.tensor(getattr(cfg, name), dtype=torch.float32).view(shape)
            self.register_buffer(name, stats, persistent=False)
        init_weights(self)

    @property
    def out_channels(self) -> int:
        return self._out_channels

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's output (B, C_last, h, w) of pixels (B, C, H, W) in [0, 1]."""
        x = (x - self.mean) / self.std  # (B, C, H, W)
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x  # (B, C_last, h, w)

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.mean(dim=(2, 3))  # (B, C_last): global average pooling

    def classify(self, maps: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_classes) of feature maps (B, C_last, h, w): for Grad-CAM, which needs
        the gradient of a logit with respect to the maps."""
        return self.fc(self.drop(self.pool(maps)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, C_last), before dropout and the classifier."""
        return self.pool(self.feature_maps(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.feature_maps(x))  # = fc(drop(features(x)))

    def num_params(self, non_embedding: bool = True) -> int:
        """All parameters (a ResNet has no embeddings; the argument is the common signature)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self) -> float:
        """Training FLOPs per image at cfg.image_size: 3 x forward (backward costs about twice
        forward), forward = 2 x the multiply-accumulates of the convs and the classifier,
        counted from the shapes; BatchNorm, ReLU, pooling and the residual adds (< 1%) are
        left out, as in the published 1.8 / 4.1 GMACs of ResNet-18 / 50."""
        macs, side = conv_macs(self.stem[0], self.cfg.image_size)
        if self.cfg.stem == "imagenet":
            side = conv_side(side, self.stem[3])
        for stage in self.stages:
            for block in stage:
                m, side = block.macs(side)
                macs += m
        macs += self.fc.in_features * self.fc.out_features
        return 3 * 2 * float(macs)

    def reset_head(self, n_classes: int) -> None:
        """A fresh classifier for a new label set (same device and dtype as the old one)."""
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        old = self.fc
        self.fc = nn.Linear(old.in_features, n_classes, device=old.weight.device,
                            dtype=old.weight.dtype)
        self.cfg.n_classes = n_classes

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return (p for name, p in self.named_parameters() if not name.startswith("fc."))

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return self.fc.parameters()

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Train only the classifier (linear probing): the backbone gets no gradients and, while
        frozen, its BatchNorm layers stay in eval mode, so `train()` does not move their running
        statistics towards the new data."""
        self.frozen = frozen
        for p in self.backbone_parameters():
            p.requires_grad = not frozen
        self.train(self.training)

    def train(self, mode: bool = True) -> ResNet:
        super().train(mode)
        if mode and self.frozen:
            for m in [*self.stem.modules(), *self.stages.modules()]:
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


# the names the model registry (bigmodel/models/registry.py) builds a family from
Config, Model = ResNetConfig, ResNet
