"""The CNN of models/cnn.py written the eager way (nn.Conv2d -> nn.BatchNorm2d -> nn.ReLU), for benchmarks that
compare the unified operator against the chain it replaces.

Same layout, parameter shapes and initial values as `models.cnn.CNN` (the unified op adopts a Conv2d without bias
and a BatchNorm2d, so `load_state_dict` maps one onto the other). Two flavours:
  - `build_small` etc. use plain `nn.Conv2d`: a user model that `ModelSpec.build` / `fuse_` turns into ConvBNAct;
  - `build_small_unfused` etc. use `EagerConv2d`, a trivial Conv2d subclass that `fuse_` leaves alone (it fuses
    exact Conv2d/BatchNorm2d types only), so the model stays eager even when given to Ray Train as a user model.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from models.cnn import ModelConfig


class EagerConv2d(nn.Conv2d):
    """nn.Conv2d, untouched by `fuse_` (a subclass)."""


def _conv_bn(conv_cls: type[nn.Conv2d], cin: int, cout: int, k: int, stride: int, relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = [conv_cls(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class EagerBlock(nn.Module):
    def __init__(self, conv_cls: type[nn.Conv2d], cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = _conv_bn(conv_cls, cin, cout, 3, stride, relu=True)
        self.conv2 = _conv_bn(conv_cls, cout, cout, 3, 1, relu=False)
        self.shortcut = (
            _conv_bn(conv_cls, cin, cout, 1, stride, relu=False) if stride != 1 or cin != cout else nn.Identity()
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class EagerCNN(nn.Module):
    """models.cnn.CNN with eager Conv2d/BatchNorm2d/ReLU modules (act must be relu)."""

    def __init__(self, cfg: ModelConfig, conv_cls: type[nn.Conv2d] = nn.Conv2d):
        super().__init__()
        if cfg.act != "relu":
            raise ValueError(f"EagerCNN supports act='relu' only, got {cfg.act!r}")
        self.cfg = cfg
        w0 = cfg.widths[0]
        self.stem = _conv_bn(conv_cls, cfg.in_channels, w0, 3, 1, relu=True)
        blocks: list[nn.Module] = []
        cin = w0
        for i, (w, depth) in enumerate(zip(cfg.widths, cfg.depths)):
            for j in range(depth):
                blocks.append(EagerBlock(conv_cls, cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_last) pooled penultimate activations."""
        return self.pool(self.blocks(self.stem(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def eager_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `models.cnn.CNN` state dict renamed for `EagerCNN`: '<op>.conv.*' -> '<op>.0.*', '<op>.bn.*' -> '<op>.1.*'."""
    return {k.replace(".conv.", ".0.").replace(".bn.", ".1."): v for k, v in state.items()}


def build_eager(cfg: ModelConfig, fusable: bool = False) -> EagerCNN:
    """The eager twin of `build_model(cfg)`; `fusable=False` uses `EagerConv2d` so `fuse_` keeps it eager."""
    return EagerCNN(cfg, nn.Conv2d if fusable else EagerConv2d)


def build_small() -> EagerCNN:
    """User-model entry point: the 'small' preset for 1x8x8 digits, 10 classes, plain Conv2d (fused by tandem)."""
    return build_eager(ModelConfig.preset("small"), fusable=True)


def build_small_unfused() -> EagerCNN:
    """User-model entry point: the 'small' preset for 1-channel images, 10 classes, kept eager by `fuse_`."""
    return build_eager(ModelConfig.preset("small"), fusable=False)


def build_small_rgb_unfused() -> EagerCNN:
    """The 'small' preset for 3-channel images, 10 classes, kept eager by `fuse_`."""
    return build_eager(ModelConfig.preset("small", in_channels=3), fusable=False)


def build_small_rgb() -> EagerCNN:
    """The 'small' preset for 3-channel images, 10 classes, plain Conv2d (fused by tandem)."""
    return build_eager(ModelConfig.preset("small", in_channels=3), fusable=True)
