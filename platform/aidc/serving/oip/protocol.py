"""Open Inference Protocol (KServe v2) data plane: protocol bodies, tensor codecs, input validation.

One place turns requests into named numpy arrays and arrays back into responses; the REST routes
(JSON and Triton's binary tensor extension) and the gRPC servicer are thin transports over it, so the
two cannot drift apart. Bad input is a `RequestError` naming the problem; `oip_error` makes the body.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from aidc.errors import RequestError
from aidc.serving.http import Strict, check_body_size, parse_json

HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton binary extension: JSON header size in bytes
DTYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}
# What a declared datatype also accepts (cast losslessly enough for the model); anything else is a 400.
ACCEPTS = {
    "FP32": {"FP16", "FP32", "FP64"},
    "INT64": {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32"},
    "INT32": {"INT8", "INT16", "INT32", "UINT8", "UINT16"},
    "BOOL": {"BOOL"},
    "BYTES": {"BYTES"},
}
Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                   "FP16", "FP32", "FP64", "BYTES"]


class RequestInput(Strict):
    name: str = Field(..., min_length=1, description="Input tensor name from the model metadata.")
    shape: list[int] = Field(..., description="Dimensions of the tensor; every one >= 0.")
    datatype: Datatype = Field(..., description="Element type, e.g. FP32, INT64, BOOL, BYTES.")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size: bytes in the binary part.")
    data: Any = Field(None, description="Row-major elements, flat or nested; absent when sent as binary.")


class RequestOutput(Strict):
    name: str = Field(..., min_length=1, description="Output tensor to return.")
    parameters: dict[str, Any] | None = Field(None, description="binary_data: true to get it as raw bytes.")


class InferenceRequest(Strict):
    id: str | None = Field(None, description="Request id, echoed in the response.")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_output: true for binary outputs.")
    inputs: list[RequestInput] = Field(..., min_length=1, description="Every input the model declares.")
    outputs: list[RequestOutput] | None = Field(None, description="Outputs to return; default all.")


class ResponseOutput(Strict):
    name: str = Field(..., description="Output tensor name.")
    shape: list[int] = Field(..., description="Dimensions of the tensor.")
    datatype: str = Field(..., description="Element type.")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size when sent as binary.")
    data: list | None = Field(None, description="Row-major flat elements (JSON responses).")


class InferenceResponse(Strict):
    model_name: str = Field(..., description="Registered model name.")
    model_version: str = Field(..., description="Registry version that answered.")
    id: str | None = Field(None, description="The request's id.")
    parameters: dict[str, Any] | None = Field(None, description="Response parameters.")
    outputs: list[ResponseOutput] = Field(..., description="Requested output tensors.")


class TensorMetadata(Strict):
    name: str = Field(..., description="Tensor name.")
    datatype: str = Field(..., description="Element type.")
    shape: list[int] = Field(..., description="Dimensions; -1 is variable (the batch).")
    parameters: dict[str, Any] | None = Field(None, description="optional: true where the model takes this input "
                                              "or another; content: binary where BYTES carry files, not text.")


class ModelMetadataResponse(Strict):
    name: str = Field(..., description="Registered model name.")
    versions: list[str] = Field(..., description="Registry versions this server serves.")
    platform: str = Field(..., description="Framework and aidc task.")
    inputs: list[TensorMetadata] = Field(..., description="Inputs a request must carry.")
    outputs: list[TensorMetadata] = Field(..., description="Outputs a response can carry.")


class ServerMetadataResponse(Strict):
    name: str = Field(..., description="Server name.")
    version: str = Field(..., description="Server version.")
    extensions: list[str] = Field(..., description="Protocol extensions supported.")


class LiveResponse(Strict):
    live: bool = Field(..., description="The server answers.")


class ReadyResponse(Strict):
    ready: bool = Field(..., description="Every served model is loaded and its integrity verified.")


class ErrorResponse(Strict):
    error: str = Field(..., description="What is wrong and how to fix it.")


def inline_schema(model: type[BaseModel]) -> dict:
    """A model's JSON schema with its $defs inlined (for an OpenAPI requestBody written by hand)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        return [resolve(v) for v in node] if isinstance(node, list) else node

    return resolve(schema)


def oip_error(exc: RequestError) -> dict:
    return {"error": exc.message}


def describe_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        where = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg']}")
    return "invalid inference request: " + "; ".join(parts)


# -- decoding ------------------------------------------------------------------------------
def parse_rest_body(raw: bytes, header_length: str | None, max_bytes: int) -> tuple[InferenceRequest, dict]:
    """A REST infer body (JSON, or JSON header + binary tensors) -> (request, {input name: array})."""
    check_body_size(len(raw), max_bytes, "send fewer rows per request")
    split = len(raw)
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            raise RequestError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}", status=400) from None
        if not 0 < split <= len(raw):
            raise RequestError(f"{HEADER_LENGTH} is {split} but the body has {len(raw)} bytes", status=400)
    body = parse_json(raw[:split], constant_status=400)
    try:
        request = InferenceRequest.model_validate(body)
    except ValidationError as exc:
        raise RequestError(describe_validation_error(exc), status=400) from None
    binary, offset, arrays = raw[split:], 0, {}
    for inp in request.inputs:
        if inp.name in arrays:
            raise RequestError(f"input {inp.name!r} appears twice", status=400, field=inp.name)
        size = (inp.parameters or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise RequestError(f"input {inp.name!r}: binary_data_size {size!r} does not fit the "
                                   f"{len(binary) - offset} binary bytes left", status=400, field=inp.name)
            arrays[inp.name] = decode_binary(binary[offset:offset + size], inp.datatype, inp.shape, inp.name)
            offset += size
        else:
            arrays[inp.name] = decode_json(inp.data, inp.datatype, inp.shape, inp.name)
    if offset != len(binary):
        raise RequestError(f"{len(binary) - offset} binary bytes after the JSON header belong to no input",
                           status=400)
    return request, arrays


TRANSPORT_PARAMETERS = {"binary_data_size", "binary_data", "binary_data_output"}


def merge_parameters(request: dict | None, per_input: list[dict | None]) -> dict:
    """The parameters a model sees: the request's, then each input's (e.g. `sample_rate` of a waveform), without
    the binary-extension ones that only describe the transport."""
    out = {}
    for p in (request, *per_input):
        out.update({k: v for k, v in (p or {}).items() if k not in TRANSPORT_PARAMETERS})
    return out


def _count(shape: list[int], name: str) -> int:
    if any(d < 0 for d in shape):
        raise RequestError(f"input {name!r} shape {shape} has a negative dimension", status=400, field=name)
    return math.prod(shape)


def _flatten(data: Any) -> list:
    if not isinstance(data, list):
        return [data]
    out: list = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


def decode_json(data: Any, datatype: str, shape: list[int], name: str) -> np.ndarray:
    """JSON `data` (flat or nested, row-major) -> array of `shape`, checking every element's type."""
    n = _count(shape, name)
    if data is None:
        raise RequestError(f"input {name!r} has no data: send 'data' or binary_data_size", status=400, field=name)
    flat = _flatten(data)
    if len(flat) != n:
        raise RequestError(f"input {name!r} has {len(flat)} values but shape {shape} needs {n}", status=400,
                           field=name)
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise RequestError(f"input {name!r} is BYTES: every element must be a string", status=400, field=name)
        return np.array(flat, dtype=object).reshape(shape)
    if not all(_fits(v, datatype) for v in flat):
        bad = next(v for v in flat if not _fits(v, datatype))
        raise RequestError(f"input {name!r} is {datatype} but holds {bad!r}", status=400, field=name)
    try:
        arr = np.array(flat, dtype=DTYPES[datatype])
    except (OverflowError, ValueError):
        raise RequestError(f"input {name!r} has values out of the {datatype} range", status=400, field=name) \
            from None
    if datatype.startswith("FP") and not np.isfinite(arr).all():
        raise RequestError(f"input {name!r} has values out of the {datatype} range", status=400, field=name)
    return arr.reshape(shape)


def _fits(v: Any, datatype: str) -> bool:
    if datatype == "BOOL":
        return isinstance(v, bool)
    if datatype.startswith(("INT", "UINT")):
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def decode_binary(chunk: bytes, datatype: str, shape: list[int], name: str) -> np.ndarray:
    """Raw little-endian bytes (BYTES: 4-byte length + bytes per element, kept as bytes) -> array of `shape`."""
    n = _count(shape, name)
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(chunk):
            if pos + 4 > len(chunk):
                raise RequestError(f"input {name!r}: truncated BYTES element", status=400, field=name)
            size = int.from_bytes(chunk[pos:pos + 4], "little")
            if pos + 4 + size > len(chunk):
                raise RequestError(f"input {name!r}: BYTES element longer than the data", status=400, field=name)
            items.append(chunk[pos + 4:pos + 4 + size])  # raw bytes: text inputs decode them in validate_inputs
            pos += 4 + size
        if len(items) != n:
            raise RequestError(f"input {name!r} has {len(items)} values but shape {shape} needs {n}", status=400,
                               field=name)
        return np.array(items, dtype=object).reshape(shape)
    dtype = np.dtype(DTYPES[datatype]).newbyteorder("<")
    if len(chunk) != n * dtype.itemsize:
        raise RequestError(f"input {name!r} has {len(chunk)} bytes but shape {shape} of {datatype} needs "
                           f"{n * dtype.itemsize}", status=400, field=name)
    arr = np.frombuffer(chunk, dtype=dtype).astype(DTYPES[datatype]).reshape(shape)
    if datatype.startswith("FP") and not np.isfinite(arr).all():
        raise RequestError(f"input {name!r} has NaN or infinite values", status=400, field=name)
    return arr


# -- validation against a model's signature ------------------------------------------------
def validate_inputs(arrays: dict[str, np.ndarray], datatypes: dict[str, str], signature: dict,
                    model: str) -> dict[str, np.ndarray]:
    """Names, datatypes and shapes against the signature; cast to the declared types."""
    declared = {t["name"]: t for t in signature["inputs"]}
    unknown = sorted(set(arrays) - set(declared))
    if unknown:
        raise RequestError(f"model {model!r} has no input(s) {unknown}; its inputs are {sorted(declared)}",
                           status=400, field=unknown[0])
    missing = sorted(n for n, t in declared.items() if n not in arrays and not _param(t, "optional"))
    if missing:
        raise RequestError(f"missing input(s) {missing} for model {model!r} (it needs {sorted(declared)})",
                           status=400, field=missing[0])
    out, batch = {}, None
    for name, spec in declared.items():
        if name not in arrays:  # an optional input left out (the task checks which combinations it takes)
            continue
        arr, sent = arrays[name], datatypes[name]
        if sent not in ACCEPTS.get(spec["datatype"], {spec["datatype"]}):
            raise RequestError(f"input {name!r} has datatype {sent}; model {model!r} takes {spec['datatype']}",
                               status=400, field=name)
        want = spec["shape"]
        if arr.ndim != len(want) or any(w != -1 and w != d for w, d in zip(want, arr.shape)):
            raise RequestError(f"input {name!r} has shape {list(arr.shape)}; model {model!r} takes {want} "
                               "(-1 = any size)", status=400, field=name)
        if arr.shape[0] == 0:
            raise RequestError(f"input {name!r} has no rows: send at least one", status=400, field=name)
        if batch is not None and arr.shape[0] != batch:
            raise RequestError(f"inputs disagree on the batch size ({batch} vs {arr.shape[0]} in {name!r})",
                               status=400, field=name)
        batch = arr.shape[0]
        out[name] = _bytes_input(arr, spec, name) if spec["datatype"] == "BYTES" else \
            arr.astype(DTYPES[spec["datatype"]], copy=False)
    return out


def _param(spec: dict, key: str):
    return (spec.get("parameters") or {}).get(key)


def _bytes_input(arr: np.ndarray, spec: dict, name: str) -> np.ndarray:
    """BYTES elements as the model takes them: text (UTF-8 str) by default; raw bytes where the signature says
    `content: binary` (files such as wav recordings), which JSON cannot carry."""
    flat = arr.reshape(-1)
    if _param(spec, "content") == "binary":
        if any(isinstance(v, str) for v in flat):
            raise RequestError(f"input {name!r} takes files as raw bytes, which JSON text cannot carry: send it "
                               "with the binary tensor extension (tritonclient: set_data_from_numpy(..., "
                               "binary_data=True)) or over gRPC", status=400, field=name)
        return arr
    out = np.empty(len(flat), dtype=object)
    for i, v in enumerate(flat):
        try:
            out[i] = v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else v
        except UnicodeDecodeError:
            raise RequestError(f"input {name!r}: BYTES element {i} is not UTF-8 text", status=400,
                               field=name) from None
    return out.reshape(arr.shape)


def select_outputs(request_outputs: list[str] | None, signature: dict, model: str) -> list[str]:
    names = [t["name"] for t in signature["outputs"]]
    if not request_outputs:
        return names
    unknown = sorted(set(request_outputs) - set(names))
    if unknown:
        raise RequestError(f"model {model!r} has no output(s) {unknown}; its outputs are {names}", status=400,
                           field=unknown[0])
    return list(dict.fromkeys(request_outputs))


# -- encoding ------------------------------------------------------------------------------
def to_binary(arr: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for v in arr.reshape(-1):
            b = v if isinstance(v, bytes) else str(v).encode("utf-8")
            parts += [len(b).to_bytes(4, "little"), b]
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=np.dtype(DTYPES[datatype]).newbyteorder("<")).tobytes()


def to_json_data(arr: np.ndarray, datatype: str) -> list:
    if datatype == "BYTES":
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr.reshape(-1)]
    return arr.reshape(-1).tolist()


def encode_rest_response(request: InferenceRequest, model: str, version: str, outputs: dict[str, np.ndarray],
                         datatypes: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    """(body, headers): JSON, or JSON header + binary tensors where the client asked for binary."""
    wants = {o.name: bool((o.parameters or {}).get("binary_data")) for o in request.outputs or []}
    default_binary = bool((request.parameters or {}).get("binary_data_output"))
    header_outputs, blobs = [], []
    for name, arr in outputs.items():
        dt = datatypes[name]
        out = {"name": name, "shape": list(arr.shape), "datatype": dt}
        if wants.get(name, default_binary):
            blob = to_binary(arr, dt)
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = to_json_data(arr, dt)
        header_outputs.append(out)
    body: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": header_outputs}
    if request.id is not None:
        body["id"] = request.id
    header = json.dumps(body).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {"Content-Type": "application/octet-stream",
                                       HEADER_LENGTH: str(len(header))}


__all__ = ["HEADER_LENGTH", "InferenceRequest", "InferenceResponse", "ModelMetadataResponse", "decode_binary",
           "decode_json", "encode_rest_response", "merge_parameters", "oip_error", "parse_rest_body",
           "select_outputs", "validate_inputs"]
