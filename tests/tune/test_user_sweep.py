"""`tandem tune --model pkg.mod:fn`: the sweep trains the user model as its baseline (or takes a trained artifact of
it as --checkpoint) and its chosen artifact rebuilds the user model; an artifact of another model is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.artifact import load_artifact, save_artifact
from models.cnn import ModelConfig, build_model
from models.data import DataConfig, colour_images, write_parquet
from tune.baseline import BaselineConfig, load_baseline
from tune.sweep import main as tune_main

TV = "tests.models.tv_models:resnet18"


def _colour(tmp_path, n: int = 160) -> str:
    x, y = colour_images(n, (3, 8, 8), 3, seed=4)
    return write_parquet(tmp_path / "c.parquet", np.arange(n), x, y, (3, 8, 8))


@pytest.mark.timeout(600)
def test_tune_sweeps_a_user_model(ray_local, tmp_path):
    pytest.importorskip("optuna", reason="OptunaSearch needs the optuna package")
    data = _colour(tmp_path)
    res = tune_main(["--smoke", "--model", TV, "--model-args", json.dumps({"width": 8}), "--data", data,
                     "--trials", "1", "--max-acc-drop", "100", "--storage", str(tmp_path / "runs"), "--name", "t",
                     "--searcher", "random"])  # fmt: skip
    assert res.artifact is not None and len(res.rows) == 1
    model, manifest = load_artifact(res.artifact, compile=False)
    assert manifest["architecture"] == "user"
    assert manifest["model_spec"]["user"] == TV and manifest["model_spec"]["user_kwargs"] == {"width": 8}
    # the baseline the sweep trained is an artifact of the user model too, normalized by the data's statistics
    assert manifest["source_checkpoint"] == str(tmp_path / "runs" / "t" / "baseline")
    base = load_artifact(manifest["source_checkpoint"])[1]
    assert base["model_spec"]["user"] == TV and len(base["model_spec"]["input_mean"]) == 3
    assert "compression sweep (tests.models.tv_models:resnet18)" in (tmp_path / "runs" / "t" / "pareto.md").read_text()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 3)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    data = _colour(tmp_path)
    cnn = build_model(ModelConfig.preset("tiny", in_channels=3, num_classes=3)).eval()
    save_artifact(cnn, tmp_path / "cnn", input_shape=(3, 8, 8))
    cfg = BaselineConfig(model=TV, checkpoint=str(tmp_path / "cnn"), cache_dir=str(tmp_path / "cache"),
                         data=DataConfig(train_path=data))  # fmt: skip
    with pytest.raises(
        ValueError, match="must hold a model of 'tests.models.tv_models:resnet18', got 'models.cnn.CNN'"
    ):
        load_baseline(cfg)
    with pytest.raises(ValueError, match="user_kwargs need a user model"):
        BaselineConfig(model_args={"width": 8})
