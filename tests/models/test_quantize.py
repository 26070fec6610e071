import copy

import pytest
import torch
import torch.nn as nn

from kernels.conv_bn import ConvBNAct
from kernels.quant import QMAX
from models.cnn import ModelConfig, build_model
from models.quantize import (
    FP8,
    BucketCompiled,
    FP8Layer,
    Int8PTQ,
    Int8QAT,
    QuantizedModel,
    fold_bn_,
    quantize_,
)
from tune.baseline import BaselineConfig, load_baseline

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def trained():
    """The trained tiny model (5 epochs, ~97-98% on the digits test split) and its data; cached per session."""
    return load_baseline(BaselineConfig(preset="tiny", epochs=5))


def _fresh(trained):
    model, data = trained
    return copy.deepcopy(model), data


def test_fold_bn_keeps_eval_function():
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("tiny")).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ConvBNAct):
                m.bn.running_mean.uniform_(-1, 1)
                m.bn.running_var.uniform_(0.2, 3)
    x = torch.randn(8, *SHAPE)
    ref = model(x)
    fold_bn_(model)
    assert not any(isinstance(m, ConvBNAct | nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_int8_ptq_within_one_point(trained, per_channel):
    model, data = _fresh(trained)
    fp32 = data.accuracy(model)
    q = quantize_(model, Int8PTQ(per_channel=per_channel), calib=data.train[0])
    assert isinstance(q, QuantizedModel)
    assert data.accuracy(q) >= fp32 - 0.01
    tensors, quant = q.artifact_state()
    scales = [t for k, t in tensors.items() if k.endswith("weight.scale")]
    assert len(scales) == 7 and all(s.numel() == 1 for s in scales) == (not per_channel)
    assert all(t.dtype == torch.int8 for k, t in tensors.items() if k.endswith("weight.q"))
    # the runtime really is an int8 graph: every conv/linear weight is an int8 constant
    graph = q.runtime
    assert sum(t.dtype == torch.int8 for t in graph.state_dict().values()) == 7
    ops = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert any("quantize_per_tensor" in o for o in ops) and any("dequantize_per_channel" in o for o in ops)
    assert quant["state"]["activation_ranges"]  # calibrated


def test_int8_qat_within_one_point(trained):
    model, data = _fresh(trained)
    fp32 = data.accuracy(model)
    ptq, _ = quantize_(copy.deepcopy(model), Int8PTQ(), calib=data.train[0]).artifact_state()
    q = quantize_(model, Int8QAT(epochs=1), calib=data.train[0], train=data.train)
    assert data.accuracy(q) >= fp32 - 0.01
    assert q.scheme == "int8_qat"
    tensors, _ = q.artifact_state()
    assert tensors.keys() == ptq.keys()  # same end format as PTQ ...
    weights = [k for k in tensors if k.endswith("weight.q")]
    assert all(tensors[k].dtype == torch.int8 and tensors[k].abs().max() <= QMAX[torch.int8] for k in weights)
    assert any(not torch.equal(tensors[k], ptq[k]) for k in weights)  # ... with fine-tuned weights


def test_fp8_emulation_error_bound(trained):
    # e4m3 keeps 3 mantissa bits (relative step 2^-3 at worst, ~2^-4 on average): per-channel weights and
    # static per-tensor inputs keep the logits within 2^-3 of their range (the worst relative step; measured
    # 0.06-0.11 on trained models) and accuracy within 1 point.
    model, data = _fresh(trained)
    x = data.test[0]
    with torch.no_grad():
        ref = model(x)
    fp32 = data.accuracy(model)
    q = quantize_(model, FP8(), calib=data.train[0])
    with torch.no_grad():
        out = q(x)
    err = (out - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.125
    assert data.accuracy(q) >= fp32 - 0.01
    layers = [m for m in q.runtime.modules() if isinstance(m, FP8Layer)]
    assert len(layers) == 7 and all(m.weight_q.dtype == torch.float8_e4m3fn for m in layers)


@pytest.mark.gpu
def test_fp8_scaled_mm_matches_emulation():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores (compute capability >= 8.9)")
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("tiny")).eval()
    calib = torch.rand(64, *SHAPE)
    q = quantize_(model, FP8(), calib=calib)
    x = torch.rand(32, *SHAPE)
    emulated = q(x)
    q.runtime.cuda()
    got = q(x.cuda()).cpu()
    # bf16 output of _scaled_mm: ~3 significant digits per layer
    torch.testing.assert_close(got, emulated, rtol=5e-2, atol=5e-2)


@pytest.mark.slow
def test_compiled_int8_matches_reference_graph(trained):
    # inductor lowers the graph to oneDNN int8 convs; the reference graph dequantizes and runs fp32 convs.
    model, data = _fresh(trained)
    q = quantize_(model, Int8PTQ(), calib=data.train[0])
    x = data.test[0][:32]
    ref = q(x)
    q.compile_()
    got = q(x)
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.95
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.1 * ref.abs().max().item())


def test_invalid_settings_raise(trained):
    with pytest.raises(ValueError, match="epochs must be"):
        Int8QAT(epochs=0)
    with pytest.raises(ValueError, match="calib_samples must be"):
        Int8PTQ(calib_samples=0)
    with pytest.raises(TypeError, match="per_channel must be a bool"):
        FP8(per_channel="yes")
    with pytest.raises(TypeError, match="unexpected keyword"):
        Int8PTQ(per_chanel=True)
    model, data = _fresh(trained)
    with pytest.raises(ValueError, match="needs train"):
        quantize_(model, Int8QAT(), calib=data.train[0])
    with pytest.raises(ValueError, match="calib must be"):
        quantize_(model, Int8PTQ(), calib=data.train[0][0])
    with pytest.raises(TypeError, match="config must be"):
        quantize_(model, "int8", calib=data.train[0])
    with pytest.raises(TypeError, match="models.cnn.CNN"):
        quantize_(nn.Linear(2, 2), Int8PTQ(), calib=data.train[0])


def test_bucket_compiled_pads_to_power_of_two_buckets(monkeypatch):
    # One graph per power-of-two bucket (freezing needs static shapes); rows are zero-padded, outputs sliced.
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the bucketing logic, not inductor
    built, seen = [], []

    def build(example):
        built.append(example.shape[0])
        return lambda x: (seen.append(x.shape[0]), x.sum((1, 2, 3)))[1]

    fn = BucketCompiled(build)
    x = torch.rand(5, *SHAPE)
    torch.testing.assert_close(fn(x), x.sum((1, 2, 3)))
    fn(x[:3]), fn(x[:1]), fn(x[:4])
    assert built == [8, 4, 1] and seen == [8, 4, 1, 4]


def test_bucket_compiled_calls_each_graph_with_one_kind_of_tensor(monkeypatch):
    # Dynamo guards a graph on its input's dispatch keys: a normal tensor (a caller outside inference_mode, or a
    # view of one) and an inference tensor (the serving replica's) each compiled the bucket again, so a replica
    # warmed up with the one paid a recompile in its first request with the other (1.6 s against 8-11 ms).
    import numpy as np
    from torch._dynamo.utils import counters

    compile_, kinds = torch.compile, []

    def eager_compile(fn, **kw):  # dynamo and its guards, not inductor; records what each call is given
        compiled = compile_(fn, backend="eager", **kw)
        return lambda x: (kinds.append(x.is_inference()), compiled(x))[1]

    monkeypatch.setattr(torch, "compile", eager_compile)
    torch._dynamo.reset()
    fn = BucketCompiled(lambda example: lambda x: x.sum((1, 2, 3)))
    x = torch.rand(4, *SHAPE)
    with torch.no_grad():
        fn(x[:1]), fn(x[:2])  # normal tensors, as a load's compile passes them
    graphs = counters["stats"]["unique_graphs"]
    with torch.inference_mode():  # what the replica serves: from numpy, under inference_mode
        out = fn(torch.from_numpy(np.ascontiguousarray(x[:1].numpy()))), fn(x[:2])
    assert kinds == [True] * 4 and counters["stats"]["unique_graphs"] == graphs  # no recompile
    torch.testing.assert_close(out[1], x[:2].sum((1, 2, 3)))
