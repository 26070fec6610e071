"""A user model (torchvision-layout ResNet-18) through one sweep trial: its trained fp32 artifact is the checkpoint,
the trial prunes it (traced), fine-tunes, quantizes to INT8, measures compiled latency and saves an artifact that
a fresh process loads, compiled, as Serve would."""

from __future__ import annotations

import os

import numpy as np
import torch

from models.artifact import load_artifact, save_artifact
from models.data import DataConfig, colour_images, prepare_data, write_parquet
from models.factory import ModelSpec
from models.training import TrainConfig, fit_local
from tune.baseline import BaselineConfig
from tune.measure import MeasureConfig
from tune.space import TrialSettings
from tune.trial import TrialContext, run_trial

TV = os.path.join(os.path.dirname(__file__), "..", "models")


def test_user_model_trial_prunes_quantizes_and_saves(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(TV)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TV, os.environ.get("PYTHONPATH", "")]))
    x, y = colour_images(360, (3, 16, 16), 6, seed=3)
    data_path = write_parquet(tmp_path / "c.parquet", np.arange(360), x, y, (3, 16, 16))
    data_cfg = DataConfig(train_path=data_path)
    splits = prepare_data(data_cfg, tmp_path / "cache")
    from models.data import load_tensors

    _, xtr, ytr = load_tensors(splits.train)
    _, xte, yte = load_tensors(splits.test)
    torch.manual_seed(0)
    model = ModelSpec(user="tv_models:resnet18", user_kwargs={"width": 8}).build((3, 16, 16), 6)
    fit_local(model, (xtr, ytr), (xte, yte), TrainConfig(epochs=3))
    save_artifact(model, tmp_path / "trained", input_shape=(3, 16, 16), probe=xte[:16])

    ctx = TrialContext(
        baseline=BaselineConfig(checkpoint=str(tmp_path / "trained"), cache_dir=str(tmp_path / "cache"), data=data_cfg),
        # batch 32: the INT8 bucket the 32-row probe runs in when the artifact is saved, so timing compiles two
        # inductor graphs (1, 32), not three (1, 8, 32)
        measure=MeasureConfig(batch_sizes=(1, 32), warmup=1, iters=2),
    )
    settings = TrialSettings(prune_ratio=0.2, quant="int8_ptq", finetune_epochs=1, calib_size=64, per_channel=True)
    reports = []
    final = run_trial(settings, ctx, lambda m, d: reports.append((m, d)), str(tmp_path / "out"))
    assert final["final"] and 0 < final["accuracy"] <= 1 and reports[-1][1] == str(tmp_path / "out")
    manifest = load_artifact(tmp_path / "out", compile=False)[1]
    assert manifest["architecture"] == "user" and manifest["quantization"]["scheme"] == "int8_ptq"
    assert manifest["pruning"]["ratio"] == 0.2 and manifest["pruning"]["shapes"]["fc"]["out"] == 6
    assert manifest["probe"]["compiled_max_diff"] is not None  # the trial measured the compiled graph
    from models.preflight import check_artifact_out_of_process

    summary = check_artifact_out_of_process(str(tmp_path / "out"))
    assert summary["compiled"] and summary["scheme"] == "int8_ptq"
