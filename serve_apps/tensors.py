"""Tensor models over the Open Inference Protocol v2 (KServe v2): REST at /v2 and gRPC on Serve's gRPC proxy.

Each served registry version is a `ServedVersion` (dynamic batching, a bounded queue). By default it runs
on its own `TensorModel` deployment (per-model replicas and autoscaling); with `placement: ingress` it runs
inside the `TensorIngress` replica itself, which saves a network hop per request (Triton-style: all models
in the server process; replicas and autoscaling then come from `ingress:`). The ingress routes by model
name/version (alias, pinned versions, a canary) and is a thin transport over
`aidc.serving.oip_plane.DataPlane`. Serve config: serve_apps/config.yaml, app `tensors`.
No `from __future__ import annotations` here: FastAPI must see real types on Serve ingress methods.
"""

import inspect
import logging
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from aidc.errors import RequestError
from aidc.serving import load_model
from aidc.serving import oip
from aidc.serving.auth import ApiKeyAuth, AuthArgs, protect
from aidc.security.audit import record_quietly
from aidc.security.auth import grpc_check
from aidc.ops.serving import RequestMetrics, grpc_request, observe_batch
from aidc.serving.oip_plane import EXTENSIONS, SERVER_NAME, SERVER_VERSION, DataPlane, ModelRoute, run_batch

logger = logging.getLogger(__name__)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchingArgs(Strict):
    max_batch_size: int = Field(16, ge=1, description="Most requests one model call runs together (1 = off).")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="Longest wait to fill a batch.")


class CanaryArgs(Strict):
    version: str = Field(..., pattern=r"^\d+$", description="Registry version that gets a share of traffic.")
    percent: float = Field(..., ge=0, le=100, description="Share of unversioned requests sent to it.")


class DeploymentArgs(Strict):
    num_cpus: float = Field(0.5, gt=0, description="CPUs per model replica.")
    num_gpus: float = Field(0, ge=0, description="GPUs per model replica (the model picks CUDA when present).")
    max_ongoing_requests: int = Field(32, ge=1, description="Concurrent requests per replica.")
    max_queued_requests: int = Field(-1, ge=-1, description="Queued requests per caller before 503 (-1 = no bound).")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Serve autoscaling_config (min_replicas may be 0); null = num_replicas.")
    num_replicas: int = Field(1, ge=1, description="Fixed replicas when autoscaling_config is null.")


class IngressArgs(Strict):
    num_cpus: float = Field(0.25, gt=0, description="CPUs per ingress replica (give more when models run in it).")
    num_gpus: float = Field(0, ge=0, description="GPUs per ingress replica (for `placement: ingress` models).")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Serve autoscaling_config of the ingress; null = num_replicas.")
    num_replicas: int = Field(1, ge=1, description="Fixed ingress replicas when autoscaling_config is null.")


class ModelArgs(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="Registered model name (the {name} in URLs).")
    alias: str = Field("champion", description="Alias served when a request names no version.")
    versions: list[str] = Field([], description="Further registry versions served when pinned in the URL.")
    canary: CanaryArgs | None = Field(None, description="Send a share of unversioned traffic to another version.")
    batching: BatchingArgs = Field(default_factory=BatchingArgs, description="Dynamic batching (@serve.batch).")
    placement: Literal["deployment", "ingress"] = Field(
        "deployment", description="deployment: each version on its own deployment (replicas and autoscaling per "
        "model, one extra hop per request); ingress: the versions run inside the ingress replica (no extra hop; "
        "scale the ingress with `ingress:`).")
    deployment: DeploymentArgs = Field(default_factory=DeploymentArgs, description="Replica resources/scaling.")
    unknown_users: Literal["popular", "404"] = Field(
        "popular", description="Recommenders: top-K for an unknown user gives popular items or a 404.")

    @model_validator(mode="after")
    def _placement(self):
        if self.placement == "ingress":
            own = self.deployment.model_fields_set - {"max_ongoing_requests", "max_queued_requests"}
            if own:
                raise ValueError(f"model {self.name!r} has placement: ingress, so it runs in the ingress replicas: "
                                 f"deployment.{sorted(own)} do not apply; set them under the app's `ingress:` "
                                 "(only max_ongoing_requests and max_queued_requests stay per model)")
        return self


class MultiplexedArgs(Strict):
    models: list[str] = Field(..., min_length=1, description="Registered names (served at their alias) that share "
                              "replicas of one deployment, loaded on demand.")
    alias: str = Field("champion", description="Alias served for each of them.")
    max_models_per_replica: int = Field(4, ge=1, description="Models kept per replica; least recently used leave.")
    deployment: DeploymentArgs = Field(default_factory=DeploymentArgs, description="Replica resources/scaling.")


class TensorsArgs(Strict):
    """Application arguments (the `args:` block of the `tensors` app in the Serve config)."""

    models: list[ModelArgs] = Field([], description="Registered models, each on its own deployment(s) or in the "
                                    "ingress (placement).")
    ingress: IngressArgs = Field(default_factory=IngressArgs, description="The TensorIngress deployment's resources "
                                 "and scaling.")
    multiplexed: MultiplexedArgs | None = Field(None, description="Many small models per replica (@serve.multiplexed).")
    tracking_uri: str | None = Field(None, description="MLflow registry; default sqlite under $AIDC_STORAGE.")
    storage: str | None = Field(None, description="Storage root of datasets (recommender history).")
    max_body_bytes: int = Field(8_000_000, ge=1024, description="Largest request body (413 above).")
    canary_seed: int | None = Field(None, description="Seed of the canary draw (tests); null = random.")
    auth: AuthArgs = Field(default_factory=AuthArgs, description="API keys (aidc keys); on unless enabled: false.")

    @model_validator(mode="after")
    def _unique_names(self):
        names = [m.name for m in self.models] + (self.multiplexed.models if self.multiplexed else [])
        if not names:
            raise ValueError("serve at least one model: models: [{name: digits-cnn}] or multiplexed: {models: [...]}")
        if len(names) != len(set(names)):
            raise ValueError(f"model names must be unique, got {names}")
        return self


class ClassifyRequest(Strict):
    texts: list[str] = Field(..., min_length=1, max_length=256, description="Texts to classify.")


class ClassifyResponse(Strict):
    model_name: str = Field(..., description="Registered model name.")
    model_version: str = Field(..., description="Registry version that answered.")
    labels: list[str] = Field(..., description="Predicted label per text.")
    probabilities: list[list[float]] = Field(..., description="Class probabilities per text.")


class TopKItem(Strict):
    item: int = Field(..., description="Item id.")
    score: float | None = Field(..., description="Predicted rating (null for popularity fallbacks).")


class TopKResponse(Strict):
    user: int = Field(..., description="The user asked about.")
    known_user: bool = Field(..., description="Whether the model saw this user in training.")
    strategy: str = Field(..., description="'model' scores, or 'popular' items for unknown users.")
    items: list[TopKItem] = Field(..., description="Best items first, excluding ones the user rated.")


class ServedVersion:
    """One registry version: loaded and integrity-verified before it takes traffic."""

    def __init__(self, ref: str, tracking_uri: str | None, batching: dict, storage: str | None,
                 unknown_users: str):
        self.loaded = load_model(ref, tracking_uri)  # verifies every file's sha256 or raises
        self.infer_batch.set_max_batch_size(batching["max_batch_size"])
        self.infer_batch.set_batch_wait_timeout_s(batching["batch_wait_timeout_s"])
        self.storage, self.unknown_users, self._topk = storage, unknown_users, None

    def describe(self) -> dict:
        return {"name": self.loaded.name, "version": self.loaded.version, "task": self.loaded.spec["task"],
                "features": self.loaded.spec["features"], "signature": self.loaded.tensor_signature()}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def infer_batch(self, requests: list) -> list:
        observe_batch(self.loaded.name, self.loaded.version, len(requests))  # aidc.ops.serving
        return run_batch(self.loaded, requests)

    async def infer(self, inputs: dict) -> dict:
        return await self.infer_batch(inputs)

    def top_k(self, user: int, k: int) -> dict:
        if self._topk is None:
            from aidc.data.dataset import open_dataset
            from aidc.serving.topk import TopK
            from aidc.storage import storage_root

            name, version = self.loaded.spec["dataset"].split("@")
            train = open_dataset(storage_root(self.storage), name, version).read_numpy("train")
            self._topk = TopK(self.loaded, train, self.unknown_users)
        return self._topk.top(user, k)


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class TensorModel(ServedVersion):
    """A `ServedVersion` on its own deployment (placement: deployment): per-model replicas and autoscaling."""


class LocalHandle:
    """A `ServedVersion` inside the ingress (placement: ingress) behind a deployment handle's call shape
    (`handle.method.remote(...)` is awaited), with the deployment's bounded queue: more than
    max_ongoing_requests + max_queued_requests requests in flight get 503 + Retry-After."""

    def __init__(self, served: ServedVersion, limit: int | None):
        self.served, self.limit, self.in_flight = served, limit, 0

    def __getattr__(self, method: str) -> "_LocalMethod":
        return _LocalMethod(self, getattr(self.served, method))


class _LocalMethod:
    """`handle.method`: `.remote(...)` runs the method in this process under the handle's queue bound."""

    def __init__(self, handle: LocalHandle, fn):
        self.handle, self.fn = handle, fn

    async def remote(self, *args):
        h = self.handle
        if h.limit is not None and h.in_flight >= h.limit:
            loaded = h.served.loaded
            raise RequestError(f"model {loaded.name!r} version {loaded.version} is at capacity "
                               f"({h.limit} requests in flight); retry after 1 s", status=503)
        h.in_flight += 1
        try:
            out = self.fn(*args)
            return await out if inspect.isawaitable(out) else out
        finally:
            h.in_flight -= 1


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class MultiplexedModels:
    """Many small models per replica: the request's multiplexed model id (`name/version`) picks one; LRU cache."""

    def __init__(self, tracking_uri: str | None, max_models: int):
        self.loads: list[str] = []

        async def load(model_id: str):
            self.loads.append(model_id)
            return load_model(model_id, tracking_uri)  # verified like any other

        self.get_model = serve.multiplexed(max_num_models_per_replica=max_models)(load)

    async def describe(self) -> dict:
        loaded = await self.get_model(serve.get_multiplexed_model_id())
        return {"name": loaded.name, "version": loaded.version, "task": loaded.spec["task"],
                "features": loaded.spec["features"], "signature": loaded.tensor_signature()}

    async def infer(self, inputs: dict) -> dict:
        return (await self.get_model(serve.get_multiplexed_model_id())).infer_tensors(inputs)

    def stats(self) -> dict:
        return {"loads": self.loads}

    def ready(self) -> bool:
        return True


api = FastAPI(title="aidc tensors (Open Inference Protocol v2)",
              description="KServe v2 REST: health, metadata, infer (JSON or Triton binary tensors).")
protect(api, "tensors")  # API keys: infer:<name> on /models/<name>/...; health and readiness open
api.add_middleware(RequestMetrics)  # requests, codes, latency (aidc.ops.serving); outermost: counts 401s too
ERRORS = {code: {"model": oip.ErrorResponse} for code in (400, 404, 413, 503)}
READY = {**ERRORS, 400: {"model": oip.ReadyResponse | oip.ErrorResponse}}
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": oip.inline_schema(oip.InferenceRequest)},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def error_response(exc: RequestError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return JSONResponse(oip.oip_error(exc), status_code=exc.status, headers=headers)


# max_ongoing_requests: the ingress only awaits the model deployments, so it takes many requests at once;
# with Serve's default (5) the proxy queues the rest and retries with growing back-off, and throughput
# collapses under load. Queues are bounded at the model deployments instead (max_queued_requests -> 503).
# graceful_shutdown_timeout_s: a config update that changes `args` restarts every deployment of the app
# (Serve hashes app args into the code version) and a 1-replica deployment is stopped before its successor
# starts: the old ingress must outlive that gap so its in-flight requests wait instead of failing.
@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=1024, graceful_shutdown_timeout_s=120)
@serve.ingress(api)
class TensorIngress:
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

    @api.get("/models/{name}", response_model=oip.ModelMetadataResponse, responses=ERRORS)
    async def model_metadata(self, name: str):
        return await self.model_version_metadata(name, None)

    @api.get("/models/{name}/versions/{version}", response_model=oip.ModelMetadataResponse, responses=ERRORS)
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
                                            [o.name for o in req.outputs or []])
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

    # -- gRPC (inference.GRPCInferenceService; the method name picks the method) -------------
    def ServerLive(self, request):
        from aidc.serving.oip_grpc import pb

        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request):
        from aidc.serving.oip_grpc import pb

        return pb.ServerReadyResponse(ready=await self.plane.ready())

    def ServerMetadata(self, request):
        from aidc.serving.oip_grpc import pb

        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelReady(self, request, grpc_context=None):
        from aidc.serving.oip_grpc import pb

        return await self._grpc(grpc_context, pb.ModelReadyResponse, lambda: self._model_ready(request))

    async def _model_ready(self, request):
        from aidc.serving.oip_grpc import pb

        return pb.ModelReadyResponse(ready=await self.plane.ready(request.name, request.version or None))

    async def ModelMetadata(self, request, grpc_context=None):
        from aidc.serving.oip_grpc import model_metadata_response, pb

        async def run():
            return model_metadata_response(await self.plane.metadata(request.name, request.version or None))

        if not grpc_check(ApiKeyAuth.guard_for("tensors"), grpc_context, request.name):  # UNAUTHENTICATED...
            return pb.ModelMetadataResponse()
        return await self._grpc(grpc_context, pb.ModelMetadataResponse, run)

    async def ModelInfer(self, request, grpc_context=None):
        from aidc.serving.oip_grpc import decode_infer_request, encode_infer_response, pb

        if not grpc_check(ApiKeyAuth.guard_for("tensors"), grpc_context, request.model_name):  # UNAUTHENTICATED...
            return pb.ModelInferResponse()

        async def run():
            arrays, types, outputs = decode_infer_request(request)
            result = await self.plane.infer(request.model_name, request.model_version or None, arrays, types,
                                            outputs)
            return encode_infer_response(result, request.id)

        return await self._grpc(grpc_context, pb.ModelInferResponse, run)

    @staticmethod
    async def _grpc(grpc_context, empty, run):
        """Run a gRPC method; a RequestError becomes the matching status code and its message."""
        import grpc

        from aidc.serving.oip_grpc import GRPC_CODES

        try:
            with grpc_request(empty.__name__.removesuffix("Response")):  # metrics (aidc.ops.serving)
                return await run()
        except RequestError as exc:
            if grpc_context is None:
                raise
            grpc_context.set_code(getattr(grpc.StatusCode, GRPC_CODES.get(exc.status, "INVALID_ARGUMENT")))
            grpc_context.set_details(exc.message)
            return empty()


def app_builder(args: dict):
    """Validate the args, resolve each model's alias to its registry version, bind one deployment per version."""
    from aidc.registry import resolve, tracking_uri

    parsed = TensorsArgs.model_validate(args)  # fail at deploy time, with the field named
    record_quietly("serve.deploy", target="tensors", details={"args": args})  # audit log
    uri = tracking_uri(parsed.tracking_uri)
    routes, mux = {}, None
    if parsed.multiplexed:
        mx = parsed.multiplexed
        mux = MultiplexedModels.options(**_deployment_options(mx.deployment)).bind(uri, mx.max_models_per_replica)
        for name in mx.models:
            v = str(resolve(f"{name}@{mx.alias}", uri).version)
            routes[name] = {"name": name, "default": v, "handles": {v: f"{name}/{v}"}, "multiplexed": True}
    for m in parsed.models:
        default = str(resolve(f"{m.name}@{m.alias}", uri).version)
        versions = dict.fromkeys([default, *m.versions, *([m.canary.version] if m.canary else [])])
        handles = {}
        for v in versions:
            resolve(f"{m.name}/{v}", uri)  # unknown versions fail the deploy, not the first request
            served = (f"{m.name}/{v}", uri, m.batching.model_dump(), parsed.storage, m.unknown_users)
            if m.placement == "ingress":
                d = m.deployment
                limit = d.max_ongoing_requests + d.max_queued_requests if d.max_queued_requests >= 0 else None
                handles[v] = {"args": served, "limit": limit}
            else:
                handles[v] = TensorModel.options(name=f"{m.name}-v{v}", **_deployment_options(m.deployment)).bind(
                    *served)
        routes[m.name] = {"name": m.name, "default": default, "handles": handles,
                          "canary": m.canary.version if m.canary else None,
                          "canary_percent": m.canary.percent if m.canary else 0.0}
    return TensorIngress.options(**_scaling(parsed.ingress)).bind(args, routes, mux)


def _scaling(d: DeploymentArgs | IngressArgs) -> dict:
    scaling = {"autoscaling_config": d.autoscaling_config} if d.autoscaling_config else {"num_replicas": d.num_replicas}
    return {"ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus}, **scaling}


def _deployment_options(d: DeploymentArgs) -> dict:
    return {"max_ongoing_requests": d.max_ongoing_requests, "max_queued_requests": d.max_queued_requests,
            **_scaling(d)}
