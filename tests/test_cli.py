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
    assert main([*argv, "--workdir", str(tmp_path)]) == 2
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
