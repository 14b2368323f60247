"""Issue #24's scenario, end to end: a 6-trial ASHA sweep whose trials each start a 1-worker Ray Train group,
its driver's process group SIGKILLed mid-sweep, then `--resume` - optionally while side processes keep the
cores busy. Reports how long each part took, whether the resume ended, every trial's status in results.csv,
and what the cluster still holds afterwards (placement groups, Ray Train cleaners whose controller died).

    python -m benchmarks.sweep_resume [--load 0] [--nice 19] [--kill-after 2] [--timeout 1800]

Runs on a local Ray of its own (4 CPUs, as the suite's); `--load N` starts N busy-looping processes at
`--nice` (0 = full priority) for the whole run. Too slow for the test suite under full load on 2 cores (the
resume alone took over 20 minutes there): the suite tests each mechanism on smaller sweeps instead
(tests/integration/test_tune.py), this runs the whole story.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import ROOT, local_ray


def _spin(niceness: int) -> None:
    os.nice(niceness)
    while True:
        pass


def _sweep_config(storage: str) -> Path:
    raw = yaml.safe_load((ROOT / "jobs" / "configs" / "digits.yaml").read_text())
    raw["run"] = {"storage": storage, "name": "killme"}
    raw["model"].update(channels=[8], hidden=16)
    raw["train"].update(epochs=4)
    raw["resources"].update(num_workers=1)
    raw["tune"] = {"space": {"train.lr": {"type": "loguniform", "low": 1.0e-4, "high": 0.03}}, "search": "random",
                   "scheduler": "asha", "num_samples": 6, "seed": 0}
    path = Path(storage) / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="no side load, kill after the first trial reports")
    p.add_argument("--load", type=int, default=0, help="busy-looping side processes")
    p.add_argument("--nice", type=int, default=19, help="their niceness (0: full priority)")
    p.add_argument("--kill-after", type=int, default=2, help="SIGKILL once this many trials have reported")
    p.add_argument("--timeout", type=float, default=1800, help="seconds the resume may take before it counts as hung")
    args = p.parse_args(argv)
    if args.quick:
        args.load, args.kill_after = 0, 1
    from aidc.tune.cleanup import orphan_cleaners, reserved

    spinners = [multiprocessing.Process(target=_spin, args=(args.nice,), daemon=True) for _ in range(args.load)]
    for s in spinners:
        s.start()
    out: dict = {"load": args.load, "nice": args.nice}
    try:
        with tempfile.TemporaryDirectory(prefix="aidc-sweep-resume-") as storage, local_ray(4) as ray:
            env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "AIDC_STORAGE": storage,
                   "PYTHONPATH": f"{ROOT}:{ROOT / 'platform'}"}
            prep = subprocess.run([sys.executable, "-m", "jobs.preprocess", "--config",
                                   str(ROOT / "jobs" / "configs" / "digits.yaml")], cwd=ROOT, env=env,
                                  capture_output=True, text=True)
            assert prep.returncode == 0, prep.stderr[-2000:]
            before = reserved()
            cmd = [sys.executable, "-m", "jobs.tune", "--config", str(_sweep_config(storage))]
            sweep = Path(storage, "sweeps", "killme")
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            while sum(1 for f in sweep.glob("*/result.json") if f.stat().st_size) < args.kill_after:
                if proc.poll() is not None or time.monotonic() - t0 > args.timeout:
                    raise SystemExit(f"the first sweep ended or stalled before {args.kill_after} trials reported")
                time.sleep(0.5)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out["killed_after_s"] = round(time.monotonic() - t0, 1)
            t1 = time.monotonic()
            try:
                done = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True,
                                      timeout=args.timeout)
                out["resume_rc"] = done.returncode
                out["startup_timeouts_logged"] = (done.stdout + done.stderr).count("WorkerGroupStartupTimeoutError")
            except subprocess.TimeoutExpired:
                out["resume_rc"] = "hung"
            out["resume_s"] = round(time.monotonic() - t1, 1)
            import pandas as pd

            csv = sweep / "results.csv"
            df = pd.read_csv(csv) if csv.exists() else pd.DataFrame(columns=["status"])
            out["trials_in_results"] = len(df)
            out["statuses"] = df["status"].value_counts().to_dict()
            out["placement_groups_left"] = [g for g in reserved() if g not in before]
            out["orphaned_cleaners"] = len(orphan_cleaners())
    finally:
        for s in spinners:
            s.terminate()
    out["ok"] = (out.get("resume_rc") == 0 and out.get("trials_in_results") == 6
                 and not out.get("placement_groups_left") and out.get("orphaned_cleaners") == 0)
    print(json.dumps(out, indent=1))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
