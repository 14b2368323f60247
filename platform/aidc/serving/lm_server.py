"""The OpenAI-compatible handlers: requests (aidc.serving.openai) -> engine sequences -> responses or
server-sent events. Transport-free: the Serve app (serve_apps/llm.py) only routes HTTP here, and
tests can drive it directly. Bad input raises RequestError (status + param), never a bare exception.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from aidc.data.text import _bpe, decode, encode
from aidc.errors import RequestError
from aidc.export.hf_export import tokenizer_config
from aidc.serving import openai as oa
from aidc.serving.chat import render_chat
from aidc.ops.serving import tag_request
from aidc.serving.engine import Engine, EngineFront, SamplingParams, TokenEvent

logger = logging.getLogger(__name__)


@dataclass
class ServedLM:
    """A loaded language model with its tokenizer (fitted at preprocessing) and its engine."""

    name: str
    version: str
    tokenizer: dict
    engine: EngineFront  # Engine (a thread) or ProcessEngine (its own process)
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def from_loaded(cls, loaded, metrics: bool = False, process: bool = False, **engine_kwargs) -> "ServedLM":
        """`process`: step the engine in its own process (`aidc.serving.engine_process`, what the llm app does
        so HTTP and model steps do not share a GIL); else in a thread of this one (batch jobs, tests)."""
        if not hasattr(loaded.model, "step"):
            raise RequestError(f"{loaded.name}/{loaded.version} is a {loaded.spec['task']} model, not a GPT "
                               "language model; serve it with the predictor app instead", status=400)
        tok = loaded.spec["transform"]["tokenizer"]
        sink = None
        if metrics:
            from aidc.serving.lm_metrics import LMMetrics

            sink = LMMetrics(loaded.name)
        if process:
            from aidc.serving.engine_process import ProcessEngine

            engine = ProcessEngine(loaded.model, tok.get("eos_id"), metrics=sink, **engine_kwargs)
        else:
            engine = Engine(loaded.model, tok.get("eos_id"), metrics=sink, **engine_kwargs)
        return cls(loaded.name, loaded.version, tok, engine)

    @property
    def context(self) -> int:
        return self.engine.block_size

    def encode(self, text: str) -> list[int]:
        return encode([text], self.tokenizer)[0]

    def decode(self, ids: list[int]) -> str:
        return decode(ids, self.tokenizer)

    def token_text(self, token: int) -> str:
        if self.tokenizer["kind"] == "bpe":
            return _bpe(self.tokenizer["json"]).decode([token], skip_special_tokens=False)
        vocab = self.tokenizer["vocab"]
        return vocab[token] if 0 <= token < len(vocab) else ""

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = self.tokenizer["vocab_size"]
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token id(s) {bad[:5]} are outside this model's vocabulary (0..{vocab - 1})",
                               status=400, field=param)
        return ids


class TextState:
    """Incremental detokenization of one choice with stop strings: text is released only once no stop
    string can still start in it, and a stop string ends the choice (it is not returned)."""

    def __init__(self, lm: ServedLM, stops: list[str], lazy: bool = False):
        self.lm, self.stops, self.lazy = lm, stops, lazy and not stops
        self.ids: list[int] = []
        self.sent = 0
        self.text = ""
        self.stopped = False
        self.prefix = self.read = 0  # decode window: ids[prefix:read] were decoded into text last time

    def add(self, token: int) -> str:
        self.ids.append(token)
        if self.lazy:  # nothing streams and nothing can stop on text: decode once, in flush()
            return ""
        # Incremental detokenization (as vLLM does): decode a short window twice, with and without the new
        # tokens, and append the difference, instead of decoding the whole sequence at every token.
        before = self.lm.decode(self.ids[self.prefix:self.read])
        after = self.lm.decode(self.ids[self.prefix:])
        if after.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
            return ""
        text = self.text + after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                self.stopped, text = True, text[:at]
                self.text = text
                return self._release(len(text))
        self.text = text
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._release(len(text) - hold)

    def flush(self) -> str:
        if self.lazy:
            self.text = self.lm.decode(self.ids)
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        delta = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return delta


@dataclass
class Choice:
    index: int
    prompt: list[int]
    prompt_text: str
    text: TextState
    generated: int = 0
    finish_reason: str | None = None
    logprobs: list[tuple[int, float, list]] = field(default_factory=list)  # generated tokens
    prompt_logprobs: list | None = None


class LMService:
    """Completions, chat completions, tokenize/detokenize and model listing over served LMs."""

    def __init__(self, models: dict[str, ServedLM]):
        self.models = models

    @property
    def default(self) -> str | None:
        """The one served model (what a request without `model` is for), or None when several are."""
        return next(iter(self.models)) if len(self.models) == 1 else None

    def model(self, name: str | None) -> ServedLM:
        if name is None:
            if self.default is None:
                raise RequestError(f"this app serves several models ({sorted(self.models)}): name one in "
                                   "`model`", status=400, field="model")
            name = self.default
        lm = self.models.get(name)
        if lm is None:
            raise RequestError(f"model {name!r} is not served here; available: {sorted(self.models)} "
                               "(GET /v1/models)", status=404, field="model")
        tag_request(lm.name, lm.version)  # request metrics by model (aidc.ops.serving)
        return lm

    def list_models(self) -> oa.ModelList:
        return oa.ModelList(data=[oa.ModelCard(id=n, created=m.created, root=f"{n}/{m.version}",
                                               max_model_len=m.context) for n, m in self.models.items()])

    def health(self) -> oa.Health:
        for m in self.models.values():  # a dead engine process: 503 + Retry-After until Serve replaces the replica
            m.engine.check_alive(RequestError)
        return oa.Health(models={n: {"version": m.version, **m.engine.stats()} for n, m in self.models.items()})

    # -- tokenize -----------------------------------------------------------------------------
    def tokenize(self, req: oa.TokenizeRequest) -> oa.TokenizeResponse:
        lm = self.model(req.model)
        text = req.prompt if req.prompt is not None else self._render(lm, req.messages, req.add_generation_prompt)
        ids = lm.encode(text)
        return oa.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=lm.context)

    def tokenizer_info(self, name: str | None) -> oa.TokenizerInfo:
        lm = self.model(name)
        # what the model's Hugging Face export writes as tokenizer_config.json
        return oa.TokenizerInfo(model=lm.name, vocab_size=lm.tokenizer["vocab_size"],
                                **tokenizer_config(lm.tokenizer, lm.context))

    def detokenize(self, req: oa.DetokenizeRequest) -> oa.DetokenizeResponse:
        lm = self.model(req.model)
        return oa.DetokenizeResponse(prompt=lm.decode(lm.check_ids(req.tokens, "tokens")))

    @staticmethod
    def _render(lm: ServedLM, messages: list[oa.ChatMessage], add_generation_prompt: bool) -> str:
        return render_chat([{"role": m.role, "content": m.text()} for m in messages], lm.tokenizer,
                           add_generation_prompt)

    # -- completions --------------------------------------------------------------------------
    async def completion(self, req: oa.CompletionRequest):
        lm = self.model(req.model)
        prompts = self._prompts(lm, req.prompt)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        if max_tokens == 0 and not req.echo:
            raise RequestError("max_tokens=0 only makes sense with echo=true (scoring the prompt)", status=400,
                               field="max_tokens")
        logprobs = req.logprobs
        params = self._params(req, max_tokens, logprobs, logprobs if req.echo and logprobs is not None else None)
        run = self._start(lm, prompts, req, params)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            return self._stream(lm, run, rid, chat=False, req=req)
        choices = await self._collect(run)
        out = []
        for c in choices:
            text = (c.prompt_text if req.echo else "") + c.text.text
            lp = self._completion_logprobs(lm, c, req.echo) if logprobs is not None else None
            out.append(oa.CompletionChoice(index=c.index, text=text, logprobs=lp, finish_reason=c.finish_reason))
        return oa.CompletionResponse(id=rid, created=int(time.time()), model=lm.name, choices=out,
                                     usage=self._usage(prompts, choices), system_fingerprint=f"{lm.name}/{lm.version}")

    # -- chat ---------------------------------------------------------------------------------
    async def chat(self, req: oa.ChatCompletionRequest):
        lm = self.model(req.model)
        text = self._render(lm, req.messages, req.add_generation_prompt)
        prompt = lm.encode(text)
        cap = req.max_completion_tokens or req.max_tokens
        max_tokens = cap if cap is not None else max(lm.context + 1 - len(prompt), 1)
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = self._params(req, max_tokens, top, None)
        run = self._start(lm, [(prompt, text)], req, params)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return self._stream(lm, run, rid, chat=True, req=req)
        choices = await self._collect(run)
        out = [oa.ChatChoice(index=c.index, message=oa.ChatResponseMessage(content=c.text.text),
                             logprobs=oa.ChatLogprobs(content=self._chat_logprobs(lm, c.logprobs))
                             if req.logprobs else None, finish_reason=c.finish_reason) for c in choices]
        return oa.ChatCompletionResponse(id=rid, created=int(time.time()), model=lm.name, choices=out,
                                         usage=self._usage([(prompt, text)], choices),
                                         system_fingerprint=f"{lm.name}/{lm.version}")

    # -- shared -------------------------------------------------------------------------------
    def _prompts(self, lm: ServedLM, prompt) -> list[tuple[list[int], str]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                out.append((lm.encode(p), p))
            else:
                ids = lm.check_ids(list(p), f"prompt[{i}]")
                out.append((ids, lm.decode(ids)))
        for i, (ids, _) in enumerate(out):
            if not ids:
                raise RequestError(f"prompt[{i}] encodes to no tokens; send some text", status=400, field="prompt")
        return out

    @staticmethod
    def _params(req, max_tokens: int, logprobs, prompt_logprobs) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              top_k=max(req.top_k, 0), seed=req.seed, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs, ignore_eos=req.ignore_eos,
                              stop_token_ids=tuple(req.stop_token_ids or ()))

    def _start(self, lm: ServedLM, prompts, req, params: SamplingParams):
        """Validate every prompt's length, then queue all choices (n per prompt) on one queue."""
        for ids, _ in prompts:
            lm.engine.check_length(len(ids), params.max_tokens)
        queue: asyncio.Queue = asyncio.Queue()
        seqs, choices = {}, []
        try:
            for p, (ids, text) in enumerate(prompts):
                for k in range(req.n):
                    sp = SamplingParams(**{**params.__dict__, "seed": None if req.seed is None else req.seed + k})
                    seq = lm.engine.add(ids, sp, queue, stream=bool(req.stream))
                    choice = Choice(p * req.n + k, ids, text, TextState(lm, req.stops(), lazy=not req.stream))
                    seqs[seq.id] = (seq, choice)
                    choices.append(choice)
        except Exception:
            for seq, _ in seqs.values():
                lm.engine.abort(seq)
            raise
        return lm, queue, seqs, choices

    async def _events(self, run) -> AsyncIterator[tuple[Choice, TokenEvent, str]]:
        """(choice, event, new text) until every choice finished; aborts what is left if the caller goes."""
        lm, queue, seqs, choices = run
        left = len(seqs)
        try:
            while left:
                seq, event = await queue.get()
                choice = seqs[seq.id][1]
                if choice.finish_reason is not None:
                    continue
                if event.prompt_logprobs is not None:
                    choice.prompt_logprobs = event.prompt_logprobs
                delta = ""
                if event.token is not None:
                    choice.generated += 1
                    if event.logprob is not None:
                        choice.logprobs.append((event.token, event.logprob, event.top or []))
                    delta = choice.text.add(event.token)
                    if choice.text.stopped:
                        lm.engine.abort(seq)
                        event.finish_reason = "stop"
                if event.finish_reason is not None:
                    delta += choice.text.flush() if not choice.text.stopped else ""
                    choice.finish_reason = event.finish_reason
                    left -= 1
                yield choice, event, delta
        finally:
            for seq, _ in seqs.values():
                lm.engine.abort(seq)

    async def _collect(self, run) -> list[Choice]:
        async for _ in self._events(run):
            pass
        return run[3]

    @staticmethod
    def _usage(prompts, choices: list[Choice]) -> oa.Usage:
        p = sum(len(ids) for ids, _ in prompts)
        c = sum(ch.generated for ch in choices)
        return oa.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    def _completion_logprobs(self, lm: ServedLM, c: Choice, echo: bool, start_offset: int = 0,
                             entries: list | None = None) -> oa.CompletionLogprobs:
        rows = []  # (token, logprob | None, top | None)
        if echo and entries is None and c.prompt_logprobs is not None:
            rows += [(t, lp, top) for t, (lp, top) in zip(c.prompt, c.prompt_logprobs)]
        rows += [(t, lp, top) for t, lp, top in (c.logprobs if entries is None else entries)]
        tokens, offsets, offset = [], [], start_offset
        for t, _, _ in rows:
            tokens.append(lm.token_text(t))
            offsets.append(offset)
            offset += len(tokens[-1])
        return oa.CompletionLogprobs(
            tokens=tokens, token_logprobs=[lp for _, lp, _ in rows], text_offset=offsets,
            top_logprobs=[None if top is None else {lm.token_text(i): v for i, v in top} for _, _, top in rows])

    def _chat_logprobs(self, lm: ServedLM, entries) -> list[oa.ChatTokenLogprob]:
        def item(t, lp):
            s = lm.token_text(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}

        return [oa.ChatTokenLogprob(**item(t, lp), top_logprobs=[oa.TopLogprob(**item(i, v)) for i, v in top])
                for t, lp, top in entries]

    async def _stream(self, lm: ServedLM, run, rid: str, chat: bool, req) -> AsyncIterator[str]:
        """The SSE lines, written together while more tokens are already waiting: when the engine runs
        ahead of the transport, one write carries several events instead of one per token."""
        queue, buf = run[1], []
        events = self._sse(lm, run, rid, chat, req)
        try:
            async for line in events:
                buf.append(line)
                if queue.empty():
                    yield "".join(buf)
                    buf = []
            if buf:
                yield "".join(buf)
        finally:
            await events.aclose()

    async def _sse(self, lm: ServedLM, run, rid: str, chat: bool, req) -> AsyncIterator[str]:
        """Server-sent events like OpenAI's: content chunks (finish_reason on each choice's last one),
        an optional usage chunk with no choices, then [DONE]."""
        created, choices = int(time.time()), run[3]
        kind = "chat.completion.chunk" if chat else "text_completion"
        pending: dict[int, list] = {c.index: [] for c in choices}

        def chunk(choice_list: list[dict], usage=None) -> str:
            body = {"id": rid, "object": kind, "created": created, "model": lm.name, "choices": choice_list}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        if chat:
            for c in choices:
                yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
        echoed: set[int] = set()
        async for c, event, delta in self._events(run):
            if event.logprob is not None:
                pending[c.index].append((event.token, event.logprob, event.top or []))
            prefix = ""
            if not chat and req.echo and c.index not in echoed:
                echoed.add(c.index)
                prefix = c.prompt_text
            if not delta and not prefix and event.finish_reason is None:
                continue
            entries, pending[c.index] = pending[c.index], []
            if chat:
                lp = {"content": [x.model_dump() for x in self._chat_logprobs(lm, entries)]} if req.logprobs else None
                yield chunk([{"index": c.index, "delta": {"content": delta} if delta or event.finish_reason is None
                              else {}, "logprobs": lp, "finish_reason": c.finish_reason}])
            else:
                lp = None
                if req.logprobs is not None:
                    rows = entries
                    if prefix and c.prompt_logprobs is not None:
                        rows = [(t, a, b) for t, (a, b) in zip(c.prompt, c.prompt_logprobs)] + entries
                    lp = self._completion_logprobs(lm, c, False, entries=rows).model_dump()
                yield chunk([{"index": c.index, "text": prefix + delta, "logprobs": lp,
                              "finish_reason": c.finish_reason}])
        if req.stream_options is not None and req.stream_options.include_usage:
            prompts = {c.index // req.n: (c.prompt, "") for c in choices}
            yield chunk([], self._usage(list(prompts.values()), choices).model_dump())
        yield "data: [DONE]\n\n"


class BodyLimit:
    """ASGI middleware: a body over `max_body_bytes` (by its Content-Length) gets 413 before any parsing.
    The limit is a class attribute the Serve replica sets from its args (one app per replica process)."""

    max_body_bytes = 1_000_000

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        length = dict(scope.get("headers") or []).get(b"content-length") if scope["type"] == "http" else None
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            body = json.dumps(oa.error_body(f"request body is {int(length)} bytes, over the limit of "
                                            f"{self.max_body_bytes}; send fewer or shorter prompts", 413)).encode()
            await send({"type": "http.response.start", "status": 413, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
