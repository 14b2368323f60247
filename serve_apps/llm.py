"""OpenAI-compatible language-model serving (Serve application `llm`, route prefix /, its API under /v1).

GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /v1/tokenize, POST /v1/detokenize,
GET /v1/health; the OpenAPI document at /v1/openapi.json. At the root, as vLLM's server has them (where
lm-evaluation-harness's `tokenizer_backend=remote` looks): POST /tokenize, POST /detokenize,
GET /tokenizer_info - `model` optional where the app serves one model. A thin shell: protocol bodies live in
aidc.serving.openai, the handlers in aidc.serving.lm_server, continuous batching in aidc.serving.engine.
Serve config: serve_apps/config.yaml (import_path: serve_apps.llm:app_builder).
No `from __future__ import annotations` here: FastAPI must see real types on Serve ingress methods.
"""

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
import ray
import torch
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException

from aidc.errors import AidcError, RequestError
from aidc.serving import openai as oa
from aidc.security.audit import record_quietly
from aidc.serving.auth import ApiKeyAuth, AuthArgs, protect
from aidc.serving.lm_server import BodyLimit, LMService, ServedLM
from aidc.serving.model import load_model
from aidc.ops.serving import RequestMetrics

logger = logging.getLogger(__name__)
ERRORS = {code: {"model": oa.ErrorResponse} for code in (400, 404, 413, 429)}

api = FastAPI(title="aidc LLM", version="1", openapi_url="/v1/openapi.json", docs_url="/v1/docs", redoc_url=None,
              description="OpenAI-compatible completions and chat completions "
              "for language models in the aidc registry, with continuous batching on Ray Serve.")


class LLMArgs(BaseModel):
    """Application arguments (the `args:` block of the Serve config)."""

    model_config = ConfigDict(extra="forbid")
    models: list[str] = Field(..., min_length=1, description="Registry references served: name@alias or name/version.")
    tracking_uri: str | None = Field(None, description="MLflow registry; default sqlite under $AIDC_STORAGE.")
    max_num_seqs: int = Field(32, ge=1, description="Sequences in the running batch (key/value cache slots).")
    max_waiting: int = Field(256, ge=1, description="Requests that may wait for a slot; 429 beyond.")
    max_prefill_tokens: int = Field(4096, ge=1, description="Padded prompt tokens prefilled in one step.")
    request_timeout_s: float | None = Field(None, gt=0, description="Stop a generation running longer than this "
                                            "(finish_reason length); None: no limit.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body (413 above).")
    metrics: bool = Field(True, description="Export engine metrics through ray.util.metrics.")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for the model; default: the replica's "
                                      "whole CPUs (at least 1) - more threads than cores collapse throughput.")
    engine_process: bool = Field(True, description="Step each model's engine in its own process (as vLLM's engine "
                                 "core), so HTTP handling and model steps do not share one GIL; false: a thread "
                                 "of the replica.")
    auth: AuthArgs = Field(default_factory=AuthArgs, description="API keys (aidc keys); on unless enabled: false.")


api.add_middleware(BodyLimit)
protect(api, "llm")  # API keys: infer:<body model> on generation/tokenizer routes; /health open
api.add_middleware(RequestMetrics)  # requests, codes, latency (aidc.ops.serving); outermost: counts 401s too


@api.exception_handler(RequestError)
async def _request_error(request, exc: RequestError):
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return JSONResponse(oa.error_body(exc.message, exc.status, exc.field), status_code=exc.status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request, exc: RequestValidationError):
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    where = f" at {param}" if param else ""
    return JSONResponse(oa.error_body(f"{err.get('msg', 'invalid request')}{where}", 400, param), status_code=400)


@api.exception_handler(HTTPException)
async def _http_error(request, exc: HTTPException):
    return JSONResponse(oa.error_body(str(exc.detail), exc.status_code), status_code=exc.status_code)


def _respond(out):
    if isinstance(out, BaseModel):
        return out
    return StreamingResponse(out, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=512)
@serve.ingress(api)
class LLMServer:
    def __init__(self, args: dict):
        self.args = LLMArgs.model_validate(args)
        BodyLimit.max_body_bytes = self.args.max_body_bytes
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        threads = self.args.torch_threads or max(1, int(cpus))
        torch.set_num_threads(threads)
        extra = {"process": True, "threads": threads} if self.args.engine_process else {}
        served = {}
        for ref in self.args.models:
            lm = ServedLM.from_loaded(load_model(ref, self.args.tracking_uri), metrics=self.args.metrics,
                                      max_seqs=self.args.max_num_seqs, max_waiting=self.args.max_waiting,
                                      max_prefill_tokens=self.args.max_prefill_tokens,
                                      timeout_s=self.args.request_timeout_s, **extra)
            served[lm.name] = lm
        self.service = LMService(served)
        ApiKeyAuth.configure("llm", self.args.auth, model=self.service.default)  # a request naming no model
        if self.args.engine_process and torch.cuda.is_available():
            torch.cuda.empty_cache()  # the loaded copies were handed to the engine processes: free them here

    def check_health(self):
        """Serve's health check: an engine process that died fails it, and Serve replaces the replica."""
        for lm in self.service.models.values():
            lm.engine.check_alive()

    def __del__(self):
        for lm in getattr(self, "service", LMService({})).models.values():
            lm.engine.close(join_s=5.0)

    @api.get("/v1/models", response_model=oa.ModelList)
    def models(self) -> oa.ModelList:
        return self.service.list_models()

    @api.post("/v1/completions", response_model=oa.CompletionResponse, responses=ERRORS)
    async def completions(self, body: oa.CompletionRequest):
        return _respond(await self.service.completion(body))

    @api.post("/v1/chat/completions", response_model=oa.ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(self, body: oa.ChatCompletionRequest):
        return _respond(await self.service.chat(body))

    @api.post("/v1/tokenize", response_model=oa.TokenizeResponse, responses=ERRORS)
    @api.post("/tokenize", response_model=oa.TokenizeResponse, responses=ERRORS)
    def tokenize(self, body: oa.TokenizeRequest) -> oa.TokenizeResponse:
        return self.service.tokenize(body)

    @api.post("/v1/detokenize", response_model=oa.DetokenizeResponse, responses=ERRORS)
    @api.post("/detokenize", response_model=oa.DetokenizeResponse, responses=ERRORS)
    def detokenize(self, body: oa.DetokenizeRequest) -> oa.DetokenizeResponse:
        return self.service.detokenize(body)

    @api.get("/tokenizer_info", response_model=oa.TokenizerInfo, responses=ERRORS)
    def tokenizer_info(self) -> oa.TokenizerInfo:
        return self.service.tokenizer_info(None)

    @api.get("/v1/health", response_model=oa.Health)
    def health(self) -> oa.Health:
        return self.service.health()


def app_builder(args: dict):
    try:
        LLMArgs.model_validate(args)  # fail at deploy time, with the field named
    except Exception as exc:
        raise AidcError(f"bad args for the llm app: {exc}") from None
    record_quietly("serve.deploy", target="llm", details={"args": args})  # audit log
    return LLMServer.bind(args)
