"""Batch inference on Ray Data: a registered model scores a dataset split or your own files offline."""

from aidc.batch.job import model_ref, run_batch_inference, summary_lines

__all__ = ["model_ref", "run_batch_inference", "summary_lines"]
