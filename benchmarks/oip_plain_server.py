"""The baseline for benchmarks.oip_serving: the same model and OIP codec in one plain FastAPI + uvicorn process.

    python -m benchmarks.oip_plain_server MODEL_DIR PORT
No `from __future__ import annotations`: FastAPI must see the real `Request` type.
"""

import sys
from pathlib import Path

from benchmarks.common import ROOT  # noqa: F401  (puts platform/ on sys.path)


def build_app(model_dir: str):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    from aidc.errors import RequestError
    from aidc.serving.oip import protocol as oip
    from aidc.tasks.loaded import LoadedModel

    loaded = LoadedModel.from_dir(Path(model_dir), "mnist-cnn", "1")
    sig = loaded.tensor_signature()
    types = {t["name"]: t["datatype"] for t in sig["outputs"]}
    app = FastAPI()

    @app.get("/v2/health/live")
    def live():
        return {"live": True}

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request):
        try:
            req, arrays = oip.parse_rest_body(await request.body(), request.headers.get(oip.HEADER_LENGTH), 8_000_000)
            inputs = oip.validate_inputs(arrays, {i.name: i.datatype for i in req.inputs}, sig, name)
            wanted = oip.select_outputs([o.name for o in req.outputs or []], sig, name)
            outputs = loaded.infer_tensors(inputs)
        except RequestError as exc:
            return JSONResponse(oip.oip_error(exc), status_code=exc.status)
        body, headers = oip.encode_rest_response(req, name, "1", {k: outputs[k] for k in wanted},
                                                 {k: types[k] for k in wanted})
        return Response(body, headers=headers)

    return app


if __name__ == "__main__":
    import torch
    import uvicorn

    torch.set_num_threads(1)
    uvicorn.run(build_app(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
