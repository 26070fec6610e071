"""serve_app/protocol.py without Ray: the OIP binary tensor data extension (bytes on the wire), datatype ranges,
input/output names, bodies bounded while they stream in, gzip/deflate, Content-Type, deep nesting."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib

import numpy as np
import pytest

from serve_app.protocol import (
    DATATYPES,
    BadRequest,
    check_content_type,
    decode_body,
    encode_infer,
    parse_infer,
    parse_json,
    read_body,
)

SHAPE = (1, 8, 8)


def infer(req: dict, binary: bytes = b"", max_instances: int = 64) -> np.ndarray:
    head = json.dumps(req).encode()
    return parse_infer(head + binary, str(len(head)) if binary else None, SHAPE, max_instances, 1 << 20)


def tensor(**kw) -> dict:
    return {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64, **kw}


def test_binary_input_equals_json_input():
    x = np.arange(128, dtype=np.float32).reshape(2, 64) / 128
    t = {"name": "input", "shape": [2, 64], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
    got = infer({"inputs": [t]}, x.astype("<f4").tobytes())
    want = infer({"inputs": [tensor(shape=[2, 64], data=x.tolist())]})
    assert got.x.shape == (2, 1, 8, 8) and np.array_equal(got.x, want.x)
    u8 = np.arange(64, dtype=np.uint8)
    t8 = {"name": "input", "shape": [1, 64], "datatype": "UINT8", "parameters": {"binary_data_size": 64}}
    assert np.array_equal(infer({"inputs": [t8]}, u8.tobytes()).x.ravel(), u8.astype(np.float32))


@pytest.mark.parametrize("size, extra", [(255, b""), (256, b"\0"), ("256", b"")])
def test_binary_input_size_must_match(size, extra):
    t = {"name": "input", "shape": [1, 64], "datatype": "FP32", "parameters": {"binary_data_size": size}}
    with pytest.raises(BadRequest, match="256 bytes") as e:
        infer({"inputs": [t]}, b"\0" * 256 + extra)
    assert e.value.status == 400


def test_binary_output_layout():
    """The response header's outputs carry binary_data_size and the tensors follow it in order, little-endian."""
    probs = np.array([[0.1, 0.9], [0.7, 0.3]], np.float32)
    req = infer({"inputs": [tensor()], "id": "r", "parameters": {"binary_data_output": True}})
    enc = encode_infer(req, probs, "m", "v")
    n = int(enc.headers["Inference-Header-Content-Length"])
    head = json.loads(enc.body[:n])
    assert head["id"] == "r" and [o["name"] for o in head["outputs"]] == ["probabilities", "class"]
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
    assert sizes == [4 * 4, 2 * 8] and len(enc.body) == n + sum(sizes)
    assert np.array_equal(np.frombuffer(enc.body[n : n + 16], "<f4").reshape(2, 2), probs)
    assert np.frombuffer(enc.body[n + 16 :], "<i8").tolist() == [1, 0]
    # Only the requested outputs, each in the form it asked for.
    only = infer({"inputs": [tensor()], "outputs": [{"name": "class"}]})
    enc = encode_infer(only, probs, "m", "v")
    assert enc.media_type == "application/json" and json.loads(enc.body)["outputs"] == [
        {"name": "class", "datatype": "INT64", "shape": [2], "data": [1, 0]}
    ]


@pytest.mark.parametrize(
    "datatype, data, message",
    [
        ("UINT8", [-5] + [0] * 63, r"\[0, 255\]"),
        ("UINT8", [300] + [0] * 63, r"\[0, 255\]"),
        ("INT8", [1000] + [0] * 63, r"\[-128, 127\]"),
        ("FP16", [70000.0] + [0.0] * 63, "65504"),
        ("FP32", [1e39] + [0.0] * 63, "finite|within"),
        ("INT64", [2**70] + [0] * 63, "numbers"),
        ("BOOL", [True] * 64, "datatype"),
        ("BYTES", ["a"] * 64, "datatype"),
    ],
)
def test_datatype_ranges(datatype, data, message):
    with pytest.raises(BadRequest, match=message) as e:
        infer({"inputs": [tensor(datatype=datatype, data=data)]})
    assert e.value.status == 422


@pytest.mark.parametrize(
    "datatype, bad, message",
    [
        ("FP32", np.nan, "no NaN or inf"),
        ("FP16", -np.inf, "no NaN or inf"),
        ("FP64", np.nan, "no NaN or inf"),
        ("FP64", -1e39, "within"),  # finite as FP64, beyond float32's range
    ],
)
def test_binary_floats_that_are_not_finite_or_beyond_float32_are_refused_wherever_they_sit(datatype, bad, message):
    dtype = DATATYPES[datatype]
    t = {
        "name": "input",
        "shape": [1, 64],
        "datatype": datatype,
        "parameters": {"binary_data_size": 64 * dtype.itemsize},
    }
    for at in (0, 37, 63):
        x = np.full(64, 0.25, dtype=dtype)
        x[at] = bad
        with pytest.raises(BadRequest, match=message) as e:
            infer({"inputs": [t]}, x.tobytes())
        assert e.value.status == 422
    x[63] = -3.0e38 if datatype != "FP16" else -65504.0  # the extremes of the datatype's range pass
    got = infer({"inputs": [t]}, x.tobytes()).x
    assert got.dtype == np.float32 and np.isfinite(got).all() and got.ravel()[63] == np.float32(x[63])


def test_input_and_output_names_are_checked():
    with pytest.raises(BadRequest, match="name must be 'input'"):
        infer({"inputs": [tensor(name="images")]})
    with pytest.raises(BadRequest, match=r"outputs\[0\].name must be one of"):
        infer({"inputs": [tensor()], "outputs": [{"name": "logits"}]})
    with pytest.raises(BadRequest, match="each output once"):
        infer({"inputs": [tensor()], "outputs": [{"name": "class"}, {"name": "class"}]})


def test_deep_nesting_is_a_client_error():
    deep = b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(BadRequest, match="nested") as e:
        parse_json(deep, 1 << 20)
    assert e.value.status == 400
    # Shallow enough for the decoder, too deep for numpy (64 dimensions): still 422, not 500.
    mid = {"inputs": [tensor(data=json.loads("[" * 500 + "1" + "]" * 500))]}
    with pytest.raises(BadRequest) as e:
        infer(mid)
    assert e.value.status == 422


def chunks(parts: list[bytes]):
    async def gen():
        for p in parts:
            yield p

    return gen()


def test_streamed_body_stops_at_the_limit():
    read = []

    async def endless():  # a chunked upload without end: reading must stop at the limit, not at the end
        while True:
            read.append(1)
            yield b"x" * 1000

    with pytest.raises(BadRequest, match="at most 10000") as e:
        asyncio.run(read_body(endless(), None, 10_000))
    assert e.value.status == 413 and len(read) == 11
    with pytest.raises(BadRequest, match="got 20000"):  # a declared length is refused before any byte is read
        asyncio.run(read_body(chunks([]), "20000", 10_000))
    assert asyncio.run(read_body(chunks([b"ab", b"c"]), None, 3)) == b"abc"


def test_content_encoding():
    body = json.dumps({"instances": [[0.5] * 64]}).encode()
    assert decode_body(gzip.compress(body), "gzip", 1 << 20) == body
    assert decode_body(zlib.compress(body), "deflate", 1 << 20) == body
    raw = zlib.compressobj(wbits=-15)
    assert decode_body(raw.compress(body) + raw.flush(), "deflate", 1 << 20) == body
    with pytest.raises(BadRequest, match="at most 1000") as e:  # a zip bomb stops at the limit
        decode_body(gzip.compress(b"0" * 10_000_000), "gzip", 1000)
    assert e.value.status == 413
    with pytest.raises(BadRequest, match="valid gzip"):
        decode_body(b"not gzip", "gzip", 1000)
    with pytest.raises(BadRequest, match="Content-Encoding") as e:
        decode_body(body, "br", 1000)
    assert e.value.status == 415


def test_content_type():
    check_content_type(None, False)
    check_content_type("application/json; charset=utf-8", False)
    check_content_type("application/octet-stream", True)
    for bad, binary in (("text/plain", False), ("application/octet-stream", False), ("image/png", True)):
        with pytest.raises(BadRequest, match="Content-Type") as e:
            check_content_type(bad, binary)
        assert e.value.status == 415
