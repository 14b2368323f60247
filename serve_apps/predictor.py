"""Any registered aidc model over HTTP: POST {"instances": [...]} -> one prediction per instance.

Images and texts get a class with probabilities, user/item pairs a rating, prompts a continuation.
Serve config: serve_apps/config.yaml (import_path: serve_apps.predictor:app_builder).
No `from __future__ import annotations` here: FastAPI must see real types on Serve ingress methods.
"""


import asyncio
import logging
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field
from ray import serve

from aidc.config import PII_TYPES
from aidc.errors import ConfigError, RequestError
from aidc.serving import error_body, load_model, parse_json_body
from aidc.security.audit import record_quietly
from aidc.serving.protect import ApiKeyAuth, protect
from aidc.serving.http import AppArgs, require
from aidc.ops.serving import RequestMetrics, tag_request

logger = logging.getLogger(__name__)
api = FastAPI(title="aidc predictor", description="Predictions from a model in the aidc registry")
protect(api, "predictor")  # API keys: infer:<model> on /predict and /metadata; /healthz open
api.add_middleware(RequestMetrics)  # requests, codes, latency (aidc.ops.serving); outermost: counts 401s too


class PredictorArgs(AppArgs):
    """Application arguments (the `args:` block of the Serve config)."""

    model: str = Field(..., description="Registered model: name@alias or name/version.")
    max_batch_size: int = Field(256, ge=1, description="Most instances in one request (413 above).")
    max_body_bytes: int = Field(4_000_000, ge=1024, description="Largest request body (413 above).")
    scrub: list[Literal[PII_TYPES]] = Field(
        [], description="Text models: personal data replaced by placeholders in each instance before the model "
        "sees it, as data.privacy.scrub did to its training data (name the same types).")


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class Predictor:
    def __init__(self, args: dict):
        self.args = PredictorArgs.model_validate(args)
        self.loaded = load_model(self.args.model, self.args.tracking_uri)
        ApiKeyAuth.configure("predictor", self.args.auth, model=self.loaded.name)
        self.scrubber = None
        if self.args.scrub:
            if not self.loaded.task.text_columns:
                raise ConfigError(f"scrub works on text models; {self.loaded.name} is {self.loaded.task.name}: "
                                  f"remove scrub from the app's args")
            from aidc.data.privacy import Scrubber

            self.scrubber = Scrubber(self.args.scrub)

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        tag_request(self.loaded.name, self.loaded.version)  # request metrics by model/version (aidc.ops.serving)
        try:
            body = parse_json_body(await request.body(), self.args.max_body_bytes)
            instances = require(body, "instances", allowed={"instances"})
            x = self.loaded.task.parse_instances(instances, self.loaded.spec["features"], self.args.max_batch_size)
            if self.scrubber is not None:  # CPU work: off the event loop, which serves the other requests
                x = await asyncio.to_thread(self.scrubber.texts, x)
        except RequestError as exc:
            return JSONResponse(error_body(exc.message, exc.status, exc.field), status_code=exc.status)
        return JSONResponse({"model": {"name": self.loaded.name, "version": self.loaded.version},
                             "predictions": self.loaded.predict(x)})

    @api.get("/metadata")
    def metadata(self) -> dict:
        return self.loaded.metadata()

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "model": f"{self.loaded.name}/{self.loaded.version}"}


def app_builder(args: dict):
    PredictorArgs.model_validate(args)  # fail at deploy time, with the field named
    record_quietly("serve.deploy", target="predictor", details={"args": args})  # audit log
    return Predictor.bind(args)
