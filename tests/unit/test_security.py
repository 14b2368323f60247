"""API keys, the auth guard and its HTTP middleware, the hash-chained audit log, and model signatures through
the registry (every refusal case) - no Ray."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from aidc.cli import main as aidc_main
from aidc.errors import IntegrityError
from aidc.security import audit, keys, security_home
from aidc.security.auth import ApiKeyAuth, AuthArgs, AuthError, Guard


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("AIDC_STORAGE", str(tmp_path / "storage"))
    monkeypatch.delenv("AIDC_SECURITY_DIR", raising=False)
    monkeypatch.delenv("AIDC_TRUSTED_KEYS", raising=False)
    monkeypatch.delenv("AIDC_SIGNING_KEY", raising=False)
    return Path(security_home())


def test_keys_are_stored_hashed_scoped_expiring_and_revocable(home, capsys):
    key, rec = keys.create("alice", ["infer:digits-cnn"], rate_limit=5)
    assert key.startswith(f"aidc_{rec.id}_") and len(key) > 50
    stored = (home / keys.KEYS_FILE).read_text()
    assert key not in stored and key.split("_", 2)[2] not in stored and rec.sha256 in stored
    assert oct((home / keys.KEYS_FILE).stat().st_mode & 0o777) == "0o600"
    records = keys.load()
    assert keys.authenticate(records, key).owner == "alice"
    assert records[rec.id].allows("digits-cnn") and not records[rec.id].allows("other")
    assert records[rec.id].allows(None)  # a request naming no model (list models) needs any infer scope
    for bad, reason in [(key[:-1] + ("A" if key[-1] != "A" else "B"), "unknown_key"), ("sk-123", "malformed_key")]:
        with pytest.raises(keys.KeyRefused) as err:
            keys.authenticate(records, bad)
        assert err.value.reason == reason and key not in str(err.value)
    expired, _ = keys.create("bob", ["infer:*"], expires_in_s=0.01)
    time.sleep(0.05)
    with pytest.raises(keys.KeyRefused, match="expired"):
        keys.authenticate(keys.load(), expired)
    keys.revoke(rec.id)
    with pytest.raises(keys.KeyRefused, match="revoked"):
        keys.authenticate(keys.load(), key)
    with pytest.raises(Exception, match="bad scope"):
        keys.create("eve", ["infer:a b"])
    # the CLI: create prints the key once, list shows states, never the key or its hash
    assert aidc_main(["keys", "create", "--owner", "carol", "--scope", "admin", "--expires-in", "30d", "--quiet"]) == 0
    carol = capsys.readouterr().out.strip()
    assert aidc_main(["keys", "list"]) == 0
    listed = capsys.readouterr().out
    assert "revoked" in listed and "expired" in listed and "owner=carol" in listed and carol not in listed
    assert keys.load()[carol.split("_")[1]].sha256 not in listed
    assert aidc_main(["keys", "revoke", "nope00000000"]) == 1


def test_guard_scopes_rate_limit_revocation_and_rate_limited_audit(home):
    good, rec = keys.create("svc", ["infer:digits-cnn"], rate_limit=1, burst=2)
    other, _ = keys.create("svc2", ["infer:other"])
    guard = Guard("tensors", AuthArgs(refresh_s=0.05, audit_interval_s=60))
    assert guard.check(f"Bearer {good}", "digits-cnn").owner == "svc"
    cases = [(None, "digits-cnn", 401, "missing_key"), ("Basic abc", "digits-cnn", 401, "malformed_key"),
             (f"Bearer {other}", "digits-cnn", 403, "scope"), (f"Bearer {other}x", "x", 401, "unknown_key")]
    for header, model, status, reason in cases:
        with pytest.raises(AuthError) as err:
            guard.check(header, model)
        assert (err.value.status, err.value.reason) == (status, reason)
    assert guard.check(f"Bearer {good}", "digits-cnn")  # burst 2: the second goes too
    with pytest.raises(AuthError) as err:
        guard.check(f"Bearer {good}", "digits-cnn")
    assert err.value.status == 429 and err.value.retry_after >= 1
    keys.revoke(rec.id)
    time.sleep(0.1)  # past refresh_s: the guard re-reads the changed store
    with pytest.raises(AuthError, match="revoked"):
        guard.check(f"Bearer {good}", "digits-cnn")
    for _ in range(3):  # a flood of the same failure: one audit record, the rest counted into the next
        with pytest.raises(AuthError):
            guard.check(None, "digits-cnn")
    denied = audit.tail(50, action="auth.")
    assert [d["details"]["reason"] for d in denied].count("missing_key") == 1
    assert {d["details"]["reason"] for d in denied} >= {"missing_key", "scope", "rate_limited", "revoked"}
    assert all(good not in json.dumps(d) and other not in json.dumps(d) for d in audit.tail(0))
    assert Guard("x", AuthArgs(enabled=False)).check(None, "m") is None


def test_middleware_answers_each_protocol_shape_and_leaves_health_open(home):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from aidc.serving.protect import protect

    apps = {}
    for kind in ("predictor", "tensors", "llm"):
        api = FastAPI()
        protect(api, kind)
        for path in ("/healthz", "/predict", "/health/ready", "/models/m/ready", "/models/m/infer", "/health",
                     "/completions", "/models"):
            api.add_api_route(path, lambda: {"ok": True}, methods=["GET", "POST"])
        apps[kind] = TestClient(api)
    ApiKeyAuth.configure("predictor", {"refresh_s": 0.01}, model="m")
    key, _ = keys.create("t", ["infer:m"])
    auth = {"Authorization": f"Bearer {key}"}
    p, t, lm = apps["predictor"], apps["tensors"], apps["llm"]
    assert p.get("/healthz").status_code == 200 and t.get("/health/ready").status_code == 200
    assert t.get("/models/m/ready").status_code == 200 and lm.get("/health").status_code == 200
    r = p.post("/predict")
    assert r.status_code == 401 and r.json()["error"]["status"] == 401 and "Bearer" in r.json()["error"]["message"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert p.post("/predict", headers=auth).json() == {"ok": True}
    r = t.post("/models/other/infer", headers=auth)
    assert r.status_code == 403 and set(r.json()) == {"error"} and "infer:other" in r.json()["error"]
    assert t.post("/models/m/infer", headers=auth).status_code == 200
    r = lm.post("/completions", json={"model": "other", "prompt": "x"}, headers=auth)
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_permitted"
    r = lm.post("/completions", json={"model": "m", "prompt": "x"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert lm.post("/completions", json={"model": "m"}, headers=auth).status_code == 200
    assert lm.get("/models", headers=auth).status_code == 200 and lm.get("/models").status_code == 401


def test_audit_chain_detects_every_kind_of_edit(home, capsys):
    for i in range(6):
        audit.record("test.event", target=f"t{i}", details={"i": i})
    assert audit.verify() == (6, [])
    assert aidc_main(["audit", "verify"]) == 0 and "6 records" in capsys.readouterr().out
    log = home / audit.LOG
    pristine = log.read_text().splitlines(keepends=True)

    def problems_after(lines):
        log.write_text("".join(lines))
        return " | ".join(audit.verify()[1])

    edited = json.loads(pristine[2])
    edited["outcome"] = "denied"
    assert "line 3 (seq 3): edited" in problems_after(pristine[:2] + [json.dumps(edited) + "\n"] + pristine[3:])
    assert "line 3: seq 4 follows seq 2 - 1 record(s) deleted" in problems_after(pristine[:2] + pristine[3:])
    assert "inserted or moved" in problems_after(pristine[:4] + [pristine[1]] + pristine[4:])
    swapped = pristine[:2] + [pristine[3], pristine[2]] + pristine[4:]
    assert "line 4: seq 3 where seq 5 was due" in problems_after(swapped)
    assert "deleted from (or added to) the end" in problems_after(pristine[:-1])
    forged = json.loads(pristine[4])  # an edit that recomputes its own hash still breaks the next link
    forged["actor"] = "someone-else"
    forged["hash"] = audit._digest(forged)
    assert "line 6 (seq 6): does not chain" in problems_after(pristine[:4] + [json.dumps(forged) + "\n"] + pristine[5:])
    assert aidc_main(["audit", "verify"]) == 1 and "does not chain" in capsys.readouterr().err
    log.write_text("".join(pristine))
    assert aidc_main(["audit", "tail", "-n", "2"]) == 0 and "t5" in capsys.readouterr().out


def _tiny_model_dir(path: Path) -> Path:
    import torch

    from aidc.registry import export_model_dir

    return export_model_dir(path, state_dict={"w": torch.arange(6.0)}, spec={"task": "none"},
                            config_yaml="x: 1\n") and path


def test_registered_versions_are_signed_and_every_refusal_is_clear(home, tmp_path, capsys, monkeypatch):
    import tempfile

    from safetensors.torch import load_file, save_file

    from aidc.registry import WEIGHTS, fetch, fetched, read_spec, register_model_dir, tracking_uri, write_manifest
    from aidc.security import signing

    (tmp_path / "downloads").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "downloads"))  # where this test's bare fetch()es go
    uri = tracking_uri()
    versions = [register_model_dir(_tiny_model_dir(tmp_path / f"m{i}"), "sig-test", "champion") for i in range(4)]
    key = home / "signing" / "private.pem"
    assert oct(key.stat().st_mode & 0o777) == "0o600" and (home / "trusted" / "aidc-default.pem").exists()
    mv, local = fetch("sig-test/1", uri)
    assert (local / signing.SIGNATURE).exists()
    # what a version is, read without downloading its weights (the llm app routes adapters so)
    assert read_spec("sig-test@champion", uri)[1] == json.loads((local / "model.json").read_text())
    assert aidc_main(["model", "verify", "sig-test/1"]) == 0 and "signature OK" in capsys.readouterr().out
    # a verified download that is read and dropped leaves nothing in the temp dir (a bare fetch() kept each one)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with monkeypatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(scratch))
        with fetched("sig-test/1", uri) as (_, files):
            assert (files / WEIGHTS).exists() and (files / signing.SIGNATURE).exists()
        assert aidc_main(["model", "verify", "sig-test/1"]) == 0 and not list(scratch.iterdir())

    def stored(version) -> Path:  # the version's files in the artifact store
        return Path(fetch(f"sig-test/{version.version}", uri)[0].source.removeprefix("file://"))

    # 2: poison a tensor and rewrite the sha256 manifest consistently - the manifest check alone would pass
    d2 = stored(versions[1])
    weights = load_file(str(d2 / WEIGHTS))
    weights["w"][0] = 1e6
    save_file(weights, str(d2 / WEIGHTS))
    write_manifest(d2)
    changed = r"sig-test/2 was modified after it was signed \(changed: MANIFEST.sha256.json, model.safetensors\)"
    with pytest.raises(IntegrityError, match=changed):
        fetch("sig-test/2", uri)
    with monkeypatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(scratch))
        with pytest.raises(IntegrityError, match=changed), fetched("sig-test/2", uri):
            pass
        assert not list(scratch.iterdir())  # a refused download is not left behind either
    # 3: unsigned (the signature deleted)
    (stored(versions[2]) / signing.SIGNATURE).unlink()
    with pytest.raises(IntegrityError, match="sig-test/3 is not signed"):
        fetch("sig-test/3", uri)
    # 4: re-signed by a key nobody trusts
    signing.generate_keypair(tmp_path / "rogue.pem", tmp_path / "rogue.pub.pem")
    signing.sign_model_dir(stored(versions[3]), tmp_path / "rogue.pem")
    with pytest.raises(IntegrityError, match="sig-test/4 is signed, but by none of the 1 trusted key"):
        fetch("sig-test/4", uri)
    assert aidc_main(["model", "verify", "sig-test/4"]) == 1 and "none of the 1 trusted" in capsys.readouterr().err
    # ... until its public key is trusted explicitly (then the default key is no longer trusted)
    os.environ["AIDC_TRUSTED_KEYS"] = str(tmp_path / "rogue.pub.pem")
    try:
        assert str(fetch("sig-test/4", uri)[0].version) == "4"
        with pytest.raises(IntegrityError, match="none of the 1 trusted"):
            fetch("sig-test/1", uri)
    finally:
        del os.environ["AIDC_TRUSTED_KEYS"]
    refused = [r for r in audit.tail(0, action="model.refused")]
    assert [r["details"]["reason"] for r in refused] == ["modified", "modified", "unsigned", "untrusted", "untrusted",
                                                         "untrusted"]
    assert [r["target"] for r in audit.tail(0, action="model.register")] == [f"sig-test/{i}" for i in range(1, 5)]
    assert audit.verify()[1] == []
