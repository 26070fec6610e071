"""The serving set (issue 14): the sweep records its measured forms of one choice (INT8 for CPU replicas, FP8
where trials measured it on a GPU), and each replica picks its form by its own hardware at load. CPU only: the
hardware is a made-up kernels.precision.DeviceCaps."""

from __future__ import annotations

import json
import logging

import pytest

from kernels.precision import DeviceCaps
from models.artifact import ArtifactError, read_serving_set, write_serving_set
from serve_app.config import served_artifact
from tune.pareto import serving_forms
from tune.sweep import write_forms

SM90 = DeviceCaps("cuda", (9, 0))
SM80 = DeviceCaps("cuda", (8, 0))
CPU = DeviceCaps("cpu")


def _row(trial: str, quant: str, acc: float, lat: float, on: str = "cpu") -> dict:
    return {"trial": trial, "quant": quant, "accuracy": acc, "latency_ms": lat, "size_bytes": 100,
            "measured_on": on, "artifact": f"s3://b/run/tune/ray/{trial}"}  # fmt: skip


ROWS = [
    _row("fp32", "none", 0.95, 9.0),
    _row("int8_fast", "int8_ptq", 0.945, 3.0),
    _row("int8_bad", "int8_ptq", 0.80, 1.0),  # fastest, but 15 points below the baseline
    _row("qat", "int8_qat", 0.95, 4.0),
    _row("fp8_gpu", "fp8", 0.948, 0.5, "cuda sm_90"),
    _row("fp8_gpu_slow", "fp8", 0.95, 0.9, "cuda sm_90"),
    _row("fp8_emulated", "fp8", 0.95, 0.1),  # FP8 timed on CPU: an emulation, never a form
]


def test_serving_forms_are_the_fastest_measured_rows_within_the_bound_per_hardware():
    def trials(rows: list[dict], base: float, drop: float) -> dict[str, str]:
        return {q: r["trial"] for q, r in serving_forms(rows, base, drop).items()}

    assert trials(ROWS, 0.95, 1.0) == {"int8_ptq": "int8_fast", "fp8": "fp8_gpu"}
    # trials without a GPU: no FP8 form, whatever the emulation timed
    assert trials([r for r in ROWS if not r["measured_on"].startswith("cuda")], 0.95, 1.0) == {"int8_ptq": "int8_fast"}
    # a tighter bound: the fastest rows that keep within it
    assert trials(ROWS, 0.99, 4.0) == {"int8_qat": "qat", "fp8": "fp8_gpu_slow"}
    # fp32 is the CPU form where no INT8 row is within the bound; nothing within it: no set
    assert trials([r for r in ROWS if r["trial"] != "qat"], 0.99, 4.0) == {"none": "fp32", "fp8": "fp8_gpu_slow"}
    assert serving_forms(ROWS, 0.99, 0.0) == {}


def test_fp8_timed_on_a_gpu_without_fp8_is_no_form():
    # an FP8 trial that landed on an sm_80 GPU timed an emulation there: no sm_89+ replica serves that measurement
    rows = [*ROWS[:4], _row("fp8_ampere", "fp8", 0.95, 0.2, "cuda sm_80"), _row("fp8_ada", "fp8", 0.95, 0.7,
                                                                                   "cuda sm_89")]  # fmt: skip
    assert {q: r["trial"] for q, r in serving_forms(rows, 0.95, 1.0).items()} == {"int8_ptq": "int8_fast",
                                                                                   "fp8": "fp8_ada"}  # fmt: skip
    assert "fp8" not in serving_forms(rows[:5], 0.95, 1.0)
    assert "fp8" not in serving_forms([*ROWS[:4], _row("old", "fp8", 0.95, 0.2, "cuda")], 0.95, 1.0)


@pytest.mark.parametrize(("hardware", "gpus", "fp8"), [(SM90, 1.0, True), (SM80, 1.0, False), (CPU, 0.0, False),
                                                       (None, 0.0, False)])  # fmt: skip
def test_the_sweeps_space_has_fp8_only_where_its_trials_run_it(hardware, gpus, fp8, capsys):
    """The smoke sweep's space (tandem run --smoke, tandem tune --smoke) by the trials' hardware: made up, or
    probed (None; CPU trials need no probe task)."""
    from tune.sweep import SweepConfig, sweep_space

    cfg = SweepConfig.smoke(trial_hardware=hardware, gpus_per_trial=gpus)
    assert "fp8" in cfg.space.quant  # asked for: the smoke space holds every scheme
    space = sweep_space(cfg)
    assert ("fp8" in space.quant) is fp8 and {"none", "int8_ptq", "int8_qat"} <= set(space.quant)
    assert ("fp8 left out of the sweep" in capsys.readouterr().out) is not fp8
    assert space.to_tune()["quant"].categories == list(space.quant)  # what Tune draws from
    assert space.finetune_epochs == cfg.space.finetune_epochs and space.calib_size == cfg.space.calib_size


def test_trials_ask_for_a_gpu_where_the_cluster_has_one(monkeypatch):
    import ray

    from tune.sweep import SweepConfig, trial_gpus

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 4.0, "CPU": 32.0})
    assert trial_gpus(None) == 1.0 and SweepConfig(gpus_per_trial=trial_gpus(None)).trial_resources()["gpu"] == 1
    assert trial_gpus(0.5) == 0.5 and trial_gpus(0) == 0.0  # --gpus-per-trial as given
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    assert trial_gpus(None) == 0.0


def test_a_space_of_fp8_alone_on_hardware_without_it_is_refused():
    from tune.space import SearchSpace
    from tune.sweep import SweepConfig, sweep_space

    assert SearchSpace(quant=("fp8",)).for_hardware(SM90).quant == ("fp8",)
    with pytest.raises(ValueError, match="quant must hold a scheme trials on .* run"):
        sweep_space(SweepConfig(space=SearchSpace(quant=("fp8",)), trial_hardware=CPU))
    with pytest.raises(TypeError, match="trial_hardware must be a kernels.precision.DeviceCaps"):
        SweepConfig(trial_hardware="sm_90")
    with pytest.raises(TypeError, match="caps must be a kernels.precision.DeviceCaps"):
        SearchSpace().for_hardware("cpu")


def test_the_sweep_writes_the_set_with_each_forms_measurements(tmp_path):
    chosen = ROWS[4]  # the sweep's chosen row (fastest within the bound overall): the default
    uri = write_forms(ROWS, chosen, 0.95, 1.0, str(tmp_path / "serving"))
    data = json.loads((tmp_path / "serving" / "serving.json").read_text())
    assert data == read_serving_set(uri) and data["default"] == "fp8"
    assert data["forms"]["fp8"] == {"artifact": "s3://b/run/tune/ray/fp8_gpu", "latency_ms": 0.5, "accuracy": 0.948,
                                    "trial": "fp8_gpu", "measured_on": "cuda sm_90", "size_bytes": 100}  # fmt: skip
    assert data["forms"]["int8_ptq"]["latency_ms"] == 3.0
    assert write_forms(ROWS, None, 0.99, 0.0, str(tmp_path / "none")) is None
    assert not (tmp_path / "none").exists()
    assert read_serving_set(str(tmp_path)) is None  # no serving.json: a single artifact


@pytest.mark.parametrize(
    "forms, default, match",
    [
        ({}, "int8_ptq", "forms must be a non-empty object"),
        ({"int4": {"artifact": "a", "latency_ms": 1.0}}, "int4", "form schemes must be among"),
        ({"int8_ptq": {"artifact": "", "latency_ms": 1.0}}, "int8_ptq", "must hold an artifact URI"),
        ({"int8_ptq": {"artifact": "a"}}, "int8_ptq", "must hold its measured latency_ms"),
        ({"int8_ptq": {"artifact": "a", "latency_ms": 1.0}}, "fp8", "default must be one of the forms"),
    ],
)
def test_a_bad_serving_set_is_refused(tmp_path, forms, default, match):
    with pytest.raises(ArtifactError, match=match):
        write_serving_set(str(tmp_path), forms, default)
    (tmp_path / "serving.json").write_text(json.dumps({"format": "tandem.serving_set", "forms": forms}))
    with pytest.raises(ArtifactError):
        read_serving_set(str(tmp_path))


def test_a_replica_picks_its_form_by_its_hardware(tmp_path, caplog, monkeypatch):
    both = write_forms(ROWS, ROWS[4], 0.95, 1.0, str(tmp_path / "both"))
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        assert served_artifact(both, SM90) == "s3://b/run/tune/ray/fp8_gpu"
        assert served_artifact(both, CPU) == served_artifact(both, SM80) == "s3://b/run/tune/ray/int8_fast"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "fp8 form (measured 0.5 ms" in caplog.text and "on cuda sm_90" in caplog.text
    caplog.clear()
    cpu_only = write_forms(ROWS[:4], ROWS[1], 0.95, 1.0, str(tmp_path / "cpu_only"))
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        assert served_artifact(cpu_only, SM90) == "s3://b/run/tune/ray/int8_fast"  # no FP8 measured: INT8
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "no FP8 form" in warning.getMessage() and "int8_ptq" in warning.getMessage()
    # without caps the replica probes its own device (here: made up as an sm_90 GPU)
    monkeypatch.setattr(DeviceCaps, "probe", classmethod(lambda cls, device=None: SM90))
    assert served_artifact(both) == "s3://b/run/tune/ray/fp8_gpu"
    # a single artifact is served as it is
    assert served_artifact(str(tmp_path / "an_artifact")) == str(tmp_path / "an_artifact")


def test_replicas_ask_for_a_gpu_only_where_the_set_has_a_gpu_form(tmp_path, monkeypatch):
    import ray

    from serve_app.config import AppConfig
    from serve_app.deploy import replica_gpus

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 2.0, "CPU": 8.0})
    both = write_forms(ROWS, ROWS[4], 0.95, 1.0, str(tmp_path / "both"))
    cpu_only = write_forms(ROWS[:4], ROWS[1], 0.95, 1.0, str(tmp_path / "cpu_only"))
    assert replica_gpus(AppConfig(artifact=both)) == 1.0
    assert replica_gpus(AppConfig(artifact=cpu_only)) == 0.0


def test_a_runs_serving_set_is_served_first(tmp_path):
    from tandem.pipeline import run_artifact, served_forms

    run = tmp_path / "runs" / "r"
    for part in ("artifacts/trained", "tune/artifact"):
        (run / part).mkdir(parents=True)
        (run / part / "manifest.json").write_text("{}")
    assert run_artifact(str(tmp_path / "runs"), "r") == str(run / "tune" / "artifact")
    uri = write_forms(ROWS, ROWS[4], 0.95, 1.0, str(run / "tune" / "serving"))
    assert run_artifact(str(tmp_path / "runs"), "r") == uri
    assert served_forms(uri) == {
        "artifact": "s3://b/run/tune/ray/int8_fast",  # what a CPU replica loads
        "serving_set": uri,
        "forms": {"int8_ptq": "s3://b/run/tune/ray/int8_fast", "fp8": "s3://b/run/tune/ray/fp8_gpu"},
    }
    one = str(run / "tune" / "artifact")
    assert served_forms(one) == {"artifact": one, "serving_set": None, "forms": {}}


def test_fp8_trials_time_where_replicas_serve_them():
    import torch

    from tune.measure import MeasureConfig, device_label, latency_ms

    assert device_label("cpu") == "cpu"
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        latency_ms(torch.nn.Identity(), (1, 2, 2), MeasureConfig(compile=False, warmup=0, iters=1), device="tpu")


@pytest.mark.gpu
def test_latency_on_cuda_times_the_model_there_and_leaves_it_on_cpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from tune.measure import MeasureConfig, device_label, latency_ms

    model = torch.nn.Conv2d(1, 4, 3)
    lat = latency_ms(model, (1, 8, 8), MeasureConfig(batch_sizes=(1, 8), compile=False, warmup=1, iters=3), "cuda")
    assert set(lat) == {"batch_1", "batch_8"} and all(v > 0 for v in lat.values())
    assert next(model.parameters()).device.type == "cpu" and device_label("cuda").startswith("cuda sm_")


@pytest.mark.gpu
def test_trials_that_ask_for_a_gpu_search_fp8_by_the_gpu_they_get(ray_local):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from tune.space import runs_fp8
    from tune.sweep import SweepConfig, sweep_space, trial_caps

    caps = trial_caps(1.0)  # probed by a task that asks for a GPU, as a trial does
    assert caps.device_type == "cuda" and caps.cuda_capability == torch.cuda.get_device_capability()
    assert ("fp8" in sweep_space(SweepConfig.smoke(gpus_per_trial=1.0)).quant) is runs_fp8(caps)
