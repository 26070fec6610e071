"""Which network to build: a named preset or a user's `package.module:function`, as one picklable spec that the
driver, Ray Train workers and Tune trials all build the same way."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from kernels.conv_bn import SaveMode
from models.cnn import ModelConfig, build_model


@dataclass(kw_only=True, slots=True)
class ModelSpec:
    """A preset or a user model; the data decides input channels and classes."""

    preset: str = "small"
    """Built-in preset (tiny, small, resnet18); ignored when `user` is set."""
    user: str | None = None
    """'package.module:function' returning an nn.Module; its Conv->BN->act chains are fused."""
    save: str = "lean"
    """Memory mode of the unified operator."""

    def __post_init__(self) -> None:
        if self.user is None and self.preset not in ModelConfig.preset_names():
            raise ValueError(f"preset must be one of {ModelConfig.preset_names()}, got {self.preset!r}")
        SaveMode.parse(self.save)

    @property
    def name(self) -> str:
        return self.user if self.user is not None else f"preset:{self.preset}"

    def config(self, image_shape: tuple[int, int, int], num_classes: int) -> ModelConfig | None:
        """The ModelConfig of a preset for this data (None for a user model)."""
        if self.user is not None:
            return None
        return ModelConfig.preset(
            self.preset, in_channels=image_shape[0], num_classes=num_classes, save=self.save
        )

    def build(self, image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
        """The model for images of `image_shape` (C, H, W) and `num_classes`; a user model is fused and its
        output shape checked on a dummy batch."""
        if self.user is None:
            return build_model(self.config(image_shape, num_classes))
        from models.fuse import fuse_
        from models.user_model import load_model

        model = fuse_(load_model(self.user), save=self.save)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros(2, *image_shape))
        model.train(was_training)
        if out.dim() != 2 or out.shape[1] < num_classes:
            raise ValueError(
                f"model {self.user} must map (N, {', '.join(map(str, image_shape))}) to (N, >= {num_classes}) "
                f"logits, got output shape {tuple(out.shape)}"
            )
        return model
