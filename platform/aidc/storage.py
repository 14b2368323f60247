"""One place that turns a URI (local path, s3://, gs://) into a pyarrow filesystem, and finds the storage root."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow.fs as pafs

STORAGE_ENV = "AIDC_STORAGE"
DEFAULT_STORAGE = "~/.aidc"
logger = logging.getLogger(__name__)


def storage_root(override: str | None = None) -> str:
    """The root under which datasets, checkpoints and the model registry live.

    Order: an explicit setting, then `$AIDC_STORAGE`, then `~/.aidc`. Local paths are made
    absolute, because Ray jobs run in an unpacked working dir, not where you typed the command.
    """
    root = override or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE
    if is_uri(root):
        return root.rstrip("/")
    return str(Path(root).expanduser().resolve())


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def join(root: str, *parts: str) -> str:
    if is_uri(root):
        return "/".join([root.rstrip("/"), *parts])
    return str(Path(root, *parts))


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an object-store URI."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    local = path[len("file://"):] if path.startswith("file://") else path
    return pafs.LocalFileSystem(), str(Path(local).expanduser().resolve())


def exists(path: str) -> bool:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def file_stamp(path: str | Path) -> tuple[int, int, int] | None:
    """A local file's (inode, mtime ns, size): changes when it is rewritten or replaced (atomic renames included);
    None when it is missing. For re-reading a config only when it changed."""
    try:
        st = os.stat(Path(path).expanduser())
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def read_text(path: str) -> str:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read().decode("utf-8")


def write_text(path: str, text: str) -> None:
    """Write atomically where the filesystem allows it (local: temp file + rename)."""
    fs, inner = filesystem(path)
    parent = inner.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{inner}.tmp-{os.getpid()}"
        Path(tmp).write_text(text, encoding="utf-8")
        os.replace(tmp, inner)
        return
    with fs.open_output_stream(inner) as f:
        f.write(text.encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_dir(path: str) -> None:
    fs, inner = filesystem(path)
    fs.create_dir(inner, recursive=True)


# --- shared storage on a multi-node cluster -------------------------------------------------------------
# Checkpoints must be readable from every node: a worker restarted on another node resumes from them.
# The driver writes a marker file under the storage root; one task pinned to each alive node looks for it.
# A node that cannot see it has its own (node-local) copy of the path, and the run fails before training.
SHARED_CHECK_DIR = ".aidc-shared-check"
# Test hook, set in a node's environment (ray.cluster_utils.Cluster.add_node(env_vars=...)): that node
# behaves as if the storage root were node-local. On one machine every simulated node shares the disk.
SIMULATE_NODE_LOCAL_ENV = "AIDC_SIMULATE_NODE_LOCAL_STORAGE"


def _sees_marker(path: str) -> tuple[str, bool]:
    import ray

    visible = not os.environ.get(SIMULATE_NODE_LOCAL_ENV) and exists(path)
    return ray.get_runtime_context().get_node_id(), visible


def check_shared(root: str, timeout_s: float = 60.0, nodes: list[dict] | None = None) -> None:
    """Fail with StorageError when a node of the running (multi-node) Ray cluster cannot see `root`.

    Object-store URIs (s3://, gs://) are shared by nature and one node needs no check; a local path
    must be a filesystem every node mounts (NFS, Lustre, ...). `nodes`: entries of `ray.nodes()` to ask
    (default: the alive ones now); one that leaves the cluster before it answers is left out.
    """
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from aidc.errors import StorageError

    if is_uri(root) or not ray.is_initialized():
        return
    nodes = [n for n in (ray.nodes() if nodes is None else nodes) if n.get("Alive")]
    if len(nodes) < 2:
        return
    marker = join(root, SHARED_CHECK_DIR, uuid.uuid4().hex)
    write_text(marker, "aidc shared-storage check\n")
    probe = ray.remote(num_cpus=0, max_retries=0)(_sees_marker)
    try:
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(marker)
                for n in nodes]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        answers = {n["NodeID"]: _answer(ref, ready, timeout_s) for n, ref in zip(nodes, refs)}
    finally:
        fs, inner = filesystem(marker)
        fs.delete_file(inner)
    # A node lost while we asked (a node loss is what this check exists for) is no longer part of the
    # cluster: nothing will run there, so it is left out rather than failing the run that follows.
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    gone = [n for n in nodes if answers[n["NodeID"]] is None
            or (answers[n["NodeID"]] is not True and n["NodeID"] not in alive)]
    if gone:
        logger.warning("shared-storage check: %d node(s) left the cluster during the check: %s", len(gone),
                       ", ".join(n["NodeID"][:8] for n in gone))
    nodes = [n for n in nodes if n not in gone]
    blind = [n for n in nodes if answers[n["NodeID"]] is not True]
    if blind:
        where = ", ".join(f"{n['NodeManagerAddress']} (node {n['NodeID'][:8]}"
                          + ("" if answers[n["NodeID"]] is False else f": {answers[n['NodeID']]}") + ")"
                          for n in blind)
        raise StorageError(
            f"storage root {root} is not shared: {len(blind)} of {len(nodes)} nodes cannot read it ({where}). "
            "On a multi-node cluster checkpoints must live where every node can read them, or a worker restarted "
            "on another node loses them: set AIDC_STORAGE (or run.storage) to a path all nodes mount (e.g. NFS) "
            "or an object store URI (s3://bucket/aidc)."
        )


def _answer(ref, ready: list, timeout_s: float) -> bool | str | None:
    """One node's answer to the shared-storage probe: True/False; None when the node is gone (Ray will not
    schedule on it any more: it died after we listed it); otherwise why there was no answer."""
    import ray

    if ref not in ready:
        return f"no answer within {timeout_s:.0f} s"
    try:
        return ray.get(ref)[1]
    except (ray.exceptions.TaskUnschedulableError, ray.exceptions.NodeDiedError):
        return None
    except ray.exceptions.RayError as exc:  # e.g. the probe's worker crashed
        return f"probe failed: {type(exc).__name__}: {str(exc)[:120]}"
