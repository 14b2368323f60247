"""OpenAI-compatible request/response bodies (pydantic), mirroring the OpenAI API field by field, and the
one builder of OpenAI error bodies. Cross-field rules live in validators so a bad request is a 400
that names the field. Fields other servers accept but that do not apply here are declared, so they
are accepted (and ignored unless noted); anything else is refused like OpenAI does."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

Strict = ConfigDict(extra="forbid")

ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}
ERROR_CODES = {404: "model_not_found", 413: "request_too_large", 429: "rate_limit_exceeded"}


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error envelope: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code or ERROR_CODES.get(status)}}


class ErrorDetail(BaseModel):
    model_config = Strict
    message: str = Field(..., description="What is wrong and how to fix it.")
    type: str = Field(..., description="Error class, e.g. invalid_request_error.")
    param: str | None = Field(None, description="The request field at fault, if any.")
    code: str | None = Field(None, description="Machine-readable code, e.g. model_not_found.")


class ErrorResponse(BaseModel):
    model_config = Strict
    error: ErrorDetail = Field(..., description="The error.")


class StreamOptions(BaseModel):
    model_config = Strict
    include_usage: bool = Field(False, description="Send a last chunk with token usage and empty choices.")


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = Strict
    model: str = Field(..., description="Registered model name (see GET /v1/models).")
    temperature: float = Field(1.0, ge=0, le=2, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set reaching top_p.")
    top_k: int = Field(-1, ge=-1, description="Keep only the k most likely tokens (-1 or 0: all).")
    n: int = Field(1, ge=1, le=16, description="Choices to generate per prompt.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end generation (not returned).")
    seed: int | None = Field(None, ge=-(2**63), lt=2**63, description="Seed for sampling: the same request and seed "
                             "give the same output (a 64-bit signed integer).")
    stream: bool = Field(False, description="Stream server-sent events, one chunk per token.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options (only with stream).")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token (honoured).")
    stop_token_ids: list[int] | None = Field(None, description="Token ids that end generation (honoured).")
    # Accepted for compatibility with OpenAI/vLLM clients; not applied by this server.
    presence_penalty: float | None = Field(None, description="Accepted, not applied.")
    frequency_penalty: float | None = Field(None, description="Accepted, not applied.")
    repetition_penalty: float | None = Field(None, description="Accepted, not applied.")
    logit_bias: dict[str, float] | None = Field(None, description="Accepted, not applied.")
    min_p: float | None = Field(None, description="Accepted, not applied.")
    min_tokens: int | None = Field(None, description="Accepted, not applied.")
    skip_special_tokens: bool | None = Field(None, description="Accepted; special tokens are always skipped.")
    user: str | None = Field(None, description="Accepted, not applied (end-user id).")
    metadata: dict[str, Any] | None = Field(None, description="Accepted, not applied.")
    store: bool | None = Field(None, description="Accepted, not applied.")
    service_tier: str | None = Field(None, description="Accepted, not applied.")

    @model_validator(mode="after")
    def _rules(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop takes at most 4 sequences")
        return self

    def stops(self) -> list[str]:
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop or []) if s]


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_Sampling):
    prompt: Prompt = Field(..., description="A string, a list of strings, a list of token ids or a list of "
                                            "token-id lists; each is a separate prompt.")
    max_tokens: int | None = Field(16, ge=0, description="Tokens to generate per choice (0 with echo: score only).")
    logprobs: int | None = Field(None, ge=0, le=20, description="Return the chosen token's logprob and the top N.")
    echo: bool = Field(False, description="Return the prompt before the completion (with its logprobs).")
    suffix: str | None = Field(None, description="Accepted, not applied.")
    best_of: int | None = Field(None, description="Accepted, not applied.")

    @model_validator(mode="after")
    def _prompt_not_empty(self):
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is an empty list; send a string or token ids")
        return self


class ContentPart(BaseModel):
    model_config = Strict
    type: Literal["text"] = Field(..., description="Only text parts are supported.")
    text: str = Field(..., description="The text.")


class ChatMessage(BaseModel):
    model_config = Strict
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(..., description="Author role.")
    content: str | list[ContentPart] | None = Field(None, description="Message text (or text parts).")
    name: str | None = Field(None, description="Optional author name.")
    tool_call_id: str | None = Field(None, description="Accepted, not applied.")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(None, ge=1, description="Deprecated by OpenAI; tokens to generate.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Tokens to generate per choice.")
    logprobs: bool = Field(False, description="Return logprobs of the generated tokens.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Most likely alternatives per token.")
    add_generation_prompt: bool = Field(True, description="End the prompt with the assistant's turn.")
    response_format: dict[str, Any] | None = Field(None, description="Accepted, not applied.")
    tools: list[dict[str, Any]] | None = Field(None, description="Accepted, not applied.")
    tool_choice: Any = Field(None, description="Accepted, not applied.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted, not applied.")

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self


class Usage(BaseModel):
    model_config = Strict
    prompt_tokens: int = Field(..., description="Tokens in the prompt(s).")
    completion_tokens: int = Field(..., description="Tokens generated.")
    total_tokens: int = Field(..., description="Sum of both.")


class CompletionLogprobs(BaseModel):
    model_config = Strict
    tokens: list[str] = Field(..., description="Token strings.")
    token_logprobs: list[float | None] = Field(..., description="Logprob of each token (first prompt token null).")
    top_logprobs: list[dict[str, float] | None] = Field(..., description="Top alternatives per token.")
    text_offset: list[int] = Field(..., description="Character offset of each token in the text.")


class CompletionChoice(BaseModel):
    model_config = Strict
    index: int = Field(..., description="Choice index.")
    text: str = Field(..., description="Generated (or echoed + generated) text.")
    logprobs: CompletionLogprobs | None = Field(None, description="Token logprobs when asked for.")
    finish_reason: Literal["stop", "length", "abort", "error"] | None = Field(
        None, description="stop: end token or stop string; length: max_tokens or context.")


class CompletionResponse(BaseModel):
    model_config = Strict
    id: str = Field(..., description="Response id.")
    object: Literal["text_completion"] = Field("text_completion", description="Object type.")
    created: int = Field(..., description="Unix time.")
    model: str = Field(..., description="Model name.")
    choices: list[CompletionChoice] = Field(..., description="One per prompt and n.")
    usage: Usage | None = Field(None, description="Token counts.")
    system_fingerprint: str | None = Field(None, description="Model version served.")


class TopLogprob(BaseModel):
    model_config = Strict
    token: str = Field(..., description="Token string.")
    logprob: float = Field(..., description="Log-probability.")
    bytes: list[int] | None = Field(None, description="UTF-8 bytes of the token.")


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list, description="Most likely alternatives.")


class ChatLogprobs(BaseModel):
    model_config = Strict
    content: list[ChatTokenLogprob] | None = Field(None, description="One entry per generated token.")


class ChatResponseMessage(BaseModel):
    model_config = Strict
    role: Literal["assistant"] = Field("assistant", description="Always assistant.")
    content: str | None = Field(None, description="Generated text.")


class ChatChoice(BaseModel):
    model_config = Strict
    index: int = Field(..., description="Choice index.")
    message: ChatResponseMessage = Field(..., description="The reply.")
    logprobs: ChatLogprobs | None = Field(None, description="Token logprobs when asked for.")
    finish_reason: Literal["stop", "length", "abort", "error"] | None = Field(None, description="Why it ended.")


class ChatCompletionResponse(BaseModel):
    model_config = Strict
    id: str = Field(..., description="Response id.")
    object: Literal["chat.completion"] = Field("chat.completion", description="Object type.")
    created: int = Field(..., description="Unix time.")
    model: str = Field(..., description="Model name.")
    choices: list[ChatChoice] = Field(..., description="One per n.")
    usage: Usage | None = Field(None, description="Token counts.")
    system_fingerprint: str | None = Field(None, description="Model version served.")


class ChatDelta(BaseModel):
    model_config = Strict
    role: Literal["assistant"] | None = Field(None, description="On the first chunk of a choice.")
    content: str | None = Field(None, description="New text.")


class ChatChunkChoice(BaseModel):
    model_config = Strict
    index: int = Field(..., description="Choice index.")
    delta: ChatDelta = Field(..., description="What is new in this chunk.")
    logprobs: ChatLogprobs | None = Field(None, description="Logprobs of this chunk's tokens.")
    finish_reason: str | None = Field(None, description="Set on the choice's last content chunk.")


class ChatCompletionChunk(BaseModel):
    model_config = Strict
    id: str = Field(..., description="Same id on every chunk of a response.")
    object: Literal["chat.completion.chunk"] = Field("chat.completion.chunk", description="Object type.")
    created: int = Field(..., description="Unix time.")
    model: str = Field(..., description="Model name.")
    choices: list[ChatChunkChoice] = Field(..., description="Empty on the usage chunk.")
    usage: Usage | None = Field(None, description="Only on the final usage chunk.")


class CompletionChunk(BaseModel):
    model_config = Strict
    id: str = Field(..., description="Same id on every chunk of a response.")
    object: Literal["text_completion"] = Field("text_completion", description="Object type.")
    created: int = Field(..., description="Unix time.")
    model: str = Field(..., description="Model name.")
    choices: list[CompletionChoice] = Field(..., description="Empty on the usage chunk.")
    usage: Usage | None = Field(None, description="Only on the final usage chunk.")


class ModelCard(BaseModel):
    model_config = Strict
    id: str = Field(..., description="Model name to put in requests.")
    object: Literal["model"] = Field("model", description="Object type.")
    created: int = Field(..., description="Unix time the server loaded it.")
    owned_by: str = Field("aidc", description="Owner.")
    root: str = Field(..., description="Registry reference served (name/version).")
    max_model_len: int = Field(..., description="Context length in tokens.")


class ModelList(BaseModel):
    model_config = Strict
    object: Literal["list"] = Field("list", description="Object type.")
    data: list[ModelCard] = Field(..., description="Served models.")


_DEFAULT_MODEL = "Registered model name; may be left out when the app serves one model (as vLLM's server)."


class TokenizeRequest(BaseModel):
    model_config = Strict
    model: str | None = Field(None, description=_DEFAULT_MODEL)
    prompt: str | None = Field(None, description="Text to tokenize; special tokens written in it (<eos>) are those "
                               "tokens.")
    messages: list[ChatMessage] | None = Field(None, description="Chat to render with the template and tokenize.")
    add_generation_prompt: bool = Field(True, description="With messages: end with the assistant's turn.")
    add_special_tokens: bool = Field(False, description="Accepted for vLLM's API: aidc's tokenizers add no "
                                     "special tokens of their own (no BOS), so both values give the same ids.")

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt or messages")
        return self


class TokenizeResponse(BaseModel):
    model_config = Strict
    tokens: list[int] = Field(..., description="Token ids.")
    count: int = Field(..., description="Number of tokens.")
    max_model_len: int = Field(..., description="Context length in tokens.")


class DetokenizeRequest(BaseModel):
    model_config = Strict
    model: str | None = Field(None, description=_DEFAULT_MODEL)
    tokens: list[int] = Field(..., description="Token ids to turn back into text.")


class DetokenizeResponse(BaseModel):
    model_config = Strict
    prompt: str = Field(..., description="The text.")


class TokenizerInfo(BaseModel):
    """GET /tokenizer_info, as vLLM's server answers it: what a client-side tokenizer stand-in needs
    (lm-evaluation-harness's `tokenizer_backend=remote` reads the special tokens and the chat template)."""

    model_config = Strict
    model: str = Field(..., description="The model whose tokenizer this is.")
    tokenizer_class: str = Field(..., description="Hugging Face class that loads the exported tokenizer.")
    bos_token: str | None = Field(None, description="Text of the beginning-of-sequence token.")
    eos_token: str | None = Field(None, description="Text of the end-of-sequence token.")
    pad_token: str | None = Field(None, description="Text of the padding token.")
    unk_token: str | None = Field(None, description="Text of the unknown token.")
    chat_template: str | None = Field(None, description="Jinja chat template, when the model has one.")
    model_max_length: int = Field(..., description="Context length in tokens.")
    clean_up_tokenization_spaces: bool = Field(..., description="Whether decoding tidies spaces (Hugging Face).")
    vocab_size: int = Field(..., description="Vocabulary size.")


class Health(BaseModel):
    model_config = Strict
    status: Literal["ok"] = Field("ok", description="Ready when every model is loaded.")
    models: dict[str, dict[str, Any]] = Field(..., description="Per model: version and engine state.")
