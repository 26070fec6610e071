"""The `tandem run` job and CLI on the bundled data."""

import json
import re
import time
from pathlib import Path

import pytest

from actors.dataset import DataConfig
from actors.train_local import TrainConfig
from kernels.precision import PrecisionConfig
from tandem.cli import main as cli_main
from tandem.job import RunConfig, main


def test_tiny_preset_reaches_90_percent_in_under_a_minute(tmp_path):
    t0 = time.perf_counter()
    report = main(RunConfig(preset="tiny", train=TrainConfig(epochs=6), local=True, storage=str(tmp_path), name="r"))
    elapsed = time.perf_counter() - t0
    assert report["test_accuracy"] >= 0.90, report["history"]
    assert elapsed < 60, f"took {elapsed:.1f} s"
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["test_accuracy"] == report["test_accuracy"] and len(saved["train"]["history"]) == 6


def test_cli_smoke_and_errors(tmp_path, capsys):
    # one epoch, not the smoke default 4: what is checked is the CLI's path to a finished local run (accuracy is
    # test_tiny_preset_reaches_90_percent_in_under_a_minute's)
    argv = ["train", "--smoke", "--local", "--precision", "fp32", "--epochs", "1", "--storage", str(tmp_path)]
    assert cli_main(argv) == 0
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


def test_runs_are_named_and_never_reused(tmp_path):
    """A default name is a fresh timestamp (suffixed when taken); a given name that exists is refused unless it is
    resumed; resuming a run that is not there is refused."""
    from tandem.job import claim_run

    store = str(tmp_path / "store")
    first = claim_run(RunConfig(storage=store))
    assert re.fullmatch(r"\d{8}-\d{6}", first.name), first.name
    (tmp_path / "store" / first.name).mkdir(parents=True)
    second = claim_run(RunConfig(storage=store))
    assert second.name != first.name and second.name.startswith(first.name[:8])
    with pytest.raises(ValueError, match="already exists .* pass --resume"):
        claim_run(RunConfig(storage=store, name=first.name))
    assert claim_run(RunConfig(storage=store, name=first.name, resume=True)).name == first.name
    with pytest.raises(ValueError, match="resume: no run 'nope'"):
        claim_run(RunConfig(storage=store, name="nope", resume=True))
    with pytest.raises(ValueError, match="name must be letters"):
        RunConfig(name="../up")
    with pytest.raises(ValueError, match="resume needs the name"):
        RunConfig(resume=True)
    with pytest.raises(ValueError, match="scheme must be one of"):
        RunConfig(storage="hdfs://cluster/runs")


def test_stage_data_puts_both_splits_in_the_run(tmp_path):
    """Workers on any node read the prepared splits from the run's storage, not from the driver's disk."""
    from tandem.job import stage_data

    local, shared = stage_data(DataConfig(), tmp_path / "scratch", str(tmp_path / "store" / "r1"))
    for split in ("train", "test"):
        path = getattr(shared, split).path
        assert path == str(tmp_path / "store" / "r1" / "data" / split)
        assert [p.suffix for p in (tmp_path / "store" / "r1" / "data" / split).iterdir()] == [".parquet"]
        assert getattr(shared, split).num_rows == getattr(local, split).num_rows
    assert shared.image_shape == (1, 8, 8) and shared.num_classes == 10


def test_local_run_report_lands_in_storage_and_workdir(tmp_path):
    store, work = tmp_path / "store", tmp_path / "work"
    cfg = RunConfig(preset="tiny", train=TrainConfig(epochs=1), local=True, storage=str(store), name="r",
                    workdir=str(work))  # fmt: skip
    main(cfg)
    assert json.loads((store / "r" / "report.json").read_text())["name"] == "r"
    assert (work / "report.json").read_bytes() == (store / "r" / "report.json").read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        main(cfg)


def test_sweep_asks_for_gpus_per_trial():
    from tune.sweep import SweepConfig

    assert SweepConfig(gpus_per_trial=1).trial_resources() == {"cpu": 1, "gpu": 1}
    assert SweepConfig().trial_resources() == {"cpu": 1}
    with pytest.raises(ValueError, match="gpus_per_trial must be a number >= 0"):
        SweepConfig(gpus_per_trial=-1)


@pytest.mark.parametrize(
    "resources, want", [({"CPU": 8.0, "GPU": 2.0}, 1.0), ({"CPU": 8.0}, 0.0), ({"CPU": 8.0, "GPU": 0.0}, 0.0)]
)
def test_run_defaults_to_one_gpu_per_worker_and_trial_where_the_cluster_has_gpus(monkeypatch, resources, want):
    """`tandem run` without --gpus-per-worker: each Train worker and Tune trial asks for 1 GPU on a cluster with
    GPUs and none on a CPU cluster (job._gpus reads ray.cluster_resources once connected); a given value stays.
    No Ray starts: the cluster's resources are made up, and the sweep stops where it would start Tune."""
    from types import SimpleNamespace

    import ray

    import tune.sweep
    from tandem import pipeline
    from tandem.cli import build_parser, run_config
    from tandem.job import _gpus

    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    cfg = _gpus(run_config(build_parser().parse_args(["run", "--smoke", "--address", "auto"])))
    assert cfg.gpus_per_worker == want
    dist = cfg.train_job().dist
    assert dist.use_gpu is (want > 0) and dist.worker_resources_request().get("GPU", 0.0) == want

    class Started(Exception):
        pass

    seen = {}

    def run_sweep(scfg):
        seen["cfg"] = scfg
        raise Started

    monkeypatch.setattr(tune.sweep, "run_sweep", run_sweep)
    split = SimpleNamespace(path="s3://b/r/data/train")
    shared = SimpleNamespace(train=split, test=split, image_shape=(1, 8, 8))
    with pytest.raises(Started):
        pipeline.sweep("s3://b/r/artifacts/trained", cfg, shared, Path("unused"), "s3://b/r/tune")
    assert seen["cfg"].trial_resources().get("gpu", 0) == want
    # an explicit --gpus-per-worker is kept whatever the cluster has
    for given in (0.0, 0.5):
        assert _gpus(RunConfig(gpus_per_worker=given)).gpus_per_worker == given


@pytest.mark.parametrize("embedded", [False, True])
@pytest.mark.parametrize("keep", [False, True])
def test_keep_serving_leaves_the_app_up_after_the_report(tmp_path, monkeypatch, embedded, keep):
    """The order of a run's end, on a stubbed cluster (no Ray; the bundled data and the model's preflight are
    real): the report is written first; with keep_serving the job then blocks while the app serves (until Ctrl-C)
    and only then deletes it; without it a job on a cluster deletes its app at once and never blocks. Serving
    through HTTP while blocked is not checked here (it would take a Ray + Serve run)."""
    from contextlib import contextmanager

    import tandem.job
    import tandem.local_ray
    from tandem import pipeline

    events = []

    @contextmanager
    def ray_session(*args, **kwargs):
        yield {"embedded": embedded, "nodes": 1}

    def after_training(cfg, splits, shared, report, scratch):
        report["serve"] = {"url": "http://127.0.0.1:1"}

    monkeypatch.setattr(tandem.local_ray, "ray_session", ray_session)
    monkeypatch.setattr(tandem.job, "train_step", lambda *a: {"history": [], "test_accuracy": 1.0})
    monkeypatch.setattr(tandem.job, "_after_training", after_training)
    monkeypatch.setattr(tandem.job, "_finish", lambda *a: events.append("report"))
    monkeypatch.setattr(tandem.job, "_block_serving", lambda url: events.append(f"serve {url} until Ctrl-C"))
    monkeypatch.setattr(pipeline, "stop_serving", lambda: events.append("delete app"))
    cfg = RunConfig(preset="tiny", storage=str(tmp_path), name="r", keep_serving=keep, gpus_per_worker=0.0)
    main(cfg)
    if keep:  # deleted, if at all (the embedded cluster goes with the job anyway), only after the block
        assert events[:2] == ["report", "serve http://127.0.0.1:1 until Ctrl-C"], events
        assert set(events[2:]) <= {"delete app"}, events
    else:
        assert events == ["report"] + ([] if embedded else ["delete app"]), events
