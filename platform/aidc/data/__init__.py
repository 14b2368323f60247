"""Ray Data layer: sources, cleaning, fitted transforms, deterministic splits, versioned datasets."""

from aidc.data.dataset import DatasetVersion, open_dataset
from aidc.data.pipeline import preprocess
from aidc.data.sources import SOURCES

__all__ = ["DatasetVersion", "SOURCES", "open_dataset", "preprocess"]
