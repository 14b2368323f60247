"""The `tensors` app's parts that need no running Serve: its arguments, the JSON convenience schemas, the replica
classes (a served registry version with dynamic batching, a local handle for `placement: ingress`, multiplexed
models), the gRPC servicer methods of the ingress, and the routing table built from the arguments.
serve_apps/tensors.py binds them into Serve deployments behind the REST routes.
No `from __future__ import annotations` here: the schemas are FastAPI response models.
"""

import inspect
import logging
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import Field, model_validator
from ray import serve

from aidc.errors import RequestError
from aidc.ops.serving import grpc_request, observe_batch
from aidc.security.auth import ApiKeyAuth, grpc_check
from aidc.serving.http import AppArgs, Strict, retry_after
from aidc.serving.oip import protocol as oip
from aidc.serving.oip.plane import EXTENSIONS, SERVER_NAME, SERVER_VERSION, run_batch
from aidc.tasks.loaded import load_model

logger = logging.getLogger(__name__)


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


class TensorsArgs(AppArgs):
    """Application arguments (the `args:` block of the `tensors` app in the Serve config)."""

    models: list[ModelArgs] = Field([], description="Registered models, each on its own deployment(s) or in the "
                                    "ingress (placement).")
    ingress: IngressArgs = Field(default_factory=IngressArgs, description="The TensorIngress deployment's resources "
                                 "and scaling.")
    multiplexed: MultiplexedArgs | None = Field(None, description="Many small models per replica (@serve.multiplexed).")
    storage: str | None = Field(None, description="Storage root of datasets (recommender history).")
    max_body_bytes: int = Field(8_000_000, ge=1024, description="Largest request body (413 above).")
    canary_seed: int | None = Field(None, description="Seed of the canary draw (tests); null = random.")

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
            from aidc.serving.oip.topk import TopK
            from aidc.storage import storage_root

            name, version = self.loaded.spec["dataset"].split("@")
            train = open_dataset(storage_root(self.storage), name, version).read_numpy("train")
            self._topk = TopK(self.loaded, train, self.unknown_users)
        return self._topk.top(user, k)


class LocalHandle:
    """A `ServedVersion` inside the ingress (placement: ingress) behind a deployment handle's call shape
    (`handle.method.remote(...)` is awaited), with the deployment's bounded queue: more than
    max_ongoing_requests + max_queued_requests requests in flight get 503 + Retry-After."""

    def __init__(self, served: ServedVersion, limit: int | None):
        self.served, self.limit, self.in_flight = served, limit, 0

    def __getattr__(self, method: str) -> "LocalMethod":
        return LocalMethod(self, getattr(self.served, method))


class LocalMethod:
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


class MultiplexedVersions:
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


def error_response(exc: RequestError) -> JSONResponse:
    """An OIP error body with the request's status (and Retry-After where retrying helps)."""
    return JSONResponse(oip.oip_error(exc), status_code=exc.status, headers=retry_after(exc.status))


class GrpcServicer:
    """inference.GRPCInferenceService on the ingress (Serve's gRPC proxy calls the method of the same name);
    `self.plane` is the ingress's DataPlane. A RequestError becomes the matching status code and its message."""

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
        from aidc.serving.oip.grpc_codec import model_metadata_response, pb

        async def run():
            return model_metadata_response(await self.plane.metadata(request.name, request.version or None))

        if not grpc_check(ApiKeyAuth.guard_for("tensors"), grpc_context, request.name):  # UNAUTHENTICATED...
            return pb.ModelMetadataResponse()
        return await self._grpc(grpc_context, pb.ModelMetadataResponse, run)

    async def ModelInfer(self, request, grpc_context=None):
        from aidc.serving.oip.grpc_codec import decode_infer_request, encode_infer_response, pb

        if not grpc_check(ApiKeyAuth.guard_for("tensors"), grpc_context, request.model_name):  # UNAUTHENTICATED...
            return pb.ModelInferResponse()

        async def run():
            arrays, types, outputs, params = decode_infer_request(request)
            result = await self.plane.infer(request.model_name, request.model_version or None, arrays, types,
                                            outputs, params)
            return encode_infer_response(result, request.id)

        return await self._grpc(grpc_context, pb.ModelInferResponse, run)

    @staticmethod
    async def _grpc(grpc_context, empty, run):
        """Run a gRPC method; a RequestError becomes the matching status code and its message."""
        import grpc

        from aidc.errors import GRPC_CODES

        try:
            with grpc_request(empty.__name__.removesuffix("Response")):  # metrics (aidc.ops.serving)
                return await run()
        except RequestError as exc:
            if grpc_context is None:
                raise
            grpc_context.set_code(getattr(grpc.StatusCode, GRPC_CODES.get(exc.status, "INVALID_ARGUMENT")))
            grpc_context.set_details(exc.message)
            return empty()


def build_routes(parsed: TensorsArgs, uri: str, bind_version, bind_multiplexed) -> tuple[dict, Any]:
    """The ingress's routing table: each model's default version (its alias resolved now, so an unknown name,
    alias or version fails the deploy, not the first request), pinned versions and canary. A version with
    placement: deployment is `bind_version(deployment name, options, served args)`; one with placement: ingress
    is loaded in the ingress replica; multiplexed models share `bind_multiplexed(options, uri, max models)`.
    Returns (routes, the multiplexed deployment or None)."""
    from aidc.registry import resolve

    routes, mux = {}, None
    if parsed.multiplexed:
        mx = parsed.multiplexed
        mux = bind_multiplexed(deployment_options(mx.deployment), uri, mx.max_models_per_replica)
        for name in mx.models:
            v = str(resolve(f"{name}@{mx.alias}", uri).version)
            routes[name] = {"name": name, "default": v, "handles": {v: f"{name}/{v}"}, "multiplexed": True}
    for m in parsed.models:
        default = str(resolve(f"{m.name}@{m.alias}", uri).version)
        versions = dict.fromkeys([default, *m.versions, *([m.canary.version] if m.canary else [])])
        handles = {}
        for v in versions:
            resolve(f"{m.name}/{v}", uri)
            served = (f"{m.name}/{v}", uri, m.batching.model_dump(), parsed.storage, m.unknown_users)
            if m.placement == "ingress":
                d = m.deployment
                limit = d.max_ongoing_requests + d.max_queued_requests if d.max_queued_requests >= 0 else None
                handles[v] = {"args": served, "limit": limit}
            else:
                handles[v] = bind_version(f"{m.name}-v{v}", deployment_options(m.deployment), served)
        routes[m.name] = {"name": m.name, "default": default, "handles": handles,
                          "canary": m.canary.version if m.canary else None,
                          "canary_percent": m.canary.percent if m.canary else 0.0}
    return routes, mux


def scaling(d: DeploymentArgs | IngressArgs) -> dict:
    """Serve options of a deployment's resources and replicas (autoscaling, or a fixed number)."""
    scaled = {"autoscaling_config": d.autoscaling_config} if d.autoscaling_config else {"num_replicas": d.num_replicas}
    return {"ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus}, **scaled}


def deployment_options(d: DeploymentArgs) -> dict:
    return {"max_ongoing_requests": d.max_ongoing_requests, "max_queued_requests": d.max_queued_requests,
            **scaling(d)}
