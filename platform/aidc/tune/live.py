"""A sweep in progress, for `aidc sweeps show`: each trial's state and since when, and which wait for resources.

The sweep's driver writes `<sweep>/live.json` (a Tune callback, every few seconds and at each change): trials
PENDING in Tune wait for a trial slot or the trial's own resources; a RUNNING trial whose Train worker group
has asked for resources but not got them yet has `<sweep>/waiting/<trial_id>.json` (written by the trial,
aidc.tune.trainable), with what it asked for and since when.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ray.tune import Callback

LIVE_FILE = "live.json"


class LiveStatus(Callback):
    def __init__(self, sweep_dir: str, interval_s: float = 2.0):
        self.sweep_dir, self.interval_s = sweep_dir, interval_s
        self._since: dict[str, tuple[str, float]] = {}
        self._last = 0.0

    def _write(self, trials, done: bool = False) -> None:
        from aidc import storage

        if storage.is_uri(self.sweep_dir):
            return
        now = time.time()
        rows = {}
        changed = False
        for t in trials:
            status, since = self._since.get(t.trial_id, (None, now))
            if status != t.status:
                self._since[t.trial_id] = (t.status, now)
                since, changed = now, True
            rows[t.trial_id] = {"status": t.status, "since": since,
                                "epochs": (t.last_result or {}).get("epochs_done", 0)}
        if not (changed or done or now - self._last >= self.interval_s):
            return
        self._last = now
        path = Path(self.sweep_dir, LIVE_FILE)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"updated": now, "finished": done, "pid": os.getpid(), "trials": rows}))
        os.replace(tmp, path)

    def on_step_end(self, iteration, trials, **info):
        self._write(trials)

    def on_experiment_end(self, trials, **info):
        self._write(trials, done=True)


def live_lines(sweep_dir: str, now: float | None = None) -> list[str] | None:
    """The in-progress view of a sweep, or None when its driver never wrote one."""
    path = Path(sweep_dir, LIVE_FILE)
    if not path.is_file():
        return None
    live = json.loads(path.read_text())
    now = now or time.time()
    waiting = {}
    for f in Path(sweep_dir, "waiting").glob("*.json"):
        try:
            waiting[f.stem] = json.loads(f.read_text())
        except (OSError, ValueError):  # being rewritten
            continue
    counts: dict[str, int] = {}
    lines = []
    for trial_id, row in sorted(live["trials"].items()):
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        note = f"{row['status'].lower()} for {_ago(now - row['since'])}, {row['epochs']} epoch(s) done"
        if row["status"] == "PENDING":
            note += " - waiting for a trial slot or the trial's resources"
        w = waiting.get(trial_id)
        if w and row["status"] == "RUNNING":
            from aidc.runtime import describe_resources

            note += (f" - waiting {_ago(now - w['since'])} for {w['workers']} worker(s) x "
                     f"{{{describe_resources(w['resources'])}}}")
        lines.append(f"  {trial_id}: {note}")
    state = "finished" if live.get("finished") else f"in progress (updated {_ago(now - live['updated'])} ago)"
    head = f"{state}: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    return [head, *lines]


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
