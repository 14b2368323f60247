"""Tensor models over the Open Inference Protocol v2 (KServe v2): REST at /v2 and gRPC on Serve's gRPC proxy.

Each served registry version is a `ServedVersion` (dynamic batching, a bounded queue). By default it runs
on its own `TensorModel` deployment (per-model replicas and autoscaling); with `placement: ingress` it runs
inside the `TensorIngress` replica itself, which saves a network hop per request (Triton-style: all models
in the server process; replicas and autoscaling then come from `ingress:`). The ingress routes by model
name/version (alias, pinned versions, a canary) through aidc.serving.oip.plane.DataPlane. A shell: the
arguments, replica classes and gRPC methods live in aidc.serving.oip.app. Serve config:
serve_apps/config.yaml, app `tensors`.
No `from __future__ import annotations` here: FastAPI must see real types on Serve ingress methods.
"""

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from aidc.errors import RequestError
from aidc.ops.serving import RequestMetrics
from aidc.registry import tracking_uri
from aidc.security.audit import record_quietly
from aidc.serving.protect import ApiKeyAuth, protect
from aidc.serving.oip import protocol as oip
from aidc.serving.oip.app import (ClassifyRequest, ClassifyResponse, GrpcServicer, LocalHandle, MultiplexedVersions,
                                  ServedVersion, TensorsArgs, TopKResponse, build_routes, error_response, scaling)
from aidc.serving.oip.plane import EXTENSIONS, SERVER_NAME, SERVER_VERSION, DataPlane, ModelRoute


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class TensorModel(ServedVersion):
    """A `ServedVersion` on its own deployment (placement: deployment): per-model replicas and autoscaling."""


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class MultiplexedModels(MultiplexedVersions):
    """Many small models per replica: the request's multiplexed model id (`name/version`) picks one; LRU cache."""


api = FastAPI(title="aidc tensors (Open Inference Protocol v2)",
              description="KServe v2 REST: health, metadata, infer (JSON or Triton binary tensors).")
protect(api, "tensors")  # API keys: infer:<name> on /models/<name>/...; health and readiness open
api.add_middleware(RequestMetrics)  # requests, codes, latency (aidc.ops.serving); outermost: counts 401s too
ERRORS = {code: {"model": oip.ErrorResponse} for code in (400, 404, 413, 503)}
READY = {**ERRORS, 400: {"model": oip.ReadyResponse | oip.ErrorResponse}}
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": oip.inline_schema(oip.InferenceRequest)},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


# max_ongoing_requests: the ingress only awaits the model deployments, so it takes many requests at once;
# with Serve's default (5) the proxy queues the rest and retries with growing back-off, and throughput
# collapses under load. Queues are bounded at the model deployments instead (max_queued_requests -> 503).
# graceful_shutdown_timeout_s: a config update that changes `args` restarts every deployment of the app
# (Serve hashes app args into the code version) and a 1-replica deployment is stopped before its successor
# starts: the old ingress must outlive that gap so its in-flight requests wait instead of failing.
@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=1024, graceful_shutdown_timeout_s=120)
@serve.ingress(api)
class TensorIngress(GrpcServicer):
    def __init__(self, args: dict, routes: dict, multiplexed=None):
        self.args = TensorsArgs.model_validate(args)
        ApiKeyAuth.configure("tensors", self.args.auth)
        for r in routes.values():
            r["handles"] = {v: self._handle(h, multiplexed) for v, h in r["handles"].items()}
        self.plane = DataPlane({n: ModelRoute(**r) for n, r in routes.items()}, seed=self.args.canary_seed)

    @staticmethod
    def _handle(h, multiplexed):
        if isinstance(h, str):  # multiplexed models: one shared handle, the model id picks the model
            return multiplexed.options(multiplexed_model_id=h)
        if isinstance(h, dict):  # placement: ingress: load (and verify) the version in this replica
            return LocalHandle(ServedVersion(*h["args"]), h["limit"])
        return h

    # -- REST ------------------------------------------------------------------------------
    @api.get("/health/live", response_model=oip.LiveResponse)
    def live(self) -> dict:
        return {"live": True}

    # Not ready is a 4xx (OIP: "200 indicates true, 4xx false"), as Triton answers: 400 with {"ready": false}.
    @api.get("/health/ready", response_model=oip.ReadyResponse, responses={400: {"model": oip.ReadyResponse}})
    async def ready(self) -> JSONResponse:
        ok = await self.plane.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 400)

    @api.get("/", response_model=oip.ServerMetadataResponse)
    def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}

    @api.get("/models/{name}", response_model=oip.ModelMetadataResponse, responses=ERRORS,
             response_model_exclude_none=True)
    async def model_metadata(self, name: str):
        return await self.model_version_metadata(name, None)

    @api.get("/models/{name}/versions/{version}", response_model=oip.ModelMetadataResponse, responses=ERRORS,
             response_model_exclude_none=True)
    async def model_version_metadata(self, name: str, version: str | None):
        try:
            return await self.plane.metadata(name, version)
        except RequestError as exc:
            return error_response(exc)

    @api.get("/models/{name}/ready", response_model=oip.ReadyResponse, responses=READY)
    async def model_ready(self, name: str):
        return await self.model_version_ready(name, None)

    @api.get("/models/{name}/versions/{version}/ready", response_model=oip.ReadyResponse, responses=READY)
    async def model_version_ready(self, name: str, version: str | None):
        try:
            ok = await self.plane.ready(name, version)
        except RequestError as exc:
            return error_response(exc)
        return JSONResponse({"ready": ok}, status_code=200 if ok else 400)

    @api.post("/models/{name}/infer", response_model=oip.InferenceResponse, responses=ERRORS,
              openapi_extra=INFER_BODY)
    async def infer(self, name: str, request: Request) -> Response:
        return await self.infer_version(name, None, request)

    @api.post("/models/{name}/versions/{version}/infer", response_model=oip.InferenceResponse, responses=ERRORS,
              openapi_extra=INFER_BODY)
    async def infer_version(self, name: str, version: str | None, request: Request) -> Response:
        try:
            req, arrays = oip.parse_rest_body(await request.body(), request.headers.get(oip.HEADER_LENGTH),
                                              self.args.max_body_bytes)
            result = await self.plane.infer(name, version, arrays, {i.name: i.datatype for i in req.inputs},
                                            [o.name for o in req.outputs or []],
                                            oip.merge_parameters(req.parameters, [i.parameters for i in req.inputs]))
        except RequestError as exc:
            return error_response(exc)
        body, headers = oip.encode_rest_response(req, result.model, result.version, result.outputs,
                                                 result.datatypes)
        return Response(body, headers=headers, media_type=headers["Content-Type"])

    # -- convenience JSON routes -------------------------------------------------------------
    @api.post("/models/{name}/classify", response_model=ClassifyResponse, responses=ERRORS)
    async def classify(self, name: str, body: ClassifyRequest):
        try:
            result = await self.plane.infer(name, None, {"text": np.array(body.texts, dtype=object)},
                                            {"text": "BYTES"}, ["label", "probabilities"])
        except RequestError as exc:
            return error_response(exc)
        return {"model_name": result.model, "model_version": result.version,
                "labels": [str(v) for v in result.outputs["label"]],
                "probabilities": result.outputs["probabilities"].round(6).tolist()}

    @api.get("/models/{name}/users/{user}/top", response_model=TopKResponse, responses=ERRORS)
    async def top_items(self, name: str, user: int, k: int = 10):
        try:
            if not 1 <= k <= 1000:
                raise RequestError(f"k must be 1..1000, got {k}", status=400, field="k")
            route = self.plane.route(name)
            if route.multiplexed or (await self.plane.describe(name))["task"] != "recommendation":
                raise RequestError(f"model {name!r} is not a recommender; top-K needs one", status=404)
            return await route.handles[route.default].top_k.remote(user, k)
        except RequestError as exc:
            return error_response(exc)


def app_builder(args: dict):
    """Validate the args, resolve each model's alias to its registry version, bind one deployment per version."""
    parsed = TensorsArgs.model_validate(args)  # fail at deploy time, with the field named
    record_quietly("serve.deploy", target="tensors", details={"args": args})  # audit log
    routes, mux = build_routes(
        parsed, tracking_uri(parsed.tracking_uri),
        bind_version=lambda name, options, served: TensorModel.options(name=name, **options).bind(*served),
        bind_multiplexed=lambda options, *a: MultiplexedModels.options(**options).bind(*a))
    return TensorIngress.options(**scaling(parsed.ingress)).bind(args, routes, mux)
