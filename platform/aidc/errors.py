"""One root exception with subclasses; every message says what is wrong and what to do.

Exceptions travel between Ray processes, so each one pickles through `__reduce__`
with the plain message it was built from.
"""

from __future__ import annotations


class AidcError(Exception):
    """Root of every error aidc raises on purpose."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):
        return (type(self), (self.message,))

    def __str__(self) -> str:
        return self.message


class ConfigError(AidcError):
    """A config file or override is invalid; raised before anything starts."""

    exit_code = 2


class DataError(AidcError):
    """Input data is missing, malformed or inconsistent with the config."""


class StorageError(AidcError):
    """The storage root cannot hold this run's files safely (e.g. node-local on a multi-node cluster)."""


class ResourcesUnavailable(AidcError):
    """Workers could not get the resources they asked for within the start bound (resources.start_timeout_s)."""


class RegistryError(AidcError):
    """A model version cannot be found, or its files fail their integrity check."""


class IntegrityError(RegistryError):
    """A model's files fail their integrity check (manifest, signature): never load it."""


class RequestError(AidcError):
    """An inference request is malformed; carries the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field

    def __reduce__(self):
        return (type(self), (self.message, self.status, self.field))


# The gRPC status code (grpc.StatusCode name) of each HTTP status a request error carries: one table for every
# gRPC answer (the OIP servicer's errors, auth refusals).
GRPC_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
              413: "RESOURCE_EXHAUSTED", 422: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}
