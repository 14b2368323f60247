"""Serving, in two wings over one HTTP layer:

llm/        language models: OpenAI-compatible, vLLM through Ray Serve LLM (app `llm`)
oip/        tensor models: the Open Inference Protocol v2 over REST and gRPC (app `tensors`)
oip_grpc/   the OIP gRPC stubs and tensor codecs
http.py     what both share: app-args base, body limits, JSON decoding, error bodies per protocol, Retry-After
protect.py  API keys on every app (aidc.security.auth underneath)
retry.py    the client retry policy the platform recommends
The JSON `predictor` app (serve_apps/predictor.py) uses http.py and the loaded model (aidc.tasks.loaded).
"""

from aidc.tasks.loaded import LoadedModel, load_model
from aidc.serving.http import error_body, parse_json_body

__all__ = ["LoadedModel", "error_body", "load_model", "parse_json_body"]
