"""The `tandem run` job and CLI on the bundled data."""

import json
import time

import pytest

from actors.dataset import DataConfig
from actors.train_local import TrainConfig
from kernels.precision import PrecisionConfig
from tandem.cli import main as cli_main
from tandem.job import RunConfig, main


def test_tiny_preset_reaches_90_percent_in_under_a_minute(tmp_path):
    t0 = time.perf_counter()
    report = main(RunConfig(preset="tiny", train=TrainConfig(epochs=6), local=True, workdir=str(tmp_path)))
    elapsed = time.perf_counter() - t0
    assert report["test_accuracy"] >= 0.90, report["history"]
    assert elapsed < 60, f"took {elapsed:.1f} s"
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["test_accuracy"] == report["test_accuracy"] and len(saved["train"]["history"]) == 6


def test_cli_smoke_and_errors(tmp_path, capsys):
    assert cli_main(["train", "--smoke", "--local", "--precision", "fp32", "--workdir", str(tmp_path)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert cli_main(["run", "--preset", "huge", "--workdir", str(tmp_path)]) == 2
    assert "preset must be one of" in capsys.readouterr().err
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"garbage")
    assert cli_main(["train", "--smoke", "--local", "--data", str(bad), "--workdir", str(tmp_path / "w")]) == 2
    assert "not a readable parquet" in capsys.readouterr().err
    assert not (tmp_path / "w" / "report.json").exists()


def test_bad_train_config():
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="train_dtype"):
        RunConfig(train=TrainConfig(precision=PrecisionConfig(train_dtype="int8")))
    with pytest.raises(ValueError, match="test_path needs train_path"):
        DataConfig(test_path="x.parquet")
    with pytest.raises(ValueError, match="local .in-process. runs train only"):
        RunConfig(local=True, steps=("train", "tune"))
    with pytest.raises(ValueError, match="steps must include 'train'"):
        RunConfig(steps=("tune",))
