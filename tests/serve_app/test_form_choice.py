"""The fp32 form the sweep timed travels in the artifact's manifest, and a replica runs it only on a machine like the
one that timed it (serve_app.form_choice.from_manifest); no Ray, no compiles."""

from __future__ import annotations

import pytest
import torch

import models.fuse
from models.artifact import read_manifest, save_artifact
from models.cnn import ModelConfig, build_model
from models.fuse import inference_form_record, inference_module, machine_fingerprint
from serve_app.form_choice import from_manifest
from tune.measure import MeasureConfig, measured_form


def _model():
    torch.manual_seed(0)
    return build_model(ModelConfig.preset("tiny", in_channels=3)).eval()


class _Spy(torch.nn.Module):
    """A served form that counts its calls (the form fastest_inference_module 'chose')."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_the_sweep_times_the_form_it_records_and_the_manifest_carries_it(tmp_path, monkeypatch):
    model = _model()
    chosen = models.fuse.CompiledInference(inference_module(model))  # torch.compile is lazy: nothing compiles
    spy = _Spy(inference_module(model))
    chosen.forward = spy.__call__  # counts what the timing calls, without compiling

    monkeypatch.setattr(models.fuse, "fastest_inference_module", lambda m, ex, bs: (chosen, {}))
    cfg = MeasureConfig(batch_sizes=(1, 4), warmup=1, iters=3)
    lat, rec = measured_form(model, (3, 8, 8), cfg)
    assert set(lat) == {"batch_1", "batch_4"} and spy.calls == 2 * (1 + 3)  # every timed call ran the chosen form
    assert rec["form"] == "CompiledInference" and rec["batch_sizes"] == [1, 4]
    assert rec["threads"] == torch.get_num_threads() and rec["cpu"] == machine_fingerprint()["cpu"]

    manifest = save_artifact(model, tmp_path / "a", input_shape=(3, 8, 8), latency_ms=lat, inference_form=rec)
    assert read_manifest(tmp_path / "a")["inference_form"] == manifest["inference_form"] == rec
    # eager timing (a smoke sweep) records no form: what it timed is not what Serve runs
    assert measured_form(model, (3, 8, 8), MeasureConfig(batch_sizes=(1,), compile=False, warmup=0, iters=1))[1] is None
    with pytest.raises(ValueError, match="inference_form"):
        save_artifact(model, tmp_path / "b", input_shape=(3, 8, 8), inference_form={"form": "Mystery"})


def test_from_manifest_returns_the_record_only_on_a_matching_machine():
    rec = inference_form_record(inference_module(_model()), (1, 32), threads=1)
    assert rec["form"] == "FoldedInference" and rec["torch"] == torch.__version__
    manifest = {"quantization": {"scheme": "none"}, "inference_form": rec}
    assert from_manifest(manifest, 1) == ("FoldedInference", (1, 32), None)
    assert from_manifest(manifest, 2) is None  # other torch threads
    traced = inference_form_record(models.fuse.ScriptedInference(inference_module(_model()), torch.rand(1, 3, 8, 8)),
                                   (1, 32), threads=1)  # fmt: skip
    assert from_manifest({**manifest, "inference_form": traced}, 1) == ("ScriptedInference", (1, 32), None)
    for key, other in (("cpu", "Some Other CPU"), ("cores", (rec["cores"] or 1) + 1), ("torch", "0.0.1"),
                       ("arch", "riscv64")):  # fmt: skip
        assert from_manifest({**manifest, "inference_form": {**rec, key: other}}, 1) is None, key
    # older artifacts (no field), a manifest that recorded none, a damaged record
    assert from_manifest({"quantization": {"scheme": "none"}}, 1) is None
    assert from_manifest({**manifest, "inference_form": None}, 1) is None
    assert from_manifest({**manifest, "inference_form": {**rec, "batch_sizes": []}}, 1) is None
    assert from_manifest({**manifest, "inference_form": {**rec, "form": "CNN"}}, 1) is None
    with pytest.raises(ValueError, match="threads must be a positive int"):
        from_manifest(manifest, 0)
    with pytest.raises(TypeError, match="manifest must be a dict"):
        from_manifest([], 1)


def test_an_artifact_saved_without_a_form_records_none(tmp_path):
    manifest = save_artifact(_model(), tmp_path / "a", input_shape=(3, 8, 8))
    assert manifest["inference_form"] is None and from_manifest(read_manifest(tmp_path / "a"), 1) is None


def test_the_onednn_form_is_rebuilt_with_the_plans_it_was_timed_with(monkeypatch):
    """The oneDNN form's record carries each conv's chosen form per batch size; rebuilt from them nothing is
    timed and every conv runs what the timed plan ran."""
    if not models.fuse.onednn_available():
        pytest.skip("this PyTorch has no oneDNN fused conv ops")
    from models.fuse import OneDNNConvAct, OneDNNInference

    model, x = _model(), torch.rand(1, 3, 8, 8)
    form = OneDNNInference(model, x, (1, 4), iters=1)
    rec = inference_form_record(form, (1, 4), threads=1)
    assert rec["form"] == "OneDNNInference" and len(rec["choices"]) == 2 and all(rec["choices"])
    name, sizes, choices = from_manifest({"inference_form": rec}, 1)

    def untimed(self, x, other=None):
        raise AssertionError("a conv was timed")

    monkeypatch.setattr(models.fuse._ConvChoice, "forward", untimed)
    again = OneDNNInference(model, x, sizes, choices=choices)
    for a, b in zip(form.plans, again.plans, strict=True):
        kinds = [[(m.packed, m.winograd, m.channels_last) for m in p.modules() if isinstance(m, OneDNNConvAct)]
                 for p in (a, b)]  # fmt: skip
        assert kinds[0] == kinds[1] and kinds[0]
    with torch.inference_mode():
        torch.testing.assert_close(again(x.expand(4, -1, -1, -1)), form(x.expand(4, -1, -1, -1)))
    with pytest.raises(ValueError, match="choices must be one form index per planned conv"):
        OneDNNInference(model, x, (1,), choices=[[0]])
    assert from_manifest({"inference_form": {**rec, "choices": None}}, 1) is None  # damaged: timed again
