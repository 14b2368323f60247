"""Named data sources -> column tables with a stable integer `id` per row, plus what describes them.

Small public datasets load into memory (they are tens of MB at most); your own large tabular files
stream through Ray Data instead (see pipeline.preprocess_streaming).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from aidc.config import register_dataset
from aidc.data.catalog import CATALOG, fetch
from aidc.data.readers import read_delimited, read_idx, read_text


@dataclass
class RawData:
    columns: dict[str, np.ndarray]
    fingerprint: str
    description: str
    meta: dict = field(default_factory=dict)
    terms: str | None = None


def _hash_arrays(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _files_fingerprint(name: str) -> str:
    return hashlib.sha256("".join(f.sha256 for f in CATALOG[name].files).encode()).hexdigest()


def load_digits(cfg) -> RawData:
    """scikit-learn's bundled handwritten digits: 1797 8x8 images, values 0..16, always offline."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images, labels = bunch.images.astype(np.float32), bunch.target.astype(np.int64)
    return RawData({"id": np.arange(len(labels)), "image": images, "label": labels}, _hash_arrays(images, labels),
                   "scikit-learn digits (UCI ML hand-written digits, 1797 images 8x8, values 0..16)",
                   {"image_shape": [8, 8], "num_classes": 10, "raw_range": [0.0, 16.0]})


def load_mnist(cfg) -> RawData:
    p = fetch("mnist", cfg.data.mirror)
    train_x = read_idx(p["train-images-idx3-ubyte.gz"], 3)
    train_y = read_idx(p["train-labels-idx1-ubyte.gz"], 1)
    test_x = read_idx(p["t10k-images-idx3-ubyte.gz"], 3)
    test_y = read_idx(p["t10k-labels-idx1-ubyte.gz"], 1)
    for x, y, n in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
        if len(x) != len(y):
            from aidc.errors import DataError

            raise DataError(f"MNIST {n}: {len(x)} images but {len(y)} labels")
    images = np.concatenate([train_x, test_x])
    labels = np.concatenate([train_y, test_y]).astype(np.int64)
    origin = np.array(["train"] * len(train_x) + ["test"] * len(test_x), dtype=object)
    return RawData({"id": np.arange(len(labels)), "image": images, "label": labels, "origin": origin},
                   _files_fingerprint("mnist"), CATALOG["mnist"].description,
                   {"image_shape": [28, 28], "num_classes": 10, "raw_range": [0.0, 255.0]}, CATALOG["mnist"].terms)


SMS_CLASSES = ["ham", "spam"]


def load_sms_spam(cfg) -> RawData:
    p = fetch("sms-spam", cfg.data.mirror)["SMSSpamCollection"]
    table = read_delimited(p, ["label", "text"], delimiter="\t", header=False,
                           types={"label": pa.string(), "text": pa.string()})
    names = table.column("label").to_numpy(zero_copy_only=False)
    labels = np.array([SMS_CLASSES.index(n) if n in SMS_CLASSES else -1 for n in names], dtype=np.int64)
    text = table.column("text").to_numpy(zero_copy_only=False).astype(object)
    return RawData({"id": np.arange(len(labels)), "text": text, "label": labels}, _files_fingerprint("sms-spam"),
                   CATALOG["sms-spam"].description, {"class_names": SMS_CLASSES}, CATALOG["sms-spam"].terms)


def load_tinyshakespeare(cfg) -> RawData:
    """One row per speech (blocks separated by a blank line), so splits never cut a speech in two."""
    text = read_text(fetch("tinyshakespeare", cfg.data.mirror)["input.txt"])
    docs = np.array([d.strip("\n") + "\n" for d in text.split("\n\n")], dtype=object)
    return RawData({"id": np.arange(len(docs)), "text": docs}, _files_fingerprint("tinyshakespeare"),
                   CATALOG["tinyshakespeare"].description, {}, CATALOG["tinyshakespeare"].terms)


def load_movielens(cfg) -> RawData:
    p = fetch("movielens", cfg.data.mirror)["ratings.csv"]
    t = read_delimited(p, ["userId", "movieId", "rating", "timestamp"],
                       types={"userId": pa.int64(), "movieId": pa.int64(), "rating": pa.float64(),
                              "timestamp": pa.int64()})
    cols = {k: t.column(c).to_numpy() for k, c in
            (("user", "userId"), ("item", "movieId"), ("rating", "rating"), ("timestamp", "timestamp"))}
    return RawData({"id": np.arange(t.num_rows), **cols}, _files_fingerprint("movielens"),
                   CATALOG["movielens"].description, {"rating_range": [0.5, 5.0]}, CATALOG["movielens"].terms)


SYNTHETIC_LETTERS = "abcdefgh"


def load_synthetic_instructions(cfg) -> RawData:
    """A letter-reversal instruction task made locally (data.chat.examples distinct chat rows): "reverse: c a f"
    -> "f a c". A tiny model learns it on a CPU in minutes and a held-out exact match measures it, so the whole
    fine-tuning lifecycle runs offline before a team points it at its own files."""
    import json

    rng = np.random.default_rng(0)
    n, seen, records = cfg.data.chat.examples, set(), []
    if n > sum(len(SYNTHETIC_LETTERS) ** k for k in range(3, 6)):
        from aidc.errors import ConfigError

        raise ConfigError(f"data.chat.examples {n} is more than the distinct rows of synthetic-instructions")
    while len(records) < n:
        word = "".join(rng.choice(list(SYNTHETIC_LETTERS), int(rng.integers(3, 6))))
        if word in seen:
            continue
        seen.add(word)
        records.append(json.dumps({"messages": [{"role": "user", "content": f"reverse: {' '.join(word)}"},
                                                {"role": "assistant", "content": " ".join(reversed(word))}]}))
    col = np.array(records, dtype=object)
    return RawData({"id": np.arange(n), "record": col}, hashlib.sha256(f"reverse-v1:{n}".encode()).hexdigest(),
                   f"synthetic letter-reversal instructions ({n} chat rows, letters {SYNTHETIC_LETTERS}, 3-5 long)")


def load_jsonl_records(cfg) -> RawData:
    """Your own JSONL (data.path: a file or folder, local or s3://, gs://): one raw line per row, parsed and
    checked by the task (a line that is not JSON is a rejected row with its reason, not a failed job)."""
    from aidc.data.readers import gunzip, input_files_fingerprint, read_bytes, with_scheme

    fingerprint, files = input_files_fingerprint(cfg.data.path)
    lines = []
    for path in with_scheme(cfg.data.path, files):
        text = gunzip(path, read_bytes(path)).decode("utf-8", errors="replace")
        lines.extend(line for line in text.splitlines() if line.strip())
    col = np.array(lines, dtype=object)
    return RawData({"id": np.arange(len(col)), "record": col}, fingerprint,
                   f"{len(files)} JSONL file(s) at {cfg.data.path}")


def _recording_rows(names: list[str], audio: list[bytes]) -> dict[str, np.ndarray]:
    """Rows of recordings named `{label}_{speaker}_{index}.wav` (FSDD's scheme), their bytes undecoded (the task
    decodes them and rejects what it cannot use, with the reason); a name off the scheme gets label -1."""
    stems = [n.rsplit("/", 1)[-1].rsplit(".", 1)[0].split("_") for n in names]
    ok = [len(x) == 3 and x[0].isdecimal() and x[2].isdecimal() for x in stems]
    col = np.empty(len(audio), dtype=object)
    col[:] = audio
    return {"id": np.arange(len(names)), "audio": col, "file": np.array(names, dtype=object),
            "label": np.array([int(x[0]) if good else -1 for x, good in zip(stems, ok)], dtype=np.int64),
            "speaker": np.array([x[1] if good else "" for x, good in zip(stems, ok)], dtype=object),
            "index": np.array([int(x[2]) if good else -1 for x, good in zip(stems, ok)], dtype=np.int64)}


DIGITS_META = {"num_classes": 10, "class_names": [str(d) for d in range(10)]}


def load_fsdd(cfg) -> RawData:
    """The Free Spoken Digit Dataset: one row per recording; origin = the official split (recordings 0-4 of each
    speaker and digit are the test set, per the upstream README)."""
    from aidc.data.catalog import fetch_tree

    folder = fetch_tree("fsdd", cfg.data.mirror)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    cols = _recording_rows([p.name for p in files], [p.read_bytes() for p in files])
    cols["origin"] = np.where((cols["index"] >= 0) & (cols["index"] < 5), "test", "train").astype(object)
    entry = CATALOG["fsdd"]
    return RawData(cols, entry.tree.content_sha256, entry.description,
                   {**DIGITS_META, "speakers": sorted(set(cols["speaker"]) - {""})}, entry.terms)


def load_wav_files(cfg) -> RawData:
    """Your own recordings (data.path: a folder, local or s3://, gs://; every file in it is a row, so a file that
    is not a usable wav is a rejected row with its reason), named {digit}_{speaker}_{index}.wav."""
    from aidc.data.readers import input_files_fingerprint, read_bytes, with_scheme

    fingerprint, files = input_files_fingerprint(cfg.data.path)
    files = sorted(files)
    audio = [read_bytes(f, allow_empty=True) for f in with_scheme(cfg.data.path, files)]
    cols = _recording_rows(files, audio)
    # ids (the split key) from each file's path inside data.path: adding a recording moves no other one
    base = cfg.data.path.rstrip("/").split("://")[-1]
    cols["id"] = np.array([int.from_bytes(hashlib.blake2b(f.removeprefix(base).encode(), digest_size=8).digest(),
                                          "little") >> 1 for f in files], dtype=np.int64)
    return RawData(cols, fingerprint, f"{len(files)} file(s) at {cfg.data.path}",
                   {**DIGITS_META, "speakers": sorted(set(cols["speaker"]) - {""})})


SOURCES = {
    "digits": load_digits,
    "mnist": load_mnist,
    "sms-spam": load_sms_spam,
    "tinyshakespeare": load_tinyshakespeare,
    "movielens": load_movielens,
    "synthetic-instructions": load_synthetic_instructions,
    "fsdd": load_fsdd,
}
for _name in SOURCES:  # job configs can name them now (data.source)
    register_dataset(_name)
