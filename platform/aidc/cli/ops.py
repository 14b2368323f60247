"""`aidc status`: a thin handler over the status screen (aidc.cli.status)."""

from __future__ import annotations

import os


def status_command(args) -> int:
    from aidc.cli.status import collect, render

    snap = collect(args.address, args.prometheus)
    print(render(snap))
    return 1 if snap["errors"] and all(snap.get(k) is None for k in ("nodes", "jobs", "serve")) else 0


def add_parsers(sub) -> None:
    s = sub.add_parser("status", help="one screen: nodes, jobs, training progress, sweeps, Serve apps, alerts")
    s.add_argument("--address", default=os.environ.get("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265"),
                   help="Ray dashboard URL (default $RAY_DASHBOARD_ADDRESS or http://127.0.0.1:8265)")
    s.add_argument("--prometheus", default=os.environ.get("AIDC_PROMETHEUS_URL"),
                   help="Prometheus URL for request rates, progress and firing alerts (default $AIDC_PROMETHEUS_URL)")
    s.set_defaults(fn=status_command)
