"""Recommendation (MovieLens): user/item index maps fitted on train (0 = unseen) -> matrix factorization."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field
import torch
from torch import nn
from torch.nn import functional as F

from aidc.config import ModelSchema
from aidc.data.transforms import apply_index_map, fit_index_map
from aidc.errors import RequestError
from aidc.models import MODELS
from aidc.tasks.base import Table, Task, jsonable, row_hashes, tensor_spec
from aidc.tasks.image import check_batch


class MFConfig(ModelSchema):
    arch: Literal["mf"] = Field(..., description="Matrix factorization with user/item biases.")
    dim: int = Field(32, ge=1, description="Embedding width of users and items.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the embeddings.")


class Recommendation(Task):
    name = "recommendation"
    model_schemas = (MFConfig,)
    input_column = "pairs"
    quality_metric = "test_rmse"
    onnx_export = True
    batch_outputs = (("rating", pa.float32()),)

    def validate(self, table: Table, cfg, meta: dict) -> np.ndarray:
        lo, hi = meta["rating_range"]
        r = table["rating"].astype(np.float64)
        reason = np.full(len(r), "", dtype=object)
        reason[(r < lo) | (r > hi)] = f"rating outside {lo:g}..{hi:g}"
        reason[~np.isfinite(r)] = "rating is missing or not a number"
        reason[(table["user"] < 0) | (table["item"] < 0)] = "negative user or item id"
        return reason

    def content_key(self, table: Table) -> np.ndarray:
        return row_hashes(table["user"], table["item"])  # one rating per (user, item)

    def fit(self, train: Table, cfg, meta: dict) -> dict:
        return {"users": fit_index_map(train["user"]), "items": fit_index_map(train["item"]),
                "global_mean": float(np.mean(train["rating"])), "rating_range": list(meta["rating_range"])}

    def encode_batch(self, batch: dict, state: dict) -> dict:
        return {"id": batch["id"], "user": batch["user"], "item": batch["item"],
                "user_idx": apply_index_map(batch["user"], state["users"]),
                "item_idx": apply_index_map(batch["item"], state["items"]),
                "rating": np.asarray(batch["rating"], dtype=np.float32)}

    describe_columns = ["user_idx", "item_idx"]

    def describe_split(self, encoded: dict) -> dict:
        return {"unseen_users": int((encoded["user_idx"] == 0).sum()),
                "unseen_items": int((encoded["item_idx"] == 0).sum())}

    def features(self, meta: dict, state: dict) -> dict:
        return {"num_users": len(state["users"]), "num_items": len(state["items"]),
                "global_mean": state["global_mean"], "rating_range": state["rating_range"]}

    def transform_batch(self, batch: dict, state: dict, training: bool = False) -> dict:
        if "user_idx" not in batch:  # raw ids (serving)
            batch = {**batch, "user_idx": apply_index_map(batch["user"], state["users"]),
                     "item_idx": apply_index_map(batch["item"], state["items"])}
        out = {"user": np.asarray(batch["user_idx"], np.int64), "item": np.asarray(batch["item_idx"], np.int64)}
        if "rating" in batch:
            out["y"] = np.asarray(batch["rating"], dtype=np.float32)
        return out

    def build_model(self, model_cfg: dict, features: dict) -> nn.Module:
        cfg = {k: v for k, v in model_cfg.items() if k != "arch"}
        return MODELS["mf"](features["num_users"], features["num_items"], global_mean=features["global_mean"], **cfg)

    def forward(self, model, batch):
        return model(batch["user"], batch["item"])

    def loss(self, outputs, batch):
        return F.mse_loss(outputs, batch["y"])

    def eval_sums(self, outputs, batch):
        lo, hi = 0.5, 5.0
        pred = outputs.float().clamp(lo, hi)
        return {"se_sum": float(((pred - batch["y"]) ** 2).sum()), "count": float(len(batch["y"]))}

    def metrics_from_sums(self, sums, prefix):
        mse = sums["se_sum"] / max(sums["count"], 1.0)
        return {f"{prefix}_loss": mse, f"{prefix}_rmse": mse**0.5}

    def planning_features(self, cfg) -> dict | None:
        if cfg.data.source == "movielens":  # ml-latest-small: 610 users, 9,742 movies
            return {"num_users": 610, "num_items": 9742, "global_mean": 3.5, "rating_range": [0.5, 5.0]}
        return None

    def planning_inputs(self, features: dict, batch: int) -> tuple:  # users, items
        return (torch.zeros(batch, device="meta", dtype=torch.long), torch.zeros(batch, device="meta", dtype=torch.long))

    def batch_inputs(self, features: dict) -> list[str]:
        return ["user", "item"]

    def batch_instance(self, row: dict) -> Any:
        return {k: jsonable(row[k]) for k in ("user", "item")}

    def parse_instances(self, instances: Any, features: dict, max_batch: int) -> dict:
        check_batch(instances, max_batch, "user/item pairs")
        users, items = [], []
        for i, inst in enumerate(instances):
            if not isinstance(inst, dict) or set(inst) != {"user", "item"}:
                raise RequestError(f'instances[{i}] must be {{"user": <id>, "item": <id>}}', field=f"instances[{i}]")
            for k in ("user", "item"):
                if isinstance(inst[k], bool) or not isinstance(inst[k], int):
                    raise RequestError(f"instances[{i}].{k} must be an integer id", field=f"instances[{i}].{k}")
            users.append(inst["user"])
            items.append(inst["item"])
        return {"user": np.array(users), "item": np.array(items)}

    def predict(self, model, batch):
        lo, hi = 0.5, 5.0
        pred = model(batch["user"], batch["item"]).float().clamp(lo, hi).cpu().numpy()
        return [{"rating": round(float(p), 4)} for p in pred]

    def tensor_signature(self, features: dict) -> dict:
        return {"inputs": [tensor_spec("user", "INT64", [-1]), tensor_spec("item", "INT64", [-1])],
                "outputs": [tensor_spec("rating", "FP32", [-1])]}  # raw ids; unseen ones get biases only

    def infer_tensors(self, model, batch, state):
        lo, hi = state["rating_range"]
        return {"rating": self.forward(model, batch).float().clamp(lo, hi).cpu().numpy().astype(np.float32)}
