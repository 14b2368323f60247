"""Compress a registered model into a new, signed version of the same model (python -m jobs.compress).

int8:    quantize the linear layers (aidc.models.quantize), score it on the test split, register.
prune:   zero the smallest-magnitude `sparsity` of linear/conv weights (torch.nn.utils.prune, global L1),
         fine-tune through the normal train loop with the mask held, register.
distill: train this config's (smaller) model through the normal train loop on the source model's soft
         targets, register.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from pathlib import Path

import aidc.tasks  # noqa: F401 - registers the workloads (configs are validated here)
from aidc import storage
from aidc.errors import ConfigError

logger = logging.getLogger(__name__)


def source_ref(cfg) -> str:
    return cfg.compress.source or f"{cfg.registry.model_name}@{cfg.registry.alias}"


def _source(cfg, uri: str):
    """(LoadedModel on the CPU, its verified folder) of the version to compress; the folder goes on exit."""
    from aidc.tasks.loaded import loaded_on_cpu

    return loaded_on_cpu(source_ref(cfg), uri)  # signature + manifest checks


def _job_for(cfg, spec: dict, model: dict | None):
    """The job config to fine-tune/distill with: the source's dataset version (and model, for pruning)."""
    from aidc.config import JobConfig, validate

    raw = cfg.model_dump(mode="json")
    if model is not None:
        raw["model"] = model
    if spec.get("dataset"):
        raw["data"]["version"] = spec["dataset"].partition("@")[2] or None
    return validate(raw, JobConfig, "compress job")


def prune_masks(model, sparsity: float) -> tuple[dict, dict]:
    """(pruned state dict, {weight name: 0/1 mask}) by global L1 magnitude over linear and conv weights."""
    from torch import nn
    from torch.nn.utils import prune

    from aidc.models.quantize import tied_linear

    model = copy.deepcopy(model).cpu()
    tied = tied_linear(model)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n not in tied]
    prune.global_unstructured([(m, "weight") for _, m in targets], pruning_method=prune.L1Unstructured,
                              amount=sparsity)
    masks = {f"{n}.weight": m.weight_mask.detach().clone() for n, m in targets}
    for _, m in targets:
        prune.remove(m, "weight")  # bake the zeros into .weight; the loop re-applies the masks after each step
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, masks


def _int8(cfg, loaded, config_yaml: str, uri: str, root: str, alias: str):
    from aidc.compress.compare import test_metrics, test_rows
    from aidc.models.quantize import quantize
    from aidc.registry import export_model_dir, register_model_dir

    quantized, state, qspec = quantize(loaded.model)
    scored = copy.copy(loaded)
    scored.model = quantized
    metrics = test_metrics(scored, test_rows(loaded.spec, root)) if loaded.spec.get("dataset") else {}
    source = f"{loaded.name}/{loaded.version}"
    spec = {**loaded.spec, "quantization": qspec, "metrics": metrics,
            "compression": {"method": "int8", "source": source, "source_metrics": loaded.spec.get("metrics", {})}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp, "model")
        export_model_dir(model_dir, state_dict=state, spec=spec, config_yaml=config_yaml)
        return register_model_dir(model_dir, loaded.name, alias, uri=uri, root=root, experiment=cfg.run.experiment,
                                  run_name=f"int8-{loaded.name}-{loaded.version}", description=f"aidc {spec['task']} model",
                                  tags={"compression": "int8", "source_version": source,
                                        **{k: f"{v:.6g}" for k, v in metrics.items()}})


def compress(cfg):
    """Make and register the compressed version; returns the RegisteredVersion."""
    from safetensors.torch import load_file

    from aidc.registry import COMPRESSED_ALIAS, CONFIG, SPEC, WEIGHTS, tracking_uri
    from aidc.train.register import register
    from aidc.train.trainer import run_training

    c = cfg.compress
    if c is None:
        raise ConfigError("this config has no compress section; add e.g. compress: {method: int8}")
    root = storage.storage_root(cfg.run.storage)
    uri = tracking_uri(cfg.run.tracking_uri, root)
    with _source(cfg, uri) as (loaded, directory):  # what compression reads of the files, read before they go
        config_yaml = (directory / CONFIG).read_text()
        teacher = ({"spec": json.loads((directory / SPEC).read_text()), "state": load_file(str(directory / WEIGHTS))}
                   if c.method == "distill" else None)
    alias = c.alias or COMPRESSED_ALIAS[c.method]
    if cfg.registry.model_name != loaded.name:
        cfg = cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"model_name": loaded.name})})
    if c.method == "int8":
        return _int8(cfg, loaded, config_yaml, uri, root, alias)
    if loaded.spec.get("quantization"):
        raise ConfigError(f"{source_ref(cfg)} is an int8 version; {c.method} starts from a float version "
                          "(set compress.source to it)")
    if cfg.train.parallelism == "fsdp":
        raise ConfigError("compress runs with train.parallelism: ddp (masks and teachers are per-parameter)")
    if cfg.train.privacy is not None:
        raise ConfigError(f"train.privacy (DP-SGD) does not retrain for compress.method {c.method}: its starting "
                          "model or teacher spent privacy this run would not account for. int8 of a private model "
                          "stays private (compress.method: int8), or drop train.privacy")
    source = f"{loaded.name}/{loaded.version}"
    info = {"method": c.method, "source": source, "source_metrics": loaded.spec.get("metrics", {})}
    if c.method == "prune":
        state, masks = prune_masks(loaded.model, c.sparsity)
        job = _job_for(cfg, loaded.spec, loaded.spec["model"])
        extras = {"init_state": state, "masks": masks}
        info["sparsity"] = c.sparsity
    else:
        job = _job_for(cfg, loaded.spec, None)
        extras = {"teacher": {"model": loaded.spec["model"], "features": loaded.spec["features"], **teacher},
                  "temperature": c.temperature, "alpha": c.alpha}
        info.update(temperature=c.temperature, alpha=c.alpha,
                    teacher_parameters=sum(p.numel() for p in loaded.model.parameters()))
    extras.setdefault("temperature", c.temperature)
    extras.setdefault("alpha", c.alpha)
    outcome = run_training(job, loop_extras={"compress": extras})
    return register(job, outcome, alias=alias, spec_extra={"compression": info},
                    tags={"compression": c.method, "source_version": source})
