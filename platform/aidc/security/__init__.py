"""Security: hashed, scoped API keys and their checks on Serve; signed model versions; a hash-chained audit log.

Everything lives under one security home that every replica and job on the cluster sees:
`$AIDC_SECURITY_DIR`, else `<storage root>/security` (`$AIDC_STORAGE`, default ~/.aidc):
  api_keys.json      key records (sha256 of each key, never the key), scopes, owner, expiry, revocation
  audit.jsonl        the audit log, one JSON record per line, each chained to the previous by sha256
  audit.head.json    the last record's seq and hash (detects records cut off the end)
  signing/private.pem  the default model-signing key (0600; override: $AIDC_SIGNING_KEY)
  trusted/*.pem      public keys trusted for verification (override: $AIDC_TRUSTED_KEYS)
"""

from __future__ import annotations

import os

from aidc import storage

SECURITY_ENV = "AIDC_SECURITY_DIR"


def security_home(override: str | None = None) -> str:
    """Where keys, the audit log and the default signing key pair live (see the module docstring)."""
    explicit = override or os.environ.get(SECURITY_ENV)
    if explicit:
        return storage.storage_root(explicit)
    return storage.join(storage.storage_root(), "security")


__all__ = ["SECURITY_ENV", "security_home"]
