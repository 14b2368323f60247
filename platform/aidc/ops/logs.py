"""Keep job logs readable: drop Ray's known-harmless repeated warnings in embedded runs.

Ray Train 2.60 starts a detached `PlacementGroupCleaner` actor per run that asks the State API (served by
the dashboard) every few seconds whether the controller still lives. An embedded local Ray runs without a
dashboard, so every check fails and logs "State API may be temporarily unavailable" until the run ends -
dozens of identical lines forwarded into the job's output, while the cleaner cannot do anything useful
there anyway (the placement group dies with the embedded Ray). `quiet_ray_workers` is a
`worker_process_setup_hook` that filters exactly that message in every worker of the embedded Ray (and
pins the worker's RAY_ADDRESS to its own cluster, so the lookup fails that way on a shared host too).
"""

from __future__ import annotations

import logging
import os

CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
NOISE = ("State API may be temporarily unavailable",)
HOOK = "aidc.ops.logs.quiet_ray_workers"


class DropMessages(logging.Filter):
    """Drop records whose message contains one of the given fragments."""

    def __init__(self, fragments=NOISE):
        super().__init__()
        self.fragments = tuple(fragments)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def pin_ray_address() -> None:
    """Point this worker's address lookups (the State API client's) at its own cluster.

    Without it, the cleaner resolves "auto" and, on a host running several Ray instances, its monitor
    thread dies with "Found multiple active Ray instances" - a traceback instead of the filtered warning.
    """
    if os.environ.get("RAY_ADDRESS"):
        return
    try:
        import ray

        if ray.is_initialized():  # a worker; never look a cluster up from elsewhere
            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - not connected (called outside a worker)
        pass


def quiet_ray_workers() -> None:
    """worker_process_setup_hook: own cluster's address, and the filter on the cleaner's logger (idempotent)."""
    pin_ray_address()
    log = logging.getLogger(CLEANER_LOGGER)
    if not any(isinstance(f, DropMessages) for f in log.filters):
        log.addFilter(DropMessages())
