"""Ray Data layer: sources, cleaning, fitted transforms, deterministic splits, versioned datasets.

Preprocess a job's data with aidc.tasks.preprocess(cfg): the pipeline (aidc.data.pipeline.preprocess) takes the
workload's task as an argument, since this layer imports no task.
"""

from aidc.data.dataset import DatasetVersion, open_dataset
from aidc.data.sources import SOURCES

__all__ = ["DatasetVersion", "SOURCES", "open_dataset"]
