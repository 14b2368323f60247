"""The `llm` app on vLLM through Ray Serve LLM: registry versions served by Ray's `LLMServer` deployments
(one vLLM engine each), behind aidc's OpenAI ingress (a subclass of Ray Serve LLM's `OpenAiIngress`).

What aidc adds to Ray Serve LLM, and where:
- `AidcLLMServer` (Ray's LLMServer): resolves the registry reference on the replica's own node, verifies
  it and writes the Hugging Face folder vLLM loads (aidc.hf.folder) before the engine starts; adds
  `tokenizer_info` and `health`, and fills in vLLM 0.29's tokenization state, which Ray 2.60 looks for
  under its old name (`openai_serving_tokenization`; vLLM now calls it `serving_tokenization`).
- `LLMIngress` (Ray's OpenAiIngress, routing by the request's `model` to that model's deployment handle):
  API keys on every route, aidc's request metrics, a body-size limit, the OpenAI error envelope for every
  error (404 unknown model, 400 bad request naming the field, 413, 429 + Retry-After when a model's queue
  is full, 503 + Retry-After while its engine is down), the tokenizer routes at the root where
  lm-evaluation-harness looks, `/v1/health`, and `max_model_len` in `/v1/models`.
Serve config: serve_apps/config.yaml; the app module (serve_apps/llm.py) only validates args and builds.
No `from __future__ import annotations`: FastAPI must see real types on Serve ingress methods.
"""

import asyncio
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field
from ray import serve
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    OpenAIHTTPException,
)
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress
from ray.llm._internal.serve.core.ingress.utils import (
    NON_STREAMING_RESPONSE_TYPES,
    _openai_json_wrapper,
    _peek_at_generator,
)
from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.llm._internal.serve.core.server.llm_server import LLMServer
from starlette.exceptions import HTTPException
from vllm.exceptions import VLLMClientError

from aidc.config import PII_TYPES
from aidc.errors import AidcError, RequestError
from aidc.ops.serving import RequestMetrics, tag_request
from aidc.security.auth import ApiKeyAuth
from aidc.serving.protect import protect
from aidc.serving.http import AppArgs, BodyLimit, Strict, openai_error_body, retry_after

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0
DOWN = ("the model's vLLM engine process is down; Serve is replacing the replica - retry in a few seconds")


class ModelArgs(Strict):
    """One served model: a registry reference and its engine and replica settings."""

    ref: str = Field(..., description="Registry reference: name@alias or name/version.")
    max_num_seqs: int = Field(32, ge=1, description="Sequences vLLM runs in one batch.")
    max_waiting: int = Field(256, ge=0, description="Requests a replica holds beyond max_num_seqs; 429 above.")
    max_model_len: Optional[int] = Field(None, ge=1, description="Context length; default: the model's own.")
    num_cpus: float = Field(1, gt=0, description="CPUs of the engine's placement-group bundle (CPU nodes).")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica; > 0 runs vLLM's CUDA engine.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one replica shards the model over (vLLM TP).")
    kv_cache_gib: int = Field(1, ge=1, description="CPU key/value cache in GiB per replica (VLLM_CPU_KVCACHE_SPACE), "
                                "so a replica fits its node.")
    enable_prefix_caching: bool = Field(True, description="vLLM's automatic prefix caching.")
    block_size: Optional[int] = Field(None, ge=16, description="KV-cache block (tokens); default 32 on CPU so "
                                      "prompts shorter than vLLM's CPU default of 128 can hit the prefix cache.")
    enforce_eager: bool = Field(True, description="Skip torch.compile/CUDA graphs: starts in seconds instead of "
                                "about 30 s more on CPU; false for peak throughput on long-lived replicas.")
    dtype: Optional[str] = Field(None, description="vLLM's dtype (auto, float32, bfloat16, ...); default: auto on "
                                 "GPUs, float32 on CPUs - vLLM's bf16 CPU kernels died with SIGILL on small "
                                 "models here (hidden 64, AMX CPU), and aidc's GPTs train in float32.")

    def engine_dtype(self) -> str:
        return self.dtype or ("auto" if self.num_gpus > 0 else "float32")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Further vLLM engine arguments.")
    env_vars: dict[str, str] = Field(default_factory=dict, description="Environment of the replica and its engine "
                                     "(e.g. VLLM_CPU_OMP_THREADS_BIND).")
    autoscaling_config: dict[str, Any] = Field(
        default_factory=lambda: {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 24},
        description="Serve autoscaling on ongoing requests per replica.")


class LLMArgs(AppArgs):
    """Application arguments (the `args:` block of the Serve config)."""

    models: list[Union[str, ModelArgs]] = Field(..., min_length=1, description="Registry references served "
                                                "(name@alias or name/version), or per-model settings.")
    defaults: dict[str, Any] = Field(default_factory=dict, description="ModelArgs fields every model starts from.")
    metrics: bool = Field(True, description="Export vLLM's engine metrics (TTFT, inter-token latency, KV cache, "
                          "prefix-cache hits) through Ray's Prometheus endpoint.")
    scrub: list[Literal[PII_TYPES]] = Field(
        [], description="Personal data replaced by placeholders (<EMAIL>, ...) in prompts and chat messages "
        "before a model sees them (completions, chat, tokenize), as data.privacy.scrub does to training data.")

    def model_args(self) -> list[ModelArgs]:
        return [m if isinstance(m, ModelArgs) else ModelArgs.model_validate({**self.defaults, "ref": m})
                for m in self.models]


class AidcLLMServer(LLMServer):
    """Ray Serve LLM's model server, started from a verified registry version."""

    async def __init__(self, llm_config, *, ref: str, tracking_uri: Optional[str] = None, gpu: bool = False,
                       adapters: Optional[dict] = None):
        from aidc.hf.folder import cache_root, materialize

        self._hf = materialize(ref, tracking_uri, gpu)  # on this node, from freshly verified files
        # this replica's adapter downloads, beside the base's folder; removed with it
        self._adapters = tempfile.mkdtemp(prefix=f"{self._hf.folder.name}-adapters-", dir=cache_root())
        llm_config.model_loading_config.model_source = str(self._hf.folder)
        llm_config._engine_config = None  # derived (and cached) from the deploy-time folder: derive it again
        await super().__init__(llm_config, model_downloader=adapter_loader(adapters or {}, tracking_uri,
                                                                          self._adapters))
        engine = self.engine
        if getattr(engine, "_oai_serving_tokenization", None) is None and engine._app_state is not None:
            engine._oai_serving_tokenization = getattr(engine._app_state, "serving_tokenization", None)

    async def tokenizer_info(self) -> dict:
        info = await self.engine._oai_serving_tokenization.get_tokenizer_info()
        return info.model_dump() if hasattr(info, "model_dump") else dict(info)

    async def health(self) -> dict:
        """Raises while the engine is dead (so does Serve's own health check: the replica is replaced)."""
        await self.engine.check_health()
        client = self.engine._engine_client
        processor = getattr(client, "output_processor", None)
        running = processor.get_num_unfinished_requests() if processor is not None else None
        return {"version": self._hf.version, "engine": "vllm", "replica_pid": os.getpid(), "running": running,
                "max_model_len": self._llm_config.engine_kwargs.get("max_model_len")}

    async def __del__(self):
        from aidc.hf.folder import remove

        if getattr(self, "_hf", None) is not None:
            remove(self._hf)
        if getattr(self, "_adapters", None) is not None:
            shutil.rmtree(self._adapters, ignore_errors=True)
        await super().__del__()


api = FastAPI(title="aidc LLM", version="2", openapi_url="/v1/openapi.json", docs_url="/v1/docs", redoc_url=None,
              description="OpenAI-compatible completions and chat completions for language models in the aidc "
              "registry, served by vLLM through Ray Serve LLM.")
api.add_middleware(BodyLimit)
protect(api, "llm")  # API keys: infer:<body model> on generation/tokenizer routes; /health open
api.add_middleware(RequestMetrics)  # requests, codes, latency (aidc.ops.serving); outermost: counts 401s too


def _json_error(message: str, status: int, param: Optional[str] = None):
    return JSONResponse(openai_error_body(message, status, param), status_code=status, headers=retry_after(status))


@api.exception_handler(RequestError)
async def _request_error(request, exc: RequestError):
    return _json_error(exc.message, exc.status, exc.field)


@api.exception_handler(RequestValidationError)
async def _validation_error(request, exc: RequestValidationError):
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid request")
    return _json_error(f"{msg} at {param}" if param else msg, 400, param)


@api.exception_handler(HTTPException)
async def _http_error(request, exc: HTTPException):
    return _json_error(str(exc.detail), exc.status_code)


@api.exception_handler(VLLMClientError)
async def _vllm_client_error(request, exc: VLLMClientError):  # vLLM's protocol validators (e.g. stream_options)
    return _json_error(str(exc.args[0] if exc.args else exc), 400, getattr(exc, "parameter", None))


@api.exception_handler(OpenAIHTTPException)
async def _openai_error(request, exc: OpenAIHTTPException):
    return _json_error(exc.message, exc.status_code)


def scrub_prompts(body, scrubber) -> None:
    """A request's prompt text (a completion's prompt or prompts; token ids are left as sent) and its chat
    messages' text (plain, or the text parts of a multi-part content), with personal data replaced."""
    from collections import Counter

    found = Counter()
    prompt = getattr(body, "prompt", None)
    if isinstance(prompt, str):
        body.prompt = scrubber.text(prompt, found)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        body.prompt = [scrubber.text(p, found) for p in prompt]
    for message in getattr(body, "messages", None) or []:
        content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
        if isinstance(content, str):
            content = scrubber.text(content, found)
        elif isinstance(content, list):
            content = [{**part, "text": scrubber.text(part["text"], found)}
                       if isinstance(part, dict) and isinstance(part.get("text"), str) else part for part in content]
        else:
            continue
        if isinstance(message, dict):
            message["content"] = content
        else:
            message.content = content


def _unavailable(exc: BaseException) -> Optional[RequestError]:
    """Map a failure reaching a model's replica to the answer a client can act on (else None)."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, BackPressureError):
        return RequestError("this model's queue is full; retry after the Retry-After seconds", status=429)
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, RayActorError) or "EngineDeadError" in text or "EngineCore" in text:
        return RequestError(DOWN, status=503)
    return None


class LLMIngress(OpenAiIngress):
    """Ray Serve LLM's OpenAI ingress with aidc's keys, metrics, errors and routes (module docstring)."""

    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, args: dict, versions: dict, vocab: dict,
                 adapters: Optional[dict] = None, adapter_cards: Optional[dict] = None):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        self._adapter_cards = adapter_cards or {}
        self.args = LLMArgs.model_validate(args)
        self.versions, self.vocab = versions, vocab  # model id -> registered version, vocabulary size
        self.adapters = adapters or {}  # LoRA adapter name -> its base model's id
        BodyLimit.max_body_bytes = self.args.max_body_bytes
        ApiKeyAuth.configure("llm", self.args.auth, model=self._only_model())
        self.scrubber = None
        if self.args.scrub:
            from aidc.data.privacy import Scrubber

            self.scrubber = Scrubber(self.args.scrub)

    def _only_model(self) -> Optional[str]:
        return next(iter(self._model_cards)) if len(self._model_cards) == 1 else None

    def _model_id(self, model: Optional[str]) -> str:
        """The served model a request names (the app's one model when it names none), else 400/404."""
        if model is None:
            if self._only_model() is None:
                raise RequestError(f"name a `model`: this app serves {sorted(self._model_cards)}", status=400,
                                   field="model")
            model = self._only_model()
        if model not in self.adapters and model.split(":", 1)[0] not in self._model_cards:
            raise RequestError(f"model {model!r} is not served here; GET /v1/models lists "
                               f"{sorted(self._model_cards)}", status=404, field="model")
        tag_request(model, self.versions.get(model))
        return model

    async def _call(self, body, method: str, request: Optional[Request]):
        body.model = self._model_id(body.model)
        if self.scrubber is not None and method != "detokenize":  # CPU work: off the event loop
            await asyncio.to_thread(scrub_prompts, body, self.scrubber)
        try:
            gen = self._get_response(body=body, call_method=method, raw_request=request)
            first, gen = await _peek_at_generator(gen)
        except Exception as exc:  # noqa: BLE001 - mapped to an answer the client can act on
            mapped = _unavailable(exc)
            if mapped is None and "GenerationError" in f"{type(exc).__name__}: {exc}" and getattr(
                    body, "response_format", None) is not None:
                # vLLM's grammar admitted no token of this model's vocabulary (e.g. a character model trained
                # on text without braces asked for JSON): the request, not the server, is at fault
                mapped = RequestError("this model's vocabulary cannot write output matching response_format "
                                      "(its tokens lack characters the format needs); drop response_format or "
                                      "use a model whose vocabulary covers it", status=400, field="response_format")
            if mapped is None and isinstance(exc, (ValueError, OverflowError, TypeError)):  # ray keeps the type
                cause = getattr(exc, "cause", None) or exc
                mapped = RequestError(f"vLLM refused this request: {type(cause).__name__}: {cause}", status=400)
            if mapped is None:
                logger.exception("generation failed")
                mapped = RequestError(f"the engine failed this request ({type(exc).__name__}); it is logged on "
                                      "the replica", status=500)
            raise mapped from None
        chunk = first[0] if isinstance(first, list) and first else first
        if isinstance(chunk, ErrorResponse):
            e = chunk.error
            raise RequestError(e.message, status=int(e.code), field=getattr(e, "param", None))
        if isinstance(chunk, NON_STREAMING_RESPONSE_TYPES) or not getattr(body, "stream", False):
            return JSONResponse(chunk.model_dump(mode="json", exclude_none=False))
        return StreamingResponse(_openai_json_wrapper(gen), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    def _get_configured_serve_handle(self, model_id: str):
        """An adapter's requests go to its base's replicas as Serve's multiplexed model id (the adapter's name),
        which Ray Serve LLM loads with the RegistryAdapters loader and vLLM applies per request."""
        base = self.adapters.get(model_id)
        if base is None:
            return super()._get_configured_serve_handle(model_id)
        if model_id not in self._configured_serve_handles:
            self._configured_serve_handles[model_id] = self._default_serve_handles[base].options(
                stream=True, multiplexed_model_id=model_id)
        return self._configured_serve_handles[model_id]

    async def _get_model_id(self, model: Optional[str]) -> str:
        return model if model in self.adapters else await super()._get_model_id(model)

    @api.get("/v1/models")
    async def models(self):
        out = await super().models()
        data = []
        for card in [*out.data, *self._adapter_cards.values()]:
            d = card.model_dump(mode="json")
            d["max_model_len"] = d.get("metadata", {}).get("max_request_context_length")
            d["version"] = self.versions.get(card.id)
            data.append(d)
        return {"object": "list", "data": data}

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        return await self._call(body, "completions", request)

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatCompletionRequest, request: Request):
        return await self._call(body, "chat", request)

    @api.post("/v1/tokenize")
    @api.post("/tokenize")
    async def tokenize(self, request: Request):
        from vllm.entrypoints.serve.tokenize.protocol import TokenizeChatRequest, TokenizeCompletionRequest

        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise RequestError(f"request body is not valid JSON: {exc}", status=400) from None
        kind = TokenizeChatRequest if isinstance(body, dict) and "messages" in body else TokenizeCompletionRequest
        try:
            parsed = kind.model_validate(body)
        except Exception as exc:  # pydantic ValidationError -> 400 naming the field
            raise RequestValidationError(exc.errors() if hasattr(exc, "errors") else []) from None
        return await self._call(parsed, "tokenize", request)

    @api.post("/v1/detokenize")
    @api.post("/detokenize")
    async def detokenize(self, body: DetokenizeRequest, request: Request):
        vocab = self.vocab.get(self._model_id(body.model))
        bad = [t for t in body.tokens if vocab and not 0 <= t < vocab]
        if bad:  # vLLM's detokenizer would overflow or index past its vocabulary (a 500 there)
            raise RequestError(f"token id(s) {bad[:5]} are outside this model's vocabulary (0..{vocab - 1})",
                               status=400, field="tokens")
        return await self._call(body, "detokenize", request)

    @api.get("/tokenizer_info")
    async def tokenizer_info(self, model: Optional[str] = None):
        model = self._model_id(model)
        try:
            info = await self._default_serve_handles[model].tokenizer_info.remote()
        except Exception as exc:  # noqa: BLE001
            raise (_unavailable(exc) or exc) from None
        return {**info, "model": model}

    @api.get("/v1/health")
    async def health(self):
        """Each model's replica answers through its engine: 503 + Retry-After while one is down."""
        models = {}
        for name, handle in self._default_serve_handles.items():
            try:
                models[name] = await asyncio.wait_for(handle.health.remote(), HEALTH_TIMEOUT_S)
            except asyncio.TimeoutError:  # no replica answers: starting, or being replaced
                raise RequestError(f"{name}: no replica is ready (starting, or replacing one whose engine died); "
                                   "retry in a few seconds", status=503) from None
            except Exception as exc:  # noqa: BLE001
                raise (_unavailable(exc) or RequestError(f"{name}: {exc}", status=503)) from None
        return {"status": "ok", "models": models}


_INGRESS = serve.ingress(api)(LLMIngress)


def cpu_engine_kwargs(block_size: Optional[int], max_len: int) -> dict:
    """vLLM settings for CPU nodes. Block 32 (not vLLM's CPU default of 128), so prompts of a few dozen tokens
    share prefix-cache blocks. No chunked prefill: vLLM 0.29's CPU sampler fails a seeded request whose prompt
    was prefilled in chunks ('CPU Generator does not use offset') and takes the engine down with it - so a
    whole prompt is prefilled in one step, up to max(2048, the context) tokens a step."""
    return {"block_size": block_size or 32, "enable_chunked_prefill": False,
            "max_num_batched_tokens": max(2048, max_len)}


def node_init_needed(source, mirror_config, bundle_nodes: set, here: str) -> bool:
    """Whether Ray Serve LLM's node initialization has anything to do: it runs a task on every node of the engine's
    placement group to download the model from a cloud mirror, and returns a local folder unchanged. A folder on
    this node, with no mirror, for an engine wholly on this node: nothing to download."""
    local = isinstance(source, str) and os.path.isdir(source)
    return not (local and mirror_config is None and bundle_nodes <= {here})


class LocalFolderInit(CallbackBase):
    """Ray Serve LLM's startup callback (LLMConfig.callback_config): skips its node initialization where
    node_init_needed says there is nothing to do. Ray runs it as a task with the engine's runtime env, a fresh
    worker process importing torch, transformers and ray.llm (~13 CPU-s, seconds of every engine start on 2 cores)
    to return the folder it was given; the one other thing it does, making torch's kernels cache dir, is done here."""

    async def on_before_node_init(self) -> None:
        import ray

        engine = self.llm_config.get_engine_config()
        pg = self.ctx.placement_group
        nodes = set(ray.util.placement_group_table(pg)["bundles_to_node_id"].values()) if pg is not None else set()
        here = ray.get_runtime_context().get_node_id()
        if not node_init_needed(self.llm_config.model_loading_config.model_source, engine.mirror_config, nodes, here):
            import torch

            os.makedirs(os.path.join(torch.hub._get_torch_home(), "kernels"), exist_ok=True)  # as Ray's task does
            self.ctx.run_init_node = False
            logger.info("model folder %s is on this node: no node initialization task",
                        self.llm_config.model_loading_config.model_source)


def adapter_loader(adapters: dict, tracking_uri: Optional[str], directory: str):
    """Ray Serve LLM's LoRA loader class for one base: an adapter named by a request (Serve's multiplexed model id,
    its registered name) is fetched from the registry into `directory` and verified (signature, sha256 manifest)
    on this replica, then vLLM loads it (its PEFT files) beside the others on the one base."""
    import itertools

    from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
    from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader

    ids = itertools.count(1)
    copies: dict[str, str] = {}  # adapter id -> its verified folder: one per replica, a reload (LRU) reuses it

    class RegistryAdapters(LoraModelLoader):
        async def load_model_from_config(self, lora_model_id: str, llm_config) -> DiskMultiplexConfig:
            import asyncio

            from aidc.registry import fetch, tracking_uri as resolve_uri

            if lora_model_id not in adapters:
                raise ValueError(f"no adapter {lora_model_id!r} on this base; it serves {sorted(adapters)}")
            if lora_model_id not in copies:
                dst = tempfile.mkdtemp(dir=directory)  # its own folder: an adapter's name is not a safe path
                _, files = await asyncio.to_thread(fetch, adapters[lora_model_id], resolve_uri(tracking_uri), dst)
                copies[lora_model_id] = str(files)
            return DiskMultiplexConfig(model_id=lora_model_id, max_total_tokens=None, local_path=copies[lora_model_id],
                                       lora_assigned_int_id=next(ids))

    return RegistryAdapters


def lora_engine_kwargs(ranks: list[int]) -> dict:
    """vLLM's multi-LoRA settings for a base serving adapters of these ranks (its max rank is one of its sizes)."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    rank = min(r for r in get_args(MaxLoRARanks) if r >= max(ranks))
    return {"enable_lora": True, "max_loras": len(ranks), "max_lora_rank": rank}


def llm_config(m: ModelArgs, name: str, folder: str, max_len: int, metrics: bool, lora_ranks: Optional[list] = None):
    """Ray Serve LLM's LLMConfig for one model: engine arguments, placement, env, Serve options; with
    `lora_ranks`, multi-LoRA for that many adapters."""
    from ray.serve.llm import LLMConfig

    gpu = m.num_gpus > 0
    engine = {"max_model_len": m.max_model_len or max_len, "max_num_seqs": m.max_num_seqs,
              "enable_prefix_caching": m.enable_prefix_caching, "enforce_eager": m.enforce_eager,
              "dtype": m.engine_dtype(), "tensor_parallel_size": m.tensor_parallel_size,
              # a random or small model under json_schema would pad with spaces until max_tokens otherwise
              "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
              "enable_prompt_tokens_details": True,  # usage.prompt_tokens_details.cached_tokens (prefix cache)
              **({} if gpu else cpu_engine_kwargs(m.block_size, m.max_model_len or max_len)), **m.engine_kwargs}
    if m.block_size and gpu:
        engine["block_size"] = m.block_size
    if lora_ranks:
        engine.update(lora_engine_kwargs(lora_ranks))
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(m.kv_cache_gib),
           **m.env_vars}
    placement = ({"bundles": [{"GPU": 1, "CPU": 1}] * m.tensor_parallel_size} if gpu
                 else {"bundles": [{"CPU": m.num_cpus}]})
    return LLMConfig(
        model_loading_config={"model_id": name, "model_source": folder},
        accelerator_config={"kind": "gpu" if gpu else "cpu"},
        engine_kwargs=engine, placement_group_config=placement, log_engine_metrics=metrics,
        runtime_env={"env_vars": env},
        **({"lora_config": {"max_num_adapters_per_replica": len(lora_ranks)}} if lora_ranks else {}),
        callback_config={"callback_class": f"{__name__}.{LocalFolderInit.__name__}"},
        deployment_config={"ray_actor_options": {"num_cpus": 0}, "autoscaling_config": m.autoscaling_config,
                           "max_ongoing_requests": m.max_num_seqs, "max_queued_requests": max(1, m.max_waiting),
                           "health_check_period_s": 5})


def build_app(args: LLMArgs):
    """The Serve application: one AidcLLMServer deployment per model, LLMIngress in front.

    Each reference is resolved to its version now (a replica started later by the autoscaler serves the same
    version) and fetched + verified here, so a tampered version fails the deploy with its reason."""
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.serve.llm import build_llm_deployment

    from aidc.hf.folder import materialize, remove

    deployments, cards, adapter_cards, versions, vocab = {}, {}, {}, {}, {}
    models, adapters = split_adapters(args)  # LoRA adapter versions are served on their base (multi-LoRA)
    for m in models:
        hf = materialize(m.ref, args.tracking_uri, m.num_gpus > 0)
        mine = {a.name: a for a in adapters if a.base == f"{hf.name}/{hf.version}"}
        try:
            cfg = llm_config(m, hf.name, str(hf.folder), hf.max_model_len, args.metrics,
                             [a.rank for a in mine.values()])
            cards[hf.name] = to_model_metadata(hf.name, cfg)
            for a in mine.values():
                adapter_cards[a.name] = to_model_metadata(a.name, cfg)
        finally:
            remove(hf)
        pinned = f"{hf.name}/{hf.version}"
        deployments[hf.name] = build_llm_deployment(
            cfg, deployment_cls=AidcLLMServer,
            bind_kwargs={"ref": pinned, "tracking_uri": args.tracking_uri, "gpu": m.num_gpus > 0,
                         "adapters": {a.name: a.ref for a in mine.values()}})
        versions[hf.name], vocab[hf.name] = hf.version, hf.vocab_size
        for a in mine.values():
            versions[a.name], vocab[a.name] = a.version, hf.vocab_size
    ingress = serve.deployment(_INGRESS, name="LLMIngress",
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    return ingress.bind(deployments, cards, args=args.model_dump(mode="json"), versions=versions, vocab=vocab,
                        adapters={a.name: a.base.split("/")[0] for a in adapters}, adapter_cards=adapter_cards)


@dataclass
class Adapter:
    """A registered LoRA adapter version: served by its base's deployment, chosen by the request's model."""

    name: str
    version: str
    base: str  # its base's pinned reference, name/version
    rank: int

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"


def split_adapters(args: "LLMArgs") -> tuple[list, list]:
    """The app's models, its LoRA adapter versions taken out (each fetched and verified here; a model's weights
    are not downloaded here, only its model.json: its replicas fetch and verify it); a base that is not listed
    itself is added with its adapter's settings."""
    from aidc.registry import fetched, read_spec, tracking_uri

    uri = tracking_uri(args.tracking_uri)
    models, adapters, bases, listed = [], [], {}, set()
    for m in args.model_args():
        mv, spec = read_spec(m.ref, uri)
        if spec.get("format") != "peft-lora":
            models.append(m)
            listed.add(f"{mv.name}/{mv.version}")
            continue
        # signature + manifest: a tampered adapter fails here
        with fetched(f"{mv.name}/{mv.version}", uri) as (mv, files):
            spec = json.loads((files / "model.json").read_text())
            rank = int(json.loads((files / "adapter_config.json").read_text())["r"])
        base = spec["base"].get("ref")
        if not base:
            raise AidcError(f"{mv.name}/{mv.version} is a LoRA adapter on a folder ({spec['base'].get('path')}), "
                            "not on a registered model: register its base (aidc model import) to serve it")
        adapters.append(Adapter(mv.name, str(mv.version), base, rank))
        bases.setdefault(base, m)
    for base, m in bases.items():
        if base not in listed:
            models.append(m.model_copy(update={"ref": base}))
    return models, adapters

