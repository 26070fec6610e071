"""A user's model (`tv_models:resnet18` / `tv_models:mobilenet_v2`, torchvision layout) through the artifact: the
spec (function, kwargs), the fusion and the pruning plan are recorded and the model is rebuilt from them, fp32 and
INT8 (PT2E), pruned or not."""

from __future__ import annotations

import os

import pytest
import torch
from tv_models import __file__ as TV_FILE

from models.artifact import ArtifactError, load_artifact, read_manifest, save_artifact
from models.factory import ModelSpec
from models.prune import PruneConfig, prune_traced_
from models.quantize import Int8PTQ, QuantizedModel, quantize_

SHAPE = (3, 16, 16)


@pytest.fixture(autouse=True)
def _importable(monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(TV_FILE))


def _trained(fn: str, **kwargs):
    spec = ModelSpec(user=f"tv_models:{fn}", user_kwargs=kwargs)
    torch.manual_seed(0)
    model = spec.build(SHAPE, 6)
    x = torch.rand(64, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.train()(x)  # BN statistics
    return model.eval(), x


@pytest.mark.parametrize("fn, kwargs", [("resnet18", {"width": 8}), ("mobilenet_v2", {"width_mult": 0.25})])
def test_pruned_user_model_round_trip(tmp_path, fn, kwargs):
    model, x = _trained(fn, **kwargs)
    report = prune_traced_(model, PruneConfig(ratio=0.2), input_shape=SHAPE)
    manifest = save_artifact(model, tmp_path / "a", input_shape=SHAPE, pruning={"ratio": 0.2, **report.to_dict()},
                             probe=x[:8], class_names=list("abcdef"))  # fmt: skip
    assert manifest["architecture"] == "user" and manifest["num_classes"] == 6
    assert manifest["model_spec"]["user"] == f"tv_models:{fn}" and manifest["model_spec"]["user_kwargs"] == kwargs
    assert manifest["model_spec"]["fused"] and manifest["pruning"]["shapes"] == report.shapes
    loaded, m2 = load_artifact(tmp_path / "a")
    assert m2["class_names"] == list("abcdef")
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_int8_user_model_round_trip_compiled(tmp_path):
    model, x = _trained("resnet18", width=8)
    prune_traced_(model, PruneConfig(ratio=0.2), input_shape=SHAPE)
    q = quantize_(model, Int8PTQ(), calib=x)
    # the probe is all 64 rows: the load compiles the INT8 graph for batch 1 and the probe's batch, and the
    # comparison below runs in that graph (a 16-row probe cost a third inductor compile, for batch 64)
    manifest = save_artifact(q, tmp_path / "q", input_shape=SHAPE, probe=x)
    assert manifest["architecture"] == "user" and manifest["quantization"]["scheme"] == "int8_ptq"
    # the compiled graph's error is measured at save even when the caller ran eagerly (a smoke sweep): a load's
    # tolerance derives from it (a fixed floor refused a pruned MobileNetV2 the sweep had just chosen)
    assert not q.compiled and isinstance(manifest["probe"]["compiled_max_diff"], float)
    loaded, _ = load_artifact(tmp_path / "q")
    assert isinstance(loaded, QuantizedModel) and loaded.compiled
    torch.testing.assert_close(loaded.reference(x), q(x), rtol=0, atol=0)
    assert (loaded(x).argmax(1) == q(x).argmax(1)).float().mean() >= 0.95


def test_user_model_that_no_longer_imports_is_named(tmp_path, monkeypatch):
    model, x = _trained("resnet18", width=8)
    save_artifact(model, tmp_path / "a", input_shape=SHAPE, probe=x[:4])
    manifest = read_manifest(tmp_path / "a")
    manifest["model_spec"]["user"] = "tv_models_gone:resnet18"
    (tmp_path / "a" / "manifest.json").write_text(__import__("json").dumps(manifest))
    with pytest.raises(ArtifactError, match="cannot import the model function 'tv_models_gone:resnet18'"):
        load_artifact(tmp_path / "a")
