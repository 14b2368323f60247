"""The contract every workload implements; the pipeline, train loop and server only call these.

Preprocessing works on column tables (dict of numpy arrays): `validate` -> `content_key` (dedup) ->
`fit` on the training rows only -> `encode_batch` (stored). Training and serving both apply
`transform_batch` with the fitted state, so they cannot drift apart.
"""

from __future__ import annotations

import base64

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

Table = dict[str, np.ndarray]
# a classifier's batch-inference output columns
CLASSIFICATION_OUTPUTS = (("class", pa.int64()), ("probabilities", pa.list_(pa.float32())))


def row_hashes(*columns: np.ndarray) -> np.ndarray:
    """A content hash per row over the given columns (for exact-duplicate detection)."""
    n = len(columns[0])
    out = np.empty(n, dtype=object)
    for i in range(n):
        h = hashlib.blake2b(digest_size=16)
        for col in columns:
            v = col[i]
            h.update(v.tobytes() if isinstance(v, np.ndarray) else str(v).encode())
            h.update(b"\x1f")
        out[i] = h.hexdigest()
    return out


def empty_text_reasons(texts: np.ndarray) -> np.ndarray:
    """Reject reason per text row: '' to keep, 'empty text' for blank ones."""
    reason = np.full(len(texts), "", dtype=object)
    reason[np.array([not str(t).strip() for t in texts], dtype=bool)] = "empty text"
    return reason


class Task:
    """A workload: how to clean and encode its data, feed and score its model, and answer requests."""

    name: str = ""
    primary_metric: str = "val_loss"  # lower is better; picks the best checkpoints
    input_column: str = ""  # raw column that requests carry
    # the raw text columns data.privacy.scrub cleans: "text" (plain) or "json" (one JSON document per row, whose
    # strings are scrubbed); none: the workload's data holds no text
    text_columns: dict[str, str] = {}

    # -- the job config (aidc.tasks registers each task with aidc.config, which reads these) -----------------
    model_schemas: tuple = ()  # the schemas of its model section (aidc.config.ModelSchema); the first is the default
    data_sources: tuple[str, ...] | None = None  # the data.source values it takes; None: all but those others list
    private_training: bool = False  # train.privacy (DP-SGD, per-sample gradients) can train its models

    def check_config(self, cfg) -> None:
        """Its own rules across a job config's sections; raise ValueError saying what is wrong and the fix."""

    # -- preprocessing --------------------------------------------------------------
    def fingerprint_settings(self, cfg) -> dict:
        """What else a dataset's content depends on, beyond data.* (e.g. a fine-tune's base tokenizer): part of
        its fingerprint, so a change makes a new dataset version."""
        return {}

    def validate(self, table: Table, cfg, meta: dict) -> np.ndarray:
        """Reject reason per row ('' = keep)."""
        raise NotImplementedError

    def content_key(self, table: Table) -> np.ndarray:
        """Rows with equal keys are duplicates."""
        raise NotImplementedError

    def fit(self, train: Table, cfg, meta: dict) -> dict:
        """Fitted transform state from the training rows only (stored in the manifest)."""
        raise NotImplementedError

    def encode_batch(self, batch: dict, state: dict) -> dict:
        """What is stored per split (e.g. token ids); identity by default."""
        return batch

    def features(self, meta: dict, state: dict) -> dict:
        """Static facts the model and the server need (shapes, vocabulary and class counts)."""
        raise NotImplementedError

    # -- training ---------------------------------------------------------------------
    def transform_batch(self, batch: dict, state: dict, training: bool = False) -> dict:
        """Stored batch -> model-ready tensors as numpy; the same function serves requests."""
        return batch

    def build_model(self, model_cfg: dict, features: dict) -> nn.Module:
        raise NotImplementedError

    def adapt(self, model: nn.Module, job: dict) -> nn.Module:
        """The model as it trains under the job (e.g. wrapped with LoRA adapters); as built by default."""
        return model

    def planning_model(self, job: dict, features: dict) -> nn.Module:
        """The model as it trains, for the capacity planner: built under torch.device("meta") (shapes only), so
        it must not read weights."""
        return self.adapt(self.build_model(job["model"], features), job)

    counts_tokens: bool = False  # the planner's step time is per token (language models), else per sample

    def planning_features(self, cfg) -> dict | None:
        """The features that size the model before its dataset is preprocessed (from the config and the source's
        fixed shapes), for the capacity planner; None: only the preprocessed data can say."""
        return None

    def planning_inputs(self, features: dict, batch: int) -> tuple | dict:
        """One micro-batch of model inputs on the meta device (shapes only), as `forward` passes them to the model:
        positional (a tuple) or keywords (a dict)."""
        raise NotImplementedError(f"task {self.name!r} cannot be planned")

    def forward(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch["x"])

    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def eval_sums(self, outputs: torch.Tensor, batch: dict) -> dict[str, float]:
        """Additive statistics of a batch (summed across batches and workers)."""
        raise NotImplementedError

    def metrics_from_sums(self, sums: dict[str, float], prefix: str) -> dict[str, float]:
        raise NotImplementedError

    def count(self, batch: dict) -> int:
        return len(next(iter(batch.values())))

    # -- after training ------------------------------------------------------------------
    def write_model_dir(self, directory, state_dict: dict, spec: dict, cfg, model=None) -> dict:
        """The registered version's folder (weights, model.json, config, sha256 manifest); returns the hashes.
        `model`: the final model as after_training built it, where it did (else built here if needed)."""
        from aidc.config import to_yaml
        from aidc.registry import export_model_dir

        return export_model_dir(directory, state_dict=state_dict, spec=spec, config_yaml=to_yaml(cfg))

    def attack_space(self, model: nn.Module, features: dict, transform: dict):
        """For eval.robustness: (a module taking this task's raw inputs scaled to 0..1 and answering the model's
        logits, a function raw test inputs -> that scale), or None where gradient attacks do not apply (token
        ids, ids of users and items are not continuous)."""
        return None

    def after_training(self, cfg, outcome, state_dict: dict, out_dir) -> tuple[list, object | None]:
        """More evaluation of the final weights before they are registered (adds to outcome.metrics); returns
        files to log with the run and the final model if it built one (handed to write_model_dir, so a large
        model is loaded once). Nothing by default."""
        return [], None

    # -- serving ----------------------------------------------------------------------
    def parse_instances(self, instances: Any, features: dict, max_batch: int) -> np.ndarray:
        """Validate a request's instances; raise RequestError naming the problem."""
        raise NotImplementedError

    def predict(self, model: nn.Module, batch: dict) -> list[dict]:
        raise NotImplementedError

    # -- offline: batch inference, compression figures, exports ------------------------------------------
    quality_metric: str = ""  # the test-split metric `aidc model compare` sets versions side by side on
    onnx_export: bool = False  # `aidc model export --format onnx|edge` takes this task's models
    export_hint: str = ""  # where an export this task lacks goes instead

    def edge_extras(self, state: dict) -> dict:
        """What the numpy-only edge runner needs beyond the fitted transform (e.g. a filterbank matrix)."""
        return {}
    batch_outputs: tuple = ()  # (column, pyarrow type) of a batch prediction; () = no batch inference
    batch_on_vllm: bool = False  # batch inference answers through vLLM's offline engine (language models)
    batch_file_format: str = ""  # batch inference scores a folder of these files, one row per file (e.g. "wav")

    def batch_inputs(self, features: dict) -> list[str]:
        """The raw columns a batch-inference input file must have."""
        return [self.input_column]

    def batch_instance(self, row: dict) -> Any:
        """One raw input row as the API's `instances[i]` (plain lists and numbers, as JSON would carry them)."""
        return jsonable(row[self.input_column])

    def parse_batch_columns(self, batch, features: dict, reasons: np.ndarray) -> dict | None:
        """Whole columns of a batch (a pandas DataFrame) -> the model's input, setting a reason on each bad row;
        None: the task parses row by row as the API does (parse_instances)."""
        return None

    def batch_prediction(self, prediction: dict, transform: dict) -> dict:
        """One prediction as the batch output stores it (e.g. a class index as its label value)."""
        return prediction

    # -- tensor serving (Open Inference Protocol v2) -----------------------------------
    def tensor_signature(self, features: dict) -> dict:
        """{"inputs": [...], "outputs": [...]}, each {name, datatype, shape} with -1 for a variable dimension.

        Input names are the raw batch columns `transform_batch` takes, so a tensor request goes through
        exactly the training-time preprocessing.
        """
        raise NotImplementedError(f"task {self.name!r} has no tensor signature")

    check_in_thread: bool = False  # check_tensor_inputs is heavy (decodes files): run it off the event loop

    def check_tensor_inputs(self, inputs: dict[str, np.ndarray], features: dict,
                            parameters: dict | None = None) -> dict | None:
        """Value checks beyond datatype and shape (ranges, empty strings; `parameters`: the request's); raise
        RequestError. Returns None, or the inputs in the form the model's replica takes (e.g. decoded files)."""

    def infer_tensors(self, model: nn.Module, batch: dict, state: dict) -> dict[str, np.ndarray]:
        """Model-ready torch batch (from transform_batch) -> named output arrays of the signature."""
        raise NotImplementedError(f"task {self.name!r} has no tensor signature")


class Classification(Task):
    """A classifier: cross-entropy on the labels `y`, accuracy and per-class F1 from additive sums."""

    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        from torch.nn import functional as F

        return F.cross_entropy(outputs, batch["y"])

    def eval_sums(self, outputs: torch.Tensor, batch: dict) -> dict[str, float]:
        return classification_sums(outputs, batch["y"], outputs.shape[1])

    def metrics_from_sums(self, sums: dict[str, float], prefix: str) -> dict[str, float]:
        return classification_metrics(sums, prefix)


def jsonable(v):
    """A value as JSON would carry it: arrays as lists, numpy scalars as Python ones, NaN/inf as text."""
    if isinstance(v, (bytes, bytearray)):  # a file's bytes (np.bytes_ too): the API's JSON convention for binary
        return {"b64": base64.b64encode(v).decode()}
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return str(v)
    return v


def tensor_spec(name: str, datatype: str, shape: list[int], **parameters) -> dict:
    """An OIP tensor's metadata; parameters: `optional` (the model takes it or another input), `content:
    binary` (BYTES carrying files, not text)."""
    return {"name": name, "datatype": datatype, "shape": shape, **({"parameters": parameters} if parameters else {})}


def classification_tensors(logits: torch.Tensor) -> dict[str, np.ndarray]:
    """Softmax probabilities (FP32, [n, classes]) and the argmax class index (INT64, [n])."""
    probs = torch.softmax(logits.float(), dim=1).cpu().numpy().astype(np.float32)
    return {"probabilities": probs, "class": probs.argmax(axis=1).astype(np.int64)}


def classification_sums(outputs: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Loss, accuracy and per-class confusion counts (for F1) of a classification batch."""
    from torch.nn import functional as F

    pred = outputs.argmax(dim=1)
    sums = {
        "loss_sum": float(F.cross_entropy(outputs.float(), y, reduction="sum")),
        "correct": float((pred == y).sum()),
        "count": float(len(y)),
    }
    for c in range(num_classes):
        sums[f"tp{c}"] = float(((pred == c) & (y == c)).sum())
        sums[f"fp{c}"] = float(((pred == c) & (y != c)).sum())
        sums[f"fn{c}"] = float(((pred != c) & (y == c)).sum())
    return sums


def num_classes_in(sums: dict[str, float]) -> int:
    """Classes counted by classification_sums (one tp<c> entry per class)."""
    return sum(1 for key in sums if key.startswith("tp"))


def classification_metrics(sums: dict[str, float], prefix: str,
                           class_names: list[str] | None = None) -> dict[str, float]:
    num_classes = num_classes_in(sums)
    n = max(sums["count"], 1.0)
    out = {f"{prefix}_loss": sums["loss_sum"] / n, f"{prefix}_accuracy": sums["correct"] / n}
    f1s = []
    for c in range(num_classes):
        tp, fp, fn = sums[f"tp{c}"], sums[f"fp{c}"], sums[f"fn{c}"]
        f1 = 2 * tp / max(2 * tp + fp + fn, 1e-9)
        f1s.append(f1)
        if class_names:
            out[f"{prefix}_f1_{class_names[c]}"] = f1
    out[f"{prefix}_macro_f1"] = float(np.mean(f1s))
    return out
