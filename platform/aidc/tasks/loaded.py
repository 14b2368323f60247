"""Load a registered model for inference: verified files -> aidc.models -> eval mode on the best device."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aidc.ops.metrics import model_load
from aidc.models.quantize import load_weights
from aidc.registry import SPEC, WEIGHTS, fetched, tracking_uri
from aidc.runtime import torch_device
from aidc.tasks import Task, get_task

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str
    version: str
    task: Task
    spec: dict
    model: torch.nn.Module
    device: torch.device

    @classmethod
    def from_dir(cls, directory: Path, name: str = "local", version: str = "0") -> "LoadedModel":
        from safetensors.torch import load_file

        spec = json.loads((directory / SPEC).read_text())
        if spec.get("format") == "huggingface":
            from aidc.errors import RegistryError

            raise RegistryError(f"{name}/{version} is a Hugging Face {spec['model'].get('model_type')} folder "
                                "as it was imported: serve it with the llm app (vLLM); the predictor and tensors "
                                "apps, export and compression take aidc models")
        task = get_task(spec["task"])
        model = task.build_model(spec["model"], spec["features"])
        device = torch_device()  # a replica/actor without a GPU of its own stays on CPU on a GPU node
        model = load_weights(model, load_file(str(directory / WEIGHTS)), spec, device)  # int8: aidc.models.quantize
        model.to(device).eval()
        return cls(name, version, task, spec, model, device)

    def predict(self, raw) -> list[dict]:
        """Raw inputs (as a client sends them) -> predictions, through the training-time transform."""
        if hasattr(self.task, "generate"):  # language models answer prompts with text
            return [{"text": t} for t in self.task.generate(self.model, list(raw), self.spec["transform"])]
        batch = raw if isinstance(raw, dict) else {self.task.input_column: raw}
        batch = self.task.transform_batch(batch, self.spec["transform"])
        tensors = {k: torch.from_numpy(np.asarray(v)).to(self.device) for k, v in batch.items()}
        with torch.inference_mode():
            return self.task.predict(self.model, tensors)

    def tensor_signature(self) -> dict:
        """Open Inference Protocol inputs/outputs (name, datatype, shape) of this model's task."""
        return self.task.tensor_signature(self.spec["features"])

    def infer_tensors(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Named raw input arrays -> named output arrays, through the training-time transform."""
        batch = self.task.transform_batch(inputs, self.spec["transform"])
        tensors = {k: torch.from_numpy(np.asarray(v)).to(self.device) for k, v in batch.items()}
        with torch.inference_mode():
            return self.task.infer_tensors(self.model, tensors, self.spec["transform"])

    def metadata(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "task": self.spec["task"],
            "dataset": self.spec.get("dataset"),
            "features": self.spec["features"],
            "metrics": self.spec.get("metrics", {}),
            "device": str(self.device),
        }


def load_model(ref: str, uri: str | None = None) -> LoadedModel:
    """Load `name@alias` (or `name/version`) from the registry, verifying every file's sha256."""
    uri = tracking_uri(uri)
    with model_load(ref), fetched(ref, uri) as (mv, directory):  # counts loads and integrity failures (ops.metrics)
        loaded = LoadedModel.from_dir(directory, mv.name, str(mv.version))  # all in memory: the files can go
    logger.info("loaded %s version %s on %s", mv.name, mv.version, loaded.device)
    return loaded


@contextlib.contextmanager
def loaded_on_cpu(ref: str, uri: str):
    """(LoadedModel, its folder): a registered version through the registry (signature + manifest checks), on the
    CPU (compression, its figures and exports read both); the downloaded folder is removed on exit."""
    with fetched(ref, uri) as (mv, directory):
        loaded = LoadedModel.from_dir(directory, mv.name, str(mv.version))
        if loaded.device.type != "cpu":
            loaded.model.cpu()
            loaded.device = torch.device("cpu")
        yield loaded, directory
