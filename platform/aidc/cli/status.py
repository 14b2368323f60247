"""`aidc status`: one screen for an operator — nodes, jobs, training progress, sweeps, Serve apps, alerts.

`collect()` asks the Ray dashboard's HTTP API (nodes with logical and physical use, jobs, Serve apps) and,
when one is configured, Prometheus (request rates, training progress, trials by state, firing alerts);
`render()` turns that snapshot into text. Each source that fails becomes a line saying so, never a traceback.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import requests

logger = logging.getLogger(__name__)
PROMETHEUS_ENV = "AIDC_PROMETHEUS_URL"
_USAGE = re.compile(r"^\s*([\d.]+)(\w*)/([\d.]+)(\w*)\s+(\S+)\s*$")
_UNITS = {"": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def _token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def parse_usage(text: str) -> dict[str, tuple[float, float]]:
    """Ray's per-node logical usage lines ('0.5/2.0 CPU', '1.2GiB/11.57GiB memory') -> {name: (used, total)}."""
    out = {}
    for line in (text or "").splitlines():
        m = _USAGE.match(line)
        if m:
            used, used_unit, total, total_unit, name = m.groups()
            out[name] = (float(used) * _UNITS.get(used_unit, 1), float(total) * _UNITS.get(total_unit, 1))
    return out


def collect(dashboard: str, prometheus: str | None = None, timeout: float = 10.0) -> dict:
    """A snapshot of the cluster: {'dashboard', 'nodes', 'jobs', 'serve', 'prometheus', 'errors'}."""
    dashboard = dashboard.rstrip("/")
    token = _token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    snap: dict = {"dashboard": dashboard, "errors": []}

    def get(path: str):
        r = requests.get(f"{dashboard}{path}", headers=headers, timeout=timeout)
        if r.status_code in (401, 403):
            raise RuntimeError(f"the dashboard refused the request ({r.status_code}): set RAY_AUTH_TOKEN_PATH to "
                               "the cluster's token file")
        r.raise_for_status()
        return r.json()

    down = False
    for key, path, pick in (("nodes", "/nodes?view=summary", lambda j: j["data"]),
                            ("jobs", "/api/jobs/", lambda j: j),
                            ("serve", "/api/serve/applications/", lambda j: j.get("applications", {}))):
        snap[key] = None
        if down:
            continue
        try:
            snap[key] = pick(get(path))
        except requests.ConnectionError:  # nothing listens there: one line that says what to do, not three
            down = True
            snap["errors"].append(f"no Ray dashboard answers at {dashboard}: start a head (make head, or "
                                  "ray start --head), or pass --address <dashboard URL>")
        except Exception as exc:  # noqa: BLE001 - one section missing is still a useful screen
            snap["errors"].append(f"{key}: {_short(exc)}")
    prometheus = prometheus or os.environ.get(PROMETHEUS_ENV)
    if prometheus:
        snap["prometheus"] = _prometheus(prometheus.rstrip("/"), timeout, snap["errors"])
    return snap


PROM_QUERIES = {
    "request_rate": "sum by (app) (rate(ray_aidc_serve_requests_total[2m]))",
    "error_rate": 'sum by (app) (rate(ray_aidc_serve_requests_total{code=~"5.."}[2m]))',
    "train_epoch": "max by (job, run) (ray_aidc_train_epoch)",
    "train_step": "max by (job, run) (ray_aidc_train_step)",
    "train_running": "max by (job, run) (ray_aidc_train_running)",
    "tune_trials": "max by (sweep, state) (ray_aidc_tune_trials)",
}


def _prometheus(url: str, timeout: float, errors: list) -> dict:
    out: dict = {"url": url}
    try:
        for key, expr in PROM_QUERIES.items():
            r = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=timeout)
            r.raise_for_status()
            out[key] = [(s["metric"], float(s["value"][1])) for s in r.json()["data"]["result"]]
        r = requests.get(f"{url}/api/v1/alerts", timeout=timeout)
        r.raise_for_status()
        out["alerts"] = [a for a in r.json()["data"]["alerts"] if a.get("state") == "firing"]
    except Exception as exc:  # noqa: BLE001
        errors.append(f"prometheus {url}: {_short(exc)}")
    return out


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}G"


def _node_lines(nodes: dict) -> list[str]:
    logical = nodes.get("nodeLogicalResources") or {}
    lines = [f"{'NODE':<18}{'STATE':<8}{'CPU used/total':<16}{'GPU used/total':<16}{'MEM (logical)':<16}"
             f"{'HOST CPU%':<10}{'HOST MEM%':<9}"]
    for n in sorted(nodes.get("summary") or [], key=lambda n: not n.get("raylet", {}).get("isHeadNode")):
        raylet = n.get("raylet", {})
        use = parse_usage(logical.get(raylet.get("nodeId"), ""))
        total = raylet.get("resourcesTotal", {})
        cpu = use.get("CPU", (0.0, total.get("CPU", 0.0)))
        gpu = use.get("GPU", (0.0, total.get("GPU", 0.0)))
        mem = use.get("memory", (0.0, total.get("memory", 0.0)))
        name = n.get("ip", "?") + (" (head)" if raylet.get("isHeadNode") else "")
        lines.append(f"{name:<18}{raylet.get('state', '?'):<8}{f'{cpu[0]:g}/{cpu[1]:g}':<16}"
                     f"{f'{gpu[0]:g}/{gpu[1]:g}':<16}{f'{_gib(mem[0])}/{_gib(mem[1])}':<16}"
                     f"{n.get('cpu', 0):<10.0f}{(n.get('mem') or [0, 0, 0])[2]:<9.0f}")
    return lines


def _job_lines(jobs: list, prom: dict | None) -> list[str]:
    running = [j for j in jobs if j.get("status") in ("RUNNING", "PENDING")]
    recent = sorted((j for j in jobs if j not in running), key=lambda j: j.get("end_time") or 0, reverse=True)[:5]
    if not jobs:
        return ["no jobs yet"]
    lines = []
    for j in running + recent:
        entry = (j.get("entrypoint") or "")[:70]
        lines.append(f"{(j.get('submission_id') or j.get('job_id') or '?')[:24]:<26}{j.get('status', '?'):<11}{entry}")
    if prom:
        epochs = {(m.get("job"), m.get("run")): v for m, v in prom.get("train_epoch", [])}
        steps = {(m.get("job"), m.get("run")): v for m, v in prom.get("train_step", [])}
        for (job, run), live in {(m.get("job"), m.get("run")): v for m, v in prom.get("train_running", [])}.items():
            if live:
                lines.append(f"  training {job} run {run}: epoch {epochs.get((job, run), 0):g}, "
                             f"step {steps.get((job, run), 0):g}")
    return lines


def _sweep_lines(prom: dict | None) -> list[str]:
    if not prom or not prom.get("tune_trials"):
        return []
    sweeps: dict[str, dict] = {}
    for m, v in prom["tune_trials"]:
        sweeps.setdefault(m.get("sweep", "?"), {})[m.get("state", "?")] = int(v)
    return ["SWEEPS"] + [f"  {name}: " + ", ".join(f"{s} {c}" for s, c in sorted(states.items()))
                         for name, states in sorted(sweeps.items())]


def _serve_lines(apps: dict, prom: dict | None) -> list[str]:
    if not apps:
        return ["no Serve applications"]
    rates = {m.get("app"): v for m, v in (prom or {}).get("request_rate", [])}
    errors = {m.get("app"): v for m, v in (prom or {}).get("error_rate", [])}
    lines = [f"{'APP':<14}{'STATUS':<14}{'ROUTE':<10}{'REPLICAS running/total':<24}{'REQ/S':<8}{'5XX/S':<8}"]
    for name, app in sorted(apps.items()):
        reps = [r for d in (app.get("deployments") or {}).values() for r in d.get("replicas", [])]
        running = sum(1 for r in reps if r.get("state") == "RUNNING")
        rate = f"{rates[name]:.2f}" if name in rates else "-"
        err = f"{errors[name]:.2f}" if name in errors else "-"
        lines.append(f"{name:<14}{app.get('status', '?'):<14}{app.get('route_prefix') or '-':<10}"
                     f"{f'{running}/{len(reps)}':<24}{rate:<8}{err:<8}")
        for dname, d in sorted((app.get("deployments") or {}).items()):
            if d.get("status") not in ("HEALTHY", None):
                lines.append(f"  {dname}: {d.get('status')} {(d.get('message') or '')[:100]}")
    return lines


def render(snap: dict) -> str:
    """The snapshot as text: one block per section."""
    prom = snap.get("prometheus")
    out = [f"aidc status  (dashboard {snap['dashboard']}"
           + (f", prometheus {prom['url']})" if prom else f"; set ${PROMETHEUS_ENV} for rates and alerts)")]
    if snap.get("nodes") is not None:
        out += ["", "NODES"] + ["  " + line for line in _node_lines(snap["nodes"])]
    if snap.get("jobs") is not None:
        out += ["", "JOBS"] + ["  " + line for line in _job_lines(snap["jobs"], prom)]
    sweeps = _sweep_lines(prom)
    if sweeps:
        out += [""] + sweeps
    if snap.get("serve") is not None:
        out += ["", "SERVE"] + ["  " + line for line in _serve_lines(snap["serve"], prom)]
    if prom is not None and "alerts" in prom:
        alerts = prom["alerts"]
        out += ["", f"ALERTS FIRING: {len(alerts)}"]
        for a in sorted(alerts, key=lambda a: (a["labels"].get("severity", ""), a["labels"].get("alertname", ""))):
            labels = a["labels"]
            what = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k not in ("alertname", "severity"))
            out.append(f"  [{labels.get('severity', '-')}] {labels.get('alertname')} {what}: "
                       f"{a.get('annotations', {}).get('summary', '')}")
    if snap["errors"]:
        out += ["", "UNAVAILABLE"] + [f"  {e}" for e in snap["errors"]]
    return "\n".join(out)
