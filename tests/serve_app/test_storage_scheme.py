"""The inference scheme chosen by the hardware a replica lands on (issue 14): FP8 on CUDA sm_89+, INT8 elsewhere;
device capabilities are made up here (kernels.precision.DeviceCaps), so this runs on CPU."""

from __future__ import annotations

import pytest
import torch

from kernels.precision import DeviceCaps
from serve_app.config import choose_artifact, scheme_for_device

ADA, HOPPER, AMPERE, CPU = (
    DeviceCaps("cuda", (8, 9)),
    DeviceCaps("cuda", (9, 0)),
    DeviceCaps("cuda", (8, 0)),
    DeviceCaps("cpu"),
)


@pytest.mark.parametrize(("caps", "scheme"), [(ADA, "fp8"), (HOPPER, "fp8"), (AMPERE, "int8"), (CPU, "int8")])
def test_scheme_follows_the_compute_capability(caps, scheme):
    assert scheme_for_device(caps) == scheme


def test_an_artifact_set_serves_the_form_the_hardware_runs():
    both = {"fp8": "s3://b/fp8", "int8_ptq": "s3://b/int8", "none": "s3://b/fp32"}
    assert choose_artifact(both, ADA) == "s3://b/fp8"
    assert choose_artifact(both, AMPERE) == choose_artifact(both, CPU) == "s3://b/int8"
    assert choose_artifact({"fp8": "f", "none": "n"}, CPU) == "n"  # no INT8 form: fp32, not an FP8 it cannot run
    with pytest.raises(ValueError, match="must hold a scheme this hardware runs"):
        choose_artifact({"fp8": "f"}, CPU)
    with pytest.raises(TypeError, match="caps must be a DeviceCaps"):
        scheme_for_device("sm_89")
    with pytest.raises(TypeError, match="artifacts must be a non-empty dict"):
        choose_artifact({}, CPU)


def test_probe_on_this_machine():
    """Without caps the process's own device decides (CPU here: INT8)."""
    import torch

    assert scheme_for_device() == ("fp8" if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
                                   else "int8")  # fmt: skip


def test_the_sweep_tries_fp8_only_where_trials_run_it():
    from tune.space import SearchSpace
    from tune.sweep import trial_caps

    assert "fp8" in SearchSpace().for_hardware(ADA).quant and "fp8" in SearchSpace().for_hardware(HOPPER).quant
    for caps in (AMPERE, CPU):
        quant = SearchSpace().for_hardware(caps).quant
        assert "fp8" not in quant and {"none", "int8_ptq", "int8_qat"} <= set(quant)
    assert trial_caps(0.0) == CPU  # CPU trials: no probe task


def test_an_fp8_replica_runs_on_its_gpu_and_the_rest_on_cpu():
    from serve_app.placement import on_device, replica_device

    assert replica_device("fp8", cuda_available=True) == "cuda"
    assert replica_device("fp8", cuda_available=False) == "cpu"  # no GPU given: the slow fallback, on CPU
    for scheme in ("none", "int8_ptq", "int8_qat"):
        assert replica_device(scheme, cuda_available=True) == "cpu"
    with pytest.raises(TypeError, match="scheme must be a string"):
        replica_device(None, True)
    model = torch.nn.Linear(4, 2)
    assert on_device(model, "cpu") is model


@pytest.mark.gpu
def test_on_device_moves_the_model_and_its_inputs_to_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from serve_app.placement import on_device

    model = torch.nn.Linear(4, 2).eval()
    x = torch.rand(3, 4)
    want = model(x)
    wrapped = on_device(model, "cuda")  # moves the module itself (want was taken on CPU before)
    out = wrapped(x)
    assert next(wrapped.parameters()).is_cuda and out.device.type == "cpu"
    assert torch.allclose(out, want.to(out.dtype), atol=1e-5)
