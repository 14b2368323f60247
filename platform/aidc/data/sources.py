"""Named data sources. Each yields rows with a stable key, a feature column and a label.

A source also reports a fingerprint of its raw input, so the same input gives the same
dataset version and a changed input gives a new one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class RawData:
    """An in-memory raw table (small sources); large sources return Ray datasets instead."""

    columns: dict[str, np.ndarray]
    fingerprint: str
    description: str
    feature_range: tuple[float, float]  # valid raw value range of the features
    num_classes: int


def _fingerprint(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def load_digits() -> RawData:
    """scikit-learn's bundled handwritten digits: 1797 8x8 images, pixel values 0..16, always offline."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = bunch.images.astype(np.float32)  # (n, 8, 8)
    labels = bunch.target.astype(np.int64)
    return RawData(
        columns={"id": np.arange(len(labels), dtype=np.int64), "image": images, "label": labels},
        fingerprint=_fingerprint(images, labels),
        description="scikit-learn digits (UCI ML hand-written digits, 1797 images 8x8, values 0..16)",
        feature_range=(0.0, 16.0),
        num_classes=10,
    )


SOURCES: dict[str, Callable[[], RawData]] = {"digits": load_digits}
