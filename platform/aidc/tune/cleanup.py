"""Reserved resources that outlive the trial that made them: found and released from the sweep's driver.

Why (issue #24): Ray removes a placement group when its creator is done, and for a group made by an actor
"done" means the actor *and its job* are dead (GCS `IsPlacementGroupLifetimeDone`). A Train V2 controller
creates its worker group's placement group from inside a Tune trial; when Tune stops that trial (ASHA, a
failure) the trial actor and its controller die, but the sweep's driver - the job - lives on, so the group
keeps its CPUs until the sweep ends. Ray Train's own guard (a detached `PlacementGroupCleaner` per run)
asks the State API whether the controller is alive; without a dashboard (an embedded `ray.init`) that API is
absent, the cleaner loops forever ("State API may be temporarily unavailable") and never removes anything,
and it only knows groups whose workers had already started. Three leaked {CPU: 0.5} groups on a 2-CPU
node made every later worker group wait forever.

`release_orphans()` applies Ray's own rule at actor death instead of job death, for this job only: a
non-detached placement group whose creator actor is dead is removed, and a cleaner actor whose controller
is dead is ended. It reads the GCS tables (no dashboard needed). `ReleaseOrphans` runs it from the sweep's
driver after every trial that ends and every few seconds while trials run.
"""

from __future__ import annotations

import logging
import time

from ray.tune import Callback

logger = logging.getLogger(__name__)

CLEANER_CLASS = "PlacementGroupCleaner"  # ray.train.v2._internal.execution.controller.placement_group_cleaner
CONTROLLER_CLASS = "TrainController"


def placement_groups(job_only: bool = True) -> list:
    """GCS rows (PlacementGroupTableData) of the placement groups not yet removed, of this job by default."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    job = ray.get_runtime_context().get_job_id()
    rows = [gcs_pb2.PlacementGroupTableData.FromString(raw)
            for raw in state._connect_and_get_accessor().get_placement_group_table()]
    return [r for r in rows if r.state != gcs_pb2.PlacementGroupTableData.REMOVED
            and (not job_only or r.creator_job_id.hex() == job)]


def reserved(job_only: bool = False) -> list[dict]:
    """Every live placement group's state and bundles, e.g. [{"state": "CREATED", "bundles": [{"CPU": 0.5}]}]."""
    from ray.core.generated import gcs_pb2

    names = gcs_pb2.PlacementGroupTableData.PlacementGroupState
    return [{"id": r.placement_group_id.hex(), "state": names.Name(r.state),
             "bundles": [dict(b.unit_resources) for b in r.bundles]} for r in placement_groups(job_only)]


def release_orphans() -> int:
    """Remove this job's placement groups whose creator actor is dead, end cleaners whose controller is dead;
    returns how many of both."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    released = 0
    for row in placement_groups():
        # a driver's own groups (Tune's trial groups) have no creator actor, which the GCS also marks dead
        if row.is_detached or not row.creator_actor_dead or ray.ActorID(row.creator_actor_id).is_nil():
            continue
        pg = PlacementGroup(ray.PlacementGroupID(row.placement_group_id))
        try:
            remove_placement_group(pg)
        except Exception as exc:  # noqa: BLE001 - removed meanwhile (Ray's own cleaner) is fine
            logger.debug("placement group %s: %s", row.placement_group_id.hex(), exc)
            continue
        released += 1
        logger.info("released placement group %s %s: the trial that made it has ended",
                    row.placement_group_id.hex(), [dict(b.unit_resources) for b in row.bundles])
    return released + _end_orphan_cleaners()


def orphan_cleaners() -> list:
    """GCS rows of the Ray Train PlacementGroupCleaner actors alive while their controller is dead.

    A cleaner is owned by the controller that started it and is detached, so it outlives it - and its job:
    one whose controller is dead has nothing left to watch, whichever sweep started it (a sweep whose driver
    was killed leaves its cleaners behind; the resumed one ends them). Matched on the owner's worker id,
    which no live actor shares."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    rows = [gcs_pb2.ActorTableData.FromString(raw)
            for raw in state._connect_and_get_accessor().get_actor_table(None, None)]
    dead = {r.address.worker_id for r in rows
            if r.class_name == CONTROLLER_CLASS and r.state == gcs_pb2.ActorTableData.DEAD}
    return [r for r in rows if r.class_name == CLEANER_CLASS and r.state == gcs_pb2.ActorTableData.ALIVE
            and r.owner_address.worker_id in dead]


def _handle(row):
    """An actor handle for a GCS actor row, registered with this worker (weakly: it keeps nothing alive).

    A detached actor without a name, started by another job, has no handle anywhere this process can reach,
    and Ray's kill needs one (`CoreWorker.kill_actor` refuses an actor it holds no handle to). Built from what
    the GCS knows of it, as Ray builds one when a handle arrives serialized."""
    import ray
    from ray.core.generated import common_pb2, core_worker_pb2

    spec = core_worker_pb2.ActorHandle(
        actor_id=row.actor_id, owner_id=row.owner_address.worker_id, owner_address=row.owner_address,
        creation_job_id=row.job_id, actor_language=common_pb2.Language.PYTHON,
        actor_creation_task_function_descriptor=row.function_descriptor, name=row.name,
        ray_namespace=row.ray_namespace, is_detached=row.is_detached)
    return ray._private.worker.global_worker.core_worker.deserialize_and_register_actor_handle(
        spec.SerializeToString(), None, True)


def _end_orphan_cleaners() -> int:
    import ray

    ended = 0
    for r in orphan_cleaners():
        try:
            ray.kill(_handle(r), no_restart=True)
            ended += 1
            logger.info("ended Ray Train's placement-group cleaner %s: its controller has ended", r.actor_id.hex())
        except Exception as exc:  # noqa: BLE001 - it exited by itself meanwhile
            logger.warning("could not end Ray Train's placement-group cleaner %s: %s", r.actor_id.hex(), exc)
    return ended


class ReleaseOrphans(Callback):
    """Tune callback: release what ended trials left reserved, at each trial's end, every `interval_s` while
    the sweep runs, and when it ends."""

    def __init__(self, interval_s: float = 5.0):
        self.interval_s = interval_s
        self._last = 0.0

    def _run(self) -> None:
        self._last = time.monotonic()
        try:
            release_orphans()
        except Exception:  # noqa: BLE001 - hygiene must never fail the sweep
            logger.warning("could not check for leftover placement groups", exc_info=True)

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self._last >= self.interval_s:
            self._run()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._run()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._run()

    def setup(self, **info):  # a resumed sweep first ends what the killed one left
        self._run()

    def on_experiment_end(self, trials, **info):
        self._run()
