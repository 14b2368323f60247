"""The OIP data plane behind REST and gRPC: route a model name (+ version) to a served version, validate
the decoded tensors against that version's signature, run it, filter the outputs.

Handles are duck-typed (`describe.remote()`, `infer.remote(arrays)`, as Ray Serve deployment handles
have), so the plane is tested without Serve; the transports only convert bodies to and from arrays.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field

import numpy as np

from aidc.errors import RequestError
from aidc.ops.serving import tag_request
from aidc.serving.oip.protocol import select_outputs, validate_inputs
from aidc.tasks import get_task

logger = logging.getLogger(__name__)
SERVER_NAME, SERVER_VERSION = "aidc", "0.1.0"
EXTENSIONS = ["binary_tensor_data", "model_versions", "canary"]


@dataclass
class ModelRoute:
    """How one registered model name is served: the alias's version, pinned extras and a canary."""

    name: str
    default: str  # the version the configured alias points at
    handles: dict[str, object]  # version -> handle of the deployment serving it
    canary: str | None = None
    canary_percent: float = 0.0
    multiplexed: bool = False  # served from the shared multiplexed deployment (no top-K)

    def pick(self, version: str | None, rng: random.Random) -> str:
        if version is not None:
            if version not in self.handles:
                raise RequestError(f"version {version!r} of model {self.name!r} is not served; served versions: "
                                   f"{sorted(self.handles, key=int)}", status=404, field="version")
            return version
        if self.canary and rng.random() * 100 < self.canary_percent:
            return self.canary
        return self.default


@dataclass
class InferResult:
    model: str
    version: str
    outputs: dict[str, np.ndarray]
    datatypes: dict[str, str]


@dataclass
class DataPlane:
    routes: dict[str, ModelRoute]
    seed: int | None = None
    _info: dict[tuple[str, str], dict] = field(default_factory=dict)
    _rng: random.Random = field(init=False)

    def __post_init__(self):
        self._rng = random.Random(self.seed)

    def route(self, name: str) -> ModelRoute:
        try:
            return self.routes[name]
        except KeyError:
            raise RequestError(f"model {name!r} is not served here; models: {sorted(self.routes)}", status=404,
                               field="model") from None

    async def describe(self, name: str, version: str | None = None, timeout_s: float | None = None) -> dict:
        """name, version, task, features and signature of a served version (cached after the first call)."""
        route = self.route(name)
        version = route.default if version is None else route.pick(version, self._rng)
        key = (name, version)
        if key not in self._info:
            call = route.handles[version].describe.remote()
            self._info[key] = await (asyncio.wait_for(call, timeout_s) if timeout_s else call)
        return self._info[key]

    async def metadata(self, name: str, version: str | None = None) -> dict:
        info = await self.describe(name, version)
        route = self.route(name)
        versions = [version] if version else sorted(route.handles, key=int)
        return {"name": name, "versions": versions, "platform": f"pytorch_{info['task']}",
                "inputs": info["signature"]["inputs"], "outputs": info["signature"]["outputs"]}

    async def ready(self, name: str | None = None, version: str | None = None, timeout_s: float = 5.0) -> bool:
        """True once every targeted version's replica has loaded and verified its model (multiplexed models
        load on demand: their deployment answering is enough, so a probe never churns its LRU cache)."""
        targets = [(name, v) for v in ([version] if version else self.route(name).handles)] if name else \
            [(n, v) for n, r in self.routes.items() for v in r.handles]

        async def check(n: str, v: str):
            route = self.route(n)
            if route.multiplexed and (n, v) not in self._info:
                return await asyncio.wait_for(route.handles[route.pick(v, self._rng)].ready.remote(), timeout_s)
            return await self.describe(n, v, timeout_s)

        try:
            await asyncio.gather(*(check(n, v) for n, v in targets))
            return True
        except RequestError:
            raise
        except Exception as exc:  # not loaded yet (or scaling up from zero): not ready
            logger.info("not ready: %s", exc)
            return False

    async def infer(self, name: str, version: str | None, arrays: dict[str, np.ndarray],
                    sent_datatypes: dict[str, str], requested: list[str] | None,
                    parameters: dict | None = None) -> InferResult:
        route = self.route(name)
        chosen = route.pick(version, self._rng)
        tag_request(name, chosen)  # request metrics by model/version, REST and gRPC (aidc.ops.serving)
        info = await self.describe(name, chosen)
        sig = info["signature"]
        inputs = validate_inputs(arrays, sent_datatypes, sig, name)
        task, args = get_task(info["task"]), (inputs, info["features"], parameters or {})
        checked = await asyncio.to_thread(task.check_tensor_inputs, *args) if task.check_in_thread \
            else task.check_tensor_inputs(*args)
        inputs = inputs if checked is None else checked  # a task may hand its replica a canonical form
        wanted = select_outputs(requested, sig, name)
        try:
            outputs = await route.handles[chosen].infer.remote(inputs)
        except Exception as exc:
            if type(exc).__name__ == "BackPressureError":  # ray.serve.exceptions; the queue is full
                raise RequestError(f"model {name!r} version {chosen} is at capacity; retry after 1 s",
                                   status=503) from None
            raise
        types = {t["name"]: t["datatype"] for t in sig["outputs"]}
        return InferResult(name, chosen, {k: outputs[k] for k in wanted}, {k: types[k] for k in wanted})


def run_batch(model, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Dynamic batching: concatenate requests along the batch axis, run once, split the outputs back."""
    sizes = [len(next(iter(r.values()))) for r in requests]
    merged = {k: np.concatenate([r[k] for r in requests]) for k in requests[0]} if len(requests) > 1 \
        else requests[0]
    outputs = model.infer_tensors(merged)
    bounds = np.cumsum(sizes)[:-1]
    parts = {k: np.split(v, bounds) for k, v in outputs.items()}
    return [{k: parts[k][i] for k in outputs} for i in range(len(requests))]


__all__ = ["DataPlane", "InferResult", "ModelRoute", "run_batch", "SERVER_NAME", "SERVER_VERSION", "EXTENSIONS"]
