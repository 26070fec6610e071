import pytest
import torch

from kernels.precision import DeviceCaps, PrecisionConfig, PrecisionPolicy, QuantTarget


@pytest.mark.parametrize(
    "caps, dtype, tf32, target",
    [
        (DeviceCaps("cpu"), torch.bfloat16, False, QuantTarget.INT8),
        (DeviceCaps("cuda", (7, 0)), torch.float16, False, QuantTarget.INT8),  # V100
        (DeviceCaps("cuda", (8, 0)), torch.bfloat16, True, QuantTarget.INT8),  # A100
        (DeviceCaps("cuda", (8, 9)), torch.bfloat16, True, QuantTarget.FP8),  # L4 / L40
        (DeviceCaps("cuda", (9, 0)), torch.bfloat16, True, QuantTarget.FP8),  # H100 / H200
    ],
)
def test_policy_from_faked_caps(caps, dtype, tf32, target):
    p = PrecisionPolicy.from_caps(caps)
    assert (p.train_dtype, p.tf32, p.infer_target) == (dtype, tf32, target)
    assert (p.grad_scaler() is not None) == (dtype == torch.float16)


def test_overrides():
    p = PrecisionPolicy.from_caps(
        DeviceCaps("cuda", (9, 0)), PrecisionConfig(train_dtype="fp32", tf32=False, infer_target="int8")
    )
    assert (p.train_dtype, p.tf32, p.infer_target) == (torch.float32, False, QuantTarget.INT8)
    with p.autocast():
        assert not torch.is_autocast_enabled("cuda")


def test_cpu_autocast_is_bf16():
    p = PrecisionPolicy.for_device("cpu")
    with p.autocast():
        y = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
    assert y.dtype == torch.bfloat16


def test_bad_config():
    with pytest.raises(ValueError, match="train_dtype must be one of"):
        PrecisionConfig(train_dtype="fp64")
    with pytest.raises(ValueError, match="infer_target must be one of"):
        PrecisionConfig(infer_target="int4")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        PrecisionPolicy.from_caps(DeviceCaps("cpu"), PrecisionConfig(train_dtype="fp16"))
    with pytest.raises(ValueError, match="sm_89"):
        PrecisionPolicy.from_caps(DeviceCaps("cuda", (8, 0)), PrecisionConfig(infer_target="fp8"))
