import pytest
import torch

from kernels.conv_bn import ConvBNAct
from models.cnn import ModelConfig, build_model


@pytest.mark.parametrize("preset", ModelConfig.preset_names())
def test_presets_shapes(preset):
    model = build_model(ModelConfig.preset(preset, in_channels=3, num_classes=7))
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 7)
    assert model.features(x).shape == (2, model.head.in_features)
    assert all(
        not isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d)) or _inside_fused(model, m)
        for m in model.modules()
    )


def _inside_fused(model, module):
    return any(module is f.conv or module is f.bn for f in model.modules() if isinstance(f, ConvBNAct))


def test_any_input_size_and_channels():
    model = build_model(ModelConfig.preset("tiny", in_channels=1, num_classes=3))
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert model(torch.randn(2, 1, 13, 21)).shape == (2, 3)


def test_resnet18_layout():
    model = build_model(ModelConfig.preset("resnet18", in_channels=3, num_classes=10))
    assert len(model.blocks) == 8
    n = sum(p.numel() for p in model.parameters())
    assert 10_500_000 < n < 11_500_000  # ResNet-18 with a 3x3 stem and a 10-way head: ~11.2M


def test_bad_configs():
    with pytest.raises(ValueError, match="preset must be one of"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.preset("tiny", num_clases=3)
    with pytest.raises(ValueError, match="equal length"):
        ModelConfig(widths=(8, 16), depths=(1,))
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        ModelConfig(num_classes=0)
    model = build_model(ModelConfig.preset("tiny", in_channels=1))
    with pytest.raises(ValueError, match=r"input must be \(N, 1, H, W\)"):
        model(torch.randn(2, 3, 8, 8))


def test_config_dict_round_trip():
    cfg = ModelConfig.preset("small", in_channels=3, num_classes=5)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
