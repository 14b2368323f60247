"""OpenAI-compatible language-model serving on vLLM through Ray Serve LLM (Serve application `llm`, route
prefix /, its API under /v1).

GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /v1/tokenize, POST /v1/detokenize,
GET /v1/health; the OpenAPI document at /v1/openapi.json. At the root, as vLLM's server has them (where
lm-evaluation-harness's `tokenizer_backend=remote` looks): POST /tokenize, POST /detokenize,
GET /tokenizer_info - `model` optional where the app serves one model. A thin shell: the deployments, the
ingress and what aidc adds to Ray Serve LLM live in aidc.serving.llm.app.
Serve config: serve_apps/config.yaml (import_path: serve_apps.llm:app_builder).
"""

from __future__ import annotations

from pydantic import ValidationError

from aidc.errors import AidcError
from aidc.security.audit import record_quietly
from aidc.serving.llm.app import LLMArgs, build_app


def app_builder(args: dict):
    try:
        parsed = LLMArgs.model_validate(args)  # fail at deploy time, with the field named
    except ValidationError as exc:
        raise AidcError(f"bad args for the llm app: {exc}") from None
    record_quietly("serve.deploy", target="llm", details={"args": args})  # audit log
    return build_app(parsed)
