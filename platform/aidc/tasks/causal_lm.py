"""Fine-tuning a pretrained causal language model (task causal_lm): any architecture `transformers` loads
(`AutoModelForCausalLM`: GPT-2, Llama, Qwen2, Mistral, ... and a GPT aidc trained, exported as GPT-2), fully or
with LoRA adapters (PEFT), on chat, instruction or plain-text rows.

`model.init_from` names the base: a registry reference (verified and laid out as a Hugging Face folder by
aidc.hf.folder, on each node that needs it) or a folder. Preprocessing tokenizes with the base's own
tokenizer and chat template, so a dataset version belongs to one base (its pinned version is in the dataset's
fingerprint). Each example is stored as token ids and labels; the labels of every token that is not a target
(system and user turns, the prompt of an instruction, padding) are -100, which cross-entropy ignores: the loss
and its gradient cover the answers only (data.chat.mask_prompt).

Row formats (JSONL, one object per line):
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}  targets: every assistant turn
  {"prompt": "...", "completion": "..."}                                        target: the completion
  {"text": "..."}                                                               target: all of it
A target ends with the tokenizer's end-of-sequence token (unless the template already writes it), so the
model learns to stop.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from pydantic import Field
from torch.nn import functional as F

from aidc.config import ModelSchema, Strict
from aidc.errors import ConfigError, DataError
from aidc.tasks.base import Table, Task, row_hashes

logger = logging.getLogger(__name__)

IGNORE = -100  # torch cross_entropy's ignore_index: positions that carry no loss and no gradient
ROLES = ("system", "user", "assistant")


# -- the base model ------------------------------------------------------------------------------------------
_REF = re.compile(r"^[A-Za-z0-9_.-]+(@[A-Za-z0-9_-]+|/\d+)?$")  # aidc.registry's reference forms


def is_folder(init_from: str) -> bool:
    """A folder (local path or object-store URI) rather than a registry reference (name@alias, name/3, name)."""
    return "://" in init_from or Path(init_from).expanduser().exists() or not _REF.match(init_from)


def resolve_base(init_from: str, cfg_run=None) -> dict:
    """{"path": folder} or {"ref": "name/version", "uri": tracking URI}: a registry alias is pinned to its version
    (a resumed run and every worker load the same weights)."""
    if is_folder(init_from):
        return {"path": init_from}
    from aidc import storage
    from aidc.registry import resolve, tracking_uri

    root = storage.storage_root(getattr(cfg_run, "storage", None))
    uri = tracking_uri(getattr(cfg_run, "tracking_uri", None), root)
    mv = resolve(init_from, uri)
    return {"ref": f"{mv.name}/{mv.version}", "uri": uri}


def base_identity(cfg) -> str:
    """What a dataset's tokens depend on: the pinned registry version, or the folder's config and tokenizer."""
    base = resolve_base(cfg.model.init_from, cfg.run)
    if "ref" in base:
        return base["ref"]
    folder = base_folder(json.dumps(base))
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"):
        if (folder / name).is_file():
            h.update(name.encode() + (folder / name).read_bytes())
    return f"{base['path']}#{h.hexdigest()[:16]}"


@functools.lru_cache(maxsize=8)
def base_folder(base_json: str) -> Path:
    """The local Hugging Face folder of a base (cached per process): a registry version is fetched, verified and
    written by aidc.hf.folder.materialize; a folder URI is downloaded; a local folder is checked as it is."""
    base = json.loads(base_json)
    if "ref" in base:
        return _materialized_base(base["ref"], base["uri"])
    path = base["path"]
    if "://" in path:
        path = str(_download(path))
    folder = Path(path).expanduser()
    check_folder(folder)
    return folder


LAYOUT = 1  # of a materialized base folder (aidc.hf.folder.materialize); bump when what it writes changes


def _materialized_base(ref: str, uri: str) -> Path:
    """The verified folder of a registry base, one per version and content on each node: every worker and run
    fetches and verifies the version, and keeps the folder it wrote only if no identical one is there yet (a
    7B base is 15 GB: a copy per worker and run would fill the disk)."""
    import os
    import shutil

    from aidc.hf.folder import materialize

    fresh = materialize(ref, uri, gpu=True)  # training has no vLLM head-size limit
    # named by the version's verified manifest (its files' sha256s; no second hashing pass over the weights) and
    # by how materialize lays a version out (a change there must not reuse an old folder)
    stable = fresh.folder.parent / f"base-{fresh.name}-v{fresh.version}-{fresh.digest}-l{LAYOUT}"
    try:
        os.rename(fresh.folder, stable)  # atomic; fails when another process put the same folder there first
    except OSError:
        shutil.rmtree(fresh.folder, ignore_errors=True)
    return stable


def _download(uri: str) -> Path:
    import pyarrow.fs as pafs

    from aidc.hf.folder import cache_root

    fs, inner = pafs.FileSystem.from_uri(uri)
    out = cache_root() / ("base-" + hashlib.sha256(uri.encode()).hexdigest()[:16])
    out.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(inner, str(out), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return out


def check_folder(folder: Path) -> None:
    """A Hugging Face causal-LM folder: config.json, safetensors weights and a tokenizer, each named if missing."""
    if not folder.is_dir():
        raise ConfigError(f"model.init_from {folder} is not a folder (nor a registry reference name@alias); give a "
                          "Hugging Face model folder (save_pretrained) or a registered model")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(folder.glob("*.safetensors")):
        missing.append("weights (*.safetensors)")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        missing.append("a tokenizer (tokenizer.json)")
    if missing:
        raise ConfigError(f"model.init_from {folder} lacks {', '.join(missing)}: a Hugging Face causal-LM folder "
                          "holds config.json, model.safetensors and tokenizer.json (model.save_pretrained + "
                          "tokenizer.save_pretrained)")


@functools.lru_cache(maxsize=8)
def load_tokenizer(folder: str):
    """The base's tokenizer; a base without a chat template gets aidc's plain one (the export's default)."""
    from transformers import AutoTokenizer

    from aidc.hf.gpt2 import DEFAULT_TEMPLATE

    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - a broken or unknown tokenizer
        raise ConfigError(f"transformers cannot load the tokenizer of {folder}: {exc}") from None
    if not tok.chat_template:
        tok.chat_template = DEFAULT_TEMPLATE
    return tok


def load_base_model(folder: Path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load and save: noise in job logs
    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - an architecture transformers does not know, broken weights
        raise ConfigError(f"transformers cannot load {folder} as a causal LM (AutoModelForCausalLM): "
                          f"{str(exc).splitlines()[0]}") from None


def add_lora(model, lora: dict):
    """Wrap `model` with LoRA adapters (PEFT): only they train; the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=lora["target_modules"], task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # target modules not in the model; an architecture without PEFT defaults
        raise ConfigError(f"model.lora: {exc}. Name the modules to adapt with --set "
                          "model.lora.target_modules=[q_proj,v_proj]") from None


# -- rows ------------------------------------------------------------------------------------------------------
def parse_record(line) -> tuple[dict | None, str]:
    """(row, '') or (None, reason): a JSON object in one of the three formats, checked."""
    try:
        row = json.loads(line) if isinstance(line, str) else line
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc.msg})"
    if not isinstance(row, dict):
        return None, "not a JSON object"
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            return None, "messages must be a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                role = m.get("role") if isinstance(m, dict) else m
                return None, f"messages[{i}]: role {role!r} is not one of {list(ROLES)}"
            if not isinstance(m.get("content"), str) or not m["content"].strip():
                return None, f"messages[{i}]: content must be a non-empty string"
        if not any(m["role"] == "assistant" for m in msgs):
            return None, "no assistant turn to learn from"
        return {"messages": msgs}, ""
    if "prompt" in row or "completion" in row:
        if not all(isinstance(row.get(k), str) and row[k].strip() for k in ("prompt", "completion")):
            return None, "prompt and completion must both be non-empty strings"
        return {"prompt": row["prompt"], "completion": row["completion"]}, ""
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            return None, "empty text"
        return {"text": row["text"]}, ""
    return None, "no messages, prompt/completion or text field"


def segments(row: dict, tok) -> list[tuple[str, bool]]:
    """The row as (text, is_target) pieces in order, rendered with the tokenizer's chat template."""
    if "text" in row:
        return [(row["text"], True)]
    if "prompt" in row:
        return [(row["prompt"], False), (row["completion"], True)]
    msgs, out, done = row["messages"], [], ""

    def render(upto: int, gen: bool) -> str:
        return tok.apply_chat_template(msgs[:upto], tokenize=False, add_generation_prompt=gen)

    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt, full = render(i, True), render(i + 1, False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError("the base's chat template does not render a conversation turn by turn (each prefix a "
                            "prefix of the next), so answer tokens cannot be told from the prompt; use a template "
                            "that does, or prompt/completion rows")
        out += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = render(len(msgs), False)[len(done):]
    return out + ([(rest, False)] if rest else [])


def encode_row(row: dict, tok, mask_prompt: bool) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE where the loss does not look) of one row."""
    ids, labels = [], []
    eos = tok.eos_token
    for text, target in segments(row, tok):
        if target and eos and not text.rstrip().endswith(eos):
            text = text + eos
        piece = tok.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if target or not mask_prompt else [IGNORE] * len(piece)
    if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False) and ids[:1] != [tok.bos_token_id]:
        ids, labels = [tok.bos_token_id] + ids, [IGNORE] + labels
    return ids, labels


def prompt_and_reference(row: dict, tok) -> tuple[str, str]:
    """What a held-out row asks (the text before its last target) and the reference answer (the last target)."""
    if "messages" in row:
        last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
        prompt = tok.apply_chat_template(row["messages"][:last], tokenize=False, add_generation_prompt=True)
        return prompt, row["messages"][last]["content"]
    if "prompt" in row:
        return row["prompt"], row["completion"]
    return "", ""


class LoraConfig(Strict):
    rank: int = Field(8, ge=1, description="LoRA rank r of each adapted weight.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (the update is scaled by alpha / rank).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch's input.")
    target_modules: list[str] | None = Field(
        None, min_length=1, description="Module names to adapt (e.g. [q_proj, v_proj]); default: PEFT's choice for "
        "the architecture (Llama/Qwen2/Mistral q_proj+v_proj, GPT-2 c_attn).")
    save: Literal["merged", "adapter"] = Field(
        "merged", description="What is registered: merged = the base with the adapter folded in (a plain model); "
        "adapter = the adapter alone in PEFT's format (adapter_config.json + adapter_model.safetensors), naming "
        "its base version.")


class HFConfig(ModelSchema):
    arch: Literal["hf"] = Field(..., description="A pretrained Hugging Face causal LM (transformers "
                                "AutoModelForCausalLM), fine-tuned (task causal_lm).")
    init_from: str = Field(..., min_length=1, description="The model to start from: a registry reference (name@alias, "
                           "name/version: an imported model or a GPT aidc trained) or a Hugging Face folder (config.json "
                           "+ safetensors + tokenizer), local or s3://, gs://.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings (train.method: lora).")
    activation_checkpointing: bool = Field(False, description="Recompute decoder-layer activations in backward.")


class CausalLM(Task):
    name = "causal_lm"
    model_schemas = (HFConfig,)
    data_sources = ("synthetic-instructions", "files")
    text_columns = {"record": "json"}
    input_column = "record"

    def check_config(self, cfg) -> None:
        if cfg.data.source == "files" and cfg.data.format != "jsonl":
            raise ValueError("task causal_lm reads data.format: jsonl (one {\"messages\": [...]}, "
                             "{\"prompt\", \"completion\"} or {\"text\"} object per line)")

    @property
    def sources(self) -> dict:
        from aidc.data.sources import load_jsonl_records, load_synthetic_instructions

        return {"synthetic-instructions": load_synthetic_instructions, "files": load_jsonl_records}

    # -- preprocessing ----------------------------------------------------------------
    counts_tokens = True

    def planning_inputs(self, features: dict, batch: int) -> dict:
        """Next-token inputs of rows padded to data.chat.max_length, as `forward` passes them; the mask 4D
        (transformers checks a 2D one's values)."""
        t = features["max_length"] - 1
        long = {"device": "meta", "dtype": torch.long}
        return {"input_ids": torch.zeros(batch, t, **long),
                "attention_mask": torch.ones(batch, 1, t, t, device="meta", dtype=torch.bool).tril(),
                "position_ids": torch.zeros(batch, t, **long)}

    def planning_features(self, cfg) -> dict:
        """A pretrained base: its config.json sizes it; rows are padded to max_length."""
        return {"base": resolve_base(cfg.model.init_from, cfg.run), "max_length": cfg.data.chat.max_length}

    def fingerprint_settings(self, cfg) -> dict:
        """Fine-tuning data is tokenized by its base model: the base's pinned version (or folder) is part of it."""
        return {"chat": cfg.data.chat.model_dump(), "base": base_identity(cfg)}

    def _tokenizer(self, state: dict):
        """The base's tokenizer (state: the fitted transform or the features, both name the base)."""
        return load_tokenizer(str(base_folder(json.dumps(state["base"], sort_keys=True))))

    def validate(self, table: Table, cfg, meta: dict) -> np.ndarray:
        state = self.fit(table, cfg, meta)
        tok, limit = self._tokenizer(state), state["max_length"]
        reasons = np.full(len(table["record"]), "", dtype=object)
        for i, line in enumerate(table["record"]):
            row, why = parse_record(line)
            if row is not None:
                n = len(encode_row(row, tok, state["mask_prompt"])[0])
                why = f"over data.chat.max_length ({n} > {limit} tokens)" if n > limit else ""
            reasons[i] = why
        return reasons

    def content_key(self, table: Table) -> np.ndarray:
        return row_hashes(table["record"])

    def fit(self, train: Table, cfg, meta: dict) -> dict:
        base = resolve_base(cfg.model.init_from, cfg.run)
        folder = base_folder(json.dumps(base, sort_keys=True))
        context = context_length(folder)
        c = cfg.data.chat
        if context and c.max_length > context:
            raise ConfigError(f"data.chat.max_length {c.max_length} is over the base model's context ({context} "
                              f"tokens, {folder}/config.json); set --set data.chat.max_length={context} or less")
        tok = load_tokenizer(str(folder))
        return {"base": base, "max_length": c.max_length, "mask_prompt": c.mask_prompt, "packing": c.packing,
                "pad_id": int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0),
                "vocab_size": len(tok)}

    def encode_batch(self, batch: dict, state: dict) -> dict:
        tok = self._tokenizer(state)
        ids, labels, prompts, refs = [], [], [], []
        for line in batch["record"]:
            row, _ = parse_record(line)
            i, lab = encode_row(row, tok, state["mask_prompt"])
            p, r = prompt_and_reference(row, tok)
            ids.append(np.asarray(i, dtype=np.int64))
            labels.append(np.asarray(lab, dtype=np.int64))
            prompts.append(p)
            refs.append(r)
        ragged = lambda xs: np.array(xs + [None], dtype=object)[:-1]  # noqa: E731 - keep an object array of arrays
        if state.get("packing") and state.get("split") == "train":
            rows = pack(ids, labels, state["max_length"])
            return {"input_ids": ragged([r[0] for r in rows]), "labels": ragged([r[1] for r in rows]),
                    "segments": ragged([r[2] for r in rows])}
        return {"id": batch["id"], "input_ids": ragged(ids), "labels": ragged(labels),
                "prompt": np.array(prompts, dtype=object), "reference": np.array(refs, dtype=object)}

    describe_columns = ["input_ids", "labels"]

    def describe_split(self, encoded: dict) -> dict:
        lengths = [len(x) for x in encoded["input_ids"]]
        targets = [int((np.asarray(y) != IGNORE).sum()) for y in encoded["labels"]]
        return {"tokens": int(sum(lengths)), "target tokens": int(sum(targets)), "longest": max(lengths, default=0)}

    def features(self, meta: dict, state: dict) -> dict:
        return {"base": state["base"], "max_length": state["max_length"], "vocab_size": state["vocab_size"],
                "pad_id": state["pad_id"]}

    # -- training ---------------------------------------------------------------------
    def transform_batch(self, batch: dict, state: dict, training: bool = False) -> dict:
        """Ragged examples -> fixed [n, max_length - 1] inputs, next-token labels and attention masks; packed
        rows also carry each token's example (`seg`, 0 = padding) and its position within that example."""
        width = state["max_length"] - 1
        n = len(batch["input_ids"])
        x = np.full((n, width), state["pad_id"], dtype=np.int64)
        y = np.full((n, width), IGNORE, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for i, (ids, labels) in enumerate(zip(batch["input_ids"], batch["labels"])):
            k = len(ids) - 1
            x[i, :k], y[i, :k], mask[i, :k] = ids[:-1], np.asarray(labels)[1:], 1
        out = {"x": x, "y": y, "mask": mask}
        if "segments" in batch:
            seg, pos = np.zeros((n, width), dtype=np.int64), np.zeros((n, width), dtype=np.int64)
            for i, full in enumerate(batch["segments"]):
                full = np.asarray(full)
                s = full[:-1]
                seg[i, :len(s)] = s
                y[i, :len(s)][full[1:] != s] = IGNORE  # an example's last token does not predict the next one's first
                starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]  # first token of each example
                pos[i, :len(s)] = np.arange(len(s)) - np.repeat(starts, np.diff(np.r_[starts, len(s)]))
            out.update(seg=seg, pos=pos)
        return out

    def build_model(self, model_cfg: dict, features: dict) -> nn.Module:
        model = load_base_model(base_folder(json.dumps(features["base"], sort_keys=True)))
        model.config.use_cache = False  # training: no KV cache
        if model_cfg.get("activation_checkpointing"):  # non-reentrant: LoRA's frozen inputs still get gradients
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def adapt(self, model: nn.Module, job: dict) -> nn.Module:
        return add_lora(model, job["model"]["lora"]) if job["train"]["method"] == "lora" else model

    def planning_model(self, job: dict, features: dict) -> nn.Module:
        """The base's architecture from its config.json alone (no weights read), with the job's adapters."""
        from transformers import AutoConfig, AutoModelForCausalLM

        folder = base_folder(json.dumps(features["base"], sort_keys=True))
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder), local_files_only=True),
                                                 dtype=torch.float32)
        model.config.use_cache = False
        return self.adapt(model, job)

    @staticmethod
    def _width(batch: dict) -> int:
        """Columns up to the longest example of the batch (the rest is padding)."""
        return max(1, int(batch["mask"].sum(dim=1).max()))

    def forward(self, model: nn.Module, batch: dict) -> torch.Tensor:
        w = self._width(batch)
        if "seg" in batch:  # packed: each example attends causally to itself only, positions restart per example
            seg = batch["seg"][:, :w]
            causal = torch.ones(w, w, dtype=torch.bool, device=seg.device).tril()
            blocks = (seg[:, :, None] == seg[:, None, :]) & causal
            return model(input_ids=batch["x"][:, :w], attention_mask=blocks[:, None],
                         position_ids=batch["pos"][:, :w]).logits
        return model(input_ids=batch["x"][:, :w], attention_mask=batch["mask"][:, :w]).logits

    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        y = batch["y"][:, :outputs.shape[1]]
        return F.cross_entropy(outputs.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)

    def eval_sums(self, outputs, batch):
        y = batch["y"][:, :outputs.shape[1]].flatten()
        return {"loss_sum": float(F.cross_entropy(outputs.flatten(0, 1).float(), y, ignore_index=IGNORE,
                                                  reduction="sum")),
                "tokens": float((y != IGNORE).sum())}

    def metrics_from_sums(self, sums, prefix):
        loss = sums["loss_sum"] / max(sums["tokens"], 1.0)
        return {f"{prefix}_loss": loss, f"{prefix}_perplexity": math.exp(min(loss, 50.0))}

    def count(self, batch):
        return int(batch["mask"].sum())  # throughput in tokens (padding not counted)


    # -- after training: the model as registered, and how it answers ----------------------------------------------
    def trained_model(self, job: dict, features: dict, state_dict: dict) -> nn.Module:
        """The base with the run's trained weights (all of them, or its LoRA adapters) on CPU, for eval."""
        from aidc.models.state import load_trained

        model = self.adapt(self.build_model(job["model"], features), job)
        load_trained(model, state_dict)
        return model.eval()

    def write_model_dir(self, directory: Path, state_dict: dict, spec: dict, cfg, model=None) -> dict:
        """A Hugging Face folder: merged weights (model.safetensors, config.json), or the LoRA adapter alone in
        PEFT's format (model.lora.save: adapter), with the base's tokenizer and the chat template it trained with;
        model.json says what it is and which base version it came from."""
        from aidc.config import to_yaml
        from aidc.hf.importer import hf_spec
        from aidc.registry import CONFIG, SPEC, write_manifest

        job, features = cfg.model_dump(mode="json"), spec["features"]
        base = features["base"]
        folder = base_folder(json.dumps(base, sort_keys=True))
        model = model if model is not None else self.trained_model(job, features, state_dict)
        adapter = job["train"]["method"] == "lora" and job["model"]["lora"]["save"] == "adapter"
        directory.mkdir(parents=True, exist_ok=True)
        if adapter:
            model.peft_config["default"].base_model_name_or_path = base.get("ref") or base.get("path")
            model.save_pretrained(str(directory))  # adapter_config.json + adapter_model.safetensors
        else:
            if job["train"]["method"] == "lora":
                model = model.merge_and_unload()
            model.config.use_cache = True
            model.save_pretrained(str(directory), safe_serialization=True)
        self._tokenizer(features).save_pretrained(str(directory))
        config = json.loads((folder / "config.json").read_text())
        out = {**hf_spec(config, folder), "format": "peft-lora" if adapter else "huggingface",
               "metrics": spec["metrics"], "dataset": spec["dataset"],
               "dataset_fingerprint": spec["dataset_fingerprint"],
               "source": {"format": "fine-tuned", "base": base, "method": job["train"]["method"]}}
        if adapter:
            out["base"] = base
        (directory / SPEC).write_text(json.dumps(out, indent=2))
        (directory / CONFIG).write_text(to_yaml(cfg))
        return write_manifest(directory)

    def after_training(self, cfg, outcome, state_dict: dict, out_dir: Path) -> tuple[list[Path], nn.Module | None]:
        """Held-out loss of the base before training, and exact match of greedy answers before and after on up
        to data.chat.eval_examples test rows; adds them to the run's metrics, writes sample generations.
        The base is loaded once: evaluated as it is, then given the run's trained weights (or adapters) in place;
        that tuned model is returned for write_model_dir."""
        from aidc.models.state import load_trained

        manifest = outcome.dataset.manifest()
        features, c = manifest["features"], cfg.data.chat
        job = cfg.model_dump(mode="json")
        rows = outcome.dataset.read("test").take(max(c.eval_examples, c.samples, 64))
        if not rows:
            return [], None
        tok = self._tokenizer(features)
        model = self.build_model(job["model"], features).eval()
        batch = {k: torch.from_numpy(v) for k, v in self.transform_batch(
            {"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]}, features).items()}
        with torch.no_grad():
            sums = self.eval_sums(self.forward(model, batch), batch)
        metrics = {f"base_{k}": v for k, v in self.metrics_from_sums(sums, "test").items()}
        asked = [r for r in rows if r["reference"]][:max(c.eval_examples, c.samples)]
        answers = {"base": [generate(model, tok, r["prompt"], c.max_new_tokens) for r in asked]}
        model = self.adapt(model, job)  # the base becomes the tuned model: LoRA wraps it, full overwrites it
        load_trained(model, state_dict)
        model.eval()
        answers["tuned"] = [generate(model, tok, r["prompt"], c.max_new_tokens) for r in asked]
        scored = asked[:c.eval_examples]
        if scored:
            for who, prefix in (("base", "base_"), ("tuned", "")):
                hits = sum(a.strip() == r["reference"].strip() for a, r in zip(answers[who], scored))
                metrics[f"{prefix}test_exact_match"] = hits / len(scored)
        outcome.metrics.update(metrics)
        samples = [{"prompt": r["prompt"], "reference": r["reference"], "base": b, "tuned": t}
                   for r, b, t in list(zip(asked, answers["base"], answers["tuned"]))[:c.samples]]
        path = Path(out_dir, "samples.json")
        path.write_text(json.dumps(samples, indent=2))
        logger.info("fine-tuned %s: %s", cfg.name, ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
        return [path], model


def pack(ids: list, labels: list, max_length: int) -> list[tuple]:
    """Examples packed in order into rows of at most max_length tokens (an example is never split):
    [(ids, labels, segments)], segments numbering each row's examples from 1."""
    rows, cur = [], ([], [], [])
    for i, lab in zip(ids, labels):
        if cur[0] and len(cur[0]) + len(i) > max_length:
            rows.append(cur)
            cur = ([], [], [])
        seg = (cur[2][-1] + 1) if cur[2] else 1
        cur = (cur[0] + list(i), cur[1] + list(lab), cur[2] + [seg] * len(i))
    if cur[0]:
        rows.append(cur)
    return [tuple(np.asarray(part, dtype=np.int64) for part in row) for row in rows]


def generate(model, tok, prompt: str, max_new_tokens: int) -> str:
    """The greedy answer to `prompt` (up to the end-of-sequence token), as text."""
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tok.eos_token_id, use_cache=True,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def context_length(folder: Path) -> int | None:
    config = json.loads((folder / "config.json").read_text())
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None
