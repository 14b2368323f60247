"""Tuning metrics: a sweep's trials by state (running, completed, stopped early, errored), from Tune's driver.

`TrialStateMetrics(sweep, epochs)` is a Ray Tune callback; the sweep adds it to its RunConfig. Final counts
go through the cluster's metrics actor, so a finished sweep's numbers outlive its driver.
"""

from __future__ import annotations

from ray.tune import Callback

from aidc.ops import metrics
from aidc.ops.durable import durable_set

STATES = ("running", "completed", "stopped", "errored")


class TrialStateMetrics(Callback):
    """Counts trials per state; a trial that ends before its last epoch was stopped early (ASHA, plateau)."""

    def __init__(self, sweep: str, epochs: int):
        self.sweep, self.epochs = sweep, epochs
        self.state: dict[str, str] = {}

    def _publish(self, durable: bool = False) -> None:
        for s in STATES:
            n = sum(1 for v in self.state.values() if v == s)
            (durable_set if durable else _set)("aidc_tune_trials", n, sweep=self.sweep, state=s)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.state[trial.trial_id] = "running"
        self._publish()

    def on_trial_complete(self, iteration, trials, trial, **info):
        epoch = (trial.last_result or {}).get("epoch")
        early = epoch is not None and int(epoch) + 1 < self.epochs
        self.state[trial.trial_id] = "stopped" if early else "completed"
        self._publish()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.state[trial.trial_id] = "errored"
        self._publish()

    def on_experiment_end(self, trials, **info):
        self._publish(durable=True)


def _set(name: str, value: float, **labels) -> None:
    metrics.set_gauge(name, value, **labels)
