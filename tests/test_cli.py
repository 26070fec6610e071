"""`tandem --help` for every command; bad flags and a missing data path fail fast with a clear message."""

import subprocess
import sys
import time

import pytest

from tandem.cli import build_parser, main


def _commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(sub.choices)


def test_all_expected_commands_exist():
    assert {"run", "train", "tune", "serve", "loadtest", "bench"} <= set(_commands())


@pytest.mark.parametrize("command", _commands())
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tandem {command}")
    assert "--" in out  # lists its options


def test_top_level_help_runs_as_a_program():
    out = subprocess.run([sys.executable, "-m", "tandem.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "tandem run" in out.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--epochs", "many"], "invalid int value"),
        (["run", "--save", "everything"], "invalid choice"),
        (["train", "--image-shape", "8x8"], "must be C,H,W"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "/nonexistent/train.parquet"], "parquet path does not exist"),
        (["run", "--workers", "0"], "num_workers must be a positive int"),
        (["run", "--epochs", "0"], "epochs must be a positive int"),
        (["run", "--preset", "gigantic"], "preset must be one of"),
        (["run", "--checkpointing", "most"], "checkpointing must be"),
        (["run", "--nodes", "0"], "nodes must be a positive int"),
    ],
)
def test_bad_values_fail_fast(argv, message, capsys, tmp_path):
    t0 = time.monotonic()
    assert main([*argv, "--storage", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert time.monotonic() - t0 < 15


def test_dashboard_covers_training_and_serving(tmp_path):
    import json

    from actors.train_metrics import GAUGES, PREFIX
    from serve_app.metrics import METRICS
    from serve_app.metrics import PREFIX as SERVE_PREFIX

    out = tmp_path / "dash.json"
    assert main(["dashboard", "--out", str(out)]) == 0
    dash = json.loads(out.read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for key in ("loss", "samples_per_s", "grad_bytes_inter_per_step", "weights_weight_mean"):
        assert key in GAUGES and f"ray_{PREFIX}{key}" in exprs
    assert "request_latency_ms" in METRICS and f"ray_{SERVE_PREFIX}request_latency_ms_bucket" in exprs
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_cluster_flags_reach_the_configs():
    from tandem.cli import run_config

    args = build_parser().parse_args(
        ["run", "--address", "auto", "--storage", "s3://bucket/runs", "--resume", "r1", "--codec", "lowrank",
         "--comm-mode", "auto", "--warmup-steps", "5", "--inter-transport", "ray", "--gpus-per-worker", "1",
         "--workers", "4", "--workers-per-node", "2", "--keep-serving"]
    )  # fmt: skip
    cfg = run_config(args)
    comm = cfg.dist.comm
    assert (comm.codec, comm.mode, comm.warmup_steps, comm.transport) == ("lowrank", "auto", 5, "ray")
    assert cfg.address == "auto" and cfg.storage == "s3://bucket/runs" and cfg.run_uri() == "s3://bucket/runs/r1"
    assert cfg.name == "r1" and cfg.resume and cfg.keep_serving
    job = cfg.train_job()
    assert job.dist.gpus_per_worker == 1 and job.dist.use_gpu and job.dist.workers_per_node == 2
    assert job.dist.name == "r1"


def test_defaults_uniform_sampling_and_smoke_fits_four_cpus():
    from tandem.cli import run_config

    cfg = run_config(build_parser().parse_args(["run", "--smoke"]))
    assert not cfg.stream.weighted and not cfg.keep_serving and cfg.workdir is None
    assert cfg.dist.num_workers * cfg.dist.cpus_per_worker + 1 <= 4  # + 1 CPU for Ray Data
    assert cfg.gpus_per_worker is None  # decided from the cluster once connected
    assert run_config(build_parser().parse_args(["train", "--weighted"])).stream.weighted
    assert "uniform" in build_parser()._subparsers._group_actions[0].choices["train"].format_help()


def test_tune_takes_the_run_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["tune", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--address", "--data", "--model", "--storage", "--name", "--gpus-per-trial"):
        assert flag in out


def test_resume_and_name_must_agree(capsys, tmp_path):
    assert main(["train", "--name", "a", "--resume", "b", "--storage", str(tmp_path)]) == 2
    assert "must name the same run" in capsys.readouterr().err
    assert main(["train", "--resume", "missing", "--local", "--storage", str(tmp_path)]) == 2
    assert "resume: no run 'missing'" in capsys.readouterr().err


def test_a_model_that_cannot_train_fails_before_any_cluster(capsys, tmp_path):
    t0 = time.monotonic()
    assert main(["train", "--model", "nosuch_module_x14:build", "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "preflight: importing the model" in err and "nosuch_module_x14" in err
    assert time.monotonic() - t0 < 15  # no Ray was started


def test_address_defaults_to_the_job_submit_cluster(monkeypatch):
    from tandem.cli import run_config

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # what `ray job submit` gives its entrypoint
    assert run_config(build_parser().parse_args(["run"])).address == "10.0.0.1:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    assert run_config(build_parser().parse_args(["run"])).address is None


def test_sigterm_stops_a_run_like_ctrl_c(monkeypatch, capsys, tmp_path):
    """`ray job stop` sends SIGTERM: the run's finally blocks (which delete its Serve app) must run, and the
    command exits 130. Without the handler the default SIGTERM action would end the process with no cleanup."""
    import os
    import signal

    import tandem.job

    cleaned = []

    def job_main(cfg):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the signal interrupts this sleep
        finally:
            cleaned.append(cfg.name)

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(tandem.job, "main", job_main)
    try:
        t0 = time.perf_counter()
        assert main(["run", "--smoke", "--name", "x", "--storage", str(tmp_path)]) == 130
        assert time.perf_counter() - t0 < 10
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert cleaned == ["x"]
    assert "stopped" in capsys.readouterr().err
