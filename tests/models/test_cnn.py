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
        not isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d)) or _inside_fused(model, m) for m in model.modules()
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


_DDP_SCRIPT = r"""
import copy, os, socket, sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from models.cnn import ModelConfig, build_model
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
torch.manual_seed(0)
model = build_model(ModelConfig.preset("small", in_channels=3, save=sys.argv[1]))
ref = copy.deepcopy(model)
ddp = DDP(model)  # wrapped before any forward: the op must not change weight storage after this
opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ddp, ref)]
x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 10, (8,))
for _ in range(3):
    for m, opt in zip((ddp, ref), opts):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
err = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))
print("max_err", err)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("save", ["lean", "fast"])
def test_ddp_training_matches_plain_training(save):
    """Under DDP (wrapped before the first forward) the unified CNN trains exactly as without: a weight whose
    layout or storage changed after DDP took it would train wrongly (the reducer keeps the old)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _DDP_SCRIPT, save], capture_output=True, text=True, env=env, timeout=300, cwd=root
    )
    assert out.returncode == 0, out.stderr[-2000:]
    err = float(out.stdout.split("max_err")[1])
    assert err < 1e-5
