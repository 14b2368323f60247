"""Many teams on one Ray cluster: teams, roles and quotas, a durable priority queue with preemption, enforcement and
usage accounting, behind a gateway that speaks Ray's Job Submission REST API (`gateway.py`).

model.py      teams, quotas, demands and job records; the durable files (teams.json, jobs.json, packages/)
admission.py  the pure scheduling round: admit, preempt, why the rest wait (unit-tested without Ray)
demand.py     what a submitted job will hold (entrypoint flags, or the aidc job config's resources)
usage.py      CPU-/GPU-hours per team and job over a time window
metrics.py    the gateway's Prometheus metrics
gateway.py    the aiohttp service on the head
"""
