"""Logging setup shared by every entrypoint (metrics and audit log grow here)."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str | None = None) -> None:
    logging.basicConfig(
        level=(level or os.environ.get("AIDC_LOG_LEVEL", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("ray.autoscaler", "alembic", "mlflow.store", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
