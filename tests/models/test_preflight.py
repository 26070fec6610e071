"""Fail fast: a model that cannot be imported, built or run on the data's shape stops at preflight, naming the step;
an artifact is loaded in a fresh process as a Serve replica would."""

from __future__ import annotations

import textwrap

import pytest
import torch

from models.artifact import ArtifactError, save_artifact
from models.cnn import ModelConfig, build_model
from models.factory import ModelSpec
from models.preflight import PreflightError, check_artifact_out_of_process, preflight

USER = textwrap.dedent(
    """
    import torch.nn as nn

    def good(num_classes=10):
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    def broken():
        raise RuntimeError("no weights file")

    def wrong_channels():
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6))
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "pf_models.py").write_text(USER)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "pf_models"


def test_preset_and_user_model_pass_and_report_fusion(user_module):
    rep = preflight(ModelSpec(preset="tiny"), (3, 16, 16), 6)
    assert rep.fused and rep.fused[0] == "stem" and not rep.unfused_convs
    rep = preflight(ModelSpec(user=f"{user_module}:good"), (3, 16, 16), 6)
    assert rep.fused == ["0"] and rep.unfused_convs == ["3"]  # the second conv has no BN after it
    assert "fused 1 Conv-BN(-act) chains: 0; left unfused: 3" in rep.describe()


@pytest.mark.parametrize(
    "target, step",
    [
        ("pf_missing_module:fn", "importing the model"),
        ("pf_models:nope", "importing the model"),
        ("pf_models:broken", "building the model pf_models:broken failed .RuntimeError: no weights file"),
        ("pf_models:wrong_channels", "building the model pf_models:wrong_channels failed .* to have 1 channels"),
    ],
)
def test_failures_name_the_step(user_module, target, step):
    with pytest.raises(PreflightError, match=step):
        preflight(ModelSpec(user=target), (3, 16, 16), 6)


def test_artifact_loads_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    save_artifact(build_model(ModelConfig.preset("tiny", in_channels=3, num_classes=6)), tmp_path / "a",
                  input_shape=(3, 8, 8))  # fmt: skip
    summary = check_artifact_out_of_process(str(tmp_path / "a"))
    assert summary["scheme"] == "none" and summary["input_shape"] == [3, 8, 8] and summary["num_classes"] == 6
    (tmp_path / "a" / "weights.pt").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="a fresh process cannot load the artifact: .*checksum mismatch"):
        check_artifact_out_of_process(str(tmp_path / "a"))
