import json
import pickle

import pytest
import torch

from kernels.conv_bn import ConvBNAct
from models.artifact import ArtifactError, compiled_tolerance, load_artifact, read_manifest, save_artifact
from models.cnn import ModelConfig, build_model
from models.prune import PruneConfig, channel_counts, prune_
from models.quantize import FP8, Int8PTQ, QuantizedModel, quantize_

SHAPE = (1, 8, 8)


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig.preset("tiny"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ConvBNAct):
                m.bn.running_mean.uniform_(-0.5, 0.5)
                m.bn.running_var.uniform_(0.5, 2.0)
                m.bn.weight.uniform_(0.5, 1.5)
    return model.eval()


def _inputs(n=40, seed=1):
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _pruned():
    model = _tiny()
    report = prune_(model, PruneConfig(ratio=0.25), input_shape=SHAPE)
    return model, report


def test_fp32_round_trip_and_manifest(tmp_path):
    model = _tiny()
    manifest = save_artifact(
        model, tmp_path / "a", input_shape=SHAPE, accuracy={"test_accuracy": 0.5}, latency_ms={"batch_1": 1.0},
        source_checkpoint="ckpt/x", class_names=[str(i) for i in range(10)],
    )  # fmt: skip
    loaded, m2 = load_artifact(tmp_path / "a")
    x = _inputs()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert m2 == manifest == json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["format"] == "tandem.artifact" and manifest["format_version"] == 1
    assert manifest["architecture"] == "models.cnn.CNN" and manifest["preset"] == "tiny"
    assert manifest["input_shape"] == [1, 8, 8] and manifest["num_classes"] == 10
    assert manifest["pruning"] is None and manifest["quantization"]["scheme"] == "none"
    assert manifest["size_bytes"] == (tmp_path / "a" / "weights.pt").stat().st_size
    assert manifest["accuracy"]["test_accuracy"] == 0.5 and manifest["source_checkpoint"] == "ckpt/x"
    assert manifest["latency_ms"] == {"batch_1": 1.0} and manifest["class_names"][3] == "3"


def test_pruned_round_trip(tmp_path):
    model, report = _pruned()
    save_artifact(model, tmp_path / "p", input_shape=SHAPE, pruning={"ratio": 0.25, **report.to_dict()})
    loaded, manifest = load_artifact(tmp_path / "p")
    assert channel_counts(loaded) == channel_counts(model) == manifest["pruning"]["channels"]
    assert manifest["pruning"]["macs_after"] == report.macs_after and manifest["pruning"]["ratio"] == 0.25
    x = _inputs()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("config", [Int8PTQ(), FP8(per_channel=False)], ids=["int8_ptq", "fp8_per_tensor"])
def test_quantized_round_trip_identical_predictions(tmp_path, config):
    model, _ = _pruned()
    n_weights = sum(m.conv.weight.numel() for m in model.modules() if isinstance(m, ConvBNAct))
    n_weights += model.head.weight.numel()
    fp32 = save_artifact(model, tmp_path / "fp32", input_shape=SHAPE)
    q = quantize_(model, config, calib=_inputs(64, seed=2))
    manifest = save_artifact(q, tmp_path / "q", input_shape=SHAPE, probe=_inputs(24, seed=3))
    loaded, _ = load_artifact(tmp_path / "q")
    assert isinstance(loaded, QuantizedModel) and loaded.scheme == config.scheme
    x = _inputs(50, seed=4)  # inputs never seen at save time
    if config.scheme == "int8_ptq":  # loaded compiled (the served graph); its reference graph is the saved one
        assert loaded.compiled
        torch.testing.assert_close(loaded.reference(x), q(x), rtol=0, atol=0)
        tol = compiled_tolerance(manifest["probe"], q(x))
        assert (loaded(x) - q(x)).abs().max().item() <= tol
    else:
        torch.testing.assert_close(loaded(x), q(x), rtol=0, atol=0)
    stored = [e for e in manifest["tensors"]["entries"] if e["name"].endswith("weight.q")]
    assert {e["dtype"] for e in stored} == {"int8" if config.scheme == "int8_ptq" else "float8_e4m3fn"}
    assert sum(torch.Size(e["shape"]).numel() for e in stored) == n_weights
    # one byte per weight + fp32 scales/biases; the tiny model's file is dominated by ~1.5 kB of zip records
    assert manifest["size_bytes"] < 0.4 * fp32["size_bytes"]


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "art"
    save_artifact(_tiny(), path, input_shape=SHAPE)
    return path


def _edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_corrupt_weights_byte(saved):
    raw = bytearray((saved / "weights.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (saved / "weights.pt").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_artifact(saved)


def test_missing_or_invalid_manifest(saved, tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_artifact(tmp_path)
    with pytest.raises(ArtifactError, match="must be a directory"):
        load_artifact(tmp_path / "nope")
    (saved / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(saved)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
        (lambda m: m.pop("quantization"), r"missing keys \['quantization'\]"),
        (lambda m: m["model_config"].update(widths=[8, 32]), "weights do not match"),
        (lambda m: m.update(num_classes=7), "disagree with model_config"),
        (lambda m: m["probe"].update(predictions=[0] * 16), "predictions differ"),
        (lambda m: m["tensors"]["entries"][0].update(offset=10**9), "does not fit"),
        (lambda m: m["model_config"].update(colour="red"), "bad model_config"),
        (lambda m: m.update(pruning={"channels": {"stem": 3}}), "pruning.channels do not fit"),
        (lambda m: m["quantization"].update(scheme="int4"), "scheme must be one of"),
        (lambda m: m.update(tensors=[]), "tensors must be an object"),
        (lambda m: m["probe"].pop("sha256"), "probe.sha256 must be a str"),
    ],
    ids=["version", "missing-key", "architecture", "classes", "predictions", "offset", "config", "pruning", "scheme",
         "tensors-type", "probe-sha"],  # fmt: skip
)
def test_mismatched_manifest(saved, edit, message):
    _edit_manifest(saved, edit)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(saved)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_never_unpickles_objects(saved):
    # A weights file holding a pickled object (checksum updated to match) is refused by weights_only loading.
    with open(saved / "weights.pt", "wb") as f:
        pickle.dump({"packed": _Evil()}, f)
    import hashlib

    digest = hashlib.sha256((saved / "weights.pt").read_bytes()).hexdigest()
    _edit_manifest(saved, lambda m: m["tensors"].update(sha256=digest))
    with pytest.raises(ArtifactError, match="unreadable"):
        load_artifact(saved)


def test_save_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="input_shape must be"):
        save_artifact(_tiny(), tmp_path, input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="class_names must have 10"):
        save_artifact(_tiny(), tmp_path, input_shape=SHAPE, class_names=["a"])
    with pytest.raises(TypeError, match="CNN or built by ModelSpec.build"):
        save_artifact(torch.nn.Linear(2, 2), tmp_path, input_shape=SHAPE)


def test_sweep_int8_artifact_of_colour_model_always_loads(tmp_path):
    """The sweep's output: a 3-channel model pruned 8%, INT8 PTQ, compiled for its latency measurement before
    saving (the recorded logits then came from the compiled graph and every Serve replica refused the
    artifact: "logits differ from the recorded ones by 0.0133"). It loads, compiled, and passes."""
    from models.cnn import ModelConfig, build_model
    from models.data import colour_images
    from models.prune import PruneConfig, prune_
    from tune.measure import MeasureConfig, latency_ms

    x = torch.from_numpy(colour_images(96)[0])
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("tiny", in_channels=3, num_classes=6))
    with torch.no_grad():  # BN statistics that are not the identity
        model.train()(x)
    prune_(model, PruneConfig(ratio=0.08), input_shape=(3, 16, 16))
    fp32 = save_artifact(model, tmp_path / "pruned", input_shape=(3, 16, 16), probe=x[:16])
    assert fp32["pruning"] is not None
    load_artifact(tmp_path / "pruned")
    q = quantize_(model, Int8PTQ(), calib=x)
    latency_ms(q, (3, 16, 16), MeasureConfig(batch_sizes=(1,), warmup=1, iters=2))  # compiles, as the trial does
    manifest = save_artifact(q, tmp_path / "int8", input_shape=(3, 16, 16), probe=x[:32])
    assert manifest["probe"]["compiled_max_diff"] is not None
    loaded, _ = load_artifact(tmp_path / "int8")
    assert loaded.compiled
    torch.testing.assert_close(loaded.reference(x[:32]), q.reference(x[:32]), rtol=0, atol=0)
