"""Open Inference Protocol gRPC messages <-> the data plane's arrays (the REST side: protocol.py)."""

from __future__ import annotations

import numpy as np

from aidc.errors import GRPC_CODES, RequestError
from aidc.serving.oip.protocol import DTYPES, decode_binary, merge_parameters, to_binary
from aidc.serving.oip_grpc import pb

_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _parameters(params) -> dict:
    """A protobuf map<string, InferParameter> -> {name: bool | int | str | float}."""
    out = {}
    for k, v in params.items():
        kind = v.WhichOneof("parameter_choice")
        if kind is None:
            raise RequestError(f"parameter {k!r} has no value (or a type this server does not know): set one of "
                               "bool_param, int64_param, string_param, double_param, uint64_param", status=400)
        out[k] = getattr(v, kind)
    return out


def decode_infer_request(req: "pb.ModelInferRequest") -> tuple[dict[str, np.ndarray], dict[str, str], list[str],
                                                                dict]:
    """ModelInferRequest -> ({input: array}, {input: datatype}, requested output names, parameters)."""
    if not req.inputs:
        raise RequestError("request has no inputs; send every input the model metadata lists", status=400)
    if req.raw_input_contents and len(req.raw_input_contents) != len(req.inputs):
        raise RequestError(f"{len(req.raw_input_contents)} raw_input_contents for {len(req.inputs)} inputs; "
                           "send one per input, in order", status=400)
    arrays, types = {}, {}
    for i, t in enumerate(req.inputs):
        if t.datatype not in DTYPES:
            raise RequestError(f"input {t.name!r} has unknown datatype {t.datatype!r}; use one of {sorted(DTYPES)}",
                               status=400, field=t.name)
        if t.name in arrays:
            raise RequestError(f"input {t.name!r} appears twice", status=400, field=t.name)
        shape = list(t.shape)
        if req.raw_input_contents:
            arr = decode_binary(req.raw_input_contents[i], t.datatype, shape, t.name)
        else:
            field = _CONTENTS.get(t.datatype)
            if field is None:
                raise RequestError(f"input {t.name!r}: {t.datatype} must be sent in raw_input_contents", status=400)
            values = list(getattr(t.contents, field))
            n = int(np.prod(shape)) if all(d >= 0 for d in shape) else -1
            if len(values) != n:
                raise RequestError(f"input {t.name!r} has {len(values)} values but shape {shape} needs {n}",
                                   status=400, field=t.name)
            arr = np.array(values, dtype=DTYPES[t.datatype]).reshape(shape)
            if t.datatype.startswith("FP") and not np.isfinite(arr).all():
                raise RequestError(f"input {t.name!r} has NaN or infinite values", status=400, field=t.name)
        arrays[t.name], types[t.name] = arr, t.datatype
    params = merge_parameters(_parameters(req.parameters), [_parameters(t.parameters) for t in req.inputs])
    return arrays, types, [o.name for o in req.outputs], params


def encode_infer_response(result, request_id: str) -> "pb.ModelInferResponse":
    """Data-plane result -> ModelInferResponse with raw_output_contents (what tritonclient reads)."""
    resp = pb.ModelInferResponse(model_name=result.model, model_version=result.version, id=request_id)
    for name, arr in result.outputs.items():
        dt = result.datatypes[name]
        resp.outputs.add(name=name, datatype=dt, shape=list(arr.shape))
        resp.raw_output_contents.append(to_binary(arr, dt))
    return resp


def model_metadata_response(meta: dict) -> "pb.ModelMetadataResponse":
    resp = pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
    for kind in ("inputs", "outputs"):
        for t in meta[kind]:
            getattr(resp, kind).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
    return resp


__all__ = ["GRPC_CODES", "decode_infer_request",
           "encode_infer_response", "model_metadata_response", "pb"]
