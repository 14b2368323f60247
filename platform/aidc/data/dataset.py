"""Versioned datasets: Parquet shards per split + manifest.json under <storage>/datasets/<name>/<version>/.

The manifest is written last, so a version without one is an interrupted write and is redone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from aidc import storage
from aidc.errors import DataError

LATEST = "LATEST"


@dataclass
class DatasetVersion:
    root: str
    name: str
    version: str
    _manifest: dict | None = field(default=None, repr=False, compare=False)

    @property
    def dir(self) -> str:
        return storage.join(self.root, "datasets", self.name, self.version)

    def path(self, split: str) -> str:
        return storage.join(self.dir, split)

    @property
    def manifest_path(self) -> str:
        return storage.join(self.dir, "manifest.json")

    @property
    def uri(self) -> str:
        return f"{self.name}@{self.version}"

    def exists(self) -> bool:
        return storage.exists(self.manifest_path)

    def manifest(self) -> dict:
        if self._manifest is None:
            if not self.exists():
                raise DataError(f"dataset {self.uri} has no manifest at {self.manifest_path}; run jobs.preprocess")
            self._manifest = json.loads(storage.read_text(self.manifest_path))
        return self._manifest

    def write_manifest(self, manifest: dict) -> None:
        storage.write_text(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=False))
        storage.write_text(storage.join(self.root, "datasets", self.name, LATEST), self.version + "\n")
        self._manifest = manifest

    @property
    def encryption(self) -> dict | None:
        """{key, kms, scheme} of a dataset encrypted at rest (data.encryption), else None."""
        return self.manifest().get("encryption")

    def check_key(self, split: str) -> None:
        """An encrypted split: fail now, naming the dataset and key id, when this process lacks the key or has
        another under its id."""
        enc = self.encryption
        if enc:
            from aidc.data.encryption import check_readable

            check_readable(self.path(split), self.uri, enc["key"], enc["kms"])

    def read(self, split: str, **kwargs):
        """A split as a Ray dataset (streaming read of its Parquet shards; each read task decrypts its files where
        the dataset is encrypted)."""
        import ray.data

        count = self.manifest()["counts"]["splits"].get(split, 0)
        if count == 0:
            raise DataError(f"dataset {self.uri} has no rows in split {split!r}; check data.split fractions")
        enc = self.encryption
        if enc:
            from aidc.data.encryption import datasource

            self.check_key(split)
            return ray.data.read_datasource(datasource(self.path(split), enc["kms"]), **kwargs)
        return ray.data.read_parquet(self.path(split), **kwargs)

    def size_bytes(self) -> int:
        """Bytes of Parquet on storage across all splits."""
        import pyarrow.fs as pafs

        fs, inner = storage.filesystem(self.dir)
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
        return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))

    def read_numpy(self, split: str) -> dict:
        """A (small) split as numpy arrays, without a Ray cluster: for clients, tests and evaluation."""
        import numpy as np
        import pyarrow.parquet as pq
        import ray.data  # noqa: F401  registers Ray's tensor extension types with pyarrow

        fs, inner = storage.filesystem(self.path(split))
        enc = self.encryption
        if enc:
            from aidc.data.encryption import decryption_properties

            self.check_key(split)
        table = pq.read_table(inner, filesystem=fs,
                              decryption_properties=decryption_properties(enc["kms"]) if enc else None)
        out = {}
        for name in table.column_names:
            col = table.column(name).combine_chunks()
            out[name] = col.to_numpy() if hasattr(col.type, "shape") else np.asarray(col.to_numpy(zero_copy_only=False))
        order = np.argsort(out["id"]) if "id" in out else slice(None)
        return {k: v[order] for k, v in out.items()}


def _subdirs(path: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, inner = storage.filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def names(root: str) -> list[str]:
    """Datasets that have been preprocessed under `root`."""
    return _subdirs(storage.join(root, "datasets"))


def versions(root: str, name: str) -> list[str]:
    return _subdirs(storage.join(root, "datasets", name))


def open_dataset(root: str, name: str, version: str | None = None) -> DatasetVersion:
    """The named version, or the latest one written for `name`."""
    if version is None:
        latest = storage.join(root, "datasets", name, LATEST)
        if not storage.exists(latest):
            raise DataError(
                f"no dataset named {name!r} under {root}; run preprocessing first: "
                f"python -m jobs.preprocess --config jobs/configs/{name}.yaml (same AIDC_STORAGE)"
            )
        version = storage.read_text(latest).strip()
    dv = DatasetVersion(root, name, version)
    if not dv.exists():
        known = ", ".join(versions(root, name)) or "none"
        raise DataError(f"dataset version {name}@{version} not found under {root}; known versions: {known}")
    return dv
