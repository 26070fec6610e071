"""The wire formats of the app's routes: request bodies (size-bounded while they stream in, gzip/deflate,
Content-Type), /predict's instances, and the Open Inference Protocol v2 (KServe v2, what NVIDIA's
`tritonclient[http]` speaks) with its binary tensor data extension. Plain functions on bytes and dicts, no Serve:
the replica (serve_app/replica.py), the routes (serve_app/routes.py) and the tests call them directly.

Every client error is a `BadRequest(status, message)`; the route answers it as `{"error": message}` (the OIP
error format, used on every route).

Binary tensor data extension (https://github.com/triton-inference-server/server/blob/main/docs/protocol/
extension_binary_data.md): a request with header `Inference-Header-Content-Length: N` carries N bytes of JSON
and then the raw little-endian tensors, in the order of the inputs whose `parameters.binary_data_size` gives
their byte length. An output is returned in binary when its `parameters.binary_data` is true, or when the request's
`parameters.binary_data_output` is true and the output does not say otherwise; the response then carries the JSON
header, the header's length in `Inference-Header-Content-Length`, and the tensors.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

INPUT_NAME = "input"
OUTPUT_NAMES = ("probabilities", "class")
# Datatypes this server takes in, as little-endian numpy types (the binary extension's byte order).
DATATYPES: dict[str, np.dtype] = {
    name: np.dtype(t).newbyteorder("<")
    for name, t in {
        "FP16": np.float16,
        "FP32": np.float32,
        "FP64": np.float64,
        "UINT8": np.uint8,
        "UINT16": np.uint16,
        "UINT32": np.uint32,
        "UINT64": np.uint64,
        "INT8": np.int8,
        "INT16": np.int16,
        "INT32": np.int32,
        "INT64": np.int64,
    }.items()
}
HEADER_LENGTH = "inference-header-content-length"
JSON_TYPES = ("application/json",)
"""Content-Types of a JSON body (a missing Content-Type is taken as JSON too: curl -d sends a form type, and
simple clients send none)."""
BINARY_TYPES = ("application/octet-stream", "application/vnd.sagemaker-triton.binary+json")


class BadRequest(Exception):
    """A client error: answered with `status` and the message, never logged as a server fault."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------------ bodies


async def read_body(chunks: AsyncIterator[bytes], declared: str | None, max_bytes: int) -> bytes:
    """The request body from its chunks, refused with 413 as soon as it passes `max_bytes` (a declared
    Content-Length before any byte is read; a chunked body when the running total does): a 500 MB chunked upload
    must not be buffered in full to learn that it is too large."""
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BadRequest(413, f"request body must be at most {max_bytes} bytes, got {declared}")
    parts, total = [], 0
    async for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            raise BadRequest(413, f"request body must be at most {max_bytes} bytes, got more")
        parts.append(chunk)
    return b"".join(parts)


def decode_body(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """The body after its Content-Encoding (identity, gzip or deflate), decompressed at most to `max_bytes`
    (a zip bomb stops there with 413)."""
    enc = (encoding or "identity").strip().lower()
    if enc == "identity":
        return body
    if enc not in ("gzip", "deflate", "x-gzip"):
        raise BadRequest(415, f"Content-Encoding must be identity, gzip or deflate, got {encoding!r}")
    # wbits: 16+ gzip framing; deflate as HTTP means the zlib format, though some clients send raw deflate.
    wbits = [31] if enc in ("gzip", "x-gzip") else [15, -15]
    for w in wbits:
        d = zlib.decompressobj(w)
        try:
            out = d.decompress(body, max_bytes + 1)
        except zlib.error:
            continue
        if len(out) > max_bytes or d.unconsumed_tail:
            raise BadRequest(413, f"decompressed request body must be at most {max_bytes} bytes, got more")
        if not d.eof:
            raise BadRequest(400, f"request body must be complete {enc} data, got a truncated stream")
        return out
    raise BadRequest(400, f"request body must be valid {enc} data")


def check_content_type(content_type: str | None, binary: bool) -> None:
    """415 unless the body's declared type is JSON (or, with the binary extension, a binary type)."""
    if not content_type:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    allowed = JSON_TYPES + (BINARY_TYPES if binary else ())
    if media not in allowed:
        raise BadRequest(415, f"Content-Type must be one of {list(allowed)}, got {media!r}")


def parse_json(body: bytes, max_bytes: int) -> dict[str, Any]:
    """The request's JSON object (413 over `max_bytes`, 400 when not a JSON object or nested too deeply)."""
    if len(body) > max_bytes:
        raise BadRequest(413, f"request body must be at most {max_bytes} bytes, got {len(body)}")
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"request body must be JSON: {e}") from None
    except RecursionError:  # the decoder recurses per nesting level: ~1000 '[' are enough
        raise BadRequest(400, "request body must be JSON nested at most ~900 levels deep") from None
    if not isinstance(obj, dict):
        raise BadRequest(400, f"request body must be a JSON object, got {type(obj).__name__}")
    return obj


# ----------------------------------------------------------------------------------------------- tensors


def _check_range(arr: np.ndarray, dtype: str, what: str) -> np.ndarray:
    """float32 images from numbers claimed to be of OIP `dtype`: each must lie in the datatype's range (UINT8
    0..255, FP16 within +-65504, ...) and be finite."""
    t = DATATYPES[dtype]
    if t.kind in "iu":
        info = np.iinfo(t)
        if arr.dtype.kind == "f" or arr.dtype == object:
            raise BadRequest(422, f"{what} must be int numbers for datatype {dtype}, got floats")
        if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
            raise BadRequest(422, f"{what} must lie in [{info.min}, {info.max}] for datatype {dtype}")
        return arr.astype(np.float32)  # every int64 is a finite float32
    # One pass decides both: the largest magnitude is NaN or inf exactly when some number is. This runs on every
    # request; without a float64 copy and two finiteness passes `numbers` takes 4.1 us for one 8x8 image, not 7.1
    m = float(np.abs(arr).max())
    if not math.isfinite(m):
        raise BadRequest(422, f"{what} must be finite numbers (no NaN or inf)")
    lim = float(np.finfo(t).max) if t.itemsize < 8 else float(np.finfo(np.float32).max)
    if m > lim:
        raise BadRequest(422, f"{what} must be finite numbers within +-{lim:.6g} for datatype {dtype}")
    return arr.astype(np.float32)  # within float32's range, so finite


def numbers(data: Any, what: str, dtype: str = "FP32") -> np.ndarray:
    """A float32 array from JSON numbers declared as OIP `dtype` (422 for ragged lists, strings, bools,
    objects, NaN or inf, and numbers outside the datatype's range)."""
    try:
        arr = np.asarray(data)
    except (ValueError, RecursionError) as e:  # ragged nesting, or deeper than numpy's 64 dimensions
        raise BadRequest(422, f"{what} must be a rectangular array of numbers: {e}") from None
    if arr.dtype.kind not in "iuf" or arr.size == 0:
        want = "int" if DATATYPES[dtype].kind in "iu" else "float/int"
        raise BadRequest(422, f"{what} must be a non-empty array of {want} numbers, got dtype {arr.dtype}")
    return _check_range(arr, dtype, what)


def instances_to_array(instances: Any, input_shape: tuple[int, int, int], max_instances: int) -> np.ndarray:
    """(N, C, H, W) float32 from /predict's `instances`: each one (C, H, W), (H, W) when C == 1, or flat."""
    if not isinstance(instances, list) or not instances:
        raise BadRequest(422, f"instances must be a non-empty list, got {type(instances).__name__}")
    if len(instances) > max_instances:
        raise BadRequest(422, f"instances must hold at most {max_instances} images, got {len(instances)}")
    arr = numbers(instances, "instances", "FP32")
    c, h, w = input_shape
    each = tuple(arr.shape[1:])
    if each not in (input_shape, (c * h * w,)) and not (c == 1 and each == (h, w)):
        allowed = [list(input_shape), [c * h * w]] + ([[h, w]] if c == 1 else [])
        raise BadRequest(422, f"each instance must have shape one of {allowed}, got {list(each)}")
    return arr.reshape(len(instances), c, h, w)


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A parsed OIP infer request."""

    x: np.ndarray
    """(N, C, H, W) float32 images."""
    outputs: tuple[tuple[str, bool], ...]
    """(name, binary) of each output to return, in the order to return them."""
    id: str | None = None


def parse_infer(
    body: bytes,
    header_length: str | None,
    input_shape: tuple[int, int, int],
    max_instances: int,
    max_bytes: int,
) -> InferRequest:
    """An OIP v2 infer request with one input, "input", of shape [N, C, H, W] or [N, C*H*W], its data in JSON
    or (binary extension) after a JSON header of `header_length` bytes."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise BadRequest(
                400,
                f"Inference-Header-Content-Length must be an int <= the body's {len(body)} bytes,"
                f" got {header_length!r}",
            )
        n = int(header_length)
        req, binary = parse_json(body[:n], max_bytes), body[n:]
    else:
        req, binary = parse_json(body, max_bytes), b""
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(400, "inputs must be a list of exactly one tensor object {name, shape, datatype, data}")
    t = inputs[0]
    params = t.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest(400, f"inputs[0].parameters must be an object, got {type(params).__name__}")
    size = params.get("binary_data_size")
    missing = [k for k in ("name", "shape", "datatype") if k not in t]
    missing += [] if "data" in t or size is not None else ["data"]
    if missing:
        raise BadRequest(400, f"inputs[0] must have name, shape, datatype and data; missing {missing}")
    if t["name"] != INPUT_NAME:
        raise BadRequest(400, f"inputs[0].name must be {INPUT_NAME!r}, got {t['name']!r}")
    dtype = t["datatype"]
    if dtype not in DATATYPES:
        raise BadRequest(422, f"inputs[0].datatype must be one of {sorted(DATATYPES)}, got {dtype!r}")
    shape = t["shape"]
    if not isinstance(shape, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape):
        raise BadRequest(422, f"inputs[0].shape must be a list of ints, got {shape!r}")
    c, h, w = input_shape
    if len(shape) not in (2, 4) or tuple(shape[1:]) not in (input_shape, (c * h * w,)):
        raise BadRequest(422, f"inputs[0].shape must be [N, {c}, {h}, {w}] or [N, {c * h * w}], got {shape}")
    n = shape[0]
    if not 1 <= n <= max_instances:
        raise BadRequest(422, f"inputs[0].shape[0] (batch) must be in [1, {max_instances}], got {n}")
    count = math.prod(shape)
    if size is not None:
        nbytes = count * DATATYPES[dtype].itemsize
        if isinstance(size, bool) or not isinstance(size, int) or size != nbytes or len(binary) != nbytes:
            raise BadRequest(
                400,
                f"inputs[0] binary data must be prod(shape) x {DATATYPES[dtype].itemsize} = {nbytes} bytes, got"
                f" binary_data_size {size!r} and {len(binary)} bytes after the header",
            )
        arr = _check_range(np.frombuffer(binary, dtype=DATATYPES[dtype]), dtype, "inputs[0] binary data")
    else:
        if binary:
            raise BadRequest(
                400, f"the body must end after the JSON header (no input has binary_data_size), got {len(binary)} more"
            )
        arr = numbers(t["data"], "inputs[0].data", dtype)
        if arr.size != count:
            raise BadRequest(422, f"inputs[0].data must hold prod(shape) = {count} numbers, got {arr.size}")
    rid = req["id"] if isinstance(req.get("id"), str) else None
    return InferRequest(arr.reshape(n, c, h, w), _requested_outputs(req), rid)


def _requested_outputs(req: dict[str, Any]) -> tuple[tuple[str, bool], ...]:
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest(400, f"parameters must be an object, got {type(params).__name__}")
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise BadRequest(400, f"parameters.binary_data_output must be true or false, got {default_binary!r}")
    outs = req.get("outputs")
    if outs is None:
        return tuple((name, default_binary) for name in OUTPUT_NAMES)
    if not isinstance(outs, list) or not outs or not all(isinstance(o, dict) for o in outs):
        raise BadRequest(400, "outputs must be a non-empty list of objects {name, parameters?}")
    chosen = []
    for i, o in enumerate(outs):
        if o.get("name") not in OUTPUT_NAMES:
            raise BadRequest(400, f"outputs[{i}].name must be one of {list(OUTPUT_NAMES)}, got {o.get('name')!r}")
        p = o.get("parameters") or {}
        binary = p.get("binary_data", default_binary) if isinstance(p, dict) else None
        if not isinstance(binary, bool):
            raise BadRequest(400, f"outputs[{i}].parameters.binary_data must be true or false, got {binary!r}")
        chosen.append((o["name"], binary))
    if len({n for n, _ in chosen}) != len(chosen):
        raise BadRequest(400, f"outputs must name each output once, got {[n for n, _ in chosen]}")
    return tuple(chosen)


@dataclass(frozen=True, slots=True)
class Encoded:
    """An infer response on the wire: the body and its extra headers."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    media_type: str = "application/json"


def encode_infer(req: InferRequest, probs: np.ndarray, model: str, version: str) -> Encoded:
    """The OIP infer response for probabilities (N, K): each requested output in JSON or binary."""
    n, k = probs.shape
    tensors = {
        "probabilities": ("FP32", [n, k], np.ascontiguousarray(probs, dtype="<f4")),
        "class": ("INT64", [n], probs.argmax(1).astype("<i8")),
    }
    outputs, blobs = [], []
    for name, binary in req.outputs:
        dt, shape, arr = tensors[name]
        out: dict[str, Any] = {"name": name, "datatype": dt, "shape": shape}
        if binary:
            raw = arr.tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            out["data"] = arr.ravel().tolist()
        outputs.append(out)
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if req.id is not None:
        head["id"] = req.id
    text = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return Encoded(text)
    headers = {"Inference-Header-Content-Length": str(len(text))}
    return Encoded(text + b"".join(blobs), headers, "application/octet-stream")


# -------------------------------------------------------------------------------------------------- OpenAPI

_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_JSON_OBJECT = {"type": "object"}
_ERROR_CONTENT = {"application/json": {"schema": _ERROR}}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "Bad request: not JSON, wrong structure", "content": _ERROR_CONTENT},
    404: {"description": "No such model, version or route", "content": _ERROR_CONTENT},
    405: {"description": "Method not allowed", "content": _ERROR_CONTENT},
    413: {"description": "Body over max_body_bytes", "content": _ERROR_CONTENT},
    415: {"description": "Unsupported Content-Type or Content-Encoding", "content": _ERROR_CONTENT},
    422: {"description": "Invalid values: shape, datatype range, non-finite", "content": _ERROR_CONTENT},
    499: {"description": "Client disconnected before sending its body", "content": _ERROR_CONTENT},
    500: {"description": "Server fault", "content": _ERROR_CONTENT},
    503: {
        "description": "Overloaded (admission control) or not ready; see Retry-After",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        "content": {"application/json": {"schema": _ERROR}},
    },
}
"""Every error status the routes answer, in the OpenAPI document (FastAPI `responses=`)."""

_NUMS = {"type": "array", "items": {}}
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"instances": {"type": "array", "items": _NUMS, "minItems": 1}},
                    "required": ["instances"],
                }
            }
        },
    }
}
INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": _JSON_OBJECT,
                        "inputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string", "enum": sorted(DATATYPES)},
                                    "parameters": _JSON_OBJECT,
                                    "data": _NUMS,
                                },
                                "required": ["name", "shape", "datatype"],
                            },
                        },
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {"name": {"type": "string"}, "parameters": _JSON_OBJECT},
                                "required": ["name"],
                            },
                        },
                    },
                    "required": ["inputs"],
                }
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
            },
        },
    }
}
"""OpenAPI request bodies of /predict and the OIP infer routes (FastAPI `openapi_extra=`: the routes read the raw
body themselves, so FastAPI cannot infer them)."""
