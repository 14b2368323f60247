"""The per-worker training loop, the Ray Train driver around it, and checkpoint state."""

from aidc.train.loop import train_loop_per_worker
from aidc.train.trainer import TrainOutcome, run_training

__all__ = ["TrainOutcome", "run_training", "train_loop_per_worker"]
