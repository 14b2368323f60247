"""aidc edge runner: predictions from an exported bundle with only numpy and onnxruntime (no torch, no Ray).

    python run.py rows.jsonl [--out predictions.jsonl]      (one JSON object per line, raw values)

The bundle folder holds model.onnx and preprocess.json (the transform fitted at preprocessing time);
this file re-implements that transform in numpy, so a row gets the prediction the served model gives.
Rows: images {"image": [[...8 numbers...] x 8]}, tabular rows {column: value}, recommender pairs
{"user": 1, "item": 31}, text {"text": "..."} (character tokenizers only), speech {"wav": "path/to/file.wav"}
(PCM wav) or {"waveform": [...samples in -1..1...], "sample_rate": 8000}. Also importable:
`Bundle(folder).predict(rows)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def _standardize(values, state) -> np.ndarray:
    mean, std = np.asarray(state["mean"], np.float32), np.asarray(state["std"], np.float32)
    return ((np.asarray(values, dtype=np.float32) - mean) / std).astype(np.float32)


def _index(values, mapping: list) -> np.ndarray:
    """1-based position in the fitted sorted list; 0 for values never seen in training."""
    lookup = {k: i + 1 for i, k in enumerate(mapping)}
    return np.array([lookup.get(v, 0) for v in values], dtype=np.int64)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


TOP_DB = 80.0  # as aidc.data.audio: the log-mel floor below each recording's loudest bin


def read_wav(path: str, sample_rate: int) -> np.ndarray:
    """A PCM wav file (the standard library's reader) -> float samples in [-1, 1], checked as in serving."""
    import wave

    try:
        with wave.open(str(path)) as w:
            channels, rate, width = w.getnchannels(), w.getframerate(), w.getsampwidth()
            declared = w.getnframes()
            raw = w.readframes(declared)
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{path}: not a PCM wav file the runner reads (8/16/32-bit integer PCM; convert float or "
                         f"extensible wavs with e.g. sox): {exc}") from None
    if len(raw) != declared * width * channels:
        raise ValueError(f"{path}: truncated: the header declares {declared * width * channels} bytes of audio, the "
                         f"file holds {len(raw)}")
    if channels != 1:
        raise ValueError(f"{path}: {channels} channels; expected mono (1 channel)")
    if rate != sample_rate:
        raise ValueError(f"{path}: sample rate {rate} Hz; expected {sample_rate} Hz")
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 4):
        x = np.frombuffer(raw, f"<i{width}").astype(np.float32) / float(2 ** (8 * width - 1))
    else:
        raise ValueError(f"{path}: {8 * width}-bit samples; the edge runner reads 8, 16 or 32-bit PCM")
    return checked_waveform(x, str(path))


def checked_waveform(x, where: str) -> np.ndarray:
    """One recording's samples as serving takes them: 1-D, non-empty, finite, within [-1, 1]."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1 or not len(x):
        raise ValueError(f"{where}: a waveform is a non-empty flat list of samples, got shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError(f"{where}: samples are NaN or infinite")
    if np.abs(x).max() > 1.0:
        raise ValueError(f"{where}: samples outside [-1, 1]: send float samples (int16 values / 32768)")
    return x


def log_mel(x: np.ndarray, state: dict, filters: np.ndarray) -> np.ndarray:
    """(frames, n_mels) log mel power in dB below the loudest bin, floored at TOP_DB: librosa's centered STFT
    (zero padding, periodic Hann window) and power_to_db, with the filterbank librosa made at export time."""
    n_fft, hop = state["n_fft"], state["hop"]
    y = np.pad(np.asarray(x, np.float32), n_fft // 2)  # centered frames: never shorter than one window
    frames = 1 + (len(y) - n_fft) // hop
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    power = np.abs(np.fft.rfft(y[idx] * window, axis=1)) ** 2  # (frames, bins)
    mel = power @ filters.T
    db = 10 * np.log10(np.maximum(1e-10, mel)) - 10 * np.log10(max(1e-10, float(mel.max())))
    return np.maximum(db, db.max() - TOP_DB).astype(np.float32)


class Bundle:
    def __init__(self, folder):
        folder = Path(folder)
        self.meta = json.loads((folder / "preprocess.json").read_text())
        self.session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        self.task, self.state, self.features = self.meta["task"], self.meta["transform"], self.meta["features"]

    def inputs(self, rows: list[dict]) -> dict[str, np.ndarray]:
        s = self.state
        if self.task == "image_classification":
            x = np.asarray([r["image"] for r in rows], dtype=np.float32)
            h, w = self.features["image_shape"]
            return {"x": _standardize(x.reshape(len(rows), h, w), s["standardize"])[:, None, :, :]}
        if self.task == "tabular_classification":
            cols = s["numeric"]["columns"]
            x = _standardize(np.array([[float(r[c]) for c in cols] for r in rows], dtype=np.float64).reshape(
                len(rows), len(cols)), s["numeric"]) if cols else np.zeros((len(rows), 0), np.float32)
            cats = [_index([str(r[c]) for r in rows], m) for c, m in s["categorical"].items()]
            cat = np.stack(cats, axis=1) if cats else np.zeros((len(rows), 0), np.int64)
            return {"x": x, "cat": cat}
        if self.task == "recommendation":
            return {"user": _index([int(r["user"]) for r in rows], s["users"]),
                    "item": _index([int(r["item"]) for r in rows], s["items"])}
        if self.task == "text_classification":
            tok = s["tokenizer"]
            if tok["kind"] != "char":
                raise SystemExit("this bundle's text model uses a BPE tokenizer, which needs the `tokenizers` "
                                 "package; the numpy-only runner handles character tokenizers")
            index = {c: i for i, c in enumerate(tok["vocab"])}
            ids = np.full((len(rows), s["max_length"]), tok["pad_id"], dtype=np.int64)
            for i, r in enumerate(rows):
                text = r["text"].lower() if tok["lowercase"] else r["text"]
                seq = [index.get(c, tok["unk_id"]) for c in text][: s["max_length"]]
                ids[i, : len(seq)] = seq
            return {"x": ids}
        if self.task == "speech_classification":
            rate, t = s["sample_rate"], s["max_frames"]
            filters = np.asarray(self.meta["mel_filters"], np.float32)
            x = np.zeros((len(rows), t, s["n_mels"]), np.float32)
            lengths = np.zeros(len(rows), np.int64)
            for i, r in enumerate(rows):
                if "wav" in r:
                    wave = read_wav(r["wav"], rate)
                elif "waveform" in r:
                    if r.get("sample_rate") != rate:
                        raise ValueError(f"row {i}: sample_rate {r.get('sample_rate')!r}; the model takes {rate} Hz")
                    wave = checked_waveform(r["waveform"], f"row {i}")
                else:
                    raise ValueError(f'row {i}: give {{"wav": "<file.wav>"}} or {{"waveform": [...], '
                                     f'"sample_rate": {rate}}}')
                f = _standardize(log_mel(wave, s, filters)[:t], s)
                x[i, :len(f)], lengths[i] = f, len(f)
            return {"x": x, "lengths": lengths}
        raise SystemExit(f"unsupported task {self.task!r}")

    def predict(self, rows: list[dict]) -> list[dict]:
        out = self.session.run(["output"], self.inputs(rows))[0]
        if self.task == "recommendation":
            lo, hi = self.state["rating_range"]
            return [{"rating": float(v)} for v in np.clip(out, lo, hi).astype(np.float32)]
        probs = _softmax(out.astype(np.float32))
        classes = probs.argmax(axis=1)
        if self.task == "tabular_classification":  # the label value, as the served model answers
            classes = np.asarray(self.state["classes"])[classes]
        return [{"class": int(c), "probabilities": [float(v) for v in p]} for c, p in zip(classes, probs)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rows", help="JSONL file of raw rows")
    p.add_argument("--out", help="write predictions here as JSONL (default: stdout)")
    p.add_argument("--bundle", default=str(Path(__file__).resolve().parent), help="bundle folder")
    args = p.parse_args(argv)
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.strip()]
    try:
        preds = Bundle(args.bundle).predict(rows)
    except ValueError as exc:  # a row the model cannot take: say which and why, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = "".join(json.dumps(pr) + "\n" for pr in preds)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
