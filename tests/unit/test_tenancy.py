"""Tenancy without a cluster: the admission round (quotas, borrowing, priorities, preemption, reasons), job
demands from entrypoints and configs, usage accounting, the durable files and the key roles."""

from __future__ import annotations

import io
import zipfile

import pytest

from aidc.errors import ConfigError
from aidc.security import keys
from aidc.tenancy import admission
from aidc.tenancy.admission import Capacity, plan
from aidc.tenancy.demand import data_allowance, job_demand, parse_entrypoint, with_run_name
from aidc.tenancy.model import (Demand, JobRecord, Jobs, Quota, Team, load_jobs, load_teams, parse_teams_file,
                                save_jobs, update_teams)
from aidc.tenancy.usage import usage

REPO_CONFIG = "jobs/configs/digits.yaml"


def job(id, team, cpus=1.0, gpus=0.0, prio=0, state="QUEUED", at=0.0, borrowed=False, started=None, gpu_type=None):
    return JobRecord(id=id, team=team, owner="k", priority=prio, demand=Demand(cpus=cpus, gpus=gpus, gpu_type=gpu_type),
                     request={"entrypoint": "true"}, state=state, submitted_at=at, borrowed=borrowed,
                     started_at=started)


def teams(**kw):
    return {name: Team(name=name, **body) for name, body in kw.items()}


def test_quota_admits_two_and_queues_the_third_with_the_reason():
    t = teams(a=dict(quota=Quota(cpus=2)), b=dict(quota=Quota(cpus=2)))
    jobs = [job("a1", "a", at=1), job("a2", "a", at=2), job("a3", "a", at=3), job("a4", "a", at=4)]
    p = plan(jobs, t, Capacity(cpus=4))
    assert p.admit == [("a1", False), ("a2", False)]
    assert p.waiting["a3"] == "team a: 2 of 2 CPUs in use, this job needs 1"
    assert p.waiting["a4"] == "team a: 2 of 2 CPUs in use, this job needs 1; 1 job ahead"
    # a1 finished: a3 runs next, a4 still waits
    jobs[0].state, jobs[1].state = "SUCCEEDED", "RUNNING"
    p = plan(jobs, t, Capacity(cpus=4))
    assert p.admit == [("a3", False)] and "a4" in p.waiting


def test_gpu_quota_per_accelerator_type_and_the_any_type_limit():
    t = teams(vision=dict(quota=Quota(gpus={"A100": 4})))
    cap = Capacity(cpus=64, gpus={"A100": 8, "H100": 8})
    running = [job("r", "vision", gpus=4, gpu_type="A100", state="RUNNING")]
    p = plan(running + [job("q", "vision", gpus=2, gpu_type="A100", at=1)], t, cap)
    assert p.waiting["q"] == "team vision: 4 of 4 A100 GPUs in use, this job needs 2"
    p = plan(running + [job("h", "vision", gpus=1, gpu_type="H100", at=1)], t, cap)
    assert "no quota for H100 GPUs" in p.waiting["h"]
    t = teams(vision=dict(quota=Quota(gpus={"*": 5})))
    p = plan(running + [job("h", "vision", gpus=2, gpu_type="H100", at=1)], t, cap)
    assert p.waiting["h"].startswith("team vision: 4 of 5 GPUs in use")
    p = plan(running + [job("h", "vision", gpus=1, gpu_type="H100", at=1)], t, cap)
    assert p.admit == [("h", False)]


def test_borrowing_runs_over_quota_on_idle_capacity_and_is_preempted_first():
    t = teams(a=dict(quota=Quota(cpus=2), borrow=True), b=dict(quota=Quota(cpus=2)))
    p = plan([job("a1", "a", cpus=2, state="RUNNING"), job("a2", "a", cpus=2, at=1)], t, Capacity(cpus=4))
    assert p.admit == [("a2", True)]
    # team b wants its share back: the borrowed job is preempted, b's job keeps the room while it stops
    jobs = [job("a1", "a", cpus=2, state="RUNNING", started=1), job("a2", "a", cpus=2, state="RUNNING",
                                                                    borrowed=True, started=2),
            job("b1", "b", cpus=2, at=3)]
    p = plan(jobs, t, Capacity(cpus=4))
    assert p.preempt == [("a2", "preempted for b1 (team b, priority 0)")] and not p.admit
    jobs[1].preempting = p.preempt[0][1]
    jobs.append(job("a3", "a", cpus=1, at=4))  # a later job cannot take the room being made for b1
    p = plan(jobs, t, Capacity(cpus=4))
    assert not p.preempt and not p.admit and p.waiting["b1"] == "waiting for preempted jobs to stop"


def test_priority_preempts_lowest_priority_newest_first_and_only_if_that_makes_room():
    t = teams(a=dict(quota=Quota(cpus=4)), b=dict(quota=Quota(cpus=4)))
    jobs = [job("low-old", "a", cpus=1, prio=1, state="RUNNING", started=1),
            job("low-new", "a", cpus=1, prio=1, state="RUNNING", started=2),
            job("mid", "a", cpus=2, prio=5, state="RUNNING", started=0),
            job("urgent", "b", cpus=1, prio=9, at=5)]
    p = plan(jobs, t, Capacity(cpus=4))
    assert p.preempt == [("low-new", "preempted for urgent (team b, priority 9)")]
    # equal priority never preempts: it waits
    jobs[-1].priority = 1
    p = plan(jobs, t, Capacity(cpus=4))
    assert not p.preempt and p.waiting["urgent"].startswith("cluster: 4 of 4 CPUs in use")
    # a job bigger than all lower-priority work together preempts nothing
    big = [j for j in jobs[:3]] + [job("huge", "b", cpus=4, prio=3, at=5)]
    assert not plan(big, t, Capacity(cpus=4)).preempt


def test_over_its_own_quota_a_job_preempts_only_its_own_teams_lower_priority_jobs():
    t = teams(a=dict(quota=Quota(cpus=2)), b=dict(quota=Quota(cpus=2)))
    jobs = [job("a-low", "a", cpus=2, prio=0, state="RUNNING", started=1),
            job("b-low", "b", cpus=1, prio=0, state="RUNNING", started=2),
            job("a-high", "a", cpus=2, prio=5, at=3)]
    p = plan(jobs, t, Capacity(cpus=8))
    assert [v for v, _ in p.preempt] == ["a-low"]


def test_never_fits_names_the_limit():
    team = Team(name="a", quota=Quota(cpus=2, gpus={"A100": 1}))
    assert admission.never_fits(team, Demand(cpus=4), Capacity(cpus=8)) == \
        "team a: quota 2 CPUs, this job needs 4"
    assert "has 8 CPUs" in admission.never_fits(team.model_copy(update={"borrow": True}), Demand(cpus=9),
                                                Capacity(cpus=8))
    assert admission.never_fits(team, Demand(cpus=1), Capacity(cpus=8)) is None


def _package(files: dict[str, str]):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return buf.getvalue()


def test_demand_from_flags_from_the_aidc_config_in_the_package_and_the_default(tmp_path, repo):
    req = {"entrypoint": "python x.py", "entrypoint_num_cpus": 2, "entrypoint_num_gpus": 1,
           "entrypoint_resources": {"accelerator_type:A100": 0.001}, "entrypoint_memory": 4 << 30}
    assert job_demand(req, None) == Demand(cpus=2, gpus=1, gpu_type="A100", memory_gb=4)
    assert job_demand({"entrypoint": "python x.py"}, None) == Demand(cpus=1)
    pkg = tmp_path / "_ray_pkg_0123456789abcdef.zip"
    pkg.write_bytes(_package({REPO_CONFIG: (repo / REPO_CONFIG).read_text()}))
    ep = f"python -m jobs.train --config {REPO_CONFIG} --set resources.num_workers=3 --set resources.cpus_per_worker=1"
    assert job_demand({"entrypoint": ep}, pkg) == Demand(cpus=4, data_cpus=1)  # 3 workers x 1 CPU + one data task
    assert job_demand({"entrypoint": ep}, pkg, cluster_gpus=4) == Demand(cpus=4, gpus=3, data_cpus=1)  # use_gpu: auto
    # what its Ray Data pipelines may hold (AIDC_DATA_CPUS): the data share; other jobs: what the driver leaves
    assert data_allowance(job_demand({"entrypoint": ep}, pkg), {"entrypoint": ep}) == 1
    assert data_allowance(Demand(cpus=4), {"entrypoint_num_cpus": 1}) == 3
    batch = f"python -m jobs.batch_infer --config {REPO_CONFIG} --set batch_infer.actors=3"
    assert job_demand({"entrypoint": batch}, pkg) == Demand(cpus=3 * 0.5 + 1, data_cpus=2.5)  # pool + reads/writes
    assert job_demand({"entrypoint": batch}, pkg, cluster_gpus=4).gpus == 3
    assert job_demand({"entrypoint": batch}, pkg, cluster_gpus=1).gpus == pytest.approx(1)  # 3 actors share it
    assert data_allowance(Demand(cpus=1), {"entrypoint_num_cpus": 1}) is None
    with pytest.raises(ConfigError, match="inside the working dir"):
        job_demand({"entrypoint": "python -m jobs.train --config ../../etc/passwd"}, pkg)
    with pytest.raises(ConfigError, match="tune.max_concurrent_trials"):
        job_demand({"entrypoint": f"python -m jobs.tune --config {REPO_CONFIG}"}, pkg)
    assert job_demand({"entrypoint": f"python -m jobs.tune --config {REPO_CONFIG} --set tune.max_concurrent_trials=2"},
                      pkg) == Demand(cpus=(0.2 + 2 * 0.5) * 2 + 1, data_cpus=1)  # as aidc.tune sizes a trial
    whole = {"entrypoint": "python x.py", "entrypoint_num_gpus": 1, "metadata": {"cpus": "8", "gpus": "2"}}
    assert job_demand(whole, None) == Demand(cpus=8, gpus=2)  # the driver's GPU is part of the job's two
    with pytest.raises(ConfigError, match="more than the job's whole declared demand"):
        job_demand({**whole, "entrypoint_num_gpus": 3}, None)
    with pytest.raises(ConfigError, match="must be numbers"):
        job_demand({"entrypoint": "x", "entrypoint_num_cpus": "lots"}, None)
    with pytest.raises(ConfigError, match="not in the uploaded working dir"):
        job_demand({"entrypoint": "python -m jobs.train --config nope.yaml"}, pkg)
    with pytest.raises(ConfigError, match="resources.num_workers"):
        job_demand({"entrypoint": f"python -m jobs.train --config {REPO_CONFIG} --set resources.num_workers=-1"}, pkg)
    with pytest.raises(ConfigError, match="without the working dir"):
        job_demand({"entrypoint": f"python -m jobs.train --config {REPO_CONFIG}"}, None)
    bad = tmp_path / "_ray_pkg_ffffffffffffffff.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a readable zip"):
        job_demand({"entrypoint": f"python -m jobs.train --config {REPO_CONFIG}"}, bad)


def test_entrypoint_parsing_and_the_run_name_that_makes_a_preempted_job_resume():
    assert parse_entrypoint("python -m jobs.train --config c.yaml --set a=1 --set=b=2") == \
        ("jobs.train", "c.yaml", ["a=1", "b=2"])
    assert parse_entrypoint("python train.py") == (None, None, [])
    ep = "python -m jobs.train --config c.yaml"
    assert with_run_name(ep, "a-1") == ep + " --set run.name=a-1"
    assert with_run_name(ep + " --set run.name=mine", "a-1") == ep + " --set run.name=mine"
    assert with_run_name("python -m jobs.preprocess --config c.yaml", "x") == "python -m jobs.preprocess --config c.yaml"
    assert with_run_name(ep + " && echo done", "x") == ep + " && echo done"
    with pytest.raises(ConfigError, match="not a valid shell command"):
        parse_entrypoint("python -m 'jobs.train")


def test_usage_counts_every_attempt_and_the_running_one_up_to_now():
    j = job("a1", "a", cpus=2, gpus=1, state="RUNNING", started=7200.0)
    j.runs.append({"ray_id": "a1", "start": 0.0, "end": 3600.0, "status": "STOPPED", "why": "preempted for b1"})
    rows = usage([j, job("q", "a")], now=9000.0)
    assert [(r.job, round(r.cpu_h, 3), round(r.gpu_h, 3), r.preemptions) for r in rows] == \
        [("a1", 2.0 + 2 * 0.5, 1.5, 1), (None, 3.0, 1.5, 1)]
    assert round(usage([j], since=3000.0, now=9000.0)[0].cpu_h, 3) == round(2 * (600 + 1800) / 3600, 3)


def test_gpu_energy_is_each_gpus_power_split_among_the_jobs_on_it_and_counted_per_hour():
    from aidc.tenancy.energy import add_energy, energy_since, gpu_watts_by_job
    from aidc.tenancy.gateway import held_by

    def gpu(index, mw, *pids):
        return {"index": index, "uuid": f"GPU-{index}", "powerMw": mw, "processesPids": [{"pid": p} for p in pids]}

    nodes = [  # the dashboard's /nodes?view=summary shape (Ray 2.60 reporter: google-style keys)
        {"raylet": {"nodeId": "n1"}, "gpus": [gpu(0, 300_000, 11, 12), gpu(1, 200_000, 13), gpu(2, 100_000, 99),
                                              gpu(3, None, 14), gpu(4, 80_000, 13, 77)]},
        {"raylet": {"nodeId": "n2"}, "gpus": [gpu(0, 250_000, 11)]},  # pid 11 of another node: someone else
        {"raylet": {"nodeId": "n3"}},  # no GPUs
    ]
    watts = gpu_watts_by_job(nodes, {"x": {("n1", 11), ("n1", 13), ("n1", 14)}, "y": {("n1", 12)}, "z": set()})
    # a shared GPU split evenly among its processes' owners; another process's share (77: a Serve replica, say)
    # and a GPU only others use (99) are nobody's here; a GPU without a power reading is skipped
    assert watts == {"x": 150.0 + 200.0 + 40.0, "y": 150.0}
    ledger: dict[str, float] = {}
    add_energy(ledger, 360.0, 3000.0, 4200.0)  # 360 W for 20 minutes, across an hour boundary
    assert ledger == pytest.approx({"0": 0.06, "3600": 0.06})  # kWh: 360 W x 600 s each side
    assert energy_since(ledger, 0) == pytest.approx(0.12) and energy_since(ledger, 3600) == pytest.approx(0.06)
    assert energy_since(ledger, 1800) == pytest.approx(0.03 + 0.06)  # half of the first hour's bucket
    j = job("e1", "a", gpus=1, state="RUNNING", started=3000.0)
    j.gpu_kwh = ledger
    row = usage([j], now=4200.0)[0]
    assert row.job == "e1" and row.gpu_kwh == pytest.approx(0.12)
    # what a job holds: its actors' plain resources, a share of a group not listed counted once per actor (Ray
    # names it twice), and its live placement groups' bundles, which hold resources with or without actors in them
    share = {"CPU_group_abc123": 0.5, "CPU_group_0_abc123": 0.5, "GPU_group_abc123": 1}
    assert held_by([{"required_resources": {"CPU": 1.0}}, {"required_resources": share}]) == {
        "CPU": 1.5, "GPU": 1.0, "memory": 0.0}
    pgs = [{"placement_group_id": "abc123", "state": "CREATED", "bundles": [
               {"node_id": "n1", "unit_resources": {"CPU": 2.0}}, {"node_id": "n1", "unit_resources": {"GPU": 1.0}}]},
           {"placement_group_id": "dead01", "state": "REMOVED", "bundles": [{"unit_resources": {"CPU": 8.0}}]}]
    assert held_by([{"required_resources": {"CPU": 1.0}}, {"placement_group_id": "abc123", "required_resources": share},
                    {"state": "DEAD", "required_resources": {"CPU": 4.0}}], pgs) == {
        "CPU": 3.0, "GPU": 1.0, "memory": 0.0}
    # running plain tasks count as actors do: their own resources, or nothing beyond a listed group's bundle
    tasks = [{"state": "RUNNING", "required_resources": {"CPU": 0.5}},
             {"state": "RUNNING", "placement_group_id": "abc123", "required_resources": share}]
    assert held_by(tasks, pgs) == {"CPU": 2.5, "GPU": 1.0, "memory": 0.0}  # 0.5 + the 2-CPU bundle


def test_work_outside_the_gateway_is_not_free_capacity_but_never_makes_a_job_impossible():
    from aidc.tenancy.gateway import outside_use

    ray_jobs = [{"submission_id": "a-1", "job_id": "01000000", "status": "RUNNING", "metadata": {"aidc_job": "a-1"}},
                {"submission_id": "direct", "job_id": "02000000", "status": "RUNNING", "metadata": {}},
                {"submission_id": "a-0", "job_id": "03000000", "status": "SUCCEEDED", "metadata": {"aidc_job": "a-0"}}]
    actors = [  # the state API's detail shape
        {"state": "ALIVE", "job_id": "01000000", "name": "", "node_id": "n1", "required_resources": {"CPU": 2.0}},
        {"state": "ALIVE", "job_id": "99000000", "name": "_ray_internal_job_actor_a-1", "node_id": "n1",
         "required_resources": {"CPU": 1.0}},  # a-1's supervisor: its entrypoint CPU is in a-1's demand
        {"state": "ALIVE", "job_id": "02000000", "name": "", "node_id": "n2",
         "required_resources": {"CPU_group_ff01": 1.0, "CPU_group_0_ff01": 1.0, "GPU_group_ff01": 1.0,
                                "memory": 2.0 * (1 << 30)}},  # a Serve replica in a placement group, on an A100
        {"state": "DEAD", "job_id": "02000000", "name": "", "node_id": "n1", "required_resources": {"CPU": 8.0}},
        {"state": "ALIVE", "job_id": "03000000", "name": "cache", "node_id": "n1", "is_detached": True,
         "required_resources": {"CPU": 1.0}},  # a detached actor a finished gateway job left behind
        {"state": "ALIVE", "job_id": "03000000", "name": "", "node_id": "n1", "is_detached": False,
         "required_resources": {"CPU": 4.0}},  # ... and one Ray is ending with its job: soon free, not counted
    ]
    pgs = [{"placement_group_id": "aa01", "creator_job_id": "01000000", "state": "CREATED",  # a-1's: in its demand
            "bundles": [{"node_id": "n1", "unit_resources": {"CPU": 4.0}}]},
           {"placement_group_id": "bb02", "creator_job_id": "02000000", "state": "CREATED",  # reserved, no actor yet
            "bundles": [{"node_id": "n1", "unit_resources": {"CPU": 1.0}}]},
           {"placement_group_id": "cc03", "creator_job_id": "03000000", "state": "CREATED",  # removed with its job
            "is_detached": False, "bundles": [{"node_id": "n1", "unit_resources": {"CPU": 2.0}}]}]
    out = outside_use(actors, [], {"n2": "A100"}, ray_jobs)
    assert (out.cpus, out.gpus, out.memory_gb) == (2.0, {"A100": 1.0}, 2.0)
    assert outside_use(actors, pgs, {"n2": "A100"}, ray_jobs).cpus == 3.0
    gateways_view = {"submission_id": "a-1", "job_id": "01000000", "status": "RUNNING", "metadata": {"aidc_job": "a-1"}}
    assert outside_use(actors, [], {}, [*ray_jobs[1:], gateways_view]).cpus == 2.0  # a-1 not yet in Ray's list
    cap = Capacity(cpus=4, gpus={"A100": 1.0}, outside=out)
    free = Team(name="t", quota=Quota())
    j = job("g1", "t", cpus=1, gpus=1, gpu_type="A100")
    p = plan([j], {"t": free}, cap)
    assert not p.admit and p.waiting["g1"] == (
        "cluster: 1 of 1 A100 GPUs in use (1 by work outside the gateway: Serve replicas, detached actors, jobs sent "
        "to Ray directly), this job needs 1")
    assert admission.never_fits(free, j.demand, cap) is None  # outside work may end: the job is not refused
    assert plan([j], {"t": free}, Capacity(cpus=4, gpus={"A100": 1.0})).admit == [("g1", False)]


def test_teams_and_jobs_files_round_trip_and_bad_files_say_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.setenv("AIDC_TENANCY_DIR", str(tmp_path / "t"))
    monkeypatch.setenv("AIDC_SECURITY_DIR", str(tmp_path / "sec"))
    update_teams(lambda t: t.teams.__setitem__("a", Team(name="a", quota=Quota(cpus=2))) or {"team": "a"})
    assert load_teams().teams["a"].quota.cpus == 2 and load_teams().version == 1
    save_jobs(Jobs(jobs={"a1": job("a1", "a")}))
    assert load_jobs().jobs["a1"].demand.cpus == 1
    (tmp_path / "t" / "jobs.json").write_text("{broken")
    with pytest.raises(ConfigError, match="not a valid aidc tenancy file"):
        load_jobs()
    with pytest.raises(ConfigError, match=r"teams\.vision\.quota\.cpus"):
        parse_teams_file("teams:\n  vision: {quota: {cpus: -1}}\n", "teams.yaml")
    with pytest.raises(ConfigError, match="bad team name"):
        parse_teams_file("teams:\n  Vision!: {}\n", "teams.yaml")
    with pytest.raises(ConfigError, match="expected a mapping 'teams:'"):
        parse_teams_file("- a\n", "teams.yaml")


def test_key_roles(tmp_path):
    home = str(tmp_path)
    _, viewer = keys.create("v", ["viewer"], team="a", home=home)
    _, dev = keys.create("d", ["developer"], team="a", home=home)
    _, admin = keys.create("root", ["admin"], home=home)
    assert viewer.can("read") and not viewer.can("submit")
    assert dev.can("submit") and not dev.can("admin")
    assert admin.can("admin") and admin.can("submit")
    with pytest.raises(ConfigError, match="give the key a team"):
        keys.create("d", ["developer"], home=home)
    with pytest.raises(ConfigError, match="bad team name"):
        keys.create("d", ["developer"], team="Team A", home=home)


def test_a_teams_rate_limit_is_shared_by_all_its_inference_keys(tmp_path):
    from aidc.security.auth import AuthArgs, AuthError, Guard

    home = str(tmp_path)
    k1, _ = keys.create("svc1", ["infer:*"], team="vision", home=home)
    k2, _ = keys.create("svc2", ["infer:*"], team="vision", home=home)
    other, _ = keys.create("svc3", ["infer:*"], team="nlp", home=home)
    keys.set_team_limit("vision", 0.001, burst=2, home=home)
    guard = Guard("tensors", AuthArgs(refresh_s=0.01), home)
    guard.check(f"Bearer {k1}", "m")
    guard.check(f"Bearer {k2}", "m")
    with pytest.raises(AuthError, match="team vision is over its rate limit") as exc:
        guard.check(f"Bearer {k1}", "m")
    assert exc.value.status == 429
    for _ in range(3):
        guard.check(f"Bearer {other}", "m")  # another team's keys are not held back
    assert keys.load(home)[keys.key_id(k1)].team == "vision"  # the key records survive the limits' rewrite
    keys.set_team_limit("vision", None, home=home)
    import time

    time.sleep(0.02)
    guard.check(f"Bearer {k2}", "m")


def test_a_borrower_never_takes_the_room_a_job_within_its_quota_was_preempting_for():
    t = teams(a=dict(quota=Quota(cpus=2), borrow=True), b=dict(quota=Quota(cpus=2)))
    jobs = [job("a-1", "a", cpus=2, state="RUNNING", started=0),
            job("a-2", "a", cpus=2, state="RUNNING", borrowed=True, started=0.5, at=0.5),
            job("a-3", "a", cpus=2, at=1), job("b-1", "b", cpus=2, at=2)]
    p = plan(jobs, t, Capacity(cpus=4))
    assert p.preempt == [("a-2", "preempted for b-1 (team b, priority 0)")] and not p.admit
    assert p.waiting["a-3"] == "team a: 4 of 2 CPUs in use, this job needs 2; no idle capacity to borrow"
    jobs[1].state, jobs[1].borrowed = "QUEUED", False  # a-2 stopped and queued again, ahead of b-1 by time
    p = plan(jobs, t, Capacity(cpus=4))
    assert p.admit == [("b-1", False)] and not p.preempt  # not a-2 again, which b-1 would preempt again


def test_the_simulated_week_benchmark_runs_and_the_queue_serves_the_high_priority_teams_sooner():
    from benchmarks.tenancy import main

    r = main(["--quick", "--sim-only"])
    assert r["trace"]["jobs"] > 100
    fcfs, aidc = r["fcfs"], r["aidc"]
    for team in ("vision", "nlp"):
        assert aidc["wait"][team]["mean_min"] <= fcfs["wait"][team]["mean_min"], (team, fcfs, aidc)
    assert 0 < aidc["gpu_utilisation"] <= 1
    # grown for what waits and shrunk when idle: every job runs, on fewer GPU-hours than the fixed cluster's
    grown = r["aidc-autoscaled"]
    assert {t: w["n"] for t, w in grown["wait"].items()} == {t: w["n"] for t, w in aidc["wait"].items()}
    assert grown["gpu_hours_provisioned"] < aidc["gpu_hours_provisioned"]
    assert aidc["gpu_utilisation"] < grown["gpu_utilisation_of_provisioned"] <= 1


def test_a_preemptor_over_its_own_quota_waits_for_its_victims_and_takes_no_more():
    t = teams(a=dict(quota=Quota(cpus=2)))
    jobs = [job("l1", "a", cpus=1, state="RUNNING", started=1), job("l2", "a", cpus=1, state="RUNNING", started=2),
            job("h", "a", cpus=1, prio=5, at=3)]
    p = plan(jobs, t, Capacity(cpus=8))
    assert p.preempt == [("l2", "preempted for h (team a, priority 5)")]
    jobs[1].preempting = p.preempt[0][1]  # l2 is stopping: the next round must not stop l1 as well
    p = plan(jobs, t, Capacity(cpus=8))
    assert not p.preempt and p.waiting["h"] == "waiting for preempted jobs to stop"


def test_preemption_stops_only_the_jobs_that_free_what_is_missing():
    t = teams(a=dict(quota=Quota(gpus={"*": 4})), b=dict(quota=Quota(), priority=0))
    cap = Capacity(cpus=4, gpus={"": 4})
    jobs = [job("cpu-only", "b", cpus=3, state="RUNNING", started=5),  # newest, but frees no GPU
            job("gpu", "b", cpus=0, gpus=4, state="RUNNING", started=1),
            job("want", "a", cpus=1, gpus=2, prio=5, at=6)]
    p = plan(jobs, t, cap)
    assert [v for v, _ in p.preempt] == ["gpu"]


def test_a_job_admitted_as_borrowed_is_not_preempted_as_borrowed_once_its_team_is_back_within_quota():
    t = teams(a=dict(quota=Quota(cpus=2), borrow=True), b=dict(quota=Quota(cpus=2)))
    jobs = [job("a-2", "a", cpus=2, state="RUNNING", borrowed=True, started=2),  # a-1 has ended: within quota now
            job("x", "b", cpus=2, state="RUNNING", started=1), job("b-1", "b", cpus=2, at=3)]
    assert not plan(jobs, t, Capacity(cpus=4)).preempt


def test_admins_set_quotas_with_aidc_teams_or_aidc_quotas(tmp_path, monkeypatch, capsys):
    from aidc.cli.main import main

    monkeypatch.setenv("AIDC_TENANCY_DIR", str(tmp_path / "t"))
    monkeypatch.setenv("AIDC_SECURITY_DIR", str(tmp_path / "sec"))
    assert main(["quotas", "set", "vision", "--cpus", "8", "--gpus", "A100=4", "--jobs", "2", "--borrow"]) == 0
    assert main(["teams", "set", "vision", "--priority", "3"]) == 0  # changes only what it is given
    capsys.readouterr()
    assert main(["quotas", "list"]) == 0
    out = capsys.readouterr().out
    assert "vision" in out and "priority=3" in out and "cpus=8.0" in out and "'A100': 4.0" in out \
        and "jobs=2" in out and "borrow=yes" in out


def test_a_jobs_ray_data_pipelines_stay_within_what_the_gateway_admitted_for_them(monkeypatch):
    import copy

    import ray.data

    from aidc.runtime import DATA_CPUS_ENV, bound_data

    ctx = copy.deepcopy(ray.data.DataContext.get_current())
    monkeypatch.delenv(DATA_CPUS_ENV, raising=False)
    assert bound_data(ctx) is None and ctx.execution_options.resource_limits.cpu == float("inf")  # Ray's default
    monkeypatch.setenv(DATA_CPUS_ENV, "1.5")
    assert bound_data(ctx) == 1.5 and ctx.execution_options.resource_limits.cpu == 1.5
    monkeypatch.setenv(DATA_CPUS_ENV, "4")  # a bound only lowers what the job set itself
    assert bound_data(ctx) == 4 and ctx.execution_options.resource_limits.cpu == 1.5
    from aidc.runtime import floor_cpus

    assert floor_cpus(1 / 6) * 6 <= 1 and floor_cpus(1 / 6) == 0.1666 and floor_cpus(0.5) == 0.5  # shares never sum over
    monkeypatch.setenv(DATA_CPUS_ENV, "lots")
    with pytest.raises(ValueError, match="not a number of CPUs"):
        bound_data(ctx)
    # inside a submitted job the gateway's variable is in the job's runtime env already: the driver does not
    # pass it again (Ray refuses to merge a driver's env_vars that repeat a key of the job's)
    from aidc.runtime import _data_env

    monkeypatch.setenv(DATA_CPUS_ENV, "1")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"env_vars": {"%s": "1"}}}' % DATA_CPUS_ENV)
    runtime_env: dict = {}
    _data_env(runtime_env)
    assert DATA_CPUS_ENV not in runtime_env.get("env_vars", {})
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")  # a driver started by hand forwards it to its workers
    _data_env(runtime_env)
    assert runtime_env["env_vars"][DATA_CPUS_ENV] == "1"


def test_an_autoscaling_cluster_grows_for_a_waiting_job_instead_of_preempting_and_within_its_full_scale():
    t = teams(a=dict(quota=Quota(cpus=20)), b=dict(quota=Quota(cpus=20)))
    full = Capacity(cpus=10, gpus={"T4": 2})
    cap = Capacity(cpus=2, full=full)  # the head alone is up; the autoscaler may add T4 nodes
    low = job("low", "b", cpus=2, prio=0, state="RUNNING", started=1)
    jobs = [low, job("g1", "a", cpus=1, gpus=1, gpu_type="T4", prio=5, at=1),
            job("g2", "a", cpus=1, gpus=2, gpu_type="T4", prio=5, at=2), job("c1", "a", cpus=1, at=3)]
    p = plan(jobs, t, cap)
    # g1 fits the grown cluster: nodes are asked for, and the lower-priority job keeps running
    assert p.grow == ["g1", "c1"] and not p.preempt
    assert p.waiting["g1"] == "cluster: 2 of 2 CPUs in use, this job needs 1; more nodes asked of the autoscaler"
    # g2 with g1 would need 3 T4s, more than the full cluster: it waits (it cannot preempt its way in either)
    assert "g2" not in p.grow and p.waiting["g2"].startswith("cluster: 2 of 2 CPUs in use, this job needs 1; 1 job")
    # without a full scale (a cluster that does not grow) the high-priority job preempts as before
    p = plan(jobs[:2] + [job("c2", "a", cpus=2, prio=5, at=3)], t, Capacity(cpus=2, gpus={"T4": 2}))
    assert p.grow == [] and [v for v, _ in p.preempt] == ["low"]
    # nodes up: admitted in order
    p = plan(jobs, t, Capacity(cpus=10, gpus={"T4": 2}, full=full))
    assert ("g1", False) in p.admit and p.grow == []
    # what even the full cluster cannot hold is refused at submission, naming it
    assert admission.never_fits(t["a"], Demand(cpus=1, gpus=3, gpu_type="T4"), cap.at_full_scale()) == \
        "cluster: has 2 T4 GPUs, this job needs 3"
    assert admission.never_fits(t["a"], Demand(cpus=1, gpus=2, gpu_type="T4"), cap.at_full_scale()) is None


def test_the_autoscaler_is_asked_for_bundles_a_node_can_hold_and_the_full_scale_comes_from_the_config(repo):
    import yaml

    from aidc.cluster import full_scale, load_cluster_yaml
    from aidc.tenancy.demand import bundles

    # a GPU and a CPU per bundle, the other CPUs one each: shapes any node of the kind holds (Ray grows nothing
    # for a constraint with a bundle no node fits); memory left out
    assert bundles(Demand(cpus=4, gpus=2, gpu_type="A100", memory_gb=4)) == \
        2 * [{"resources": {"CPU": 1.0, "GPU": 1.0, "accelerator_type:A100": 0.001}}] + 2 * [{"resources": {"CPU": 1.0}}]
    assert bundles(Demand(cpus=2.5)) == 2 * [{"resources": {"CPU": 1.0}}] + [{"resources": {"CPU": 0.5}}]
    assert bundles(Demand(cpus=0.5, gpus=2)) == 2 * [{"resources": {"CPU": 0.25, "GPU": 1.0}}]
    assert bundles(Demand()) == []
    # the project's cluster.yaml: the head, 4 x 8 A100 and 6 x 4 L4 nodes at most
    reach = full_scale(load_cluster_yaml(repo / "cluster.yaml"))
    assert reach["CPU"] == 8 + 4 * 96 + 6 * 48 and reach["GPU:A100"] == 32 and reach["GPU:L4"] == 24
    assert reach["workers"] == 10 and reach["memory"] > 0
    # the cluster's max_workers bounds each resource, the largest nodes counted first
    config = yaml.safe_load((repo / "cluster.yaml").read_text())
    config["max_workers"] = 5
    reach = full_scale(config)
    assert reach["GPU:A100"] == 32 and reach["GPU:L4"] == 20 and reach["CPU"] == 8 + 4 * 96 + 1 * 48
    # a type without max_workers launches none (Ray's autoscaler v2); memory not declared everywhere is unknown
    del config["available_node_types"]["gpu-l4x4"]["max_workers"]
    del config["available_node_types"]["head"]["resources"]["memory"]
    reach = full_scale(config)
    assert reach["CPU"] == 8 + 4 * 96 and "GPU:L4" not in reach and "memory" not in reach
    del config["available_node_types"]["gpu-l4x4"]["resources"]  # detected at launch: the reach is unknown
    assert full_scale(config) is None


def test_a_node_type_whose_nodes_are_all_up_adds_nothing_so_its_jobs_preempt_instead_of_waiting(repo, tmp_path):
    """cluster.yaml allows 4 A100 nodes and 10 workers: with the 4 A100 nodes up, an A100 job the cluster cannot
    hold waits for no node (it preempts at once, not after --node-wait), while an L4 job still may."""
    from aidc.cluster import growth_room, load_cluster_yaml
    from aidc.tenancy.gateway import Gateway

    config = load_cluster_yaml(repo / "cluster.yaml")
    a100 = {"CPU": 96.0, "GPU": 8.0, "accelerator_type:A100": 1.0, "memory": 9e11, "node:10.0.0.2": 1.0}
    l4 = {"CPU": 48.0, "GPU": 4.0, "accelerator_type:L4": 1.0}
    room = growth_room(config, 4 * [a100])
    assert "GPU:A100" not in room and room["GPU:L4"] == 24 and room["workers"] == 6 and room["CPU"] == 6 * 48
    assert growth_room(config, [])["GPU:A100"] == 32  # none up: the whole config less the head
    assert growth_room(config, 4 * [a100] + 6 * [l4])["workers"] == 0
    # a node of no declared type counts against max_workers only
    assert growth_room(config, 9 * [{"CPU": 4.0}])["workers"] == 1
    # a type declaring only CPUs is not a GPU node's; more nodes of a type alive than its max_workers (the config
    # lowered while they run) leave the other types their room
    config["available_node_types"]["cpu-only"] = {"resources": {"CPU": 96}, "max_workers": 4}
    assert "GPU:A100" not in growth_room(config, 4 * [a100]) and growth_room(config, 4 * [a100])["workers"] == 6
    config["available_node_types"]["gpu-a100x8"]["max_workers"] = 2
    assert growth_room(config, 4 * [a100])["GPU:L4"] == 24

    gw = Gateway("http://127.0.0.1:9", home=str(tmp_path / "t"), security_home=str(tmp_path / "s"), token="x",
                 autoscaling_config=str(repo / "cluster.yaml"))
    alive = Capacity(cpus=8 + 4 * 96, gpus={"A100": 32})
    grown = gw._grown(alive, 4 * [a100])
    assert grown.gpus == {"A100": 32, "L4": 24} and grown.cpus == 8 + 4 * 96 + 6 * 48
    assert gw._grown(alive, 4 * [a100] + 6 * [l4]) is None  # every worker the config allows is up
    t = teams(a=dict(quota=Quota(cpus=500, gpus={"A100": 32, "L4": 24})))
    low = job("low", "a", cpus=8, gpus=8, gpu_type="A100", prio=0, state="RUNNING", started=1)
    others = [job(f"o{i}", "a", cpus=8, gpus=8, gpu_type="A100", prio=9, state="RUNNING", started=1) for i in range(3)]
    hi = job("hi", "a", cpus=8, gpus=8, gpu_type="A100", prio=5, at=2)
    l4_job = job("l4", "a", cpus=8, gpus=4, gpu_type="L4", prio=5, at=3)
    p = plan([low, *others, hi, l4_job], t, Capacity(cpus=alive.cpus, gpus=alive.gpus, full=grown), now=100.0)
    assert [v for v, _ in p.preempt] == ["low"] and p.grow == ["l4"]
    assert gw.full_scale().gpus == {"A100": 32, "L4": 24}  # what a submission is checked against: unchanged


def test_a_job_waits_for_nodes_only_so_long_and_never_grows_past_a_preemption_under_way():
    t = teams(a=dict(quota=Quota(cpus=20)), b=dict(quota=Quota(cpus=20)))
    cap = Capacity(cpus=2, full=Capacity(cpus=10, gpus={"": 4}))  # GPU nodes of no declared type: any type
    low = job("low", "b", cpus=2, prio=0, state="RUNNING", started=1)
    hi = job("hi", "a", cpus=2, gpus=1, gpu_type="T4", prio=5, at=1)
    assert plan([low, hi], t, cap, now=100.0).grow == ["hi"]
    hi.nodes_asked_at = 100.0  # no node came within node_wait_s (a cloud out of them): it preempts as usual
    p = plan([low, hi], t, Capacity(cpus=2, gpus={"T4": 1}, full=cap.full), node_wait_s=60, now=161.0)
    assert p.grow == [] and [v for v, _ in p.preempt] == ["low"]
    # past the deadline with nothing to preempt: the nodes are still the way in (it never waits unasked)
    assert plan([hi], t, Capacity(cpus=2, full=cap.full), node_wait_s=60, now=161.0).grow == ["hi"]
    # victims stopping: the room is held for the job they were stopped for, nothing asked of the autoscaler
    low.preempting = "preempted for hi"
    p = plan([low, hi], t, Capacity(cpus=2, gpus={"T4": 1}, full=cap.full), now=200.0)
    assert p.grow == [] and p.waiting["hi"] == "waiting for preempted jobs to stop"
    # untyped GPUs at full scale may be of the type a job asks for: not refused; memory not declared: not checked
    assert admission.never_fits(t["a"], Demand(cpus=1, gpus=4, gpu_type="T4", memory_gb=500), cap.at_full_scale()) \
        is None
    assert "has 4 T4 GPUs" in admission.never_fits(t["a"], Demand(gpus=5, gpu_type="T4"), cap.at_full_scale())


def test_the_gateway_asks_for_a_gpu_type_only_where_its_autoscaling_config_declares_it(tmp_path, monkeypatch):
    """Ray builds new nodes from the config's resources: a bundle naming a type no node type declares would make the
    whole (all-or-nothing) constraint infeasible, so it is asked for as GPUs of any type."""
    import asyncio
    import json

    from aidc.tenancy.gateway import Gateway

    config = tmp_path / "autoscaling.json"
    config.write_text(json.dumps({"max_workers": 2, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 2}}, "gpu": {"resources": {"CPU": 8, "GPU": 4}, "max_workers": 2}}}))
    gw = Gateway("http://127.0.0.1:9", home=str(tmp_path / "t"), security_home=str(tmp_path / "s"), token="x",
                 autoscaling_config=str(config))
    asks = []
    monkeypatch.setattr(gw, "_request_resources", asks.append)
    monkeypatch.setattr(gw, "_autoscaler_news", lambda: "")
    assert gw.full_scale().gpus == {"": 8.0}
    gw.jobs.jobs["j"] = job("j", "a", cpus=2, gpus=2, gpu_type="A100")
    gw._grow = ["j"]
    asyncio.run(gw._autoscale())
    assert asks == [2 * [{"resources": {"CPU": 1.0, "GPU": 1.0}}]]
    gw._grow = []
    asyncio.run(gw._autoscale())  # nothing waits: released
    assert asks[-1] == []
