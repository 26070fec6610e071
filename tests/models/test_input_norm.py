"""Per-channel input normalization of a user model (and of a preset, in its own forward): computed once from the
training data (validation), built into the model as its `InputNorm` front, recorded in the artifact's spec, and so
applied the same by training, the artifact's local prediction and Serve's path (load_artifact +
models.fuse.inference_module, as serve_app's replica does), including INT8."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from models.artifact import load_artifact, save_artifact
from models.cnn import ModelConfig
from models.data import DataConfig, colour_images, load_tensors, prepare_data, write_parquet
from models.factory import ModelSpec
from models.fuse import inference_module
from models.quantize import Int8PTQ, quantize_
from models.training import TrainConfig, evaluate, fit_local

TV = "tests.models.test_input_norm:small_net"
OFFSET, SCALE = 100.0, 50.0


def small_net(num_classes: int = 3) -> nn.Module:
    """A user model: two conv-BN-ReLU stages, pooling, a linear head (seconds to train here)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )  # fmt: skip


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """A colour set moved far from [0, 1] (pixels ~ 100 +- 50): prepared, validated, its statistics measured."""
    tmp = tmp_path_factory.mktemp("norm")
    x, y = colour_images(300, (3, 8, 8), 3, seed=6)
    path = write_parquet(tmp / "s.parquet", np.arange(300), OFFSET + SCALE * x, y, (3, 8, 8))
    splits = prepare_data(DataConfig(train_path=path), tmp / "prep")
    return splits, load_tensors(splits.train)[1:], load_tensors(splits.test)[1:]


def test_statistics_are_built_into_the_model_and_its_artifact(shifted, tmp_path):
    splits, train, test = shifted
    mean, std = splits.train.channel_mean, splits.train.channel_std
    assert all(OFFSET + 10 < m < OFFSET + SCALE for m in mean) and all(5 < s < SCALE for s in std)
    spec = ModelSpec(user=TV).normalized(mean, std)
    torch.manual_seed(0)
    model = spec.build((3, 8, 8), 3)
    normed = model.norm(train[0][:200])
    assert normed.mean().abs() < 0.2 and (normed.std() - 1).abs() < 0.2  # what the network itself sees
    fit_local(model, train, test, TrainConfig(epochs=4, batch_size=32))
    acc = evaluate(model, *test)[1]
    assert acc >= 0.8, acc  # learnable at this offset because the input is normalized
    save_artifact(model, tmp_path / "fp32", input_shape=(3, 8, 8), probe=test[0][:16])
    loaded, manifest = load_artifact(tmp_path / "fp32")
    assert manifest["model_spec"]["input_mean"] == pytest.approx(list(mean))
    assert manifest["model_spec"]["input_std"] == pytest.approx(list(std))
    x = test[0][:32]
    model.eval()
    with torch.no_grad():
        local = model(x)
        served = inference_module(loaded)(x)
    assert torch.equal(local.argmax(1), served.argmax(1))
    torch.testing.assert_close(served, local, atol=1e-3 * local.abs().max().item(), rtol=0)

    # INT8: the normalization is in the quantized graph too; the served (compiled) model agrees with the reference
    q = quantize_(model, Int8PTQ(), calib=train[0][:64])
    save_artifact(q, tmp_path / "int8", input_shape=(3, 8, 8), probe=test[0][:16])
    served8, m8 = load_artifact(tmp_path / "int8")
    assert m8["model_spec"]["input_mean"] == pytest.approx(list(mean))
    with torch.no_grad():
        assert (served8(x).argmax(1) == local.argmax(1)).float().mean() >= 0.9


def test_a_preset_normalizes_in_its_forward_and_its_artifact(shifted, tmp_path):
    """A built-in preset on the user's data gets the same normalization, recorded in its model_config; the
    pruned + INT8 artifact the sweep would choose rebuilds with it."""
    from models.prune import PruneConfig, prune_

    splits, train, test = shifted
    mean, std = splits.train.channel_mean, splits.train.channel_std
    spec = ModelSpec(preset="tiny").normalized(mean, std)
    torch.manual_seed(0)
    model = spec.build((3, 8, 8), 3)
    assert model.cfg.input_mean == pytest.approx(mean) and "input_mean" not in model.state_dict()
    fit_local(model, train, test, TrainConfig(epochs=4, batch_size=32))
    assert evaluate(model, *test)[1] >= 0.8
    save_artifact(model, tmp_path / "fp32", input_shape=(3, 8, 8), probe=test[0][:16])
    loaded, manifest = load_artifact(tmp_path / "fp32")
    assert manifest["model_config"]["input_mean"] == pytest.approx(list(mean))
    x = test[0][:32]
    model.eval()
    with torch.no_grad():
        local = model(x)
        served = inference_module(loaded)(x)
        bare = type(model)(model.cfg.with_(input_mean=None, input_std=None))
        bare.load_state_dict(model.state_dict())
        assert not torch.allclose(bare.eval()(x), local, atol=1e-2)  # the stats do change what the net sees
    torch.testing.assert_close(served, local, atol=1e-3 * local.abs().max().item(), rtol=0)
    prune_(model, PruneConfig(ratio=0.25), input_shape=(3, 8, 8))
    q = quantize_(model, Int8PTQ(), calib=train[0][:64])
    save_artifact(q, tmp_path / "int8", input_shape=(3, 8, 8), probe=test[0][:16])
    served8, m8 = load_artifact(tmp_path / "int8")
    assert m8["model_config"]["input_mean"] == pytest.approx(list(mean)) and m8["pruning"] is not None
    with torch.no_grad():
        assert (served8(x).argmax(1) == model.eval()(x).argmax(1)).float().mean() >= 0.9
    with pytest.raises(ValueError, match="one per channel"):
        ModelSpec(preset="tiny").normalized((0.0,), (1.0,)).build((3, 8, 8), 3)


def test_bad_statistics_are_refused():
    with pytest.raises(ValueError, match="input_std must be finite and > 0"):
        ModelSpec(user=TV, input_mean=(0.0,), input_std=(0.0,))
    with pytest.raises(ValueError, match="together"):
        ModelSpec(user=TV, input_mean=(0.0,))
    with pytest.raises(ValueError, match="must have 3 values"):
        ModelSpec(user=TV, input_mean=(0.0,), input_std=(1.0,)).build((3, 8, 8), 3)
    assert ModelSpec(preset="tiny").normalized((0.5,), (0.2,)).input_std == (0.2,)  # presets too
    with pytest.raises(ValueError, match="input_mean must be finite"):
        ModelConfig(in_channels=1, input_mean=(float("nan"),), input_std=(1.0,))
    # a constant channel is shifted, not divided by zero
    assert ModelSpec(user=TV).normalized((0.5, 0.1), (0.0, 0.2)).input_std == (1.0, 0.2)
