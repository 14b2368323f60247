"""API keys for tests that drive the Serve apps (auth is on by default there)."""

from __future__ import annotations

import contextlib


def make_key(*scopes: str, owner: str = "tests", **kwargs) -> str:
    """A new API key in the current security home ($AIDC_STORAGE/security), as `aidc keys create` makes one."""
    from aidc.security import keys

    return keys.create(owner, list(scopes) or ["infer:*"], **kwargs)[0]


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@contextlib.contextmanager
def requests_send_key(key: str):
    """Every `requests` call in this process sends `Authorization: Bearer <key>` unless it sets its own
    (for test modules written before the apps required keys)."""
    import requests

    original = requests.Session.request

    def request(self, method, url, **kwargs):
        headers = dict(kwargs.pop("headers", None) or {})
        if not any(h.lower() == "authorization" for h in headers):
            headers["Authorization"] = f"Bearer {key}"
        return original(self, method, url, headers=headers, **kwargs)

    requests.Session.request = request
    try:
        yield key
    finally:
        requests.Session.request = original


def triton_bearer(key: str):
    """A tritonclient plugin that sends the key on every call (client.register_plugin(triton_bearer(key)))."""
    from tritonclient._plugin import InferenceServerClientPlugin

    class Bearer(InferenceServerClientPlugin):
        def __call__(self, request):
            request.headers["authorization"] = f"Bearer {key}"

    return Bearer()
