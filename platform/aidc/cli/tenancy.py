"""`aidc gateway`, `aidc teams`, `aidc queue`, `aidc usage`: thin handlers over aidc.tenancy (admins, on the head)."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime

from aidc.cli.security import duration


def gateway_command(args) -> int:
    config = args.autoscaling_config
    if config is None:  # what `ray up` leaves on the head (cluster.yaml's --autoscaling-config), if there
        default = os.path.expanduser("~/ray_bootstrap_config.yaml")
        config = default if os.path.isfile(default) else None
    from aidc.telemetry import setup_logging
    from aidc.tenancy.gateway import cluster_token, serve  # (neither imports Ray)

    if config and "RAY_AUTH_MODE" not in os.environ and cluster_token():
        # the autoscaler is asked through Ray's GCS client, which sends the cluster token only in token mode, read
        # once when Ray is first imported: before that
        os.environ["RAY_AUTH_MODE"] = "token"

    setup_logging()
    # a service logs what it does (aidc's CLI is quiet, at WARNING): its address, the autoscaler asks
    logging.getLogger().setLevel(os.environ.get("AIDC_LOG_LEVEL", "INFO").upper())
    serve(args.ray_address, args.host, args.port, interval_s=args.interval, enforce_s=args.enforce_interval,
          autoscaling_config=config or None, gcs_address=args.gcs_address, node_wait_s=args.node_wait)
    return 0


def _gpus(items: list[str] | None) -> dict[str, float] | None:
    if items is None:
        return None
    out = {}
    for item in items:
        kind, _, n = item.rpartition("=")
        try:
            out[kind or "*"] = float(n)
        except ValueError:
            raise SystemExit(f"error: bad --gpus {item!r}: use TYPE=N (A100=4) or N for GPUs of any type") from None
    return out


def teams_command(args) -> int:
    from aidc.errors import ConfigError
    from aidc.tenancy.model import Quota, Team, load_teams, parse_teams_file, update_teams

    if args.action == "list":
        from aidc import storage
        from aidc.security.keys import keys_path, parse_team_limits

        path = keys_path()
        limits = parse_team_limits(storage.read_text(path)) if storage.exists(path) else {}
        teams = load_teams().teams
        if not teams:
            print("no teams yet; add one with aidc teams set vision --cpus 8 --gpus A100=4 --jobs 4")
        for t in teams.values():
            q = t.quota
            print(f"{t.name:<16} priority={t.priority} max_priority={t.max_priority if t.max_priority is not None else t.priority} "
                  f"borrow={'yes' if t.borrow else 'no'}  quota: cpus={q.cpus if q.cpus is not None else '-'} "
                  f"gpus={q.gpus or '-'} memory_gb={q.memory_gb if q.memory_gb is not None else '-'} "
                  f"jobs={q.jobs if q.jobs is not None else '-'}  "
                  f"infer_rate={limits[t.name].rate_limit if t.name in limits else '-'}/s")
        return 0
    if args.action == "apply":
        if not args.name:
            raise ConfigError("aidc teams apply needs a file: aidc teams apply teams.yaml")
        from pathlib import Path

        new = parse_teams_file(Path(args.name).read_text(), args.name)

        def replace(teams):
            teams.teams = new
            return {"team": "*", "teams": sorted(new)}

        update_teams(replace, action="team.apply")
        print(f"applied {len(new)} teams from {args.name}: {', '.join(sorted(new))}")
        return 0
    if not args.name:
        raise ConfigError(f"aidc teams {args.action} needs a team name, e.g. aidc teams {args.action} vision")
    if args.action == "delete":
        def drop(teams):
            if args.name not in teams.teams:
                raise ConfigError(f"no team {args.name!r}; see aidc teams list")
            del teams.teams[args.name]
            return {"team": args.name}

        update_teams(drop, action="team.delete")
        print(f"deleted team {args.name}: its queued jobs wait until it exists again; running jobs go on")
        return 0

    def change(teams):  # set: create or update only the fields given
        old = teams.teams.get(args.name) or Team(name=args.name)
        quota = old.quota.model_dump()
        for field, value in (("cpus", args.cpus), ("memory_gb", args.memory_gb), ("jobs", args.jobs),
                             ("gpus", _gpus(args.gpus))):
            if value is not None:
                quota[field] = None if value == -1 else value
        body = old.model_dump()
        body["quota"] = Quota.model_validate(quota).model_dump()
        for field, value in (("priority", args.priority), ("max_priority", args.max_priority),
                             ("borrow", args.borrow)):
            if value is not None:
                body[field] = value
        teams.teams[args.name] = Team.model_validate(body)
        return {"team": args.name, "old": old.model_dump(), "new": teams.teams[args.name].model_dump()}

    update_teams(change)
    if args.infer_rate_limit is not None:
        from aidc.security.keys import set_team_limit

        set_team_limit(args.name, None if args.infer_rate_limit <= 0 else args.infer_rate_limit, args.infer_burst)
    t = load_teams().teams[args.name]
    print(f"team {t.name}: quota {t.quota.model_dump(exclude_none=True)}, priority {t.priority}, "
          f"borrow {'yes' if t.borrow else 'no'}")
    return 0


def queue_command(args) -> int:
    from aidc.tenancy.admission import order
    from aidc.tenancy.model import load_jobs

    jobs = list(load_jobs().jobs.values())
    active = [j for j in jobs if j.state == "RUNNING"] + order([j for j in jobs if j.state == "QUEUED"])
    if args.all:
        active += sorted((j for j in jobs if j.state not in ("RUNNING", "QUEUED")), key=lambda j: j.submitted_at)
    if not active:
        print("no running or queued jobs" + ("" if args.all else " (--all shows finished ones)"))
    now = time.time()
    for j in active:
        waited = (j.first_started_at or now) - j.submitted_at
        print(f"{j.id:<28} {j.team:<12} {j.state:<9} prio={j.priority:<3} {j.demand.short():<18} "
              f"{'borrowed ' if j.borrowed else ''}attempt={j.attempt + 1} waited={waited:.0f}s  {j.message}")
    return 0


def usage_command(args) -> int:
    from aidc.tenancy.model import load_jobs
    from aidc.tenancy.usage import format_usage, usage

    since = time.time() - args.since if args.since else 0.0
    rows = usage(list(load_jobs().jobs.values()), since)
    if args.team:
        rows = [r for r in rows if r.team == args.team]
    label = datetime.fromtimestamp(since).isoformat(timespec="seconds") if since else "the start"
    print(f"usage since {label} (CPU/GPU-h: admitted demand x time held; GPU-kWh: NVML power of the GPUs its "
          "processes used, via Ray's agent; 0 without GPUs)")
    print(format_usage(rows))
    return 0


def add_parsers(sub) -> None:
    g = sub.add_parser("gateway", help="the tenancy gateway: Ray's Jobs API per team (run it on the head)")
    g.add_argument("--ray-address", default="http://127.0.0.1:8265", help="the real Jobs API (dashboard) URL")
    g.add_argument("--host", default="0.0.0.0", help="address to listen on")
    g.add_argument("--port", type=int, default=8266, help="port to listen on (teams set RAY_ADDRESS to it)")
    g.add_argument("--interval", type=float, default=1.0, help="seconds between scheduling rounds")
    g.add_argument("--enforce-interval", type=float, default=5.0, help="seconds between resource-use checks")
    g.add_argument("--autoscaling-config", default=os.environ.get("AIDC_AUTOSCALING_CONFIG"),
                   help="the autoscaler's cluster config (default: ~/ray_bootstrap_config.yaml where `ray up` left "
                   "it): jobs the nodes alive cannot hold but the full cluster can wait for nodes the gateway asks "
                   "Ray's autoscaler for; '' for a cluster that does not grow")
    g.add_argument("--gcs-address", help="the head's GCS (HOST:PORT) the autoscaler is asked through (default: the "
                   "Ray head last started on this host)")
    g.add_argument("--node-wait", type=float, default=600.0, help="seconds a job waits for nodes asked of the "
                   "autoscaler before it may preempt lower-priority or borrowed jobs (the cloud may have none)")
    g.set_defaults(fn=gateway_command)

    t = sub.add_parser("teams", aliases=["quotas"],
                       help="teams, their quotas and priorities: list, set NAME, delete NAME, apply FILE")
    t.add_argument("action", choices=["list", "set", "delete", "apply"])
    t.add_argument("name", nargs="?", help="team name (set, delete) or a teams YAML file (apply)")
    t.add_argument("--cpus", type=float, help="CPU quota (-1: no limit)")
    t.add_argument("--gpus", action="append", help="GPU quota per accelerator type: A100=4 (repeatable), or N for "
                   "any type")
    t.add_argument("--memory-gb", type=float, help="memory quota in GiB (-1: no limit)")
    t.add_argument("--jobs", type=int, help="jobs running at once (-1: no limit)")
    t.add_argument("--priority", type=int, help="default priority of the team's jobs")
    t.add_argument("--max-priority", type=int, help="highest priority a job may ask for (metadata priority)")
    t.add_argument("--infer-rate-limit", type=float, help="requests/s per Serve replica for all the team's inference "
                   "keys together (0: no limit)")
    t.add_argument("--infer-burst", type=int, help="requests at once above the team's rate (default 2x)")
    t.add_argument("--borrow", action=__import__("argparse").BooleanOptionalAction, default=None,
                   help="may run over quota on idle capacity (preempted first)")
    t.set_defaults(fn=teams_command)

    q = sub.add_parser("queue", help="running and queued jobs of every team, in admission order")
    q.add_argument("--all", action="store_true", help="finished jobs too")
    q.set_defaults(fn=queue_command)

    u = sub.add_parser("usage", help="CPU-hours and GPU-hours per team and job")
    u.add_argument("--since", type=duration, help="window, e.g. 7d, 24h (default: everything)")
    u.add_argument("--team", help="one team only")
    u.set_defaults(fn=usage_command)


__all__ = ["add_parsers"]
