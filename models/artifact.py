"""The saved-model format: what `tune/` exports and what the Serve app loads (and nothing else).

An artifact is a directory:
    manifest.json   the schema below (UTF-8 JSON)
    weights.pt      torch.save({"packed": uint8 tensor}) - every tensor of the model, packed back to back
    probe.pt        torch.save({"input": (N, C, H, W) float32, "logits": (N, classes) float32})
Both .pt files are read with `torch.load(weights_only=True)` (plain tensors only, nothing is unpickled beyond
that). `weights.pt` holds one byte buffer rather than a dict of tensors so that its size on disk is the
size of the numbers (no per-tensor zip records) and an int8 model really is ~1/4 of its fp32 file.

manifest.json (format_version 1):
    format            "tandem.artifact"
    format_version    1
    created_utc       ISO 8601 time of saving
    architecture      "models.cnn.CNN" (a preset, rebuilt from model_config) or "user" (rebuilt by calling the
                      recorded function; its package must be importable where the artifact is loaded)
    model_config      models.cnn.ModelConfig.to_dict() (widths, depths, act, in_channels, num_classes, ...)
    preset            ModelConfig.preset_name, or null
    input_shape       [C, H, W] of one sample
    num_classes       int; class_names: list of str or null (index i names class i)
    model_spec        null for a preset CNN; for architecture "user": {"user": "pkg.mod:fn", "user_kwargs": {...},
                      "preset", "save", "fused": [qualified names of the ConvBNAct ops fuse_ made]}
    pruning           null (unpruned) or {"channels": {ConvBNAct qualified name: out channels} (CNN) or
                      "shapes": {layer name: {"in", "out", "groups"}} (user models), "ratio": float
                      or null, and any counts given at save: "params_before", "params_after", "macs_before",
                      "macs_after", ...}
    quantization      {"scheme": "none" | "int8_ptq" | "int8_qat" | "fp8", "config": {fields of the config
                      class}, "state": scheme-specific JSON (e.g. int8 activation ranges by observer name)}
    accuracy          {"test_accuracy": float in [0, 1] or null, any other named float, e.g. "baseline"}
    latency_ms        {"batch_1": float, "batch_32": float, ...} measured by whoever saved it, or {}
    size_bytes        size of weights.pt in bytes
    source_checkpoint str or null (where the trained weights came from)
    tensors           {"file": "weights.pt", "sha256": hex digest of weights.pt, "entries": [{"name": str,
                      "dtype": torch dtype name without "torch.", "shape": [int], "offset": byte offset}]}
    probe             {"file": "probe.pt", "sha256": ..., "predictions": [argmax class per probe sample]}
    extra             free-form JSON dict from the saver

Loading rebuilds the model from `model_config` (+ `pruning.channels`, + the quantization scheme's own
rebuild), loads the tensors, runs the probe inputs and checks that the predicted classes are identical to
those recorded at save time (and the logits equal within 1e-5 of their magnitude). The recorded logits are
always the reference graph's; an INT8 model is then compiled (the graph the sweep measured, what Serve runs)
and its logits must be within a tolerance derived from the compiled-vs-reference difference measured at save
(`probe.compiled_max_diff`, see `compiled_tolerance`), so a loaded artifact is known to behave as the
measured one. Every inconsistency raises `ArtifactError` (a ValueError) saying what is wrong.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from kernels.conv_bn import ConvBNAct
from models.cnn import ModelConfig, build_model
from models.factory import USER_ARCHITECTURE, ModelSpec, describe
from models.prune import apply_module_shapes_, channel_counts, module_shapes, resize_
from models.quantize import CONFIGS, QuantizedModel, restore_quantized

FORMAT = "tandem.artifact"
FORMAT_VERSION = 1
ARCHITECTURE = "models.cnn.CNN"
_ALIGN = 16  # byte alignment of each packed tensor (any dtype's view needs offset % itemsize == 0)
_REQUIRED = (
    "format",
    "format_version",
    "architecture",
    "model_config",
    "input_shape",
    "num_classes",
    "pruning",
    "quantization",
    "tensors",
    "probe",
)


class ArtifactError(ValueError):
    """A corrupt, incomplete or mismatched artifact."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pack_tensors(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[dict]]:
    """(one uint8 buffer, entries) holding `tensors` back to back; inverse of `unpack_tensors`."""
    entries, chunks, offset = [], [], 0
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        pad = -offset % _ALIGN
        if pad:
            chunks.append(torch.zeros(pad, dtype=torch.uint8))
            offset += pad
        entries.append({"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                        "offset": offset})  # fmt: skip
        chunks.append(raw)
        offset += raw.numel()
    buf = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
    return buf, entries


def unpack_tensors(buf: torch.Tensor, entries: list[dict]) -> dict[str, torch.Tensor]:
    """Tensors (copies) from a packed buffer; raises ArtifactError on entries that do not fit it."""
    if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8 or buf.dim() != 1:
        raise ArtifactError(f"packed weights must be a 1-D uint8 tensor, got {buf!r:.80}")
    out = {}
    for e in entries:
        try:
            name, shape, offset = e["name"], [int(v) for v in e["shape"]], int(e["offset"])
            dtype = getattr(torch, e["dtype"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ArtifactError(f"malformed tensor entry {e!r}: {err}") from None
        if not isinstance(dtype, torch.dtype):
            raise ArtifactError(f"tensor {name!r}: unknown dtype {e['dtype']!r}")
        n = torch.Size(shape).numel() * dtype.itemsize
        if offset < 0 or offset % dtype.itemsize or offset + n > buf.numel():
            raise ArtifactError(f"tensor {name!r} ({n} bytes at {offset}) does not fit the {buf.numel()}-byte buffer")
        out[name] = buf[offset : offset + n].clone().view(dtype).reshape(shape)
    return out


def _describe(model: nn.Module) -> dict:
    """How to rebuild the fp32 model behind `model` (models.factory.describe; a QuantizedModel carries it)."""
    if isinstance(model, QuantizedModel):
        return model.source
    return describe(model)


def _pristine_shapes(spec: dict, input_shape: tuple[int, int, int], num_classes: int) -> dict:
    fresh = ModelSpec.from_dict(spec).build(input_shape, num_classes)
    return module_shapes(fresh)


def default_probe(input_shape: tuple[int, ...], n: int = 16) -> torch.Tensor:
    """Deterministic probe inputs, uniform in [0, 1) (the digits' pixel range)."""
    return torch.rand(n, *input_shape, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reference logits: a QuantizedModel's reference graph even when it was compiled (the compiled graph's
    rounding differs from the reference by a small measured amount, checked separately)."""
    model.eval()
    if isinstance(model, QuantizedModel):
        return model.reference(x).float()
    return model(x).float()


# A rebuild runs the same reference ops on the same numbers: it reproduces the recorded logits up to float
# reassociation, relative to the logits' magnitude.
REBUILD_RTOL = 1e-5
# The compiled INT8 graph (inductor, oneDNN) requantizes with its own rounding: an activation one uint8 step off
# moves the logits by a fraction of a percent (measured: 5e-4 .. 1.3e-2 of max |logit| on the sweep's models).
# A load allows COMPILED_SLACK x the difference measured when saving, and at least COMPILED_FLOOR of the largest
# |logit| when nothing was measured, so a replica on another x86 CPU still accepts tandem's own artifacts.
COMPILED_SLACK = 4.0
COMPILED_FLOOR = 0.02


def _scale(logits: torch.Tensor) -> float:
    return max(1.0, logits.abs().max().item())


def compiled_tolerance(probe_manifest: dict, logits: torch.Tensor) -> float:
    """Largest |compiled - recorded reference| logit difference a load accepts (see COMPILED_SLACK)."""
    measured = probe_manifest.get("compiled_max_diff")
    floor = COMPILED_FLOOR * _scale(logits)
    if isinstance(measured, int | float) and measured >= 0:
        return max(COMPILED_SLACK * measured, floor / 4)
    return floor


@torch.no_grad()
def _compiled_diff(model: nn.Module, probe: torch.Tensor, logits: torch.Tensor) -> float | None:
    """Max |compiled - reference| logit difference of an INT8 model on the probe, what a load's tolerance derives
    from. Measured on the model's own compiled graph, or on a compiled copy when the caller did not compile (a
    smoke sweep measures eager latency): without it a load fell back to a fixed floor that a pruned MobileNetV2
    exceeded (0.19 vs 0.066), so the sweep's own output did not load. None for fp32 or when inductor fails here
    (the load then reports its own compile error)."""
    if not isinstance(model, QuantizedModel) or model.scheme not in ("int8_ptq", "int8_qat"):
        return None
    if not model.compiled:
        model = copy.copy(model)  # shares the runtime; only the copy holds the compiled graph
        try:
            model.compile_(probe, batch_sizes=(len(probe),))
        except Exception:  # inductor fails in many ways (no C compiler, an unsupported op): the load names it
            return None
    return (model(probe).float() - logits).abs().max().item()


def save_artifact(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_shape: tuple[int, int, int],
    accuracy: dict[str, float | None] | None = None,
    latency_ms: dict[str, float] | None = None,
    pruning: dict | None = None,
    source_checkpoint: str | None = None,
    class_names: list[str] | None = None,
    probe: torch.Tensor | None = None,
    extra: dict | None = None,
    inference_form: dict | None = None,
) -> dict:
    """Writes `model` (a `CNN`, pruned or not, or the `QuantizedModel` returned by `quantize_`) to directory
    `path` (created; existing artifact files are replaced). `pruning` adds counts/ratio to the recorded
    channels; `probe` (N, C, H, W) are the inputs whose predictions a load must reproduce (default: 16
    deterministic random inputs). `inference_form`: the fp32 form whose latency `latency_ms` holds
    (models.fuse.inference_form_record), which a replica on a matching machine then runs as it is instead of
    timing the forms again (serve_app.form_choice.from_manifest); None when none was timed. Returns the
    manifest."""
    if inference_form is not None:
        from models.fuse import INFERENCE_FORMS

        if not isinstance(inference_form, dict) or inference_form.get("form") not in INFERENCE_FORMS:
            raise ValueError(f"inference_form must be a models.fuse.inference_form_record, got {inference_form!r}")
        if isinstance(model, QuantizedModel):
            raise ValueError("inference_form must be None for a quantized model (its form is fixed by its scheme)")
    desc = _describe(model)
    input_shape = tuple(int(v) for v in input_shape)
    cfg = ModelConfig.from_dict(desc["model_config"]) if desc["architecture"] == ARCHITECTURE else None
    in_channels = cfg.in_channels if cfg is not None else input_shape[0]
    if len(input_shape) != 3 or input_shape[0] != in_channels:
        raise ValueError(f"input_shape must be ({in_channels}, H, W), got {input_shape}")
    probe = default_probe(input_shape) if probe is None else probe.detach().float().cpu()
    if tuple(probe.shape[1:]) != input_shape:
        raise ValueError(f"probe must be (N, *{input_shape}), got {tuple(probe.shape)}")
    logits = _run(model, probe)
    num_classes = cfg.num_classes if cfg is not None else logits.shape[1]
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names must have {num_classes} entries, got {len(class_names)}")
    compiled_diff = _compiled_diff(model, probe, logits)

    if isinstance(model, QuantizedModel):
        tensors, quant = model.artifact_state()
    else:
        tensors, quant = dict(model.state_dict()), {"scheme": "none", "config": {}, "state": {}}
    prune_info, model_spec = None, None
    if cfg is not None:
        channels = desc["channels"]
        if channels != channel_counts(build_model(cfg)) or pruning:
            prune_info = {"ratio": None, **(pruning or {}), "channels": channels}
    else:  # a user model: its spec, what fuse_ fused, and the layer shapes when pruned
        model_spec = {**desc["model_spec"], "fused": desc["fused"]}
        if desc["shapes"] != _pristine_shapes(desc["model_spec"], input_shape, num_classes) or pruning:
            prune_info = {"ratio": None, **(pruning or {}), "shapes": desc["shapes"]}
            prune_info.pop("channels", None)

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    buf, entries = pack_tensors(tensors)
    torch.save({"packed": buf}, out / "weights.pt")
    torch.save({"input": probe, "logits": logits}, out / "probe.pt")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "architecture": desc["architecture"],
        "model_config": cfg.to_dict() if cfg is not None else {},
        "model_spec": model_spec,
        "preset": cfg.preset_name if cfg is not None else None,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "class_names": class_names,
        "pruning": prune_info,
        "quantization": quant,
        "accuracy": {"test_accuracy": None, **(accuracy or {})},
        "latency_ms": dict(latency_ms or {}),
        "size_bytes": (out / "weights.pt").stat().st_size,
        "source_checkpoint": source_checkpoint,
        "tensors": {"file": "weights.pt", "sha256": _sha256(out / "weights.pt"), "entries": entries},
        "probe": {
            "file": "probe.pt",
            "sha256": _sha256(out / "probe.pt"),
            "predictions": logits.argmax(1).tolist(),
            "compiled_max_diff": compiled_diff,
        },
        "extra": dict(extra or {}),
        "inference_form": None if inference_form is None else dict(inference_form),
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False))
    os.replace(tmp, out / "manifest.json")  # the manifest appears last and atomically
    return manifest


def read_manifest(path: str | os.PathLike) -> dict:
    """The validated manifest of artifact directory `path` (files not checked)."""
    p = Path(path)
    if not p.is_dir():
        raise ArtifactError(f"artifact path must be a directory, got {str(p)!r}")
    mpath = p / "manifest.json"
    if not mpath.is_file():
        raise ArtifactError(f"{p}: not an artifact (no manifest.json)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mpath}: must hold a JSON object, got {type(manifest).__name__}")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise ArtifactError(f"{mpath}: missing keys {missing}")
    if manifest["format"] != FORMAT:
        raise ArtifactError(f"{mpath}: format must be {FORMAT!r}, got {manifest['format']!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ArtifactError(
            f"{mpath}: format_version {manifest['format_version']!r} is not supported (this code reads "
            f"{FORMAT_VERSION})"
        )
    _check_types(manifest, mpath)
    if manifest["architecture"] not in (ARCHITECTURE, USER_ARCHITECTURE):
        got = manifest["architecture"]
        raise ArtifactError(f"{mpath}: architecture must be {ARCHITECTURE!r} or {USER_ARCHITECTURE!r}, got {got!r}")
    if manifest["architecture"] == USER_ARCHITECTURE and not isinstance(manifest.get("model_spec"), dict):
        raise ArtifactError(f"{mpath}: a user model's artifact must hold model_spec (an object)")
    return manifest


_TYPES = {  # key: (allowed types, what the value must be)
    "model_config": (dict, "an object"),
    "input_shape": (list, "a list [C, H, W]"),
    "num_classes": (int, "an int"),
    "pruning": ((dict, type(None)), "null or an object"),
    "quantization": (dict, "an object"),
    "tensors": (dict, "an object"),
    "probe": (dict, "an object"),
}
_SUBKEYS = {
    "tensors": {"file": str, "sha256": str, "entries": list},
    "probe": {"file": str, "sha256": str, "predictions": list},
    "quantization": {"scheme": str},
}


def _check_types(manifest: dict, mpath: Path) -> None:
    for key, (types, what) in _TYPES.items():
        if not isinstance(manifest[key], types):
            raise ArtifactError(f"{mpath}: {key} must be {what}, got {type(manifest[key]).__name__}")
    for key, sub in _SUBKEYS.items():
        for name, typ in sub.items():
            if not isinstance(manifest[key].get(name), typ):
                raise ArtifactError(f"{mpath}: {key}.{name} must be a {typ.__name__}")
    pruning = manifest["pruning"]
    plan = "channels" if manifest["architecture"] == ARCHITECTURE else "shapes"
    if pruning is not None and not isinstance(pruning.get(plan), dict):
        raise ArtifactError(f"{mpath}: pruning.{plan} must be an object")


def _load_file(p: Path, spec: dict, what: str) -> dict:
    f = p / spec.get("file", "")
    if not f.is_file():
        raise ArtifactError(f"{p}: {what} file {spec.get('file')!r} is missing")
    if _sha256(f) != spec.get("sha256"):
        raise ArtifactError(f"{f}: checksum mismatch (file corrupt or replaced after saving)")
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad zip/pickle; all mean "unreadable"
        raise ArtifactError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{f}: must hold a dict of tensors, got {type(obj).__name__}")
    return obj


def load_artifact(
    path: str | os.PathLike, *, verify: bool = True, compile: bool | None = None
) -> tuple[nn.Module, dict]:
    """(model in eval mode, manifest) from artifact directory `path`. The model is a `CNN` for scheme "none",
    else a `QuantizedModel`. `verify` runs the probe and checks the logits recorded at save time.

    `compile` (default: True for the INT8 schemes, whose latency the sweep measured compiled) returns the
    INT8 model compiled with inductor and warmed on the probe's batch sizes, i.e. the graph that was measured;
    with `verify` its logits must be within `compiled_tolerance` of the recorded ones."""
    p = Path(path)
    manifest = read_manifest(p)
    input_shape = tuple(manifest["input_shape"])
    tensors = unpack_tensors(_load_file(p, manifest["tensors"], "weights").get("packed"),
                             manifest["tensors"]["entries"])  # fmt: skip
    rebuild = _REBUILD[manifest["architecture"]]
    model = rebuild(manifest, input_shape, p)
    probe = _load_file(p, manifest["probe"], "probe")
    quant = manifest["quantization"]
    try:
        if quant.get("scheme") == "none":
            model.load_state_dict(tensors, strict=True)
            model.eval()
        else:
            model = restore_quantized(model, quant, tensors, example=probe["input"][:2])
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{p}: weights do not match the manifest's model ({e})") from None
    want = probe["logits"]
    if verify:
        got = _run(model, probe["input"])
        if got.argmax(1).tolist() != manifest["probe"]["predictions"] or got.shape != want.shape:
            raise ArtifactError(f"{p}: the rebuilt model's predictions differ from those recorded when saved")
        atol = REBUILD_RTOL * _scale(want)
        if not torch.allclose(got, want, rtol=0, atol=atol):
            diff = (got - want).abs().max().item()
            raise ArtifactError(
                f"{p}: rebuilt model's logits differ from the recorded ones by {diff:.3g} (tolerance {atol:.3g})"
            )
    if compile is None:
        compile = quant.get("scheme") in ("int8_ptq", "int8_qat")
    if compile and isinstance(model, QuantizedModel):
        _compile_and_check(model, probe["input"], want, manifest["probe"], p, verify)
    return model, manifest


def _rebuild_cnn(manifest: dict, input_shape: tuple, p: Path) -> nn.Module:
    """A preset CNN from model_config, resized to pruning.channels."""
    try:
        cfg = ModelConfig.from_dict(manifest["model_config"])
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{p}: bad model_config ({e})") from None
    shape_ok = len(input_shape) == 3 and input_shape[0] == cfg.in_channels
    if cfg.num_classes != manifest["num_classes"] or not shape_ok:
        raise ArtifactError(
            f"{p}: num_classes/input_shape {manifest['num_classes']}/{list(input_shape)} disagree with "
            f"model_config (num_classes={cfg.num_classes}, in_channels={cfg.in_channels})"
        )
    model = build_model(cfg)
    if manifest["pruning"] is not None:
        try:
            resize_(model, manifest["pruning"]["channels"])
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{p}: pruning.channels do not fit the architecture ({e})") from None
    return model


def _rebuild_user(manifest: dict, input_shape: tuple, p: Path) -> nn.Module:
    """A user model: its function called again with the recorded kwargs, fused, checked to fuse the same
    chains, and resized to the recorded layer shapes of a pruned model (before the weights load)."""
    spec = dict(manifest["model_spec"])
    fused = spec.pop("fused", None)
    try:
        model = ModelSpec.from_dict(spec).build(input_shape, manifest["num_classes"])
    except ImportError as e:
        raise ArtifactError(f"{p}: cannot import the model function {spec.get('user')!r} ({e})") from None
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{p}: cannot rebuild the model {spec.get('user')!r} ({e})") from None
    got = [n for n, m in model.named_modules() if isinstance(m, ConvBNAct)]
    if fused is not None and got != fused:
        raise ArtifactError(f"{p}: fuse_ fused other chains than when saved ({len(got)} vs {len(fused)})")
    if manifest["pruning"] is not None:
        try:
            apply_module_shapes_(model, manifest["pruning"]["shapes"])
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{p}: pruning.shapes do not fit the model ({e})") from None
    return model


# one rebuild entry per kind of model
_REBUILD = {ARCHITECTURE: _rebuild_cnn, USER_ARCHITECTURE: _rebuild_user}


def _compile_and_check(model: QuantizedModel, x: torch.Tensor, want: torch.Tensor, probe_manifest: dict,
                       p: Path, verify: bool) -> None:  # fmt: skip
    try:
        model.compile_(x, batch_sizes=(1, len(x)))
    except Exception as e:  # inductor fails in many ways (no C compiler, unsupported op): all mean "cannot serve"
        raise ArtifactError(f"{p}: compiling the INT8 model failed ({type(e).__name__}: {e})") from None
    if not verify:
        return
    got = model(x).float()
    tol = compiled_tolerance(probe_manifest, want)
    diff = (got - want).abs().max().item()
    if diff > tol:
        raise ArtifactError(
            f"{p}: the compiled model's logits differ from the recorded ones by {diff:.3g} (tolerance {tol:.3g},"
            f" measured at save {probe_manifest.get('compiled_max_diff')})"
        )
    # near-ties may flip under a rounding difference within tolerance; clear winners may not
    top2 = want.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tol
    if not torch.equal(got.argmax(1)[clear], want.argmax(1)[clear]):
        raise ArtifactError(f"{p}: the compiled model's predictions differ from those recorded when saved")


# A serving set: one point of the sweep in the forms the sweep measured, the choice among them left to the
# replica's hardware at load (serve_app.config.served_artifact: FP8 on sm_89+, INT8 elsewhere). A directory
# holding only serving.json:
#     format      "tandem.serving_set"
#     forms       {scheme: {"artifact": URI of that form's artifact (a sweep trial's), "latency_ms": float (as the
#                 sweep measured it), and what else the sweep recorded: "accuracy", "trial", "measured_on", ...}}
#     default     the scheme of the sweep's chosen row, one of forms
SERVING_SET = "serving.json"
SERVING_SET_FORMAT = "tandem.serving_set"
SCHEMES = ("none", *CONFIGS)
"""Quantization schemes an artifact (and a serving set's form) may have."""


def check_serving_set(data: object, where: str = "serving set") -> dict:
    """`data` as a valid serving set (the dict itself); ArtifactError saying what is wrong."""
    if not isinstance(data, dict) or data.get("format") != SERVING_SET_FORMAT:
        raise ArtifactError(f"{where}: must be an object with format {SERVING_SET_FORMAT!r}, got {data!r:.200}")
    forms = data.get("forms")
    if not isinstance(forms, dict) or not forms:
        raise ArtifactError(f"{where}: forms must be a non-empty object of scheme -> form, got {forms!r:.200}")
    for scheme, form in forms.items():
        if scheme not in SCHEMES:
            raise ArtifactError(f"{where}: form schemes must be among {list(SCHEMES)}, got {scheme!r}")
        if not isinstance(form, dict) or not isinstance(form.get("artifact"), str) or not form["artifact"]:
            raise ArtifactError(f"{where}: form {scheme!r} must hold an artifact URI string, got {form!r:.200}")
        lat = form.get("latency_ms")
        if isinstance(lat, bool) or not isinstance(lat, int | float) or not lat > 0:
            raise ArtifactError(f"{where}: form {scheme!r} must hold its measured latency_ms > 0, got {lat!r}")
    if data.get("default") not in forms:
        raise ArtifactError(f"{where}: default must be one of the forms {sorted(forms)}, got {data.get('default')!r}")
    return data


def write_serving_set(uri: str, forms: dict[str, dict], default: str) -> str:
    """Writes the serving set `<uri>/serving.json` (validated first); returns `uri`."""
    from models import storage

    data = check_serving_set({"format": SERVING_SET_FORMAT, "forms": forms, "default": default}, uri)
    storage.write_text(storage.join(uri, SERVING_SET), json.dumps(data, indent=2, default=str))
    return uri


def read_serving_set(uri: str) -> dict | None:
    """The validated serving set at `uri` (a path or storage URI); None when `uri` holds no serving.json (one
    artifact)."""
    from models import storage

    path = storage.join(uri, SERVING_SET)
    if not storage.exists(path):
        return None
    try:
        data = json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    return check_serving_set(data, path)
