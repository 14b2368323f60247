"""Speech classification (spoken digits): wav recordings -> log-mel frames -> a recurrent or convolutional model.

Stored per row: the decoded mono waveform (float32). On the stream (training, serving, batch inference alike):
optional augmentation (training only), log-mel features, per-band standardization fitted on the training split,
padding/cutting to the fitted frame count with each recording's true length.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from aidc.config import ModelSchema
from aidc.data.audio import augment_waveform, decode_wav, frames_of, log_mel, mel_filters
from aidc.errors import RequestError
from aidc.models import MODELS
from aidc.tasks.base import (CLASSIFICATION_OUTPUTS, Classification, Table, classification_tensors, row_hashes,
                             tensor_spec)
from aidc.tasks.image import check_batch


class SpeechRNNConfig(ModelSchema):
    arch: Literal["speech_rnn"] = Field("speech_rnn", description="Recurrent speech classifier over log-mel frames.")
    cell: Literal["gru", "lstm"] = Field("gru", description="Recurrent cell.")
    hidden: int = Field(64, ge=1, description="Hidden state width.")
    layers: int = Field(2, ge=1, description="Stacked recurrent layers.")
    bidirectional: bool = Field(False, description="Also read each recording backwards (a second stack).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout between layers and before the classifier.")


class SpeechCNNConfig(ModelSchema):
    arch: Literal["speech_cnn"] = Field("speech_cnn", description="Convolutional classifier over the spectrogram.")
    channels: list[int] = Field([16, 32], min_length=1, description="Output channels of each conv block.")
    hidden: int = Field(64, ge=1, description="Width of the hidden fully connected layer.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout before the classifier head.")


def _settings(cfg) -> dict:
    a = cfg.data.audio
    return {"sample_rate": a.sample_rate, "n_mels": a.n_mels, "n_fft": int(round(a.window_ms * a.sample_rate / 1000)),
            "hop": int(round(a.hop_ms * a.sample_rate / 1000))}


class SpeechClassification(Classification):
    name = "speech_classification"
    model_schemas = (SpeechRNNConfig, SpeechCNNConfig)
    input_column = "audio"  # the wav file's bytes
    quality_metric = "test_accuracy"
    batch_outputs = CLASSIFICATION_OUTPUTS
    data_sources = ("fsdd", "files")
    batch_file_format = "wav"  # batch inference over a folder of recordings
    onnx_export = True  # the graph takes (x, lengths); the edge runner computes the log-mel frames in numpy
    check_in_thread = True  # check_tensor_inputs decodes wav files: off the ingress event loop

    def edge_extras(self, state: dict) -> dict:
        """librosa's mel filterbank of these settings, so the edge runner needs no librosa."""
        return {"mel_filters": mel_filters(state["sample_rate"], state["n_mels"], state["n_fft"]).tolist()}

    @property
    def sources(self) -> dict:
        from aidc.data.sources import load_fsdd, load_wav_files

        return {"fsdd": load_fsdd, "files": load_wav_files}

    def check_config(self, cfg) -> None:
        if cfg.data.source == "files" and cfg.data.format != "wav":
            raise ValueError("task speech_classification reads data.format: wav (a folder of recordings named "
                             "{digit}_{speaker}_{index}.wav)")
        s = _settings(cfg)
        if s["n_fft"] // 2 + 1 < s["n_mels"]:
            raise ValueError(f"data.audio: a {cfg.data.audio.window_ms:g} ms window at {s['sample_rate']} Hz has "
                             f"{s['n_fft'] // 2 + 1} frequency bins, fewer than n_mels {s['n_mels']}; raise "
                             "window_ms or lower n_mels")
        m = cfg.model
        if m.arch == "speech_cnn" and (min(m.channels) < 1 or s["n_mels"] // 2 ** len(m.channels) < 1):
            raise ValueError(f"model.channels {m.channels}: each block needs >= 1 channel and halves the "
                             f"{s['n_mels']} mel bands; use at most {max(1, s['n_mels'].bit_length() - 1)} blocks")
        if s["hop"] < 1:
            raise ValueError(f"data.audio.hop_ms {cfg.data.audio.hop_ms:g} is under one sample at "
                             f"{s['sample_rate']} Hz; raise it")

    def fingerprint_settings(self, cfg) -> dict:
        return {"audio": cfg.data.audio.model_dump()}

    # -- preprocessing --------------------------------------------------------------
    def validate(self, table: Table, cfg, meta: dict) -> np.ndarray:
        rate = cfg.data.audio.sample_rate
        reason = np.array([decode_wav(b, rate)[1] for b in table["audio"]], dtype=object)
        bad = (table["label"] < 0) | (table["label"] >= meta["num_classes"])
        reason[bad & (reason == "")] = "no label: the file name is not {digit}_{speaker}_{index}.wav"
        return reason

    def content_key(self, table: Table) -> np.ndarray:
        return row_hashes(table["audio"])

    def encode_batch(self, batch: dict, state: dict) -> dict:
        rate = state["sample_rate"]
        waves = np.empty(len(batch["audio"]), dtype=object)
        waves[:] = [decode_wav(b, rate)[0] for b in batch["audio"]]
        return {"id": batch["id"], "waveform": waves, "label": batch["label"], "speaker": batch["speaker"],
                "file": batch["file"]}

    def fit(self, train: Table, cfg, meta: dict) -> dict:
        s = _settings(cfg)
        a = cfg.data.audio
        waves = [decode_wav(b, s["sample_rate"])[0] for b in train["audio"]]
        feats = np.concatenate([log_mel(w, s["sample_rate"], s["n_mels"], s["n_fft"], s["hop"]) for w in waves])
        lengths = [len(w) for w in waves]
        samples = int(a.max_seconds * s["sample_rate"]) if a.max_seconds else int(np.percentile(lengths, 99))
        std = feats.std(axis=0)
        return {**s, "mean": feats.mean(axis=0).tolist(), "std": np.where(std > 1e-6, std, 1.0).tolist(),
                "max_frames": frames_of(samples, s["hop"]), "class_names": meta["class_names"],
                "augment": {"enabled": a.augment, "max_time_shift_ms": a.max_time_shift_ms,
                            "noise_snr_db": a.noise_snr_db}}

    def features(self, meta: dict, state: dict) -> dict:
        return {"n_mels": state["n_mels"], "max_frames": state["max_frames"], "num_classes": meta["num_classes"],
                "class_names": meta["class_names"], "sample_rate": state["sample_rate"]}

    # -- the stream (training, serving, batch) ------------------------------------------
    def transform_batch(self, batch: dict, state: dict, training: bool = False) -> dict:
        if "waveform" in batch:
            waves = list(batch["waveform"])
        else:  # raw wav files (serving, batch inference): decoded as in preprocessing
            waves = [_decoded(b, state["sample_rate"], i) for i, b in enumerate(batch["audio"])]
        if training and state["augment"]["enabled"]:
            rng = np.random.default_rng()
            waves = [augment_waveform(np.asarray(w, np.float32), state["augment"], state["sample_rate"], rng)
                     for w in waves]
        x, lengths = self.frames(waves, state)
        out = {"x": x, "lengths": lengths}
        if "label" in batch:
            out["y"] = np.asarray(batch["label"], dtype=np.int64)
        return out

    @staticmethod
    def frames(waves, state: dict) -> tuple[np.ndarray, np.ndarray]:
        """Waveforms -> standardized log-mel frames (n, max_frames, n_mels), zero-padded or cut, and lengths."""
        t, m = state["max_frames"], state["n_mels"]
        mean, std = np.asarray(state["mean"], np.float32), np.asarray(state["std"], np.float32)
        x = np.zeros((len(waves), t, m), dtype=np.float32)
        lengths = np.zeros(len(waves), dtype=np.int64)
        for i, w in enumerate(waves):
            f = (log_mel(np.asarray(w, np.float32), state["sample_rate"], m, state["n_fft"], state["hop"])[:t]
                 - mean) / std
            x[i, :len(f)], lengths[i] = f, len(f)
        return x, lengths

    # -- training ---------------------------------------------------------------------
    def build_model(self, model_cfg: dict, features: dict) -> nn.Module:
        cfg = {k: v for k, v in model_cfg.items() if k != "arch"}
        return MODELS[model_cfg["arch"]](n_mels=features["n_mels"], num_classes=features["num_classes"], **cfg)

    def forward(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch["x"], batch["lengths"])

    def planning_features(self, cfg) -> dict:
        """The longest audio is data.audio.max_seconds, else (before the data says) 1 s."""
        s = _settings(cfg)
        samples = int((cfg.data.audio.max_seconds or 1.0) * s["sample_rate"])
        return {"n_mels": s["n_mels"], "max_frames": frames_of(samples, s["hop"]), "num_classes": 10,
                "sample_rate": s["sample_rate"]}

    def planning_inputs(self, features: dict, batch: int) -> tuple:
        return (torch.zeros(batch, features["max_frames"], features["n_mels"], device="meta"),
                torch.full((batch,), features["max_frames"], device="meta", dtype=torch.long))

    # -- serving ----------------------------------------------------------------------
    def parse_instances(self, instances: Any, features: dict, max_batch: int) -> np.ndarray:
        """Each instance a wav file as {"b64": "<base64>"} (the JSON convention for bytes)."""
        check_batch(instances, max_batch, "wav files")
        out = np.empty(len(instances), dtype=object)
        for i, inst in enumerate(instances):
            if not isinstance(inst, dict) or set(inst) != {"b64"} or not isinstance(inst["b64"], str):
                raise RequestError(f'instances[{i}] must be {{"b64": "<a base64-encoded wav file>"}}',
                                   field=f"instances[{i}]")
            try:
                out[i] = base64.b64decode(inst["b64"], validate=True)
            except ValueError:
                raise RequestError(f"instances[{i}].b64 is not valid base64", field=f"instances[{i}]") from None
            _decoded(out[i], features["sample_rate"], i)
        return out

    def predict(self, model: nn.Module, batch: dict) -> list[dict]:
        probs = torch.softmax(self.forward(model, batch).float(), dim=1).cpu().numpy()
        return [{"class": int(p.argmax()), "probabilities": [round(float(v), 6) for v in p]} for p in probs]


    def tensor_signature(self, features: dict) -> dict:
        """Either input, one per request: `audio`, wav files as BYTES (raw bytes: the binary tensor extension or
        gRPC), or `waveform`, FP32 samples in [-1, 1] with `sample_rate` in the parameters. A waveform row is one
        whole recording (zero padding would count as audio): recordings of different lengths go in separate
        requests, which the server batches together."""
        return {"inputs": [tensor_spec("audio", "BYTES", [-1], optional=True, content="binary"),
                           tensor_spec("waveform", "FP32", [-1, -1], optional=True)],
                "outputs": [tensor_spec("probabilities", "FP32", [-1, features["num_classes"]]),
                            tensor_spec("class", "INT64", [-1]), tensor_spec("label", "BYTES", [-1])]}

    def check_tensor_inputs(self, inputs: dict[str, np.ndarray], features: dict,
                            parameters: dict | None = None) -> dict:
        """Exactly one of `audio` / `waveform`; wav files decoded (a bad one is a 400 naming it) and waveforms
        checked against the model's sample rate. Either way the replica gets the decoded waveforms, so requests
        of both kinds batch together."""
        rate = features["sample_rate"]
        if ("audio" in inputs) == ("waveform" in inputs):
            raise RequestError("send one input: 'audio' (wav files as BYTES) or 'waveform' (FP32 samples, with "
                               f"parameters.sample_rate: {rate})", status=400, field="audio")
        waves = np.empty(len(next(iter(inputs.values()))), dtype=object)
        if "audio" in inputs:
            waves[:] = [_decoded(b, rate, i, field="audio") for i, b in enumerate(inputs["audio"])]
            return {"waveform": waves}
        sent = (parameters or {}).get("sample_rate")
        if sent is None:
            raise RequestError(f"input 'waveform' needs its sample rate: set parameters.sample_rate (the model "
                               f"takes {rate} Hz)", status=400, field="waveform")
        try:
            hz = float(sent) if not isinstance(sent, bool) else None  # a number, or its text (string-only clients)
        except (TypeError, ValueError):
            hz = None
        if hz is None or not np.isfinite(hz):
            raise RequestError(f"parameters.sample_rate must be a number of Hz, got {sent!r}", status=400,
                               field="sample_rate")
        if hz != rate:
            raise RequestError(f"parameters.sample_rate is {sent!r}; model takes {rate} Hz: resample the "
                               f"waveform to {rate} Hz", status=400, field="sample_rate")
        x = inputs["waveform"]
        if x.shape[1] == 0:
            raise RequestError("input 'waveform' has no samples", status=400, field="waveform")
        out_of_range = np.argwhere(np.abs(x) > 1.0)
        if len(out_of_range):
            i, t = out_of_range[0]
            raise RequestError(f"waveform[{i}] sample {t} is {x[i, t]:g}, outside [-1, 1]: send float samples "
                               "(int16 values / 32768)", status=400, field="waveform")
        waves[:] = list(x)
        return {"waveform": waves}

    def infer_tensors(self, model, batch, state):
        out = classification_tensors(self.forward(model, batch))
        out["label"] = np.array([state["class_names"][c] for c in out["class"]], dtype=object)
        return out


def _decoded(data, sample_rate: int, i: int, field: str | None = None) -> np.ndarray:
    where = f"{field}[{i}]" if field else f"instances[{i}]"
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RequestError(f"{where}: expected a wav file's bytes, got {type(data).__name__}", status=400,
                           field=field or where)
    wave, why = decode_wav(bytes(data), sample_rate)
    if wave is None:
        raise RequestError(f"{where}: {why}", status=400, field=field or where)
    return wave
