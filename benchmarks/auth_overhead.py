"""What API keys cost: the same OIP tensor app with auth on and off, side by side under load, plus the
per-request key check in-process and why the key store hashes with sha256 rather than scrypt.

Serve: one tensors app per setting (MNIST-shaped CNN, batching on, 1 replica) on one Serve, driven in
turn at each concurrency (req/s, p50, p99); in-process: Guard.check with a warm key cache, sha256 of a
key, and scrypt (n=2**14, r=8, p=1, a common password-hashing setting) of the same key.

    python -m benchmarks.auth_overhead [--quick] [--seconds S]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import api_key_header, local_ray
from benchmarks.oip_serving import MODEL, QUIET, drive, register_random_cnn


def per_check_us(n: int) -> dict:
    """Microseconds per key check: the guard (cached store), a bare sha256, scrypt."""
    from aidc.security.auth import AuthArgs, Guard

    key = api_key_header()["Authorization"].split()[1]
    guard = Guard("bench", AuthArgs(refresh_s=60))
    guard.check(f"Bearer {key}", MODEL)
    t = time.perf_counter()
    for _ in range(n):
        guard.check(f"Bearer {key}", MODEL)
    guard_us = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    for _ in range(n):
        hashlib.sha256(key.encode()).hexdigest()
    sha_us = (time.perf_counter() - t) / n * 1e6
    reps = 3
    t = time.perf_counter()
    for _ in range(reps):
        hashlib.scrypt(key.encode(), salt=b"0123456789abcdef", n=2 ** 14, r=8, p=1)
    scrypt_us = (time.perf_counter() - t) / reps * 1e6
    return {"guard_check_us": round(guard_us, 1), "sha256_us": round(sha_us, 2), "scrypt_us": round(scrypt_us)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="One level, 1.5 s each (smoke test).")
    p.add_argument("--seconds", type=float, default=8.0, help="Load duration per concurrency level and setting.")
    a = p.parse_args(argv)
    levels = [1] if a.quick else [1, 8, 32]
    seconds = 1.5 if a.quick else a.seconds
    result: dict = {"in_process": per_check_us(200 if a.quick else 20000)}
    print("in_process", json.dumps(result["in_process"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uri = register_random_cnn(root)
        with local_ray(4, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}):
            from ray import serve

            from serve_apps.tensors import app_builder
            from aidc.testing import free_port, serve_shutdown, serve_start

            port = free_port()
            serve_start(http_options={"host": "127.0.0.1", "port": port})
            try:
                for setting in ("on", "off"):
                    args = {"tracking_uri": uri, "auth": {"enabled": setting == "on"}, "models": [{
                        "name": MODEL, "batching": {"max_batch_size": 32, "batch_wait_timeout_s": 0.004},
                        "deployment": {"num_cpus": 0.5, "max_ongoing_requests": 128}}]}
                    serve.run(app_builder(args), name=f"auth-{setting}", route_prefix=f"/{setting}/v2",
                              logging_config=QUIET)
                for c in levels:  # interleaved: both settings see the same background load
                    for setting in ("on", "off"):
                        url = f"http://127.0.0.1:{port}/{setting}/v2/models/{MODEL}/infer"
                        result[f"{setting}_c{c}"] = drive(url, c, seconds)
                        print(setting, c, json.dumps(result[f"{setting}_c{c}"]), flush=True)
            finally:
                serve_shutdown()
    f = {"note": "closed-loop client on the same (shared, loaded) 2-core machine; compare ratios"}
    for c in levels:
        on, off = result[f"on_c{c}"], result[f"off_c{c}"]
        f[f"auth_on_over_off_req_per_s_c{c}"] = round(on["req_per_s"] / max(off["req_per_s"], 1e-9), 3)
        f[f"auth_on_minus_off_p50_ms_c{c}"] = round(on["p50_ms"] - off["p50_ms"], 2)
    ip = result["in_process"]
    f["scrypt_over_sha256"] = round(ip["scrypt_us"] / max(ip["sha256_us"], 1e-9))
    result["figures"] = f
    print(json.dumps(f, indent=2))
    return result


if __name__ == "__main__":
    main()
