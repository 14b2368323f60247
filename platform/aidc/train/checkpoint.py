"""Checkpoint state: model, optimizer, scheduler, epoch/step, RNG state, history, the best model so far
and the resolved config."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from aidc.train.telemetry import observe_checkpoint_save

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(directory: str | Path, state: dict, config: dict) -> None:
    start, directory = time.perf_counter(), Path(directory)
    torch.save({**state, "rng": rng_state()}, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    observe_checkpoint_save(config.get("name", ""), time.perf_counter() - start)  # aidc.train.telemetry


# FSDP runs on several workers: each rank writes its own shards of the model, optimizer and best-model state
# with torch.distributed.checkpoint (DCP) into this folder of the checkpoint (Ray Train merges every rank's
# files into one checkpoint); rank 0 writes the rest (state.pt, without weights). Nothing is gathered; a
# resume loads the shards onto whatever world size it has (DCP reshards).
SHARDS = "shards"


def _sharded_opts(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    from aidc.models.state import has_frozen

    frozen = has_frozen(model)
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


def sharded_model_state(model) -> dict:
    """This rank's shards of the (trained) model state, detached copies: a snapshot that training does not move."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {k: v.detach().clone() for k, v in get_model_state_dict(model, options=_sharded_opts(model)).items()}


def set_sharded_model(model, shards: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, shards, options=_sharded_opts(model))


def save_sharded(directory: str | Path, model, optimizer, best_model: dict | None, state: dict, config: dict,
                 rank: int) -> None:
    """Every rank: its shards (model, optimizer, best model) with DCP; rank 0 also the state without weights."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    start, directory = time.perf_counter(), Path(directory)
    opts = _sharded_opts(model)
    payload = {"model": get_model_state_dict(model, options=opts),
               "optimizer": get_optimizer_state_dict(model, optimizer, options=opts),
               **({"best": best_model} if best_model is not None else {})}
    dcp.save(payload, checkpoint_id=str(directory / SHARDS))
    if rank == 0:
        torch.save({**state, "sharded": True, "rng": rng_state()}, directory / STATE_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    observe_checkpoint_save(config.get("name", ""), time.perf_counter() - start)  # aidc.train.telemetry


def load_sharded(directory: str | Path, model, optimizer, with_best: bool) -> dict | None:
    """Load the shards of a sharded checkpoint into `model` and `optimizer` (any world size); returns this rank's
    shards of the best model (or None)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    opts = _sharded_opts(model)
    _init_optimizer_state(optimizer)  # DCP loads into the state it is given: a fresh optimizer has none yet
    payload = {"model": sharded_model_state(model), "optimizer": get_optimizer_state_dict(model, optimizer, options=opts)}
    if with_best:
        payload["best"] = sharded_model_state(model)
    dcp.load(payload, checkpoint_id=str(Path(directory) / SHARDS))
    set_sharded_model(model, payload["model"])
    set_optimizer_state_dict(model, optimizer, payload["optimizer"], options=opts)
    return payload.get("best")


def _init_optimizer_state(optimizer) -> None:
    """Create the optimizer's per-parameter state (as torchtitan does): one step of zero gradients at lr 0."""
    if optimizer.state:
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr


def load(directory: str | Path) -> dict:
    # weights_only=False: our own checkpoints hold numpy RNG state; never load untrusted files here.
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)


# Ray Train's local mode (num_workers: 0) keeps only a reference to the last reported checkpoint, whose
# temporary folder is gone by the end of the run, and persists nothing to resume from: such runs keep
# their checkpoints themselves, in numbered folders under the run's storage.
def numbered(root: str | Path) -> list[Path]:
    root = Path(root)
    found = [p for p in root.glob("checkpoint_*") if (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def next_numbered(root: str | Path) -> Path:
    existing = numbered(root)
    path = Path(root) / f"checkpoint_{int(existing[-1].name.split('_')[1]) + 1 if existing else 0:06d}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def prune_numbered(root: str | Path, keep: int) -> None:
    import shutil

    for old in numbered(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
