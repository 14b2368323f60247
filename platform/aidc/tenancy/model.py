"""Teams, quotas, job demands and job records: the tenancy state, and where it lives on disk.

Two files under the tenancy home (`$AIDC_TENANCY_DIR`, else `<storage root>/tenancy`), each replaced atomically
(temp file + rename) under an flock, so a gateway or head restart finds them whole:
  teams.json   teams, their quotas and priorities (written by `aidc teams`; the gateway re-reads it on change)
  jobs.json    every job the gateway accepted: queued, running, finished (written by the gateway only)
  packages/    working-dir packages uploaded through the gateway, kept until their jobs end (Ray's copy in the
               GCS is pinned only for minutes, and is gone after a head restart)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aidc import storage
from aidc.errors import ConfigError
from aidc.security import audit
from aidc.security.keys import team_problem

TENANCY_ENV = "AIDC_TENANCY_DIR"
TEAMS_FILE, JOBS_FILE = "teams.json", "jobs.json"
RESOURCES = ("cpus", "gpus", "memory_gb", "jobs")


def tenancy_home(override: str | None = None) -> Path:
    explicit = override or os.environ.get(TENANCY_ENV)
    root = Path(explicit) if explicit else Path(storage.storage_root()) / "tenancy"
    if storage.is_uri(str(root)):
        raise ConfigError(f"the tenancy state must be on a local or NFS path on the head (flock), not {root}: "
                          f"set {TENANCY_ENV}=/path")
    return root.expanduser().absolute()


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Demand(Strict):
    """What one job holds while it runs: CPUs, GPUs (of one accelerator type, or any), memory."""

    cpus: float = Field(0.0, ge=0, description="CPUs (Ray logical CPUs) the job's driver, workers and tasks hold.")
    gpus: float = Field(0.0, ge=0, description="GPUs the job holds.")
    gpu_type: str | None = Field(None, description="Accelerator type of its GPUs (A100, H100...); null: any.")
    memory_gb: float = Field(0.0, ge=0, description="Memory (Ray logical memory) in GiB; 0: not declared.")
    data_cpus: float | None = Field(None, ge=0, description="Of `cpus`, what an aidc job's Ray Data tasks may hold "
                                    "at once (its config's data share); null: what its driver's reservation leaves.")

    def short(self) -> str:
        gpu = f", {self.gpus:g} {self.gpu_type or ''} GPU".replace("  ", " ") if self.gpus else ""
        mem = f", {self.memory_gb:g} GiB" if self.memory_gb else ""
        return f"{self.cpus:g} CPU{gpu}{mem}"


class Quota(Strict):
    """A team's share of the cluster; a missing limit is no limit."""

    cpus: float | None = Field(None, ge=0, description="CPUs the team's running jobs may hold together.")
    gpus: dict[str, float] = Field(default_factory=dict, description="GPUs per accelerator type from cluster.yaml "
                                   "({A100: 4}); the key '*' limits GPUs of any type together. Empty: no GPU "
                                   "limit.")
    memory_gb: float | None = Field(None, ge=0, description="Memory (GiB) the team's running jobs may hold.")
    jobs: int | None = Field(None, ge=0, description="Jobs the team may run at once.")

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, v):
        bad = {k: n for k, n in v.items() if n < 0}
        if bad:
            raise ValueError(f"GPU limits must be >= 0, got {bad}")
        return v


class Team(Strict):
    name: str = Field(..., description="Team name (lowercase), as on its keys (aidc keys create --team).")
    quota: Quota = Field(default_factory=Quota, description="Guaranteed share (see Quota).")
    priority: int = Field(0, description="Default priority of the team's jobs (higher runs first and may preempt "
                          "lower).")
    max_priority: int | None = Field(None, description="Highest priority a job may ask for (metadata priority); "
                                     "default: the team's priority.")
    borrow: bool = Field(False, description="Run over the quota on other teams' idle share; such jobs are "
                         "preempted first when the owners need it back.")

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        problem = team_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class Teams(Strict):
    teams: dict[str, Team] = Field(default_factory=dict)
    version: int = Field(0, description="Bumped on every change.")


JobState = Literal["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobRecord(Strict):
    """One job as the gateway knows it. `id` is the submission id the team sees; each attempt runs in Ray as
    `<id>` (first) or `<id>-a<n>` (after a preemption)."""

    id: str
    team: str
    owner: str = Field(..., description="Key id that submitted it.")
    priority: int = 0
    demand: Demand
    request: dict = Field(..., description="The Jobs API submit body (entrypoint, runtime_env, metadata, "
                          "entrypoint_* resources), without submission_id.")
    state: JobState = "QUEUED"
    attempt: int = 0
    borrowed: bool = False
    preempting: str | None = Field(None, description="Set while the job is being stopped to make room: why.")
    stopping: bool = Field(False, description="A stop was asked for while it ran.")
    message: str = ""
    submitted_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    first_started_at: float | None = None
    requeued_at: float | None = Field(None, description="When it last went back in the queue (preempted).")
    nodes_asked_at: float | None = Field(None, description="Since when it waits for nodes asked of the autoscaler "
                                         "(unset once admitted; after the gateway's --node-wait it may preempt).")
    deleted: bool = Field(False, description="Deleted by its team: hidden from the Jobs API, kept for usage.")
    runs: list[dict] = Field(default_factory=list, description="Finished attempts: ray_id, start, end, status, "
                             "why it ended.")
    packages: list[str] = Field(default_factory=list, description="Package URIs its runtime_env names.")
    tasks_counted: int | None = Field(None, description="The attempt submitted with AIDC_DATA_CPUS: its running "
                                      "tasks count in enforcement (an attempt from an older gateway is spared).")
    gpu_kwh: dict[str, float] = Field(default_factory=dict, description="GPU energy it drew, kWh per hour "
                                      "(key: the hour's start, epoch seconds), every attempt; aidc.tenancy.energy.")

    @property
    def ray_id(self) -> str:
        return self.id if self.attempt == 0 else f"{self.id}-a{self.attempt}"

    def usage(self, now: float | None = None, since: float = 0.0) -> tuple[float, float]:
        """(CPU-seconds, GPU-seconds) held since `since`, the running attempt counted up to now."""
        spans = [(r["start"], r["end"]) for r in self.runs]
        if self.state == "RUNNING" and self.started_at:
            spans.append((self.started_at, now or time.time()))
        held = sum(max(0.0, e - max(s, since)) for s, e in spans)
        return held * self.demand.cpus, held * self.demand.gpus


class Jobs(Strict):
    jobs: dict[str, JobRecord] = Field(default_factory=dict)


def _read(path: Path, model):
    if not path.exists():
        return model()
    try:
        return model.model_validate_json(path.read_text())
    except (ValidationError, ValueError) as exc:
        raise ConfigError(f"{path} is not a valid aidc tenancy file ({exc}); restore it from a backup or fix it "
                          "(it is JSON written by aidc teams / the gateway)") from None


def _write(path: Path, obj: BaseModel) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(obj.model_dump_json(indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_teams(home: str | None = None) -> Teams:
    return _read(tenancy_home(home) / TEAMS_FILE, Teams)


def load_jobs(home: str | None = None) -> Jobs:
    return _read(tenancy_home(home) / JOBS_FILE, Jobs)


def save_jobs(jobs: Jobs, home: str | None = None) -> None:
    _write(tenancy_home(home) / JOBS_FILE, jobs)


def update_teams(change, home: str | None = None, actor: str | None = None, action: str = "team.set"):
    """Read-modify-write teams.json under a lock; `change(teams)` edits it in place and returns what to log."""
    root = tenancy_home(home)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with audit.locked(root / "teams.lock"):
        teams = load_teams(home)
        detail = change(teams)
        teams.version += 1
        _write(root / TEAMS_FILE, teams)
    audit.record_quietly(action, target=str(detail.get("team")), actor=actor or audit.default_actor(),
                         details=detail)
    return teams


def parse_teams_file(text: str, source: str) -> dict[str, Team]:
    """Teams from an admin's YAML or JSON file: {teams: {vision: {quota: {...}, priority: 10, borrow: true}}}."""
    import yaml

    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not YAML/JSON: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("teams"), dict):
        raise ConfigError(f"{source}: expected a mapping 'teams:' of team name -> {{quota: {{cpus: 8, gpus: "
                          "{A100: 4}, memory_gb: 64, jobs: 4}, priority: 10, borrow: true}}")
    out = {}
    for name, body in raw["teams"].items():
        try:
            out[name] = Team.model_validate({"name": name, **(body or {})})
        except ValidationError as exc:
            problems = "; ".join(f"teams.{name}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"{source}: {problems}") from None
    return out


__all__ = ["JOBS_FILE", "RESOURCES", "TEAMS_FILE", "TENANCY_ENV", "TERMINAL", "Demand", "JobRecord", "Jobs",
           "Quota", "Team", "Teams", "load_jobs", "load_teams", "parse_teams_file", "save_jobs", "tenancy_home",
           "update_teams"]
