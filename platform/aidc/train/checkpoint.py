"""Checkpoint state: model, optimizer, scheduler, epoch/step, RNG state, history, the best model so far
and the resolved config."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from aidc.ops.training import observe_checkpoint_save

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
    observe_checkpoint_save(config.get("name", ""), time.perf_counter() - start)  # aidc.ops.training


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
