"""The contract every workload implements; the pipeline, train loop and server only call these."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


class Task:
    """A workload: how to fit its transforms, feed its model, score it and answer requests."""

    name: str = ""
    feature_column: str = ""
    primary_metric: str = "val_loss"  # lower is better; used to keep the best checkpoints

    # -- preprocessing --------------------------------------------------------------
    def fit(self, train_ds) -> dict:
        """Fitted transform state from the training split only (stored in the manifest)."""
        raise NotImplementedError

    def features(self, raw: Any) -> dict:
        """Static facts about the features (shapes, classes, raw value range) for the manifest."""
        raise NotImplementedError

    # -- training ---------------------------------------------------------------------
    def transform_batch(self, batch: dict, state: dict) -> dict:
        """Raw numpy batch -> model-ready {'x': ..., 'y': ...}; the same function serves requests."""
        raise NotImplementedError

    def build_model(self, model_cfg: dict, features: dict) -> nn.Module:
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def eval_sums(self, outputs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Additive statistics of a batch (summed across batches and workers)."""
        raise NotImplementedError

    def metrics_from_sums(self, sums: dict[str, float], prefix: str) -> dict[str, float]:
        raise NotImplementedError

    # -- serving ----------------------------------------------------------------------
    def parse_instances(self, instances: Any, features: dict, max_batch: int) -> np.ndarray:
        """Validate a request's instances; raise RequestError naming the problem."""
        raise NotImplementedError

    def predict(self, model: nn.Module, x: torch.Tensor) -> list[dict]:
        raise NotImplementedError
