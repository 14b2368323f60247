"""Deterministic, seedable splits from a hash of each row's key (never row order), a dataset's own
test set, or time order per user."""

from __future__ import annotations

import hashlib

import numpy as np

SPLITS = ("train", "val", "test")


def split_fraction(key: object, seed: int) -> float:
    """A number in [0, 1) that depends only on (seed, key)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_splits(keys: np.ndarray, train: float, val: float, seed: int) -> np.ndarray:
    """Split name per key: [0, train) -> train, [train, train+val) -> val, the rest -> test."""
    u = np.fromiter((split_fraction(k, seed) for k in keys.tolist()), dtype=np.float64, count=len(keys))
    out = np.full(len(keys), "test", dtype=object)
    out[u < train + val] = "val"
    out[u < train] = "train"
    return out


def predefined_splits(keys: np.ndarray, origin: np.ndarray, train: float, seed: int) -> np.ndarray:
    """The dataset's own test rows stay test; the rest is hashed into train / val."""
    out = assign_splits(keys, train, 1.0 - train, seed)
    out[origin == "test"] = "test"
    return out


def time_splits(group: np.ndarray, time: np.ndarray, val: float, test: float, min_rows: int = 3) -> np.ndarray:
    """Per group (user), the latest `test` fraction -> test and the `val` fraction before it -> val.
    Groups with fewer than `min_rows` rows stay entirely in train, so no user is only in val/test."""
    import pandas as pd

    df = pd.DataFrame({"g": group, "t": time, "i": np.arange(len(group))}).sort_values(["g", "t", "i"])
    rank = df.groupby("g").cumcount().to_numpy()
    size = df.groupby("g")["g"].transform("size").to_numpy()
    n_test = np.floor(size * test).astype(int)
    n_val = np.floor(size * val).astype(int)
    split = np.full(len(df), "train", dtype=object)
    split[rank >= size - n_test - n_val] = "val"
    split[rank >= size - n_test] = "test"
    split[size < min_rows] = "train"
    out = np.empty(len(group), dtype=object)
    out[df["i"].to_numpy()] = split
    return out
