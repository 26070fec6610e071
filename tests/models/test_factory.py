"""models/factory.py ModelSpec.build: one forward per build (the layout plan's, which is also a user model's shape
check), no save plan at build time (training makes it, kernels.conv_bn.SavePlan)."""

from __future__ import annotations

import pytest
import torch

from bench import _eager_cnn
from kernels.conv_bn import ConvBNAct, SaveMode
from models.factory import ModelSpec


def test_build_runs_one_forward_and_leaves_the_save_plan_to_training(monkeypatch):
    calls = []
    real = _eager_cnn.EagerCNN.forward

    def forward(self, x):
        calls.append(tuple(x.shape))
        return real(self, x)

    monkeypatch.setattr(_eager_cnn.EagerCNN, "forward", forward)
    model = ModelSpec(user="bench._eager_cnn:build_small_rgb", save="lean").build((3, 8, 8), 10)
    assert calls == [(2, 3, 8, 8)]  # the shape check and the layout plan share one batch-2 forward
    ops = [m for m in model.modules() if isinstance(m, ConvBNAct)]
    assert ops and all(op.save is SaveMode.LEAN for op in ops)  # an inference-only rebuild plans nothing more
    preset = ModelSpec(preset="resnet18", save="lean").build((3, 8, 8), 10)
    assert all(op.save is SaveMode.LEAN for op in preset.modules() if isinstance(op, ConvBNAct))


def test_build_rejects_a_user_model_with_the_wrong_output():
    with pytest.raises(ValueError, match=r"must map \(N, 3, 8, 8\) to \(N, >= 20\) logits, got output shape \(2, 10\)"):
        ModelSpec(user="bench._eager_cnn:build_small_rgb").build((3, 8, 8), 20)


def test_training_plans_the_lean_model_at_its_batch():
    """fit_epochs (local training, QAT, the sweep's fine-tune) plans at its own batch: at batch 4 on 8x8 inputs
    the late small-map ops of `tiny` keep their conv output, the early ones stay lean."""
    from models.training import TrainConfig, fit_epochs

    model = ModelSpec(preset="tiny", save="lean").build((3, 8, 8), 10)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    fit_epochs(model, (x, y), TrainConfig(epochs=1, batch_size=4, bn_recompute_rows=0))
    saves = [op.save for op in model.modules() if isinstance(op, ConvBNAct)]
    assert saves[0] is SaveMode.LEAN and SaveMode.FAST in saves
