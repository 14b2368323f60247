"""The tenancy gateway: Ray's Job Submission REST API, per team, in front of the real one.

    aidc gateway --ray-address http://127.0.0.1:8265 --port 8266        # on the head, with the cluster token
    RAY_ADDRESS=http://head:8266 RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<aidc key> ray job submit --working-dir . -- ...

It speaks the routes `ray job submit/status/logs/stop/list/delete` and `JobSubmissionClient` use (version, package
upload, submit, list, get, stop, delete, logs, the log-tail websocket). A request's aidc key gives its team and
roles; a job is queued durably (`model.py`), admitted by `admission.plan` when the team's quota and the cluster
have room, and only then submitted to Ray with the cluster token, which teams no longer hold. Another team's job
is a 404, a role without the right a 403. Preempted jobs are stopped in Ray and queued again (an aidc training
job resumes from its latest checkpoint: the gateway names its run). While jobs run, their actors' resources
(Ray's state API) are compared with what they were admitted for; a job that holds more is stopped, and the
message names the excess. On a cluster that autoscales, jobs the nodes alive cannot hold wait for new ones, which
the gateway asks of Ray's autoscaler (v2) from the autoscaling config's full scale. Admission, preemption, stops
and denials go to the audit log; `/metrics` serves quota use, queue length and wait times for Prometheus.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web
from aidc import storage
from aidc.cluster import accelerator_types, full_scale, growth_room, load_cluster_yaml
from aidc.errors import AidcError, ConfigError
from aidc.runtime import DATA_CPUS_ENV, floor_cpus
from aidc.security import audit
from aidc.security.auth import AuthArgs, AuthError, Guard
from aidc.security.keys import KeyRecord
from aidc.tenancy import admission, energy, metrics
from aidc.tenancy.demand import GIB, bundle, bundles, data_allowance, job_demand, with_run_name
from aidc.tenancy.model import (TEAMS_FILE, TERMINAL, JobRecord, Jobs, Teams, load_jobs, load_teams, save_jobs,
                                tenancy_home)

logger = logging.getLogger(__name__)

_SUBMIT_FIELDS = {"entrypoint", "submission_id", "runtime_env", "metadata", "entrypoint_num_cpus",
                  "entrypoint_num_gpus", "entrypoint_memory", "entrypoint_resources", "entrypoint_label_selector",
                  "job_id"}
_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
_ATTEMPT = re.compile(r"-a\d+$")  # <id>-a<n>: the gateway's name for a job's later attempts in Ray
_GROUP_WILD = {k: re.compile(rf"^{k}_group_[0-9a-f]+$") for k in ("CPU", "GPU", "memory")}
_GROUP_INDEXED = {k: re.compile(rf"^{k}_group_\d+_[0-9a-f]+$") for k in ("CPU", "GPU", "memory")}
PACKAGE_TTL_S = 3600.0
_PACKAGE = re.compile(r"^_ray_pkg_[0-9a-f]{16,64}\.zip$")
_RAY_INFO = ("job_id", "driver_info", "error_type", "driver_agent_http_address", "driver_node_id",
             "driver_exit_code", "message", "start_time", "end_time")


_HELD = ("CPU", "GPU", "memory")
_LIVE_PG = ("CREATED", "RESCHEDULING")


def _holdings(actors: list[dict], pgs: list[dict]):
    """(node id, {CPU, GPU, memory}) for each live placement-group bundle and each actor's own share: an actor in
    one of these groups takes from its bundle (counted there), any other actor counts its plain resources and
    its share of a group not listed (Ray names it CPU_group_<pg> and CPU_group_<i>_<pg>: the larger, once)."""
    counted = {pg.get("placement_group_id") for pg in pgs if pg.get("state") in _LIVE_PG}
    for pg in pgs:
        if pg.get("state") in _LIVE_PG:
            for held in pg.get("bundles") or []:
                res = held.get("unit_resources") or {}
                yield held.get("node_id"), {k: float(res.get(k, 0.0)) for k in _HELD}
    for actor in actors:  # ... and each running plain task (the state API's tasks have the actors' fields)
        if actor.get("state", "ALIVE") not in ("ALIVE", "RUNNING"):
            continue
        res = actor.get("required_resources") or {}
        own = {k: float(res.get(k, 0.0)) for k in _HELD}
        if actor.get("placement_group_id") not in counted:
            for k in _HELD:
                own[k] += max(sum(v for n, v in res.items() if _GROUP_WILD[k].match(n)),
                              sum(v for n, v in res.items() if _GROUP_INDEXED[k].match(n)))
        yield actor.get("node_id"), own


def held_by(actors: list[dict], pgs: list[dict] = ()) -> dict[str, float]:
    """CPUs, GPUs and memory (bytes) the live actors and placement groups hold (see _holdings)."""
    held = dict.fromkeys(_HELD, 0.0)
    for _, own in _holdings(actors, pgs):
        for k in _HELD:
            held[k] += own[k]
    return held


def _as_capacity(reach: dict[str, float]) -> admission.Capacity:
    """aidc.cluster's full_scale / growth_room terms (`GPU:<type>` keys, memory in bytes) as a Capacity; memory 0
    (not checked) where the config does not declare it."""
    return admission.Capacity(cpus=reach.get("CPU", 0.0), memory_gb=reach.get("memory", 0.0) / GIB,
                              gpus={k[4:]: v for k, v in reach.items() if k.startswith("GPU:")})


def outside_use(actors: list[dict], pgs: list[dict], gpu_kinds: dict[str, str],
                ray_jobs: list[dict]) -> admission.Held:
    """What live actors and placement groups of work the gateway did not admit hold: Serve replicas, detached
    actors, jobs submitted to Ray directly, and what a gateway job left behind when it ended (a detached actor, a
    Serve app it started). A running job the gateway submitted carries `aidc_job` in its metadata (`ray_jobs`:
    Ray's job list, and the gateway's running jobs in its shape); its actors, groups and supervisor (which holds
    the entrypoint's resources) are in its demand. GPUs count under their node's accelerator type (`gpu_kinds`:
    node id -> type)."""
    mine = [j for j in ray_jobs if (j.get("metadata") or {}).get("aidc_job") and j.get("status") not in TERMINAL]
    ours = {j.get("job_id") for j in mine} - {None}
    supervisors = {f"_ray_internal_job_actor_{j.get('submission_id')}" for j in mine}
    # an ended job's actors and groups that are not detached are being removed with it: soon free (counting
    # them made a preemption stop more jobs than the room it needed)
    ended = {j.get("job_id") for j in ray_jobs if j.get("status") in TERMINAL} - {None} - ours

    def kept(job_id, item) -> bool:
        return job_id not in ours and (job_id not in ended or bool(item.get("is_detached")))
    theirs = [a for a in actors if kept(a.get("job_id"), a) and a.get("name") not in supervisors]
    out = admission.Held()
    for node_id, own in _holdings(theirs, [pg for pg in pgs if kept(pg.get("creator_job_id"), pg)]):
        out.cpus += own["CPU"]
        out.memory_gb += own["memory"] / (1 << 30)
        kind = gpu_kinds.get(node_id, "") if own["GPU"] else ""
        if own["GPU"]:
            out.gpus[kind] = out.gpus.get(kind, 0.0) + own["GPU"]
        shape = bundle(own["CPU"], own["GPU"], kind)
        if shape["resources"]:  # as a bundle for the autoscaler: it fits the node it is on
            out.per_node.append(shape)
    return out


class PackageGone(AidcError):
    """A job's working-dir package is in neither Ray nor the gateway's store: the job cannot run."""


def cluster_token() -> str | None:
    """The Ray cluster's token: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (as Ray reads it)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token").expanduser()
    return path.read_text().strip() if path.is_file() else None


def _text(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message)


class Gateway:
    """State, scheduling and the Ray client of one gateway process; `app()` gives the aiohttp application."""

    def __init__(self, ray_address: str, *, home: str | None = None, security_home: str | None = None,
                 token: str | None = None, interval_s: float = 1.0, enforce_s: float = 5.0,
                 capacity: admission.Capacity | None = None, autoscaling_config: str | None = None,
                 gcs_address: str | None = None, node_wait_s: float = 600.0):
        self.ray = ray_address.rstrip("/")
        self.home = tenancy_home(home)
        self.packages = self.home / "packages"
        self.guard = Guard("gateway", AuthArgs(), security_home)
        self.token = token if token is not None else cluster_token()
        self.interval_s, self.enforce_s = interval_s, enforce_s
        self.fixed_capacity = capacity
        # the autoscaler's config (how far the cluster grows) and the GCS the autoscaler is asked through
        self.autoscaling_config, self.gcs_address, self.node_wait_s = autoscaling_config, gcs_address, node_wait_s
        # the autoscaling config's file stamp, the cluster at full scale by it, and the config itself
        self._full: tuple[tuple | None, admission.Capacity | None, dict] = (("unread",), None, {})
        self._grow: list[str] = []  # jobs waiting for nodes the autoscaler is asked for
        self._asked: tuple[float, list[dict]] | None = None  # (when, bundles) last asked; None: never asked
        self._ask_failed_at = float("-inf")
        self._news, self._news_at = "", float("-inf")  # what the autoscaler does about it, when last read
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_file = open(self.home / "gateway.lock", "a")
        try:  # one gateway per tenancy home: two would each write jobs.json
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another aidc gateway already runs on {self.home}; stop it, or give this one its own "
                              "state (AIDC_TENANCY_DIR)") from None
        self.jobs: Jobs = load_jobs(str(self.home))
        self.lock = asyncio.Lock()
        self.wake = asyncio.Event()
        self._teams: Teams = Teams()
        self._teams_stamp = None
        self._capacity: tuple[float, admission.Capacity] | None = None
        self._energy_at: float | None = None  # when GPU energy was last counted (monotonic)
        self._saved_at, self._unsaved_energy = time.monotonic(), False
        self._strikes: dict[str, int] = {}
        self._stops: dict[str, float] = {}  # job id -> when a stop was last sent to Ray
        self._last_sweep = 0.0
        self.serve_lock = asyncio.Lock()
        self.ray_info: dict[str, dict] = {}  # job id -> what Ray said last about its running attempt
        self._last_enforce = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._audit = audit.RateLimitedAudit(10.0)

    # ---- state ------------------------------------------------------------------------------------------------

    def teams(self) -> Teams:
        """teams.json, re-read when it changed (aidc teams set takes effect on the next round)."""
        path = self.home / TEAMS_FILE
        stamp = storage.file_stamp(path)
        if stamp != self._teams_stamp:
            try:
                self._teams = load_teams(str(self.home)) if stamp else Teams()
                self._teams_stamp = stamp
            except ConfigError as exc:  # keep the last good copy; an admin is told by aidc teams
                logger.error("%s", exc)
        return self._teams

    def save(self) -> None:
        save_jobs(self.jobs, str(self.home))
        self._saved_at, self._unsaved_energy = time.monotonic(), False

    # ---- Ray -----------------------------------------------------------------------------------------------------

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=60))
        return self._session

    async def ray_call(self, method: str, path: str, **kw) -> tuple[int, bytes]:
        s = await self.session()
        async with s.request(method, self.ray + path, **kw) as r:
            return r.status, await r.read()

    async def ray_job(self, ray_id: str) -> dict | None:
        status, body = await self.ray_call("GET", f"/api/jobs/{ray_id}")
        if status == 404:
            return None
        if status != 200:
            raise AidcError(f"Ray Jobs API answered {status} for {ray_id}: {body[:300]!r}")
        return json.loads(body)

    async def capacity(self) -> admission.Capacity:
        """Alive nodes' total resources and what work outside the gateway holds of them (state API), cached for
        two resource checks (10 s by default); or the fixed capacity given at start."""
        if self.fixed_capacity is not None:
            return self.fixed_capacity
        now = time.monotonic()
        if self._capacity and now - self._capacity[0] < 2 * self.enforce_s:
            return self._capacity[1]
        cap = admission.Capacity(cpus=0.0)
        kinds: dict[str, str] = {}  # node id -> its GPUs' accelerator type
        workers: list[dict] = []  # alive worker nodes' resources
        for node in await self._state("/api/v0/nodes?limit=10000&detail=true"):
            if node.get("state") != "ALIVE":
                continue
            res = node.get("resources_total") or {}
            if not node.get("is_head_node"):
                workers.append(res)
            cap.cpus += res.get("CPU", 0.0)
            cap.memory_gb += res.get("memory", 0.0) / (1 << 30)
            if res.get("GPU"):
                types = accelerator_types(res)
                kind = kinds[node.get("node_id")] = types[0] if types else ""
                cap.gpus[kind] = cap.gpus.get(kind, 0.0) + res["GPU"]
        cap.full = self._grown(cap, workers)
        try:
            cap.outside = await self._outside(kinds)
        except Exception as exc:  # noqa: BLE001 - keep the last known outside use rather than stop scheduling
            logger.warning("work outside the gateway: %s (using the last known)", exc)
            cap.outside = self._capacity[1].outside if self._capacity else admission.Held()
        self._capacity = (now, cap)
        return cap

    def full_scale(self) -> admission.Capacity | None:
        """The cluster at full scale by its autoscaling config (read again when the file changes); None where there
        is none, or its node types do not declare their resources (then jobs wait for the nodes alive)."""
        if not self.autoscaling_config:
            return None
        path = Path(self.autoscaling_config).expanduser()
        stamp = storage.file_stamp(path)
        if stamp == self._full[0]:
            return self._full[1]
        full, config = None, {}
        try:
            config = load_cluster_yaml(path) if stamp else {}
            reach = full_scale(config) if stamp else None
            if reach is None:
                logger.warning("autoscaling config %s: %s; jobs wait for the nodes alive", path,
                               "not found" if stamp is None else "its node types do not all declare `resources`")
            else:
                full = _as_capacity(reach)
                logger.info("cluster at full scale (%s): %g CPUs, GPUs %s", path, full.cpus, full.gpus or "none")
        except ConfigError as exc:
            logger.error("autoscaling config: %s; jobs wait for the nodes alive", exc)
        self._full = (stamp, full, config)
        return full

    def _grown(self, cap: admission.Capacity, workers: list[dict]) -> admission.Capacity | None:
        """The cluster as far as its autoscaler can still grow it from the nodes alive (`workers`: the alive worker
        nodes' resources), per node type (a type whose nodes are all up adds nothing); None where it cannot grow
        (or its reach is unknown): a job the nodes alive cannot hold then preempts, as on a fixed cluster."""
        if self.full_scale() is None:
            return None
        room = growth_room(self._full[2], workers)
        if not room or not room["workers"]:
            return None
        add = _as_capacity(room)
        return admission.Capacity(cpus=cap.cpus + add.cpus,
                                  gpus={k: cap.gpus.get(k, 0.0) + add.gpus.get(k, 0.0) for k in {*cap.gpus, *add.gpus}},
                                  memory_gb=(cap.memory_gb + add.memory_gb) if "memory" in room else 0.0)

    async def _autoscale(self) -> None:
        """Ask Ray's autoscaler for the nodes that jobs waiting for them need. Ray (autoscaler v2, `ray up`'s
        default) takes one cluster constraint, sized against whole nodes whether used or not, so it is the running
        jobs', outside work's and the waiting jobs' bundles together; it is released (empty) once no job waits for
        nodes, so idle nodes time out as usual. While jobs wait, what the autoscaler does about it (nodes launching,
        a launch that failed) goes into their message."""
        if not self.autoscaling_config or self.fixed_capacity is not None:
            return
        want: list[dict] = []
        if self._grow:
            jobs = self.jobs.jobs
            for j in [*(j for j in jobs.values() if j.state == "RUNNING"), *(jobs[i] for i in self._grow)]:
                want += bundles(j.demand)
            want += self._capacity[1].outside.per_node if self._capacity else []
            # a GPU type no node type of the config declares would make the whole constraint infeasible (Ray
            # builds new nodes from the config's resources): asked for as GPUs of any type
            kinds = set(self._full[1].gpus) if self._full[1] else set()
            want = [{"resources": {k: v for k, v in b["resources"].items()
                                   if not k.startswith("accelerator_type:") or k.split(":", 1)[1] in kinds}}
                    for b in want]
        now = time.monotonic()
        last = self._asked[1] if self._asked else None
        # asked already (again each minute: a new head forgets), or failed lately; asked once at start even when
        # nothing waits: a constraint an earlier gateway left must not keep nodes up
        if not ((last == want and (not want or now - self._asked[0] < 60)) or now - self._ask_failed_at < 10):
            try:
                await asyncio.to_thread(self._request_resources, want)
            except Exception as exc:  # noqa: BLE001 - GCS down or restarting: the jobs keep waiting; asked again
                self._ask_failed_at = now
                if want:
                    logger.warning("asking Ray's autoscaler for %d bundles failed (again in 10 s): %s", len(want), exc)
                else:  # releasing at start, no GCS found (no autoscaler to release): not again until jobs wait
                    logger.warning("releasing the autoscaler's constraint failed: %s", exc)
                    self._asked = (now, want)
                return
            if want != last:
                logger.info("asked Ray's autoscaler for %d bundle%s (%s)", len(want), "s" * (len(want) != 1),
                            ", ".join(self._grow) or "released: no job waits for nodes")
            self._asked = (now, want)
        if not self._grow:
            self._news = ""
        elif now - self._news_at >= 5:
            self._news_at = now
            try:
                self._news = await asyncio.to_thread(self._autoscaler_news)
            except Exception as exc:  # noqa: BLE001 - only the message's detail
                logger.debug("the autoscaler's status: %s", exc)

    def _gcs(self) -> str:
        from ray._private.services import find_bootstrap_address

        gcs = self.gcs_address or find_bootstrap_address(None)
        if not gcs:
            raise AidcError("no Ray head found on this host; start the gateway with --gcs-address HOST:PORT")
        return gcs

    def _request_resources(self, want: list[dict]) -> None:
        from ray.autoscaler.v2.sdk import request_cluster_resources

        request_cluster_resources(self._gcs(), want, timeout=10)

    def _autoscaler_news(self) -> str:
        """What Ray's autoscaler is doing: nodes launching or starting, the latest launch that failed (10 min)."""
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(self._gcs(), timeout=5)
        coming = Counter(node.ray_node_type_name for node in status.pending_nodes)
        for launch in status.pending_launches:
            coming[launch.ray_node_type_name] += launch.count
        parts = [f"{n} {kind} node{'s' * (n != 1)} starting" for kind, n in sorted(coming.items())]
        now = time.time()
        failed = [f for f in status.failed_launches if now - (f.failed_ts_s or f.request_ts_s) < 600]
        if failed:
            f = max(failed, key=lambda f: f.failed_ts_s or f.request_ts_s)
            at = time.strftime("%H:%M:%S", time.localtime(f.failed_ts_s or f.request_ts_s))  # stable: saved once
            parts.append(f"launching {f.ray_node_type_name} failed at {at} ({(f.details or 'no reason given')[:200]})"
                         "; the autoscaler retries")
        return ", ".join(parts)

    async def _outside(self, kinds: dict[str, str]) -> admission.Held:
        # actors and groups before the jobs list: an actor exists only once its driver is registered, so the list
        # read after it names every running job the actors belong to
        actors, pgs = await asyncio.gather(
            self._state("/api/v0/actors?limit=10000&detail=true&filter_keys=state&filter_predicates=%3D"
                        "&filter_values=ALIVE"),
            self._state("/api/v0/placement_groups?limit=10000&detail=true"))
        status, body = await self.ray_call("GET", "/api/jobs/")
        if status != 200:
            raise AidcError(f"Ray Jobs API /api/jobs/ answered {status}: {body[:200]!r}")
        mine = [{"submission_id": j.ray_id, "job_id": self.ray_info.get(j.id, {}).get("job_id"), "status": "RUNNING",
                 "metadata": {"aidc_job": j.id}} for j in self.jobs.jobs.values() if j.state == "RUNNING"]
        return outside_use(actors, pgs, kinds, json.loads(body) + mine)

    async def _state(self, path: str) -> list[dict]:
        status, body = await self.ray_call("GET", path)
        if status != 200:
            raise AidcError(f"Ray state API {path.split('?')[0]} answered {status}: {body[:200]!r}")
        return json.loads(body)["data"]["result"]["result"]

    def package_path(self, team: str, uri: str) -> Path:
        """Where the gateway keeps a team's working-dir package `gcs://_ray_pkg_<hash>.zip` (each team its own)."""
        name = uri.split("://", 1)[1] if "://" in uri else uri
        if not uri.startswith("gcs://") or not _PACKAGE.match(name):
            raise ConfigError(f"package {uri!r}: the gateway takes working-dir packages as gcs://_ray_pkg_<hash>.zip "
                              "(ray job submit --working-dir uploads them)")
        return self.packages / team / name

    @staticmethod
    def ray_package_name(team: str, data: bytes) -> str:
        """The name a team's package has in Ray's one shared package namespace: from the team and the bytes, so
        no team can put other bytes under a name another team's jobs run from."""
        digest = hashlib.sha256(team.encode() + b"\0" + data).hexdigest()
        return f"_ray_pkg_{digest[:32]}.zip"

    async def ensure_packages(self, job: JobRecord) -> dict[str, str]:
        """Upload a job's packages to Ray under their team-and-content names where Ray lacks them (expired pins,
        a restarted head); returns client URI -> the URI Ray runs from."""
        out = {}
        for uri in job.packages:
            local = self.package_path(job.team, uri)
            if not local.is_file():
                raise PackageGone(f"package {uri} is gone from the gateway's store; submit the job again")
            data = local.read_bytes()
            name = self.ray_package_name(job.team, data)
            out[uri] = f"gcs://{name}"
            status, _ = await self.ray_call("GET", f"/api/packages/gcs/{name}")
            if status == 200:
                continue
            status, body = await self.ray_call("PUT", f"/api/packages/gcs/{name}", data=data)
            if status != 200:
                raise ConnectionError(f"uploading {uri} to Ray failed ({status}): {body[:300]!r}")
        return out

    async def submit_to_ray(self, job: JobRecord) -> None:
        """Submit the job's current attempt; idempotent: Ray refuses a submission id twice, and a job already there
        under this id is adopted only if the gateway put it there (its metadata names this job and attempt)."""
        names = await self.ensure_packages(job)
        mark = {"aidc_job": job.id, "aidc_team": job.team, "aidc_attempt": str(job.attempt)}
        env = dict(job.request.get("runtime_env") or {})
        if env.get("working_dir") in names:
            env["working_dir"] = names[env["working_dir"]]
        if isinstance(env.get("py_modules"), list):
            env["py_modules"] = [names.get(m, m) for m in env["py_modules"]]
        data = data_allowance(job.demand, job.request)
        if data is not None:  # aidc's Ray Data pipelines stay within it (aidc.runtime.bound_data); tasks count
            env["env_vars"] = {**(env.get("env_vars") or {}), DATA_CPUS_ENV: f"{floor_cpus(data):g}"}
        job.tasks_counted = job.attempt
        body = {**job.request, "submission_id": job.ray_id, "metadata": {**(job.request.get("metadata") or {}), **mark},
                "entrypoint": with_run_name(job.request["entrypoint"], job.id), "runtime_env": env}
        status, raw = await self.ray_call("POST", "/api/jobs/", json=body)
        if status == 200:
            return
        wrapped = re.search(rb"status code (\d{3})", raw)  # the dashboard answers 500 for its job agent's 400
        if status == 500 and wrapped and wrapped[1].startswith(b"4"):
            status = int(wrapped[1])
        if status in (400, 500) and b"already exists" in raw:
            info = await self.ray_job(job.ray_id)
            meta = (info or {}).get("metadata") or {}
            if all(meta.get(k) == v for k, v in mark.items()):
                return
            job.state, job.ended_at = "FAILED", time.time()
            job.message = f"Ray already has a job {job.ray_id} that the gateway did not submit; submit again"
            return
        text = raw.decode(errors="replace")[-1500:]
        if status >= 500:
            raise ConnectionError(f"Ray Jobs API {status}: {text}")
        job.state, job.ended_at, job.message = "FAILED", time.time(), f"Ray refused the job ({status}): {text}"

    # ---- scheduling ----------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """The scheduling loop: every interval (or at once after a submit or stop), one round."""
        while True:
            self.wake.clear()  # before the round: a submit during it wakes the next one
            try:
                await self.tick()
            except Exception as exc:  # noqa: BLE001 - Ray down or restarting: retry next round
                logger.warning("scheduling round failed (retrying): %s", exc)
            try:
                await asyncio.wait_for(self.wake.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass

    async def tick(self) -> None:
        async with self.lock:
            changed = await self._refresh()
            if time.monotonic() - self._last_enforce >= self.enforce_s:
                self._last_enforce = time.monotonic()
                changed |= await self._enforce()
            changed |= await self._schedule()
            if changed or (self._unsaved_energy and time.monotonic() - self._saved_at >= 60):
                self.save()
            if time.monotonic() - self._last_sweep >= 60:
                self._last_sweep = time.monotonic()
                self._sweep_packages()
            metrics.publish(self.jobs.jobs.values(), self.teams().teams)
        await self._autoscale()  # out of the lock: a slow GCS must not hold up submissions

    async def _refresh(self) -> bool:
        changed = False
        running = [j for j in self.jobs.jobs.values() if j.state == "RUNNING"]
        infos = await asyncio.gather(*(self.ray_job(j.ray_id) for j in running), return_exceptions=True)
        for job, info in zip(running, infos):
            try:
                if isinstance(info, BaseException):
                    raise info
                changed |= await self._refresh_one(job, info)
            except PackageGone as exc:
                job.state, job.ended_at, job.message = "FAILED", time.time(), exc.message
                changed = True
            except Exception as exc:  # noqa: BLE001 - one job's trouble never stops the round for the others
                logger.warning("refreshing %s: %s", job.id, exc)
        return changed

    async def _refresh_one(self, job: JobRecord, info: dict | None) -> bool:
        """Apply what Ray says (`info`, None: no such job) about a running job's current attempt."""
        if not isinstance(info, dict):  # saved as running, not in Ray (a crash before the submit, a head restart)
            if job.preempting or job.stopping:
                info = {"status": "STOPPED", "message": "not found in Ray"}
            else:
                self.ray_info.pop(job.id, None)  # the old cluster's job id and pids: not this attempt's
                await self.submit_to_ray(job)
                return True
        self.ray_info[job.id] = {k: info.get(k) for k in _RAY_INFO}
        if info.get("status") not in TERMINAL:
            if (job.preempting or job.stopping) and time.monotonic() - self._stops.get(job.id, 0) > 5:
                await self._send_stop(job)  # re-sent until Ray says stopped (a stop lost in a crash, a 5xx)
            return False
        now = time.time()
        self.ray_info.pop(job.id, None)
        self._stops.pop(job.id, None)
        self._strikes.pop(job.id, None)
        if self._capacity:  # what it held is free (or being freed): the next admission reads the cluster again
            self._capacity = (float("-inf"), self._capacity[1])  # (its outside use kept should that read fail)
        job.runs.append({"ray_id": job.ray_id, "start": job.started_at or now, "end": now,
                         "status": info["status"], "why": job.preempting or info.get("message") or "",
                         "job_id": info.get("job_id")})
        if job.preempting and not job.stopping and info["status"] == "STOPPED":
            audit.record_quietly("job.requeue", target=job.id, actor="gateway",
                                 details={"team": job.team, "why": job.preempting, "attempt": job.attempt + 1})
            job.message = f"{job.preempting}; queued again (resumes from its latest checkpoint)"
            job.state, job.attempt, job.preempting, job.started_at, job.borrowed = "QUEUED", job.attempt + 1, \
                None, None, False
            job.requeued_at = now
            metrics.count("preempted", job.team)
            return True
        job.state, job.ended_at, job.preempting = info["status"], now, None
        job.message = job.message if job.stopping and job.message else (info.get("message") or "")
        for k in ("job_id", "driver_exit_code", "error_type"):
            job.runs[-1][k] = info.get(k)
        return True

    async def _enforce(self) -> bool:
        """Stop running jobs that hold more than they were admitted for (two checks in a row): their actors,
        placement groups and running tasks plus the driver's reservation, from Ray's state API. The processes
        found are also what GPU energy is counted for."""
        changed = False
        processes: dict[str, set[tuple[str, int]]] = {}
        for job in [j for j in self.jobs.jobs.values() if j.state == "RUNNING"]:
            info = self.ray_info.get(job.id, {})
            if not info.get("job_id"):
                continue
            try:
                actors, pgs, tasks = await self._job_holdings(info["job_id"])
            except Exception as exc:  # noqa: BLE001 - the state API unavailable: check next round
                logger.warning("resource check of %s: %s", job.id, exc)
                continue
            # GPU tasks (Ray Data map tasks, remote functions) draw in their workers' processes
            processes[job.id] = {(a.get("node_id"), int(a["pid"])) for a in actors if a.get("pid")} | {
                (t.get("node_id"), int(t["worker_pid"])) for t in tasks if t.get("worker_pid")}
            driver_pid = (info.get("driver_info") or {}).get("pid")
            if driver_pid and str(driver_pid).isdigit():
                processes[job.id].add((info.get("driver_node_id"), int(driver_pid)))
            if job.stopping:
                continue
            if job.tasks_counted != job.attempt:  # started by a gateway that did not bound its Ray Data
                tasks = []
            held, no_tasks = held_by(actors + tasks, pgs), held_by(actors, pgs)
            in_tasks = {k: held[k] - no_tasks[k] for k in held}  # beyond the groups they run in
            cpus = held["CPU"] + float(job.request.get("entrypoint_num_cpus") or 0)
            gpus = held["GPU"] + float(job.request.get("entrypoint_num_gpus") or 0)
            excess = []
            for n, kind, admitted in ((cpus, "CPU", job.demand.cpus), (gpus, "GPU", job.demand.gpus)):
                if n > admitted + admission.EPS:
                    part = f", {in_tasks[kind]:g} of them in {len(tasks)} running tasks" if in_tasks[kind] else ""
                    excess.append(f"{n:g} {kind}s (admitted for {admitted:g}{part})")
            if not excess:
                self._strikes.pop(job.id, None)
                continue
            self._strikes[job.id] = self._strikes.get(job.id, 0) + 1
            if self._strikes[job.id] < 2:
                continue
            why = (f"stopped by the aidc gateway: the job holds {' and '.join(excess)} in its driver, actors, tasks "
                   "and placement groups; "
                   "declare what it needs (its config's resources, or --metadata-json '{\"cpus\": \"4\", \"gpus\": "
                   "\"1\"}' for the whole job) and submit again")
            job.stopping, job.message = True, why
            self.save()
            await self._send_stop(job)
            audit.record_quietly("job.enforce", target=job.id, actor="gateway", outcome="denied",
                                 details={"team": job.team, "excess": excess})
            metrics.count("enforced", job.team)
            changed = True
        try:
            await self._count_energy(processes)
        except Exception as exc:  # noqa: BLE001 - the dashboard unavailable: this interval is not counted
            logger.warning("GPU energy: %s", exc)
        return changed

    async def _count_energy(self, processes: dict[str, set[tuple[str, int]]]) -> None:
        """Add the GPU energy each running job drew since the last check (aidc.tenancy.energy) to its ledger
        (saved with the next change, or within a minute); nothing is asked where the cluster has no GPUs."""
        now = time.monotonic()
        last, self._energy_at = self._energy_at, now
        if last is None or not processes:
            return
        # whether the cluster has GPUs: from the capacity scheduling last read (refreshed here once a minute), so
        # an idle queue does not make every check read the whole cluster's actors and groups
        cap = self._capacity[1] if self._capacity and now - self._capacity[0] < 60 else await self.capacity()
        if not cap.gpus:
            return
        nodes = await self.ray_call("GET", "/nodes?view=summary")
        if nodes[0] != 200:
            raise AidcError(f"the dashboard's /nodes answered {nodes[0]}: {nodes[1][:200]!r}")
        watts = energy.gpu_watts_by_job(json.loads(nodes[1]).get("data", {}).get("summary") or [], processes)
        held_s = min(now - last, 3 * self.enforce_s)  # after a gap (a slow round, a restart) the reading is stale
        wall = time.time()
        for job_id, w in watts.items():
            job = self.jobs.jobs[job_id]
            energy.add_energy(job.gpu_kwh, w, wall - held_s, wall)
            metrics.add_energy(job.team, w * held_s / 3.6e6)
        self._unsaved_energy |= bool(watts)

    async def _job_holdings(self, ray_job_id: str) -> tuple[list[dict], list[dict], list[dict]]:
        """A Ray job's live actors, placement groups and running plain tasks (state API). A task blocked in
        ray.get/ray.wait (RUNNING_IN_RAY_GET...) has lent its CPUs back and is not listed; actor methods hold
        nothing beyond their actor."""
        where = f"limit=10000&detail=true&filter_keys=job_id&filter_predicates=%3D&filter_values={ray_job_id}"
        running = "".join(f"&filter_keys={k}&filter_predicates=%3D&filter_values={v}"
                          for k, v in (("state", "RUNNING"), ("type", "NORMAL_TASK")))
        actors, pgs, tasks = await asyncio.gather(
            self._state(f"/api/v0/actors?{where}"),
            self._state(f"/api/v0/placement_groups?{where.replace('job_id', 'creator_job_id')}"),
            self._state(f"/api/v0/tasks?{where}{running}"))
        return [a for a in actors if a.get("state") == "ALIVE"], pgs, tasks

    async def _send_stop(self, job: JobRecord) -> None:
        self._stops[job.id] = time.monotonic()
        status, body = await self.ray_call("POST", f"/api/jobs/{job.ray_id}/stop")
        if status not in (200, 404):
            logger.warning("stopping %s in Ray: %s %s", job.ray_id, status, body[:200])

    async def _schedule(self) -> bool:
        queued = [j for j in self.jobs.jobs.values() if j.state == "QUEUED"]
        self._grow = []
        if not queued:
            return False
        teams = self.teams().teams
        plan = admission.plan([j for j in self.jobs.jobs.values() if not j.deleted], teams, await self.capacity(),
                              self.node_wait_s)
        changed = bool(plan.preempt or plan.admit)
        self._grow = plan.grow
        now = time.time()
        for job in queued:  # since when each waits for nodes (past node_wait_s it may preempt instead)
            if job.id in plan.grow and not job.nodes_asked_at:
                job.nodes_asked_at, changed = now, True
            elif job.id not in plan.grow and job.nodes_asked_at and now - job.nodes_asked_at < self.node_wait_s:
                job.nodes_asked_at, changed = None, True  # admitted, or waiting for something else now
        for job_id, why in plan.preempt:
            self.jobs.jobs[job_id].preempting = why
        for job_id, why in plan.waiting.items():
            if job_id in plan.grow and self._news:
                why = f"{why} ({self._news})"
            changed |= self.jobs.jobs[job_id].message != why
            self.jobs.jobs[job_id].message = why
        if plan.preempt:
            self.save()  # durable before Ray stops anything: a restarted gateway requeues, never loses, the victims
        for job_id, why in plan.preempt:
            job = self.jobs.jobs[job_id]
            audit.record_quietly("job.preempt", target=job_id, actor="gateway",
                                 details={"team": job.team, "priority": job.priority, "why": why})
            try:
                await self._send_stop(job)
            except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError) as exc:  # re-sent until stopped
                logger.warning("preempting %s: %s", job_id, exc)
        for job_id, borrowed in plan.admit:
            job = self.jobs.jobs[job_id]
            now = time.time()
            job.state, job.borrowed, job.started_at, job.nodes_asked_at = "RUNNING", borrowed, now, None
            job.first_started_at = job.first_started_at or now
            job.message = "admitted" + (" on borrowed capacity" if borrowed else "")
            self.save()  # durable before Ray sees it: a crash now resubmits the same id, never a second copy
            try:
                await self.submit_to_ray(job)
            except PackageGone as exc:
                job.state, job.ended_at, job.message = "FAILED", now, exc.message
                continue
            except ConnectionError as exc:  # Ray answered 5xx: it did not take the job
                job.state, job.started_at, job.message = "QUEUED", None, f"waiting: Ray Jobs API unavailable ({exc})"
                continue
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:  # Ray may have taken it: the next round knows
                logger.warning("submitting %s: %s (checked again next round)", job.ray_id, exc)
                continue
            if job.state == "RUNNING":
                waited = now - (job.requeued_at or job.submitted_at)
                metrics.observe_wait(job.team, waited)
                audit.record_quietly("job.admit", target=job.id, actor="gateway",
                                     details={"team": job.team, "demand": job.demand.model_dump(), "borrowed": borrowed,
                                              "attempt": job.attempt, "waited_s": round(waited, 3)})
        return changed

    def _sweep_packages(self) -> None:
        """Delete stored packages that no unfinished job names and that are over an hour old (an upload just
        before its submit is never taken away)."""
        live = {(j.team, p) for j in self.jobs.jobs.values() if j.state not in TERMINAL for p in j.packages}
        cutoff = time.time() - PACKAGE_TTL_S
        for path in self.packages.glob("*/_ray_pkg_*.zip"):
            if (path.parent.name, f"gcs://{path.name}") not in live and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)

    # ---- HTTP ------------------------------------------------------------------------------------------------------

    def caller(self, request: web.Request, right: str) -> KeyRecord:
        """The request's key if it has `right` (read, submit, admin), else AuthError 401/403."""
        try:
            rec = self.guard.authenticate(request.headers.get("Authorization"))
        except AuthError as exc:
            self._denied(request, exc, None)
            raise
        if not rec.can(right) or (rec.team is None and not rec.can("admin")):
            exc = AuthError(f"key {rec.id} ({rec.owner}, roles {rec.scopes}) may not {right} jobs: ask an admin for "
                            f"a key with the {'developer' if right == 'submit' else 'viewer'} role of your team", 403,
                            "role")
            self._denied(request, exc, rec)
            raise exc
        if rec.team is not None and rec.team not in self.teams().teams and not rec.can("admin"):
            exc = AuthError(f"team {rec.team!r} of key {rec.id} is not set up on this cluster; ask an admin to run "
                            f"aidc teams set {rec.team} ...", 403, "unknown_team")
            self._denied(request, exc, rec)
            raise exc
        return rec

    def _denied(self, request: web.Request, exc: AuthError, rec: KeyRecord | None) -> None:
        who = f"key:{rec.id}" if rec else "anonymous"
        self._audit(f"{exc.reason}/{who}", "gateway.denied", target=request.path, outcome="denied", actor=who,
                    details={"reason": exc.reason, "status": exc.status, "method": request.method,
                             "team": rec.team if rec else None})

    def visible(self, rec: KeyRecord, job_id: str) -> JobRecord | None:
        job = self.jobs.jobs.get(job_id) or self.jobs.jobs.get(_ATTEMPT.sub("", job_id))  # <id> or <id>-a<n>
        if job is None or job.deleted or (job.team != rec.team and not rec.can("admin")):
            return None
        return job

    def details(self, job: JobRecord) -> dict:
        """The job as the Jobs API's JobDetails, under the id its team knows."""
        info = self.ray_info.get(job.id) if job.state == "RUNNING" else \
            (job.runs[-1] if job.state in TERMINAL and job.runs else None)
        info = info or {}
        status = {"QUEUED": "PENDING"}.get(job.state, job.state)
        if job.state == "RUNNING":
            status = "RUNNING" if info.get("driver_info") or info.get("driver_agent_http_address") else "PENDING"
        out = {"type": "SUBMISSION", "job_id": None, "submission_id": job.id, "driver_info": None, "status": status,
               "entrypoint": job.request.get("entrypoint", ""), "message": job.message, "error_type": None,
               "start_time": int(job.submitted_at * 1000), "end_time": None,
               "metadata": {**(job.request.get("metadata") or {}), "aidc_team": job.team,
                            "aidc_priority": str(job.priority), "aidc_attempt": str(job.attempt)},
               "runtime_env": job.request.get("runtime_env") or {}, "driver_agent_http_address": None,
               "driver_node_id": None, "driver_exit_code": None}
        for k in ("job_id", "driver_info", "error_type", "driver_node_id", "driver_exit_code"):
            if info.get(k) is not None:
                out[k] = info[k]
        if job.state in TERMINAL:
            out["end_time"] = int((job.ended_at or time.time()) * 1000)
            if job.runs:
                out["driver_exit_code"] = job.runs[-1].get("driver_exit_code")
                out["error_type"] = job.runs[-1].get("error_type")
        elif job.state == "RUNNING" and info.get("message") and not job.preempting:
            out["message"] = info["message"]
        return out

    def app(self) -> web.Application:
        app = web.Application(client_max_size=512 << 20, middlewares=[self._errors])
        r = app.router
        r.add_get("/api/version", self.version)
        r.add_get("/api/packages/{protocol}/{name}", self.get_package)
        r.add_put("/api/packages/{protocol}/{name}", self.put_package)
        r.add_post("/api/jobs/", self.submit)
        r.add_get("/api/jobs/", self.list_jobs)
        r.add_get("/api/jobs/{id}", self.get_job)
        r.add_post("/api/jobs/{id}/stop", self.stop_job)
        r.add_delete("/api/jobs/{id}", self.delete_job)
        r.add_get("/api/jobs/{id}/logs", self.logs)
        r.add_get("/api/jobs/{id}/logs/tail", self.tail)
        r.add_get("/api/serve/applications/", self.serve_apps)
        r.add_put("/api/serve/applications/", self.serve_apps)
        r.add_delete("/api/serve/applications/", self.serve_apps)
        r.add_get("/healthz", self.healthz)
        r.add_get("/metrics", self.metrics)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app) -> None:
        app["loop"] = asyncio.create_task(self.run())

    async def _stop(self, app) -> None:
        app["loop"].cancel()
        if self._session:
            await self._session.close()

    @web.middleware
    async def _errors(self, request, handler):
        try:
            return await handler(request)
        except AuthError as exc:
            return _text(exc.status, exc.message)
        except ConfigError as exc:
            return _text(400, exc.message)
        except web.HTTPException:
            raise
        except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError) as exc:
            return _text(503, f"the Ray Jobs API behind the gateway is unreachable ({exc!r}); retry shortly")
        except Exception as exc:  # noqa: BLE001 - logged with its traceback; the client gets a reason, not a trace
            logger.exception("gateway error on %s %s", request.method, request.path)
            return _text(500, f"aidc gateway error: {type(exc).__name__}: {exc}")

    async def serve_apps(self, request):
        """`serve deploy/status/shutdown --address <gateway>`: Serve's REST API. Serve takes one declarative config
        for the whole cluster, so the gateway records which team deployed each app: status (deployers) shows a
        team its own apps; a deployer's deploy may not drop or change another team's app; shutdown is admin's."""
        method = request.method
        rec = self.caller(request, "admin" if method == "DELETE" else "deploy")
        owners_path = self.home / "serve_owners.json"
        owners = json.loads(owners_path.read_text()) if owners_path.is_file() else {}
        if method == "GET":
            status, out = await self.ray_call("GET", "/api/serve/applications/")
            if status == 200 and not rec.can("admin"):
                body = json.loads(out)
                body["applications"] = {k: v for k, v in (body.get("applications") or {}).items()
                                        if owners.get(k) == rec.team}
                out = json.dumps(body).encode()
            return web.Response(status=status, body=out, content_type="application/json")
        raw = await request.read()
        async with self.serve_lock:
            return await self._serve_change(request, rec, method, raw, owners_path, owners)

    async def _serve_change(self, request, rec: KeyRecord, method: str, raw: bytes, owners_path: Path,
                            owners: dict) -> web.Response:
        owners = json.loads(owners_path.read_text()) if owners_path.is_file() else owners  # under the lock
        me = rec.team or "*admin*"
        if method == "PUT":
            try:
                config = json.loads(raw)
                names = [a["name"] for a in config.get("applications") or []]
            except (ValueError, TypeError, KeyError, AttributeError):
                return _text(400, "the deploy body is not a Serve config (JSON with applications: [{name: ...}])")
            status, cur = await self.ray_call("GET", "/api/serve/applications/")
            current = (json.loads(cur).get("applications") or {}) if status == 200 else {}
            others = sorted(n for n in set(current) | set(names) if owners.get(n, "*unknown*") != me
                            and (n in owners or n in current) and not rec.can("admin"))
            if others:
                return _text(403, f"a Serve deploy replaces every app on the cluster, and {others} belong to other "
                                  f"teams ({', '.join(sorted({owners.get(n, 'unknown') for n in others}))}); ask an "
                                  "admin to deploy the combined config")
        status, out = await self.ray_call(method, "/api/serve/applications/", data=raw or None,
                                          headers={"Content-Type": request.headers.get("Content-Type",
                                                                                       "application/json")})
        if status < 400:
            if method == "PUT":
                owners = {n: owners.get(n) or me for n in names}
            else:
                owners = {}
            storage.write_text(str(owners_path), json.dumps(owners))  # atomic: temp file + rename
        audit.record_quietly("serve." + ("deploy" if method == "PUT" else "shutdown"), target="serve",
                             actor=f"key:{rec.id}", outcome="ok" if status < 400 else "failed",
                             details={"team": rec.team, "status": status})
        return web.Response(status=status, body=out, content_type="application/json" if status == 200 else "text/plain")

    async def healthz(self, request):
        return web.json_response({"ok": True})

    async def metrics(self, request):
        return web.Response(body=metrics.render(), content_type="text/plain")

    async def version(self, request):
        self.caller(request, "read")
        status, body = await self.ray_call("GET", "/api/version")
        return web.Response(status=status, body=body, content_type="application/json")

    def _package_route(self, request, rec: KeyRecord) -> Path:
        if request.match_info["protocol"] != "gcs":
            raise ConfigError(f"the gateway takes working-dir packages as gcs://_ray_pkg_<hash>.zip, not "
                              f"{request.match_info['protocol']}://")
        if rec.team is None:
            raise ConfigError(f"key {rec.id} has no team: packages are uploaded with a team's developer key")
        return self.package_path(rec.team, f"gcs://{request.match_info['name']}")

    async def get_package(self, request):
        rec = self.caller(request, "submit")
        found = self._package_route(request, rec).is_file()
        return web.Response(status=200 if found else 404,
                            text="" if found else f"Package {request.match_info['name']} does not exist")

    async def put_package(self, request):
        rec = self.caller(request, "submit")
        path = self._package_route(request, rec)
        data = await request.read()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # the team's own copy; a fresh mtime keeps the sweep off it until it is submitted
        return web.Response(status=200)  # Ray gets it at admission, under a name of the team's and the bytes

    async def submit(self, request):
        rec = self.caller(request, "submit")
        if rec.team is None or rec.team not in self.teams().teams:
            return _text(400, f"key {rec.id} has no team set up on this cluster: jobs are submitted with a team's "
                              "developer key (aidc keys create --team <team> --scope developer)")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _text(400, "the submit body is not JSON: use ray job submit or JobSubmissionClient.submit_job")
        if not isinstance(body, dict) or not isinstance(body.get("entrypoint"), str) or not body["entrypoint"].strip():
            return _text(400, "the submit body needs an entrypoint (a shell command), e.g. ray job submit -- python "
                              "-m jobs.train --config jobs/configs/mnist.yaml")
        unknown = sorted(set(body) - _SUBMIT_FIELDS)
        if unknown:
            return _text(400, f"unknown submit field(s) {unknown}; the Jobs API takes {sorted(_SUBMIT_FIELDS)}")
        team = self.teams().teams[rec.team]
        job_id = body.get("submission_id") or body.get("job_id") or f"{rec.team}-{os.urandom(6).hex()}"
        if not isinstance(job_id, str) or not _ID.match(job_id) or _ATTEMPT.search(job_id):
            return _text(400, f"bad submission id {job_id!r}: letters, digits, '.', '_' and '-', up to 100, not "
                              "starting with '.' or '-' and not ending in -a<number> (the gateway's attempt names)")
        metadata = body.get("metadata") or {}
        runtime_env = body.get("runtime_env") or {}
        if not isinstance(metadata, dict) or not isinstance(runtime_env, dict):
            return _text(400, "metadata and runtime_env must be mappings (--metadata-json '{\"priority\": \"10\"}')")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            return _text(400, "metadata keys and values must be strings, as in Ray's Jobs API: '{\"gpus\": \"2\"}'")
        priority = team.priority
        if "priority" in metadata:
            try:
                priority = int(metadata["priority"])
            except (TypeError, ValueError):
                return _text(400, f"metadata priority {metadata['priority']!r} is not an integer")
            top = team.max_priority if team.max_priority is not None else team.priority
            if priority > top:
                return _text(403, f"team {rec.team} may submit at priority {top} at most, not {priority}; ask an "
                                  f"admin (aidc teams set {rec.team} --max-priority {priority})")
        modules = runtime_env.get("py_modules") or []
        uris = [runtime_env.get("working_dir"), *(modules if isinstance(modules, list) else [modules])]
        pkgs = [u for u in uris if isinstance(u, str) and "://" in u]
        for uri in pkgs:
            if not self.package_path(rec.team, uri).is_file():  # also refuses any name but _ray_pkg_<hash>.zip
                return _text(400, f"package {uri} was not uploaded through this gateway by team {rec.team}; submit "
                                  "with --working-dir (the client uploads it here first)")
        working = self.package_path(rec.team, runtime_env["working_dir"]) if runtime_env.get("working_dir") in pkgs \
            else None
        try:
            cap = await self.capacity()
        except (AidcError, aiohttp.ClientError, asyncio.TimeoutError, KeyError, TypeError, ValueError) as exc:
            return _text(503, f"cannot read the cluster's resources from Ray ({exc}); retry shortly")
        demand = await asyncio.to_thread(job_demand, body, working, cap.gpu_total())
        # against the cluster at full scale where its autoscaling config is known; otherwise it may still grow
        full = self.full_scale()
        whole = admission.Capacity(cap.cpus, cap.gpus, cap.memory_gb, full=full).at_full_scale() if full else None
        impossible = admission.never_fits(team, demand, whole)
        if impossible:
            if full:
                impossible = impossible.replace("cluster: has", "cluster at full scale (its autoscaling config) has")
            return _text(400, f"job needs {demand.short()} and can never run: {impossible}")
        request_body = {k: v for k, v in body.items() if k not in ("submission_id", "job_id")}
        async with self.lock:
            if job_id in self.jobs.jobs:
                return _text(400, f"Job with submission_id {job_id} already exists. Please use a different "
                                  "submission_id.")
            job = JobRecord(id=job_id, team=rec.team, owner=rec.id, priority=priority, demand=demand,
                            request=request_body, packages=pkgs, message="queued")
            self.jobs.jobs[job_id] = job
            self.save()
        audit.record_quietly("job.submit", target=job_id, actor=f"key:{rec.id}",
                             details={"team": rec.team, "priority": priority, "demand": demand.model_dump()})
        self.wake.set()
        return web.json_response({"job_id": None, "submission_id": job_id})

    async def list_jobs(self, request):
        rec = self.caller(request, "read")
        jobs = [j for j in self.jobs.jobs.values() if not j.deleted and (rec.can("admin") or j.team == rec.team)]
        return web.json_response([self.details(j) for j in jobs])

    def _job_or_404(self, request, right: str) -> tuple[KeyRecord, JobRecord]:
        rec = self.caller(request, right)
        job = self.visible(rec, request.match_info["id"])
        if job is None:
            raise web.HTTPNotFound(text=f"Job {request.match_info['id']} does not exist")
        return rec, job

    async def get_job(self, request):
        _, job = self._job_or_404(request, "read")
        return web.json_response(self.details(job))

    async def stop_job(self, request):
        rec, job = self._job_or_404(request, "submit")
        async with self.lock:
            if job.state in TERMINAL:
                return web.json_response({"stopped": False})
            why = f"stopped by {rec.owner} (key {rec.id})"
            if job.state == "QUEUED":
                job.state, job.ended_at, job.message = "STOPPED", time.time(), why + " while queued"
            else:
                job.stopping, job.message = True, why
                self.save()
                await self._send_stop(job)
            self.save()
        audit.record_quietly("job.stop", target=job.id, actor=f"key:{rec.id}", details={"team": job.team})
        self.wake.set()
        return web.json_response({"stopped": True})

    async def delete_job(self, request):
        rec, job = self._job_or_404(request, "submit")
        if job.state not in TERMINAL:
            return _text(400, f"Attempted to delete job with submission_id {job.id}, but it is in a non-terminal "
                              f"state {self.details(job)['status']}; stop it first")
        async with self.lock:
            for ray_id in {r["ray_id"] for r in job.runs}:
                await self.ray_call("DELETE", f"/api/jobs/{ray_id}")
            job.deleted = True  # gone from the Jobs API; kept for usage accounting
            self.save()
        audit.record_quietly("job.delete", target=job.id, actor=f"key:{rec.id}", details={"team": job.team})
        return web.json_response({"deleted": True})

    def _attempts(self, job: JobRecord) -> list[str]:
        ids = [r["ray_id"] for r in job.runs]
        if job.state == "RUNNING" and job.ray_id not in ids:
            ids.append(job.ray_id)
        return ids

    async def logs(self, request):
        _, job = self._job_or_404(request, "read")
        parts = []
        for n, ray_id in enumerate(self._attempts(job)):
            status, body = await self.ray_call("GET", f"/api/jobs/{ray_id}/logs")
            text = json.loads(body).get("logs", "") if status == 200 else ""
            if n:
                parts.append(f"--- aidc: attempt {n + 1} ({ray_id}) ---\n")
            parts.append(text)
        return web.json_response({"logs": "".join(parts)})

    async def tail(self, request):
        """Follow the job's logs through every attempt: wait while queued, then Ray's own tail of each attempt."""
        _, job = self._job_or_404(request, "read")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        reader = asyncio.create_task(self._drain(ws))  # sees the client go away
        followed: set[str] = set()
        s = await self.session()
        try:
            while not reader.done():
                job = self.jobs.jobs.get(job.id)
                if job is None:
                    break
                pending = [i for i in self._attempts(job) if i not in followed]
                if not pending:
                    if job.state in TERMINAL:
                        break
                    await asyncio.sleep(self.interval_s / 2)
                    continue
                ray_id = pending[0]
                followed.add(ray_id)
                if len(followed) > 1:
                    await ws.send_str(f"--- aidc: {job.message or 'job restarted'}; attempt {len(followed)} ---\n")
                try:
                    async with s.ws_connect(f"{self.ray}/api/jobs/{ray_id}/logs/tail",
                                            timeout=aiohttp.ClientWSTimeout(ws_close=10)) as upstream:
                        async for msg in upstream:
                            if msg.type != aiohttp.WSMsgType.TEXT or reader.done():
                                break
                            await ws.send_str(msg.data)
                except aiohttp.WSServerHandshakeError as exc:
                    if exc.status == 404 and job.state == "RUNNING" and job.ray_id == ray_id:
                        followed.discard(ray_id)  # admitted, not yet in Ray (the submit is under way): again soon
                        await asyncio.sleep(self.interval_s / 2)
                        continue
                    logger.warning("tailing %s: %s", ray_id, exc)
                except aiohttp.ClientError as exc:
                    logger.warning("tailing %s: %s", ray_id, exc)
                while not reader.done():  # until the round that sees this attempt end (requeued or final)
                    job = self.jobs.jobs.get(job.id)
                    if job is None or job.state in TERMINAL or job.ray_id != ray_id:
                        break
                    await asyncio.sleep(self.interval_s / 2)
        finally:
            reader.cancel()
            await ws.close()
        return ws

    @staticmethod
    async def _drain(ws: web.WebSocketResponse) -> None:
        async for _ in ws:
            pass


def serve(ray_address: str, host: str, port: int, **kw) -> None:
    """Run the gateway until interrupted."""
    gw = Gateway(ray_address, **kw)
    if not gw.token:
        logger.warning("no Ray cluster token found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token): the "
                       "gateway calls the Jobs API without one")
    logger.info("aidc gateway on http://%s:%d in front of %s (state %s)", host, port, gw.ray, gw.home)
    web.run_app(gw.app(), host=host, port=port, print=None, access_log=None)


__all__ = ["Gateway", "cluster_token", "serve"]
