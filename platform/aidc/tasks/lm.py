"""Language modelling (tiny-shakespeare): documents -> tokens packed into fixed blocks -> GPT."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field
import torch
from torch import nn
from torch.nn import functional as F

from aidc.data.tokenizer import decode, encode, pack_blocks, train_tokenizer
from aidc.errors import RequestError
from aidc.models.gpt import build_gpt
from aidc.tasks.base import Table, Task, empty_text_reasons, row_hashes
from aidc.tasks.image import check_batch
from aidc.tasks.text import TransformerConfig


class GPTConfig(TransformerConfig):
    arch: Literal["gpt"] = Field(..., description="GPT-style decoder-only language model.")
    d_model: int = Field(128, ge=8, description="Model width (768 for GPT-2 small).")
    layers: int = Field(4, ge=1, description="Decoder blocks (12 for GPT-2 small).")
    activation_checkpointing: bool = Field(False, description="Recompute block activations in backward.")
    gelu: Literal["none", "tanh"] = Field("none", description="GELU form: exact, or GPT-2's tanh approximation.")


class LanguageModel(Task):
    name = "language_model"
    model_schemas = (GPTConfig,)
    text_columns = {"text": "text"}
    input_column = "text"
    quality_metric = "test_perplexity"
    export_hint = "language models: --format hf"
    batch_outputs = (("completion", pa.string()), ("finish_reason", pa.string()))
    batch_on_vllm = True
    counts_tokens = True

    def planning_features(self, cfg) -> dict:
        text = cfg.data.text  # a char vocabulary: bytes
        return {"vocab_size": text.vocab_size if text.tokenizer == "bpe" else 256, "block_size": text.block_size,
                "tokenizer": text.tokenizer}

    def planning_inputs(self, features: dict, batch: int) -> tuple:
        return (torch.zeros(batch, features["block_size"], device="meta", dtype=torch.long),)

    def batch_inputs(self, features: dict) -> list[str]:
        return ["prompt"]

    def validate(self, table: Table, cfg, meta: dict) -> np.ndarray:
        return empty_text_reasons(table["text"])

    def content_key(self, table: Table) -> np.ndarray:
        return row_hashes(table["text"])

    def fit(self, train: Table, cfg, meta: dict) -> dict:
        t = cfg.data.text
        return {"tokenizer": train_tokenizer(list(train["text"]), t.tokenizer, t.vocab_size, t.lowercase),
                "block_size": t.block_size}

    def encode_batch(self, batch: dict, state: dict) -> dict:
        blocks = pack_blocks(encode(batch["text"], state["tokenizer"]), state["block_size"],
                             state["tokenizer"]["eos_id"])
        return {"tokens": blocks}

    def features(self, meta: dict, state: dict) -> dict:
        return {"vocab_size": state["tokenizer"]["vocab_size"], "block_size": state["block_size"],
                "tokenizer": state["tokenizer"]["kind"]}

    def transform_batch(self, batch: dict, state: dict, training: bool = False) -> dict:
        tokens = np.asarray(batch["tokens"], dtype=np.int64)
        return {"x": tokens[:, :-1], "y": tokens[:, 1:]}

    def build_model(self, model_cfg: dict, features: dict) -> nn.Module:
        return build_gpt(model_cfg, features)

    def loss(self, outputs, batch):
        return F.cross_entropy(outputs.flatten(0, 1), batch["y"].flatten())

    def eval_sums(self, outputs, batch):
        y = batch["y"].flatten()
        return {"loss_sum": float(F.cross_entropy(outputs.flatten(0, 1).float(), y, reduction="sum")),
                "tokens": float(y.numel())}

    def metrics_from_sums(self, sums, prefix):
        loss = sums["loss_sum"] / max(sums["tokens"], 1.0)
        return {f"{prefix}_loss": loss, f"{prefix}_perplexity": math.exp(min(loss, 50.0))}

    def count(self, batch):
        return int(np.prod(batch["y"].shape))  # throughput in tokens

    def parse_instances(self, instances: Any, features: dict, max_batch: int) -> np.ndarray:
        check_batch(instances, max_batch, "prompts")
        for i, t in enumerate(instances):
            if not isinstance(t, str) or not t:
                raise RequestError(f"instances[{i}] must be a non-empty prompt string", field=f"instances[{i}]")
        return np.array(instances, dtype=object)

    def generate(self, model, prompts, state: dict, max_new_tokens: int = 64, temperature: float = 0.8,
                 seed: int = 0) -> list[str]:
        device = next(model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(seed)
        out = []
        for ids in encode(prompts, state["tokenizer"]):
            idx = torch.tensor([ids or [state["tokenizer"]["eos_id"]]], device=device)
            full = model.generate(idx, max_new_tokens, temperature=temperature, top_k=50, generator=gen)
            out.append(decode(full[0, len(ids):].tolist(), state["tokenizer"]))
        return out
