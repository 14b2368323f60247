"""One model copy per Ray Data actor: raw rows in, typed predictions (or a reject reason) out.

Rows from your own files are checked with the same validation the HTTP API applies to a request
(`Task.parse_instances`), row by row only when a batch has a bad row, so a bad row is rejected with the
API's own message and never stops the job. Rows of a preprocessed dataset split were validated at
preprocessing and go straight through `transform_batch`. Language models answer prompts through vLLM, the
llm app's engine (its offline `LLM`, in the actor's own process), with the API's sampling options.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pyarrow as pa

from aidc.errors import RequestError
from aidc.tasks.base import jsonable

logger = logging.getLogger(__name__)

STATUS, REASON, INPUT = "status", "reject_reason", "input"

def output_schema(task, key_type: pa.DataType) -> pa.Schema:
    return pa.schema([("key", key_type), *task.batch_outputs, (REASON, pa.string()), (INPUT, pa.string()),
                      (STATUS, pa.string())])


def _llm_app():
    """aidc.serving.llm.app, imported once more where the first import lost Ray's registry race: importing Ray
    Serve LLM registers vLLM's KV-connector backends in the cluster's KV store, checking first and then writing
    (ray.llm ... kv_transfer/factory.py, Ray 2.60), so two actors importing it at the same moment can both see
    a backend missing and the second write raises "already registered". The retry sees it registered."""
    for attempt in range(3):
        try:
            from aidc.serving.llm import app as llm_app

            return llm_app
        except ValueError as exc:
            if "already registered" not in str(exc) or attempt == 2:
                raise
            logger.info("importing Ray Serve LLM raced another process's registration; importing again")


def _vllm(ref: str, tracking_uri: str, max_num_seqs: int):
    """vLLM's offline engine over the verified version's Hugging Face folder, in this process (no engine
    process to start inside a Ray actor); the same engine arguments as the llm app's defaults."""
    import os

    from aidc.hf.folder import materialize

    llm_app = _llm_app()
    ModelArgs, cpu_engine_kwargs = llm_app.ModelArgs, llm_app.cpu_engine_kwargs

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from vllm import LLM

    gpu = torch.cuda.is_available()
    hf = materialize(ref, tracking_uri, gpu)
    m = ModelArgs(ref=ref, num_gpus=1 if gpu else 0)
    llm = LLM(model=str(hf.folder), max_model_len=hf.max_model_len, max_num_seqs=max_num_seqs, dtype=m.engine_dtype(),
              enforce_eager=m.enforce_eager, enable_prefix_caching=m.enable_prefix_caching,
              **({} if gpu else cpu_engine_kwargs(None, hf.max_model_len)))
    return llm, hf


class BatchPredictor:
    """Ray Data callable class: loads the model once (registry fetch: manifest and signature checks)."""

    def __init__(self, ref: str, tracking_uri: str, key: str, from_split: bool, options: dict, task: str):
        """`task`: the version's task, from the spec the job verified (a language model loads into vLLM only)."""
        from aidc.tasks import get_task
        from aidc.tasks.loaded import load_model

        self.task = get_task(task)
        self.key, self.from_split, self.options = key, from_split, options
        self.llm, self.features = None, None  # a language model's only column is `prompt`
        if self.task.batch_on_vllm:
            self.llm, self.hf = _vllm(ref, tracking_uri, max_num_seqs=max(1, min(options["batch_size"], 32)))
        else:
            self.loaded = load_model(ref, tracking_uri)
            self.features = self.loaded.spec["features"]

    # -- per batch --------------------------------------------------------------------------
    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        n = len(batch)
        reasons = np.full(n, "", dtype=object)
        preds: dict[str, list] = {name: [None] * n for name, _ in self.task.batch_outputs}
        if self.from_split:
            ok = np.arange(n)
            values = self._predict_split(batch)
        else:
            ok, values, reasons = self._predict_raw(batch, reasons)
        for name, column in values.items():
            for i, v in zip(ok, column):
                preds[name][i] = v
        bad = reasons != ""
        inputs = np.full(n, None, dtype=object)  # the row as it came, for rejected rows only
        for i, row in zip(np.flatnonzero(bad), batch.iloc[np.flatnonzero(bad)].to_dict("records")):
            inputs[i] = json.dumps({k: jsonable(v) for k, v in row.items()}, default=str)
        keys = batch[self.key].to_numpy() if self.key in batch else np.arange(n)
        key_arr = pa.array(keys.tolist() if keys.dtype == object else keys)
        cols = {"key": key_arr,
                **{name: pa.array(preds[name], type=t) for name, t in self.task.batch_outputs},
                REASON: pa.array([r or None for r in reasons], type=pa.string()),
                INPUT: pa.array(inputs.tolist(), type=pa.string()),
                STATUS: pa.array(np.where(bad, "rejected", "predicted").tolist(), type=pa.string())}
        return pa.table(cols, schema=output_schema(self.task, key_arr.type))

    def _predict_split(self, batch: pd.DataFrame) -> dict[str, list]:
        cols = {}
        for c in batch.columns:
            v = batch[c].to_numpy()
            if v.dtype == object and len(v) and isinstance(v[0], np.ndarray) \
                    and len({x.shape for x in v}) == 1:  # ragged (e.g. waveforms) stays a column of arrays
                v = np.stack(v)
            cols[c] = v
        return self._rows(self.loaded.predict(cols))

    def _predict_raw(self, batch: pd.DataFrame, reasons: np.ndarray):
        columns = self.task.batch_inputs(self.features)
        missing = [c for c in columns if c not in batch.columns]
        if missing:
            reasons[:] = f"missing column(s) {missing}"
            return np.arange(0), {}, reasons
        if self.task.batch_on_vllm:
            return self._complete(batch, reasons)
        x = self.task.parse_batch_columns(batch, self.features, reasons)
        if x is None:
            instances = [self.task.batch_instance(r) for r in batch[columns].to_dict("records")]
            try:  # the whole batch at once; row by row only to name the bad rows
                x = self.task.parse_instances(instances, self.features, max_batch=len(instances))
            except RequestError:
                for i, inst in enumerate(instances):
                    try:
                        self.task.parse_instances([inst], self.features, max_batch=1)
                    except RequestError as exc:
                        reasons[i] = str(exc).replace("instances[0]", "row")
                good = [inst for inst, r in zip(instances, reasons) if not r]
                x = self.task.parse_instances(good, self.features, len(good)) if good else None
        ok = np.flatnonzero(reasons == "")
        if not len(ok):
            return ok, {}, reasons
        return ok, self._rows(self.loaded.predict(x)), reasons

    def _rows(self, predictions: list[dict]) -> dict[str, list]:
        transform = self.loaded.spec["transform"]
        predictions = [self.task.batch_prediction(p, transform) for p in predictions]
        return {n: [p[n] for p in predictions] for n, _ in self.task.batch_outputs}

    def __del__(self):
        if getattr(self, "hf", None) is not None:
            from aidc.hf.folder import remove

            remove(self.hf)

    def _complete(self, batch: pd.DataFrame, reasons: np.ndarray):
        """Prompts -> completions through vLLM, every prompt checked as the API checks it."""
        from vllm import SamplingParams

        o = self.options
        tokenizer = self.llm.get_tokenizer()
        prompts = batch["prompt"].to_numpy(dtype=object)
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p:
                reasons[i] = "prompt must be a non-empty string"
                continue
            n = len(tokenizer.encode(p, add_special_tokens=False))
            if not n:
                reasons[i] = "prompt encodes to no tokens; send some text"
            elif n + o["max_tokens"] > self.hf.max_model_len:
                reasons[i] = (f"prompt of {n} tokens + max_tokens {o['max_tokens']} is over the model's context: "
                              f"context is {self.hf.max_model_len} tokens; shorten the prompt or lower max_tokens")
        ok = np.flatnonzero(reasons == "")
        if not len(ok):
            return ok, {}, reasons
        try:
            params = SamplingParams(max_tokens=o["max_tokens"], temperature=o["temperature"], top_p=o["top_p"],
                                    seed=o["seed"], stop=o["stop"] or None)
        except ValueError as exc:  # a problem of the whole batch's options: the same reason for every row
            reasons[ok] = str(exc)
            return np.arange(0), {}, reasons
        outs = self.llm.generate([str(prompts[i]) for i in ok], params, use_tqdm=False)
        return ok, {"completion": [r.outputs[0].text for r in outs],
                    "finish_reason": [r.outputs[0].finish_reason for r in outs]}, reasons
