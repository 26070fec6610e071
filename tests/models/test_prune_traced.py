"""Pruning of any traceable CNN (Torch-Pruning's dependency graph on fused models): torchvision-layout ResNet-18 and
MobileNetV2 (tests/models/tv_models.py), coupled channels, and the rebuild from recorded shapes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tv_models import mobilenet_v2, resnet18

from kernels.conv_bn import ConvBNAct
from models.fuse import fuse_
from models.prune import PruneConfig, apply_module_shapes_, module_shapes, prune_traced_

SHAPE = (3, 32, 32)


def _fused(fn, **kw) -> nn.Module:
    torch.manual_seed(0)
    model = fuse_(fn(num_classes=6, **kw))
    with torch.no_grad():  # BN statistics that are not the identity, so scores and folds are not degenerate
        model.train()(torch.rand(8, *SHAPE))
    return model.eval()


def test_resnet18_prune20_macs_and_forward():
    model = _fused(resnet18)
    report = prune_traced_(model, PruneConfig(ratio=0.2), input_shape=SHAPE)
    assert report.macs_after <= 0.70 * report.macs_before, report.macs_after / report.macs_before
    shapes = report.shapes
    # residual coupling: every block's output channels equal its stage's stream (stem / downsample / conv2 tied)
    out = {name.removesuffix(".conv"): s["out"] for name, s in shapes.items() if "groups" in s}
    assert out["conv1"] == out["layer1.0.conv2"] == out["layer1.1.conv2"] < 64
    assert out["layer2.0.downsample.0"] == out["layer2.0.conv2"] == out["layer2.1.conv2"] < 128
    assert shapes["fc"] == {"in": out["layer4.1.conv2"], "out": 6}
    assert isinstance(model.layer1[0].conv1, ConvBNAct)  # fused ops stay fused
    x = torch.rand(4, *SHAPE)
    model.train()
    loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()  # trainable after pruning
    assert model.eval()(x).shape == (4, 6)


def test_mobilenet_v2_depthwise_coupling():
    model = _fused(mobilenet_v2, width_mult=0.5)
    report = prune_traced_(model, PruneConfig(ratio=0.2), input_shape=SHAPE)
    assert report.macs_after <= 0.75 * report.macs_before
    depthwise = [s for s in report.shapes.values() if s.get("groups", 1) > 1]
    assert len(depthwise) == 17
    assert all(s["groups"] == s["in"] == s["out"] for s in depthwise)  # depthwise: one channel per group
    for i, block in enumerate(model.features[1:-1], start=1):  # expand -> depthwise -> project, channels chained
        convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]  # in forward order
        for a, b in zip(convs, convs[1:], strict=False):
            assert a.out_channels == b.in_channels, f"features.{i}"
    assert model(torch.rand(2, *SHAPE)).shape == (2, 6)


def test_recorded_shapes_rebuild_the_pruned_model():
    model = _fused(resnet18, width=16)
    prune_traced_(model, PruneConfig(ratio=0.3, steps=2), input_shape=SHAPE)
    fresh = fuse_(resnet18(num_classes=6, width=16))
    apply_module_shapes_(fresh, module_shapes(model))
    fresh.load_state_dict(model.state_dict())
    x = torch.rand(3, *SHAPE)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="must name exactly the model's"):
        apply_module_shapes_(fuse_(resnet18(num_classes=6, width=16)), {"conv1.conv": {"in": 3, "out": 8, "groups": 1}})


def test_finetune_runs_between_steps():
    model = _fused(resnet18, width=8)
    seen = []
    before = copy.deepcopy(model)
    prune_traced_(model, PruneConfig(ratio=0.5, steps=2), input_shape=SHAPE,
                  finetune=lambda m, step: seen.append((step, m.conv1.conv.out_channels)))  # fmt: skip
    assert [s for s, _ in seen] == [1, 2] and seen[0][1] > seen[1][1] and seen[1][1] < before.conv1.conv.out_channels
