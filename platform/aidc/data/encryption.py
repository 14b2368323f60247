"""Datasets encrypted at rest (data.encryption): Parquet modular encryption through pyarrow's encryption API.

Every column and the footer of each Parquet file are encrypted (AES-GCM) with data keys Parquet makes per file;
those are wrapped by a key-encryption key that is wrapped by the master key the config names (envelope
encryption, pyarrow's double wrapping). The master key never leaves the KMS client: the files hold wrapped keys
and the manifest holds the key id, never a key.

KMS clients: `local` (the one shipped) takes a master key (16, 24 or 32 bytes, base64) from the environment
variable AIDC_KEY_<ID> (the id upper-cased, non-alphanumerics as _) or from the file <AIDC_KEYS_DIR or
~/.aidc/keys>/<id>.key, which must be mode 0600 and not under the storage root. A cloud KMS (Vault, AWS KMS,
GCP KMS) plugs in as another pyarrow KmsClient registered with `register_kms(name, factory)` and named by
`data.encryption.kms`; its wrap_key/unwrap_key call the service, so no master key is ever on a node.

Reads and writes build their crypto objects in the process that does the I/O (pyarrow's are not picklable):
a Ray read or write task builds them from the key id, so each node needs the key (the environment variable in
the job's runtime_env, or the key file), or the cloud KMS's credentials.
"""

from __future__ import annotations

import base64
import os
import re
import stat
from pathlib import Path
from typing import Callable, Iterator

from aidc import storage
from aidc.errors import DataError

KEYS_DIR_ENV = "AIDC_KEYS_DIR"
_KMS_FACTORIES: dict[str, Callable] = {}


def key_env(key_id: str) -> str:
    return "AIDC_KEY_" + re.sub(r"[^A-Za-z0-9]", "_", key_id).upper()


def keys_dir() -> Path:
    return Path(os.environ.get(KEYS_DIR_ENV) or Path.home() / ".aidc" / "keys")


def key_file(key_id: str) -> Path:
    from aidc.config import KEY_ID

    if not re.match(KEY_ID, key_id):
        raise DataError(f"key id {key_id!r} is not a plain name (letters, digits, _ . -, not starting with a dot)")
    return keys_dir() / f"{key_id}.key"


class MissingKey(DataError):
    pass


def master_key(key_id: str, root: str | None = None) -> bytes:
    """The local KMS's master key `key_id`: from AIDC_KEY_<ID>, else its key file (mode 0600, outside the
    storage root)."""
    raw = os.environ.get(key_env(key_id))
    where = f"environment variable {key_env(key_id)}"
    if raw is None:
        path = key_file(key_id)
        if not path.exists():
            raise MissingKey(f"key {key_id!r} not found: set {key_env(key_id)} (base64 of a 16/24/32-byte key) or "
                             f"create {path} with `aidc data keygen {key_id}`")
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise DataError(f"key file {path} is readable by others (mode {mode:o}); run chmod 600 {path}")
        if root and not storage.is_uri(root) and _inside(path, root):
            raise DataError(f"key file {path} is inside the storage root {root}, beside the data it protects; "
                            f"keep keys elsewhere ({KEYS_DIR_ENV})")
        raw, where = path.read_text().strip(), str(path)
    try:
        key = base64.b64decode(raw, validate=True)
    except ValueError as exc:
        raise DataError(f"key {key_id!r} in {where} is not base64") from exc
    if len(key) not in (16, 24, 32):
        raise DataError(f"key {key_id!r} in {where} is {len(key)} bytes; AES needs 16, 24 or 32")
    return key


def _inside(path: Path, root: str) -> bool:
    try:
        path.resolve().relative_to(Path(root).resolve())
        return True
    except ValueError:
        return False


def keygen(key_id: str) -> Path:
    """A new random 256-bit master key in its key file (mode 0600); refuses to overwrite one."""
    path = key_file(key_id)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists():
        raise DataError(f"key file {path} exists; a dataset encrypted with it would become unreadable")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(os.urandom(32)).decode() + "\n")
    return path


def _local_kms(config):
    import pyarrow.parquet.encryption as pe
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    class LocalKms(pe.KmsClient):
        """Wraps Parquet's key-encryption keys with AES-GCM under the master key (nonce || ciphertext, base64)."""

        def __init__(self):
            super().__init__()

        def wrap_key(self, key_bytes, master_key_identifier):
            nonce = os.urandom(12)
            sealed = AESGCM(master_key(master_key_identifier)).encrypt(nonce, key_bytes, None)
            return base64.b64encode(nonce + sealed)

        def unwrap_key(self, wrapped_key, master_key_identifier):
            raw = base64.b64decode(wrapped_key)
            return AESGCM(master_key(master_key_identifier)).decrypt(raw[:12], raw[12:], None)

    return LocalKms()


def register_kms(name: str, factory: Callable) -> None:
    """The hook for a cloud KMS: `factory(pyarrow KmsConnectionConfig) -> pyarrow.parquet.encryption.KmsClient`,
    used where data.encryption.kms names it (register it in every process that reads or writes: e.g. in a
    module the job imports)."""
    _KMS_FACTORIES[name] = factory


register_kms("local", _local_kms)


def _crypto(kms: str):
    import pyarrow.parquet.encryption as pe

    if kms not in _KMS_FACTORIES:
        raise DataError(f"no KMS client named {kms!r}; known: {sorted(_KMS_FACTORIES)} (aidc.data.encryption."
                        "register_kms adds one)")
    return pe.CryptoFactory(_KMS_FACTORIES[kms]), pe.KmsConnectionConfig(custom_kms_conf={"kms": kms})


def write_args(key_id: str, kms: str = "local") -> dict:
    """Ray's write_parquet arguments that encrypt (call inside the writing process: arrow_parquet_args_fn)."""
    import pyarrow.dataset as pads
    import pyarrow.parquet.encryption as pe

    factory, conn = _crypto(kms)
    # uniform: every column and the footer under the one master key; double wrapping: per-file data keys
    # wrapped by a key-encryption key wrapped by the master key (the KMS is called once per process)
    config = pe.EncryptionConfiguration(footer_key=key_id, uniform_encryption=True, double_wrapping=True,
                                        data_key_length_bits=256)
    return {"encryption_config": pads.ParquetEncryptionConfig(factory, conn, config)}


def decryption_properties(kms: str = "local"):
    import pyarrow.parquet.encryption as pe

    factory, conn = _crypto(kms)
    return factory.file_decryption_properties(conn, pe.DecryptionConfiguration())


def parquet_format(kms: str = "local"):
    """A pyarrow dataset Parquet format that decrypts."""
    import pyarrow.dataset as pads
    import pyarrow.parquet.encryption as pe

    factory, conn = _crypto(kms)
    options = pads.ParquetFragmentScanOptions(
        decryption_config=pads.ParquetDecryptionConfig(factory, conn, pe.DecryptionConfiguration()))
    return pads.ParquetFileFormat(default_fragment_scan_options=options)


# What readers and writers of Parquet pass along, given `enc` = {key, kms} of an encrypted dataset or None.

def reading_format(enc: dict | None):
    """The pyarrow dataset format to read with: plain Parquet, or Parquet that decrypts."""
    return parquet_format(enc["kms"]) if enc else "parquet"


def ray_write_kwargs(enc: dict | None) -> dict:
    """Ray write_parquet's extra arguments: none, or those that make each write task encrypt."""
    if not enc:
        return {}
    key, kms = enc["key"], enc["kms"]
    return {"arrow_parquet_args_fn": lambda: write_args(key, kms)}


def file_options(enc: dict | None):
    """pyarrow write_dataset's file_options: None, or Parquet options that encrypt."""
    if not enc:
        return None
    import pyarrow.dataset as pads

    return pads.ParquetFileFormat().make_write_options(**write_args(enc["key"], enc["kms"]))


def check_readable(path: str, dataset: str, key_id: str, kms: str = "local") -> None:
    """Open one file's footer with the key: a missing or wrong key fails here, naming dataset and key, before
    any read task starts (never garbage rows: AES-GCM authenticates what it decrypts)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, inner = storage.filesystem(path)
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
             if i.type == pafs.FileType.File and i.path.endswith(".parquet")]
    if not files:
        return
    try:
        with fs.open_input_file(files[0]) as f:
            pq.ParquetFile(f, decryption_properties=decryption_properties(kms)).metadata
    except MissingKey as exc:
        raise DataError(f"dataset {dataset} is encrypted with key {key_id!r}, which this process lacks: "
                        f"{exc}") from None
    except DataError:
        raise
    except Exception as exc:  # pyarrow reports the KMS's failure (InvalidTag: another key) as an OSError
        raise DataError(f"dataset {dataset} is encrypted with key {key_id!r} and the key {key_id!r} this process "
                        f"has does not open it (a different key under that id?): "
                        f"{type(exc).__name__} {(str(exc).splitlines() or [''])[0][:200]}".rstrip()) from None


def datasource(paths: str, kms: str = "local", **kwargs):
    """A Ray Data datasource over encrypted Parquet files (ray.data.read_datasource): each read task opens its
    files with decryption properties it builds itself."""
    from ray.data.datasource import FileBasedDatasource

    class EncryptedParquet(FileBasedDatasource):
        _FILE_EXTENSIONS = ["parquet"]

        def __init__(self):
            super().__init__(paths, file_extensions=["parquet"], **kwargs)

        def _read_stream(self, f, path: str) -> Iterator:
            import pyarrow as pa
            import pyarrow.parquet as pq

            file = pq.ParquetFile(f, decryption_properties=decryption_properties(kms))
            for batch in file.iter_batches(batch_size=8192):
                yield pa.Table.from_batches([batch])

        def _open_input_source(self, filesystem, path: str, **open_args):
            return filesystem.open_input_file(path)  # Parquet reads its footer first: random access, not a stream

    return EncryptedParquet()
