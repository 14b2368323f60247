"""aidc edge runner: predictions from an exported bundle with only numpy and onnxruntime (no torch, no Ray).

    python run.py rows.jsonl [--out predictions.jsonl]      (one JSON object per line, raw values)

The bundle folder holds model.onnx and preprocess.json (the transform fitted at preprocessing time);
this file re-implements that transform in numpy, so a row gets the prediction the served model gives.
Rows: images {"image": [[...8 numbers...] x 8]}, tabular rows {column: value}, recommender pairs
{"user": 1, "item": 31}, text {"text": "..."} (character tokenizers only). Also importable:
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
    preds = Bundle(args.bundle).predict(rows)
    text = "".join(json.dumps(pr) + "\n" for pr in preds)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
