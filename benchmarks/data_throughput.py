"""Ray Data vs one pandas process on the same input and the same machine.

CPU-bound: clean (normalise, strip URLs/numbers, collapse spaces) + byte-level BPE tokenization of
SMS messages. Vectorised: standardization of numeric columns, where pandas is expected to win.
Tokenizers run single-threaded in both (RAYON_NUM_THREADS=1), so parallelism comes only from the
framework under test. Prints rows/s, the ratios, and Ray Data's scaling from 1 to 2 CPUs.

    python -m benchmarks.data_throughput [--quick] [--rows N]
"""

from __future__ import annotations

import argparse
import json
import os
import re

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers loads: one thread per process
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks.common import SHARED_DATA, local_ray, timed  # noqa: E402

URL = re.compile(r"https?://\S+|www\.\S+")
NUM = re.compile(r"\d+")
SPACE = re.compile(r"\s+")


def clean_text(t: str) -> str:
    t = URL.sub(" <url> ", t.lower())
    t = NUM.sub(" <num> ", t)
    t = "".join(ch for ch in t if ch.isprintable())
    return SPACE.sub(" ", t).strip()


def make_tokenizer_state(texts):
    from aidc.data.tokenizer import train_tokenizer

    return train_tokenizer([clean_text(t) for t in texts[:2000]], "bpe", 2000, lowercase=False)


def text_batch(batch: pd.DataFrame, state: dict) -> pd.DataFrame:
    from aidc.data.tokenizer import encode, pad_truncate

    cleaned = [clean_text(t) for t in batch["text"]]
    ids = pad_truncate(encode(cleaned, state), 64, 0)
    return pd.DataFrame({"n_tokens": (ids != 0).sum(axis=1)})


def standardize_batch(batch: pd.DataFrame, mean: np.ndarray, std: np.ndarray) -> pd.DataFrame:
    return (batch - mean) / std


def load_texts(rows: int) -> pd.DataFrame:
    lines = (SHARED_DATA / "sms-spam-collection" / "SMSSpamCollection").read_text(encoding="utf-8").splitlines()
    texts = [line.split("\t", 1)[1] for line in lines]
    reps = -(-rows // len(texts))
    # A suffix per copy keeps repeated messages distinct (no caching effects anywhere).
    return pd.DataFrame({"text": [f"{t} #{i}" for i in range(reps) for t in texts][:rows]})


def split_frame(df: pd.DataFrame, blocks: int) -> list[pd.DataFrame]:
    step = -(-len(df) // blocks)
    return [df.iloc[i:i + step] for i in range(0, len(df), step)]


def ray_run(df: pd.DataFrame, fn, fn_kwargs: dict, cpus: int, blocks: int) -> float:
    with local_ray(cpus) as ray:
        ds = ray.data.from_pandas(split_frame(df, blocks))
        ds.map_batches(fn, fn_kwargs=fn_kwargs, batch_format="pandas", batch_size=1024).materialize()  # warm-up
        ds = ray.data.from_pandas(split_frame(df, blocks))
        _, secs = timed(lambda: ds.map_batches(fn, fn_kwargs=fn_kwargs, batch_format="pandas",
                                               batch_size=1024).materialize())
    return secs


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    rows = 4_000 if args.quick else args.rows

    texts = load_texts(rows)
    state = make_tokenizer_state(list(texts["text"]))
    _, pandas_s = timed(lambda: pd.concat([text_batch(texts.iloc[i:i + 1024], state)
                                           for i in range(0, rows, 1024)]))
    ray1 = ray_run(texts, text_batch, {"state": state}, cpus=1, blocks=8)
    ray2 = ray_run(texts, text_batch, {"state": state}, cpus=2, blocks=8)

    num = pd.DataFrame(np.random.default_rng(0).normal(size=(rows * 10, 8)), columns=[f"x{i}" for i in range(8)])
    mean, std = num.mean().to_numpy(), num.std().to_numpy()
    _, pandas_std = timed(lambda: standardize_batch(num, mean, std))
    ray_std = ray_run(num, standardize_batch, {"mean": mean, "std": std}, cpus=2, blocks=8)

    result = {
        "text_rows": rows,
        "text_pandas_rows_per_s": round(rows / pandas_s),
        "text_ray_1cpu_rows_per_s": round(rows / ray1),
        "text_ray_2cpu_rows_per_s": round(rows / ray2),
        "text_ray2_vs_pandas": round(pandas_s / ray2, 2),
        "text_ray_scaling_1_to_2": round(ray1 / ray2, 2),
        "std_rows": rows * 10,
        "std_pandas_rows_per_s": round(rows * 10 / pandas_std),
        "std_ray_2cpu_rows_per_s": round(rows * 10 / ray_std),
        "std_ray2_vs_pandas": round(pandas_std / ray_std, 3),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
