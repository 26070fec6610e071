import json

import pytest

from models.artifact import load_artifact
from tune.space import SearchSpace
from tune.sweep import OptunaMO, SweepConfig, run_sweep


@pytest.mark.slow
def test_smoke_sweep_writes_front_plot_and_artifact(ray_local, tmp_path):
    pytest.importorskip("optuna", reason="OptunaSearch needs the optuna package")
    pytest.importorskip("matplotlib", reason="the Pareto plot needs matplotlib")
    # 4 trials over the schemes CPU trials run (fp32, INT8 PTQ/QAT: FP8 is left out on CPU); a loose accuracy drop
    # so a model is chosen.
    space = SearchSpace(prune_ratio=(0.0, 0.3), finetune_epochs=(0, 1), calib_size=(64,))
    cfg = SweepConfig.smoke(str(tmp_path / "out"), searcher=OptunaMO(seed=0), space=space, max_acc_drop_pts=100.0)
    result = run_sweep(cfg)
    out = tmp_path / "out"
    assert 1 <= len(result.rows) <= 4 and result.front
    assert (out / "pareto.md").read_text().count("\n|") >= 3
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    summary = json.loads((out / "trials.json").read_text())
    assert summary["chosen"] == result.chosen["trial"] and set(summary["front"]) <= {r["trial"] for r in result.rows}
    model, manifest = load_artifact(out / "artifact")  # verifies the recorded predictions
    assert manifest["accuracy"]["test_accuracy"] == pytest.approx(result.chosen["accuracy"])
    assert manifest["latency_ms"]["batch_32"] == pytest.approx(result.chosen["latency_ms"])
    for row in result.rows:
        assert row["size_bytes"] > 0 and 0 < row["accuracy"] <= 1 and row["latency_ms"] < 1e6
        assert row["quant"] != "fp8" or row["measured_on"].startswith("cuda")  # CPU trials: no FP8 emulation
