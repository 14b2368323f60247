"""Text classification (SMS spam): BPE/char tokens truncated/padded -> transformer encoder -> classes."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator
import torch
from torch import nn

from aidc.config import ModelSchema
from aidc.data.tokenizer import encode, pad_truncate, train_tokenizer
from aidc.errors import RequestError
from aidc.models import MODELS
from aidc.tasks.base import (CLASSIFICATION_OUTPUTS, Classification, Table, classification_metrics, classification_tensors,
                             empty_text_reasons, num_classes_in, row_hashes, tensor_spec)
from aidc.tasks.image import check_batch

MAX_CHARS = 5000


class TransformerConfig(ModelSchema):
    arch: Literal["transformer"] = Field(..., description="Transformer-encoder text classifier.")
    d_model: int = Field(64, ge=8, description="Model width.")
    heads: int = Field(4, ge=1, description="Attention heads (must divide d_model).")
    layers: int = Field(2, ge=1, description="Encoder layers.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout in attention and feed-forward blocks.")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.d_model % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide d_model ({self.d_model})")
        return self


class TextClassification(Classification):
    name = "text_classification"
    model_schemas = (TransformerConfig,)
    private_training = True
    text_columns = {"text": "text"}
    input_column = "text"
    quality_metric = "test_macro_f1"
    onnx_export = True
    batch_outputs = CLASSIFICATION_OUTPUTS

    def planning_features(self, cfg) -> dict | None:
        text = cfg.data.text
        if cfg.data.source == "sms-spam":
            return {"vocab_size": text.vocab_size, "max_length": text.max_length, "num_classes": 2}
        return None

    def planning_inputs(self, features: dict, batch: int) -> tuple:
        return (torch.zeros(batch, features["max_length"], device="meta", dtype=torch.long),)

    def validate(self, table: Table, cfg, meta: dict) -> np.ndarray:
        reason = empty_text_reasons(table["text"])
        reason[(table["label"] < 0) & (reason == "")] = "unknown label"
        return reason

    def content_key(self, table: Table) -> np.ndarray:
        return row_hashes(table["text"])

    def fit(self, train: Table, cfg, meta: dict) -> dict:
        t = cfg.data.text
        tok = train_tokenizer(list(train["text"]), t.tokenizer, t.vocab_size, t.lowercase)
        return {"tokenizer": tok, "max_length": t.max_length, "class_names": meta["class_names"]}

    def encode_batch(self, batch: dict, state: dict) -> dict:
        ids = pad_truncate(encode(batch["text"], state["tokenizer"]), state["max_length"],
                           state["tokenizer"]["pad_id"])
        return {"id": batch["id"], "input_ids": ids, "label": batch["label"]}

    def features(self, meta: dict, state: dict) -> dict:
        return {"vocab_size": state["tokenizer"]["vocab_size"], "max_length": state["max_length"],
                "num_classes": len(meta["class_names"]), "class_names": meta["class_names"]}

    def transform_batch(self, batch: dict, state: dict, training: bool = False) -> dict:
        if "input_ids" not in batch:  # raw text (serving): same encoder as preprocessing
            batch = {**batch, "input_ids": pad_truncate(encode(batch["text"], state["tokenizer"]),
                                                         state["max_length"], state["tokenizer"]["pad_id"])}
        out = {"x": np.asarray(batch["input_ids"], dtype=np.int64)}
        if "label" in batch:
            out["y"] = np.asarray(batch["label"], dtype=np.int64)
        return out

    def build_model(self, model_cfg: dict, features: dict) -> nn.Module:
        cfg = {k: v for k, v in model_cfg.items() if k != "arch"}
        return MODELS["transformer"](vocab_size=features["vocab_size"], max_length=features["max_length"],
                                     num_classes=features["num_classes"], **cfg)

    def metrics_from_sums(self, sums, prefix):
        return classification_metrics(sums, prefix, ["ham", "spam"] if num_classes_in(sums) == 2 else None)

    def parse_instances(self, instances: Any, features: dict, max_batch: int) -> np.ndarray:
        check_batch(instances, max_batch, "texts")
        for i, t in enumerate(instances):
            if not isinstance(t, str) or not t.strip():
                raise RequestError(f"instances[{i}] must be a non-empty string", field=f"instances[{i}]")
            if len(t) > MAX_CHARS:
                raise RequestError(f"instances[{i}] has {len(t)} characters; the limit is {MAX_CHARS}",
                                   status=413, field=f"instances[{i}]")
        return np.array(instances, dtype=object)

    def predict(self, model, batch):
        probs = torch.softmax(model(batch["x"]).float(), dim=1).cpu().numpy()
        return [{"class": int(p.argmax()), "probabilities": [round(float(v), 6) for v in p]} for p in probs]

    def tensor_signature(self, features: dict) -> dict:
        return {"inputs": [tensor_spec("text", "BYTES", [-1])],  # raw strings, tokenized server-side
                "outputs": [tensor_spec("probabilities", "FP32", [-1, features["num_classes"]]),
                            tensor_spec("class", "INT64", [-1]), tensor_spec("label", "BYTES", [-1])]}

    def check_tensor_inputs(self, inputs: dict[str, np.ndarray], features: dict,
                            parameters: dict | None = None) -> None:
        for i, t in enumerate(inputs["text"]):
            if not str(t).strip():
                raise RequestError(f"text[{i}] is empty: send a non-empty string", field="text")
            if len(t) > MAX_CHARS:
                raise RequestError(f"text[{i}] has {len(t)} characters; the limit is {MAX_CHARS}", status=413,
                                   field="text")

    def infer_tensors(self, model, batch, state):
        out = classification_tensors(model(batch["x"]))
        out["label"] = np.array([state["class_names"][c] for c in out["class"]], dtype=object)
        return out
