"""Many teams on one cluster, driven like users: `ray start`, the aidc gateway in front of Ray's Jobs API, real
`ray job submit/status/logs/stop/list` with team keys, quotas and the queue, preemption, enforcement, and a
gateway SIGKILLed with jobs queued."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from aidc.serving.retry import wait_ready
from tests.conftest import BIN, REPO, free_port, ray_head, run_cli

pytestmark = pytest.mark.e2e

def sleeper(n: int, s: float) -> list[str]:
    return ["python", "-c", f"import time; print('job {n} says hello', flush=True); time.sleep({s})"]


class Gateway:
    def __init__(self, env: dict, dashboard: str, tmp: Path, args: tuple = ()):
        self.port, self.dashboard, self.tmp, self.args = free_port(), dashboard, tmp, list(args)
        self.env = {**env, "AIDC_TENANCY_DIR": str(tmp / "tenancy"), "AIDC_SECURITY_DIR": str(tmp / "security")}
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        log = open(self.tmp / "gateway.log", "a")
        self.proc = subprocess.Popen([BIN / "aidc", "gateway", "--ray-address", self.dashboard, "--host", "127.0.0.1",
                                      "--port", str(self.port), "--interval", "0.3", "--enforce-interval", "1", *self.args],
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        wait_ready(f"{self.url}/healthz", timeout_s=60, poll_s=0.3)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def aidc(self, *args) -> str:
        return run_cli([BIN / "aidc", *args], self.env)

    def key(self, owner, role, team=None) -> str:
        return self.aidc("keys", "create", "--owner", owner, "--scope", role, *(["--team", team] if team else []),
                         "--quiet").split()[0]

    def client_env(self, key: str) -> dict:
        env = {k: v for k, v in self.env.items() if not k.startswith(("RAY_AUTH_TOKEN", "AIDC_"))}
        return {**env, "RAY_ADDRESS": self.url, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": key}

    def ray(self, key: str, *args, check=True, timeout=300) -> subprocess.CompletedProcess:
        proc = subprocess.run([BIN / "ray", "job", *args], env=self.client_env(key), cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, f"ray job {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def job(self, key: str, job_id: str) -> requests.Response:
        return requests.get(f"{self.url}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def wait(self, key, job_id, states, timeout=180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(key, job_id).json()
            if info["status"] in states:
                return info
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(0.3)
        raise AssertionError(f"{job_id} never reached {states}: {info}\n{(self.tmp / 'gateway.log').read_text()[-3000:]}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tenancy")
    with ray_head(tmp_path, num_cpus=4, prefix="aidc-gw-") as head:
        gw = Gateway(head[0], head[1], tmp_path)
        gw.restart_head = head.restart
        gw.aidc("teams", "set", "a", "--cpus", "2", "--priority", "0", "--max-priority", "10")
        gw.aidc("teams", "set", "b", "--cpus", "2")
        gw.aidc("teams", "set", "c", "--cpus", "2", "--max-priority", "5")
        gw.aidc("teams", "set", "d", "--cpus", "2")
        gw.start()
        try:
            yield gw
        finally:
            gw.stop()


def test_quota_queue_team_isolation_roles_enforcement_and_a_gateway_killed_mid_queue(gateway, tmp_path):
    gw = gateway
    dev_a, view_a, dev_b = gw.key("alice", "developer", "a"), gw.key("vera", "viewer", "a"), gw.key("bob", "developer", "b")

    # team a (2 CPUs) submits three 1-CPU jobs: two run, the third waits with the reason, then runs
    for n in (1, 2, 3):
        out = gw.ray(dev_a, "submit", "--no-wait", "--submission-id", f"a-{n}", "--entrypoint-num-cpus", "1", "--",
                     *sleeper(n, 6)).stdout
        assert f"a-{n}" in out
    gw.wait(dev_a, "a-1", ("RUNNING",))
    gw.wait(dev_a, "a-2", ("RUNNING",))
    info = gw.job(dev_a, "a-3").json()
    assert info["status"] == "PENDING" and info["message"] == "team a: 2 of 2 CPUs in use, this job needs 1", info
    assert "PENDING" in gw.ray(view_a, "status", "a-3").stdout  # a viewer reads its team's jobs

    # another team cannot see or stop them; a viewer cannot submit
    assert gw.job(dev_b, "a-1").status_code == 404
    stop = gw.ray(dev_b, "stop", "--no-wait", "a-1", check=False)
    assert stop.returncode != 0 and "does not exist" in stop.stdout + stop.stderr
    assert "a-1" not in gw.ray(dev_b, "list").stdout
    denied = gw.ray(view_a, "submit", "--no-wait", "--", "echo hi", check=False)
    assert denied.returncode != 0 and "may not submit jobs" in denied.stdout + denied.stderr
    over = gw.ray(dev_a, "submit", "--no-wait", "--metadata-json", json.dumps({"priority": "99"}), "--", "echo hi",
                  check=False)
    assert over.returncode != 0 and "priority 10 at most" in over.stdout + over.stderr
    huge = gw.ray(dev_a, "submit", "--no-wait", "--entrypoint-num-cpus", "3", "--", "echo hi", check=False)
    assert huge.returncode != 0 and "can never run: team a: quota 2 CPUs" in huge.stdout + huge.stderr

    for n in (1, 2, 3):
        assert gw.wait(dev_a, f"a-{n}", ("SUCCEEDED", "FAILED", "STOPPED"))["status"] == "SUCCEEDED"
    assert "job 3 says hello" in gw.ray(view_a, "logs", "a-3").stdout

    # bad input: a key of a team that is not set up, a job config the gateway cannot read, a bad body
    stray = gw.key("sam", "developer", "nosuchteam")
    refused = gw.ray(stray, "submit", "--no-wait", "--", "echo", "hi", check=False)
    assert refused.returncode != 0 and "team 'nosuchteam'" in refused.stdout + refused.stderr
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "bad.yaml").write_text("name: x\ntask: image_classification\nresources: {num_workers: lots}\n")
    bad = gw.ray(dev_a, "submit", "--no-wait", "--working-dir", str(tmp_path / "work"), "--", "python", "-m",
                 "jobs.train", "--config", "bad.yaml", check=False)
    assert bad.returncode != 0 and "400" in bad.stderr and "resources.num_workers" in bad.stderr, bad.stderr[-2000:]
    deployer = gw.key("dora", "deployer", "a")
    apps = requests.get(f"{gw.url}/api/serve/applications/", headers={"Authorization": f"Bearer {deployer}"},
                        timeout=60)
    assert apps.status_code == 200, apps.text  # Serve's REST API, through the gateway with the cluster token
    r = requests.put(f"{gw.url}/api/serve/applications/", json={"applications": []}, timeout=30,
                     headers={"Authorization": f"Bearer {dev_a}"})
    assert r.status_code == 403 and "may not deploy" in r.text
    auth = {"Authorization": f"Bearer {dev_a}"}
    for bad_body, why in (({"entrypoint": "true", "submission_id": "."}, "bad submission id"),
                          ({"entrypoint": "true", "submission_id": "a-1-a1"}, "attempt names"),
                          ({"entrypoint": "true", "submission_id": 7}, "bad submission id"),
                          ({"entrypoint": "true", "runtime_env": "x"}, "must be mappings"),
                          ({"entrypoint": "true", "entrypoint_num_cpus": "lots"}, "must be numbers"),
                          ({"entrypoint": "true", "runtime_env": {"working_dir": "gcs://../teams.json"}},
                           "_ray_pkg_<hash>.zip"),
                          ({"entrypoint": "true", "runtime_env": {"working_dir": "gcs:///etc/passwd"}},
                           "_ray_pkg_<hash>.zip")):
        r = requests.post(f"{gw.url}/api/jobs/", json=bad_body, headers=auth, timeout=30)
        assert r.status_code == 400 and why in r.text, (bad_body, r.status_code, r.text)
    r = requests.put(f"{gw.url}/api/packages/gcs/..%2Fteams.json", data=b"x", headers=auth, timeout=30)
    assert r.status_code in (400, 404) and (gw.tmp / "tenancy" / "teams.json").read_text().startswith("{")
    r = requests.post(f"{gw.url}/api/jobs/", data=b"{not json", headers={"Authorization": f"Bearer {dev_a}"},
                      timeout=30)
    assert r.status_code == 400 and "not JSON" in r.text

    # a job that declares 1 CPU and starts 3 one-CPU actors is stopped, and the message names the excess
    script = tmp_path / "work" / "greedy.py"
    script.write_text("import time, ray\nray.init()\n@ray.remote(num_cpus=1)\nclass A:\n    def ping(self):\n"
                      "        return 1\nactors = [A.remote() for _ in range(3)]\nray.get([a.ping.remote() for a in actors])\n"
                      "print('holding 3 CPUs', flush=True)\ntime.sleep(120)\n")
    # and one whose actor takes 2 CPUs of a placement group (Ray lists its share twice: counted once)
    (tmp_path / "work" / "greedy_pg.py").write_text(
        "import time, ray\nfrom ray.util.placement_group import placement_group\n"
        "from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy as In\nray.init()\n"
        "pg = placement_group([{'CPU': 2}])\nray.get(pg.ready())\n@ray.remote(num_cpus=2)\nclass A:\n"
        "    def ping(self):\n        return 1\n"
        "a = A.options(scheduling_strategy=In(pg, placement_group_bundle_index=0)).remote()\n"
        "ray.get(a.ping.remote())\nprint('holding a bundle', flush=True)\ntime.sleep(120)\n")
    # and one that declares 1 CPU for the whole job and runs three one-CPU plain tasks
    (tmp_path / "work" / "greedy_tasks.py").write_text(
        "import os, time, ray\nray.init()\nprint('data CPUs', os.environ['AIDC_DATA_CPUS'], flush=True)\n"
        "@ray.remote(num_cpus=1)\ndef hold():\n    time.sleep(120)\n"
        "ray.get([hold.remote() for _ in range(3)])\n")
    for name in ("greedy", "greedy_pg", "greedy_tasks"):  # one after the other: side by side, one could starve
        declared = ["--metadata-json", '{"cpus": "1"}'] if name == "greedy_tasks" else ["--entrypoint-num-cpus", "1"]
        gw.ray(dev_b, "submit", "--no-wait", "--submission-id", name, "--working-dir", str(script.parent),
               *declared, "--", "python", f"{name}.py")
        info = gw.wait(dev_b, name, ("STOPPED", "FAILED", "SUCCEEDED"), timeout=120)
        assert info["status"] == "STOPPED", info
        if name == "greedy":  # (its driver's CPU and two or three actors, whichever the check saw twice in a row)
            assert re.search(r"holds [34] CPUs \(admitted for 1\)", info["message"]), info
        elif name == "greedy_pg":
            assert "holds 3 CPUs (admitted for 1)" in info["message"], info
    # the tasks counted (the driver holds none: the job's whole demand was declared), and what the job's own Ray
    # Data pipelines were told to keep within (aidc.runtime.bound_data): the whole 1 CPU. Two or three tasks,
    # whichever the check saw running twice in a row: both are over 1 (a fresh-clone run stopped it at 2, the
    # third task not yet started)
    assert re.search(r"holds ([23]) CPUs \(admitted for 1, \1 of them in \1 running tasks\)", info["message"]), info
    assert "data CPUs 1" in gw.ray(dev_b, "logs", "greedy_tasks").stdout
    metrics = requests.get(f"{gw.url}/metrics", timeout=10).text
    assert 'aidc_tenancy_quota_limit{resource="cpus",team="a"} 2.0' in metrics
    assert 'aidc_tenancy_events_total{event="enforced",team="b"} 3.0' in metrics
    assert 'aidc_tenancy_gpu_energy_kwh_total{team="b"} 0.0' in metrics  # no GPUs here: nothing drawn

    # the gateway SIGKILLed with jobs queued: restarted, every job runs exactly once
    gw.aidc("teams", "set", "b", "--cpus", "1")
    for n in (1, 2, 3):
        gw.ray(dev_b, "submit", "--no-wait", "--submission-id", f"b-{n}", "--entrypoint-num-cpus", "1", "--",
               *sleeper(n, 2))
    gw.wait(dev_b, "b-1", ("RUNNING", "SUCCEEDED"))
    gw.kill()
    time.sleep(3)
    gw.start()
    for n in (1, 2, 3):
        assert gw.wait(dev_b, f"b-{n}", ("SUCCEEDED", "FAILED", "STOPPED"))["status"] == "SUCCEEDED"
    listed = json.loads(run_cli([sys.executable, "-c", (
        "import json; from ray.job_submission import JobSubmissionClient as C; "
        f"print(json.dumps([j.submission_id for j in C({gw.dashboard!r}).list_jobs()]))")], {**gw.env, "RAY_AUTH_MODE": "token"}
        ).strip().splitlines()[-1])
    assert sorted(i for i in listed if i and i.startswith("b-")) == ["b-1", "b-2", "b-3"]
    for n in (1, 2, 3):
        lines = gw.ray(dev_b, "logs", f"b-{n}").stdout.splitlines()
        assert lines.count(f"job {n} says hello") == 1  # printed by one run (the entrypoint echo quotes it too)

    # work the gateway did not admit (a job an admin sent to Ray directly, like Serve replicas) holds 3 of the
    # 4 CPUs: a 2-CPU job waits, saying so, and runs once that work ends
    hold = tmp_path / "work" / "hold.py"
    hold.write_text("import time, ray\nray.init()\n@ray.remote(num_cpus=3)\nclass Hold:\n    def ping(self):\n"
                    "        return 1\nh = Hold.remote()\nray.get(h.ping.remote())\nprint('holding', flush=True)\n"
                    "time.sleep(300)\n")
    direct = [BIN / "ray", "job", "--address", gw.dashboard]
    run_cli([*direct[:2], "submit", *direct[2:], "--no-wait", "--submission-id", "outside", "--working-dir",
             str(hold.parent), "--", "python", "hold.py"], gw.env)
    deadline = time.monotonic() + 120
    while "holding" not in run_cli([*direct[:2], "logs", *direct[2:], "outside"], gw.env):
        assert time.monotonic() < deadline, "the direct job never held its CPUs"
        time.sleep(0.5)
    time.sleep(2.5)  # the gateway's capacity is at most two checks old (--enforce-interval 1)
    dev_d = gw.key("dina", "developer", "d")
    gw.ray(dev_d, "submit", "--no-wait", "--submission-id", "d-after", "--entrypoint-num-cpus", "2", "--",
           *sleeper(4, 1))
    deadline = time.monotonic() + 60
    while not (info := gw.job(dev_d, "d-after").json())["message"]:
        assert time.monotonic() < deadline, info
        time.sleep(0.3)
    assert info["status"] == "PENDING" and info["message"].startswith(
        "cluster: 3 of 4 CPUs in use (3 by work outside the gateway: Serve replicas, detached actors, jobs sent to "
        "Ray directly), this job needs 2"), info
    run_cli([*direct[:2], "stop", *direct[2:], "outside"], gw.env)
    assert gw.wait(dev_d, "d-after", ("SUCCEEDED", "FAILED", "STOPPED"), timeout=120)["status"] == "SUCCEEDED"

    # admins see every team's queue and usage
    out = gw.aidc("queue", "--all")
    assert "a-3" in out and "b-3" in out and "SUCCEEDED" in out
    usage = gw.aidc("usage", "--team", "a")
    assert "TOTAL (3 jobs)" in usage


def test_a_preempted_training_job_resumes_from_its_checkpoint_and_ends_as_if_never_stopped(gateway):
    gw = gateway
    dev_c, dev_d = gw.key("carol", "developer", "c"), gw.key("dan", "developer", "d")
    # `ray job submit` waiting for the end: the working dir goes through the gateway, logs are tailed through it
    out = gw.ray(dev_c, "submit", "--working-dir", ".", "--", "python", "-m", "jobs.preprocess", "--config",
                 "jobs/configs/digits.yaml").stdout
    assert "rows read 1797 = kept 1797 + rejected 0" in out and "succeeded" in out, out[-2000:]
    train = ["python", "-m", "jobs.train", "--config", "jobs/configs/digits.yaml", "--set", "train.epochs=4"]
    gw.ray(dev_c, "submit", "--no-wait", "--submission-id", "c-train", "--working-dir", ".", "--", *train)
    gw.ray(dev_d, "submit", "--no-wait", "--submission-id", "d-train", "--working-dir", ".", "--", *train,
           "--set", "run.name=d-baseline")  # the uninterrupted run, beside it (demand: 2 x 0.5 CPU + a data task)
    checkpoints = Path(gw.env["AIDC_STORAGE"]) / "runs" / "c-train"  # the gateway named the run after the job
    deadline = time.monotonic() + 240
    while not list(checkpoints.glob("checkpoint_*")):
        assert time.monotonic() < deadline, gw.ray(dev_c, "logs", "c-train").stdout[-3000:]
        assert gw.job(dev_c, "c-train").json()["status"] in ("PENDING", "RUNNING")
        time.sleep(0.5)
    _gpu_energy_joins_the_dashboards_nodes_to_the_state_apis_actors(gw, "c-train")
    # a priority-5 job of the same team, over the team's 2 CPUs: the priority-0 training job makes room
    gw.ray(dev_c, "submit", "--no-wait", "--submission-id", "c-urgent", "--metadata-json", json.dumps({"priority": "5"}),
           "--entrypoint-num-cpus", "2", "--", *sleeper(9, 3))
    assert gw.wait(dev_c, "c-urgent", ("SUCCEEDED", "FAILED", "STOPPED"), timeout=240)["status"] == "SUCCEEDED"
    done = gw.wait(dev_c, "c-train", ("SUCCEEDED", "FAILED", "STOPPED"), timeout=300)
    base = gw.wait(dev_d, "d-train", ("SUCCEEDED", "FAILED", "STOPPED"), timeout=300)
    assert done["status"] == base["status"] == "SUCCEEDED", (done, base)
    assert done["metadata"]["aidc_attempt"] == "1"  # stopped once, run again
    logs = gw.ray(dev_c, "logs", "c-train").stdout
    assert "--- aidc: attempt 2 (c-train-a1) ---" in logs
    scores = [line.split(": ", 1)[1] for line in logs.splitlines() if line.startswith("run c-train: ")]
    baseline = [line.split(": ", 1)[1] for line in gw.ray(dev_d, "logs", "d-train").stdout.splitlines()
                if line.startswith("run d-baseline: ")]
    assert len(scores) == 1 and scores == baseline, (scores, baseline)  # the same metrics as never stopped
    assert "1" in [line.split()[-1] for line in gw.aidc("usage", "--team", "c").splitlines() if "c-train" in line]
    audit = gw.aidc("audit", "tail", "-n", "200", "--filter", "job.")
    assert "job.preempt" in audit and "job.requeue" in audit


def _gpu_energy_joins_the_dashboards_nodes_to_the_state_apis_actors(gw, job_id: str):
    """The gateway's GPU energy (aidc.tenancy.energy) matches the dashboard's node summary, where NVML readings
    are, to a job's actors from the state API by (node id, pid): both from this real Ray, a running job's
    actors. No GPU here, so one reading is added to the actor's real node."""
    from aidc.tenancy.energy import gpu_watts_by_job

    auth = {"Authorization": f"Bearer {Path(gw.env['RAY_AUTH_TOKEN_PATH']).read_text().strip()}"}
    ray_job = requests.get(f"{gw.dashboard}/api/jobs/{job_id}", headers=auth, timeout=30).json()["job_id"]
    actors = requests.get(f"{gw.dashboard}/api/v0/actors?limit=1000&detail=true&filter_keys=job_id&"
                          f"filter_predicates=%3D&filter_values={ray_job}", headers=auth, timeout=30).json()
    alive = [a for a in actors["data"]["result"]["result"] if a["state"] == "ALIVE" and a.get("pid")]
    assert alive, actors
    summary = requests.get(f"{gw.dashboard}/nodes?view=summary", headers=auth, timeout=30).json()["data"]["summary"]
    node = next(n for n in summary if n["raylet"]["nodeId"] == alive[0]["node_id"])
    assert node["gpus"] == []  # the reporter's GPU list, empty on this machine
    node["gpus"] = [{"index": 0, "powerMw": 120_000, "processesPids": [{"pid": alive[0]["pid"]}]}]
    procs = {(a["node_id"], int(a["pid"])) for a in alive}
    assert gpu_watts_by_job(summary, {job_id: procs, "other": {("elsewhere", 1)}}) == {job_id: 120.0}


def test_a_head_restart_loses_no_job_the_running_one_runs_again_and_the_queued_one_once(gateway, tmp_path):
    """The head stopped and started again (a new cluster: Ray's job table is gone): the gateway, from its own
    records, submits the running job again (its working dir uploaded again) and then the queued one; each
    marker file counts the runs."""
    gw = gateway
    gw.aidc("teams", "set", "e", "--cpus", "1")
    dev_e = gw.key("erin", "developer", "e")
    work = tmp_path / "work"
    work.mkdir()
    (work / "once.py").write_text(  # e-1's first run holds on (until the head goes); any other run ends at once
        "import os, sys, time\nmarker = sys.argv[2]\nagain = os.path.exists(marker)\nopen(marker, 'a').write('x')\n"
        "print(('again ' if again else 'first ') + sys.argv[1], flush=True)\n"
        "time.sleep(0 if again else float(sys.argv[3]))\n")
    runs = {n: tmp_path / f"e-{n}.runs" for n in (1, 2)}
    for n, hold in ((1, 300), (2, 0)):
        gw.ray(dev_e, "submit", "--no-wait", "--submission-id", f"e-{n}", "--working-dir", str(work),
               "--entrypoint-num-cpus", "1", "--", "python", "once.py", f"e-{n}", str(runs[n]), str(hold))
    deadline = time.monotonic() + 120
    while not runs[1].exists():
        assert time.monotonic() < deadline, gw.job(dev_e, "e-1").json()
        time.sleep(0.3)
    assert gw.job(dev_e, "e-2").json()["status"] == "PENDING"
    gw.restart_head()
    for n in (1, 2):
        assert gw.wait(dev_e, f"e-{n}", ("SUCCEEDED", "FAILED", "STOPPED"), timeout=240)["status"] == "SUCCEEDED"
    assert runs[1].read_text() == "xx" and runs[2].read_text() == "x"  # e-1 again after the restart, e-2 once
    assert "again e-1" in gw.ray(dev_e, "logs", "e-1").stdout


def test_on_an_autoscaling_cluster_a_gpu_job_waits_for_the_node_the_gateway_asks_for_which_goes_when_it_ends(
        tmp_path):
    """Ray's own autoscaler (v2) on its fake multi-node provider: the head alone is up (2 CPUs, no GPU) and one T4
    node may be added. A T4 job through the gateway is queued (not refused, not left waiting forever), the gateway
    asks the autoscaler for it, the node comes, the job runs on it, and once it ended the request is released and
    the idle node goes."""
    t4 = {"resources": {"CPU": 1, "GPU": 1, "accelerator_type:T4": 1}, "max_workers": 1}
    # a node type the provider cannot launch (as a cloud out of capacity): Ray refuses its tiny object store
    v100 = {"resources": {"CPU": 1, "GPU": 1, "accelerator_type:V100": 1, "object_store_memory": 1000},
            "max_workers": 1}
    with ray_head(tmp_path, num_cpus=2, prefix="aidc-as-",
                  autoscale={"workers": {"t4": t4, "v100": v100}, "idle_timeout_minutes": 0.1}) as head:
        gw = Gateway(head[0], head[1], tmp_path, ("--autoscaling-config", str(head.config),
                                                  "--gcs-address", head.gcs_address))
        gw.aidc("teams", "set", "v", "--cpus", "2", "--gpus", "T4=2", "--gpus", "V100=1")  # the cluster: the limit
        gw.env.pop("RAY_AUTH_MODE")  # as an admin's shell on the head: the gateway turns token mode on for Ray's client
        gw.start()
        try:
            dev = gw.key("dev-v", "developer", "v")

            def nodes() -> list[dict]:  # dead ones too
                body = requests.get(f"{head[1]}/api/v0/nodes?detail=true", timeout=30, headers={
                    "Authorization": f"Bearer {Path(head[0]['RAY_AUTH_TOKEN_PATH']).read_text().strip()}"}).json()
                return body["data"]["result"]["result"]

            def alive() -> list[dict]:
                return [n for n in nodes() if n["state"] == "ALIVE"]

            assert [n["resources_total"].get("GPU", 0) for n in alive()] == [0]
            # more T4s than the cluster has at full scale: refused at once, naming the limit
            big = gw.ray(dev, "submit", "--no-wait", "--metadata-json", '{"cpus": "1", "gpus": "2", "gpu_type": "T4"}',
                         "--", "true", check=False)
            assert big.returncode != 0
            assert "cluster at full scale (its autoscaling config) has 1 T4 GPUs" in big.stdout + big.stderr
            task = ("import ray; ray.init(); f = ray.remote(num_gpus=1, accelerator_type='T4')("
                    "lambda: ray.get_runtime_context().get_node_id()); print('ran on', ray.get(f.remote()))")
            gw.ray(dev, "submit", "--no-wait", "--submission-id", "t4-job", "--metadata-json",
                   '{"cpus": "1", "gpus": "1", "gpu_type": "T4"}', "--", "python", "-c", task)
            asked = gw.wait(dev, "t4-job", ("PENDING", "RUNNING", "SUCCEEDED"), timeout=60)
            seen = [asked.get("message") or ""]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                info = gw.job(dev, "t4-job").json()
                seen.append(info.get("message") or "")
                if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                    break
                time.sleep(0.5)
            assert info["status"] == "SUCCEEDED", (info, (tmp_path / "gateway.log").read_text()[-3000:])
            assert any("more nodes asked of the autoscaler" in m for m in seen), seen
            # the T4 node(s), dead ones too: one the autoscaler launched may go idle (6 s here) before the job's
            # task is placed, and a second be launched for it (a fresh-clone run ran it on the second)
            gpu_node = [n["node_id"] for n in nodes() if n["resources_total"].get("GPU")]
            logs = gw.ray(dev, "logs", "t4-job").stdout
            assert gpu_node and any(f"ran on {n}" in logs for n in gpu_node), (logs, gpu_node)
            log = (tmp_path / "gateway.log").read_text()
            assert "asked Ray's autoscaler for 1 bundle (t4-job)" in log  # nothing else runs
            # ended: the gateway releases its request and the autoscaler ends the idle node (idle timeout 6 s)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and len(alive()) > 1:
                time.sleep(1)
            assert len(alive()) == 1, alive()
            log = (tmp_path / "gateway.log").read_text()  # released once no job waits (and at start: a clean slate)
            assert log.index("for 1 bundle (t4-job)") < log.rindex("for 0 bundles (released: no job waits for nodes)")
            # a node that cannot be launched: the job waits and its message says why (the autoscaler retries)
            gw.ray(dev, "submit", "--no-wait", "--submission-id", "v100-job", "--metadata-json",
                   '{"cpus": "1", "gpus": "1", "gpu_type": "V100"}', "--", "true")
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                info = gw.job(dev, "v100-job").json()
                if "launching v100 failed" in (info.get("message") or ""):
                    break
                time.sleep(1)
            assert info["status"] == "PENDING" and "launching v100 failed" in info["message"], info
            assert "the autoscaler retries" in info["message"]
            assert 'aidc_tenancy_waiting_for_nodes{team="v"} 1.0' in requests.get(f"{gw.url}/metrics", timeout=30).text
            gw.ray(dev, "stop", "v100-job")
            assert gw.wait(dev, "v100-job", ("STOPPED",), timeout=30)
        finally:
            gw.stop()
