"""Deterministic, seedable splits from a hash of each row's key, never from row order."""

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
