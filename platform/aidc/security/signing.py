"""Model signatures with OpenSSF model-signing (1.1.1): every registered version is signed at registration,
and every load from the registry verifies the signature against the trusted public keys first.

The signature (`model.sig`, a Sigstore bundle over the sha256 of every file in the version's folder) lives
beside the files; the private key never does. Keys are elliptic-curve (P-256) PEM files:
  signing key:  $AIDC_SIGNING_KEY, else <security home>/signing/private.pem - generated (0600) on first use
                together with its public key in <security home>/trusted/ when neither exists
  trusted keys: $AIDC_TRUSTED_KEYS (paths separated by ':'; files or folders of *.pem), else
                every *.pem in <security home>/trusted/
Refusals (IntegrityError, `reason` unsigned | modified | untrusted): no signature; any file added, removed or
changed since signing (a rewritten sha256 manifest included); a signature no trusted key made.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from aidc import storage
from aidc.errors import ConfigError, IntegrityError
from aidc.security import audit, security_home

logger = logging.getLogger(__name__)

SIGNATURE = "model.sig"
SIGNING_KEY_ENV = "AIDC_SIGNING_KEY"
TRUSTED_KEYS_ENV = "AIDC_TRUSTED_KEYS"


def _home() -> Path:
    home = security_home()
    if storage.is_uri(home):
        raise ConfigError(f"signing keys must be local files, but the security home is {home}: "
                          f"set {SIGNING_KEY_ENV} and {TRUSTED_KEYS_ENV} (or AIDC_SECURITY_DIR) to local paths")
    return Path(home)


def generate_keypair(private_path: Path, public_path: Path) -> None:
    """A new EC P-256 key pair: the private key 0600 (its folder 0700), the public key beside the trusted ones."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    public_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))


def signing_key() -> Path:
    """The private key to sign with (generating the default pair on first use)."""
    explicit = os.environ.get(SIGNING_KEY_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"{SIGNING_KEY_ENV}={explicit} is not a file; point it at an EC private key PEM "
                              "(aidc keys signing-keygen PATH makes one)")
    else:
        home = _home()
        path = home / "signing" / "private.pem"
        if not path.exists():
            home.mkdir(parents=True, exist_ok=True, mode=0o700)
            with audit.locked(home / "signing.lock"):
                if not path.exists():
                    generate_keypair(path, home / "trusted" / "aidc-default.pem")
                    logger.warning("generated the model-signing key pair %s (public key in %s)", path,
                                   home / "trusted")
                    audit.record_quietly("signing.keygen", target=str(path))
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"the signing key {path} is readable by others (mode {oct(path.stat().st_mode & 0o777)}): "
                          f"chmod 600 {path}")
    return path


def trusted_keys() -> list[Path]:
    """The public keys verification trusts (see the module docstring)."""
    explicit = os.environ.get(TRUSTED_KEYS_ENV)
    entries = [Path(p).expanduser() for p in explicit.split(os.pathsep) if p] if explicit else [_home() / "trusted"]
    found = []
    for entry in entries:
        if entry.is_dir():
            found.extend(sorted(entry.glob("*.pem")))
        elif entry.is_file():
            found.append(entry)
        elif explicit:
            raise ConfigError(f"{TRUSTED_KEYS_ENV} names {entry}, which does not exist")
    return found


def _hashing():
    from model_signing import hashing

    # every file counts (git metadata too), except the signature itself
    return hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False)


def sign_model_dir(directory: Path, private_key: Path | None = None) -> Path:
    """Write `directory/model.sig` over every file in it; returns its path."""
    from model_signing import signing

    private_key = private_key or signing_key()
    sig = Path(directory) / SIGNATURE
    signing.Config().set_hashing_config(_hashing()).use_elliptic_key_signer(private_key=private_key).sign(
        Path(directory), sig)
    return sig


def _refuse(message: str, reason: str) -> IntegrityError:
    exc = IntegrityError(message)
    exc.reason = reason  # a bounded label for aidc.ops.metrics (not pickled: counted where it is raised)
    return exc


def _what_changed(text: str) -> str:
    changed = re.findall(r"Hash mismatch for \\?'([^'\\]+)\\?'", text)  # list repr may escape the quotes
    other = re.findall(r"((?:Extra|Missing) files[^\"\]]*)", text)
    return "; ".join(([f"changed: {', '.join(changed)}"] if changed else []) + other) or text[:300]


def verify_model_dir(directory: Path, label: str | None = None, trusted: list[Path] | None = None) -> Path:
    """Check `directory/model.sig` against the trusted keys: the public key that verified it, or IntegrityError."""
    from model_signing import verifying

    directory = Path(directory)
    label = label or str(directory)
    sig = directory / SIGNATURE
    if not sig.is_file():
        raise _refuse(f"{label} is not signed (no {SIGNATURE}): refusing to load it. Versions registered by aidc "
                      "are signed at registration; re-register the model from its training run or import", "unsigned")
    trusted = trusted if trusted is not None else trusted_keys()
    if not trusted:
        raise _refuse(f"no trusted public keys to verify {label} with: set {TRUSTED_KEYS_ENV} to the signer's public "
                      f"key (PEM), or put it in {_home() / 'trusted'}", "untrusted")
    for key in trusted:
        try:
            verifying.Config().set_hashing_config(_hashing()).use_elliptic_key_verifier(public_key=key).verify(
                directory, sig)
            return key
        except ValueError as exc:
            if str(exc).startswith("Signature mismatch"):  # the key matched: the files changed since signing
                raise _refuse(f"{label} was modified after it was signed ({_what_changed(str(exc))}): "
                              "refusing to load a modified model", "modified") from None
            logger.debug("%s: not signed by %s: %s", label, key, exc)
        except Exception as exc:  # noqa: BLE001 - a bundle another key made, or a corrupt one
            logger.debug("%s: not signed by %s: %s", label, key, exc)
    raise _refuse(f"{label} is signed, but by none of the {len(trusted)} trusted key(s) "
                  f"({', '.join(p.name for p in trusted)}): refusing to load it. If you trust its signer, add the "
                  f"signer's public key to {TRUSTED_KEYS_ENV}", "untrusted")


def verify_or_refuse(directory: Path, label: str, then=None) -> Path:
    """verify_model_dir, then `then(directory)` (e.g. the sha256 manifest check); a refusal is written to the
    audit log before it is raised."""
    try:
        key = verify_model_dir(directory, label)
        if then is not None:
            then(directory)
        return key
    except IntegrityError as exc:
        audit.record_quietly("model.refused", target=label, outcome="refused",
                             details={"reason": getattr(exc, "reason", "manifest"), "error": str(exc)[:500]})
        raise


def record_registration(name: str, version: str, alias: str | None) -> None:
    """Audit a new registered version (and the alias moved to it)."""
    audit.record_quietly("model.register", target=f"{name}/{version}", details={"alias": alias})


__all__ = ["SIGNATURE", "SIGNING_KEY_ENV", "TRUSTED_KEYS_ENV", "generate_keypair", "record_registration",
           "sign_model_dir", "signing_key", "trusted_keys", "verify_model_dir", "verify_or_refuse"]
