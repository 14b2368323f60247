"""`aidc keys`, `aidc audit` and `aidc model verify`: thin handlers over aidc.security (and the registry)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

_DURATION = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>[smhd]?)$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    m = _DURATION.match(text or "")
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: use e.g. 3600, 90m, 12h or 30d")
    return float(m["n"]) * _SECONDS[m["unit"]]


def keys_command(args) -> int:
    from aidc.security import keys, signing

    if args.action == "create":
        if not args.owner or not args.scope:
            print("error: aidc keys create needs --owner and at least one --scope (infer:<model>, infer:* or admin)",
                  file=sys.stderr)
            return 2
        key, rec = keys.create(args.owner, args.scope, expires_in_s=args.expires_in, rate_limit=args.rate_limit,
                               burst=args.burst, team=args.team)
        print(key)
        if not args.quiet:
            print(f"created key {rec.id} for {rec.owner}{f' (team {rec.team})' if rec.team else ''}: scopes {', '.join(rec.scopes)}, expires "
                  f"{rec.expires_at or 'never'}, rate limit {rec.rate_limit or 'none'}. The key is shown only once: "
                  "send it as 'Authorization: Bearer <key>'.", file=sys.stderr)
        return 0
    if args.action == "list":
        records = keys.load()
        if not records:
            print(f"no API keys in {keys.keys_path()}; create one with aidc keys create --owner you --scope 'infer:*'")
        for rec in sorted(records.values(), key=lambda r: r.created_at):
            print(f"{rec.id}  {rec.state():8} owner={rec.owner}  team={rec.team or '-'}  scopes={','.join(rec.scopes)}  "
                  f"expires={rec.expires_at or 'never'}  rate={rec.rate_limit or '-'}/s  created={rec.created_at[:19]}")
        return 0
    if args.action == "revoke":
        if not args.id:
            print("error: aidc keys revoke needs a key id (see aidc keys list)", file=sys.stderr)
            return 2
        rec = keys.revoke(args.id)
        print(f"revoked key {rec.id} of {rec.owner}: refused on every replica within seconds")
        return 0
    # signing-keygen
    if not args.id:
        print("error: aidc keys signing-keygen needs a path for the private key, e.g. /etc/aidc/signing.pem",
              file=sys.stderr)
        return 2
    private = Path(args.id).expanduser()
    public = private.with_suffix(".pub.pem")
    signing.generate_keypair(private, public)
    print(f"private key {private} (0600): set {signing.SIGNING_KEY_ENV}={private} where models are registered\n"
          f"public key  {public}: add it to {signing.TRUSTED_KEYS_ENV} where models are loaded")
    return 0


def audit_command(args) -> int:
    from aidc.security import audit

    if args.action == "verify":
        count, problems = audit.verify()
        if problems:
            print(f"audit log FAILED verification ({count} lines):", file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
            return 1
        print(f"audit log OK: {count} records, hash chain intact")
        return 0
    for rec in audit.tail(args.n, action=args.filter):
        print(audit.format_record(rec))
    return 0


def model_verify(args) -> int:
    from aidc.registry import fetched, tracking_uri
    from aidc.security.signing import verify_model_dir

    with fetched(args.path, tracking_uri(args.tracking_uri, args.storage)) as (mv, local):  # signature + manifest
        key = verify_model_dir(local, f"{mv.name}/{mv.version}")
        files = sorted(p.name for p in local.iterdir() if p.is_file())
    print(f"{mv.name} version {mv.version}: signature OK (trusted key {key}), {len(files)} files verified")
    return 0


def add_parsers(sub) -> None:
    k = sub.add_parser("keys", help="API keys for the Serve apps: create, list, revoke; signing-keygen PATH")
    k.add_argument("action", choices=["create", "list", "revoke", "signing-keygen"])
    k.add_argument("id", nargs="?", help="key id (revoke) or private key path (signing-keygen)")
    k.add_argument("--owner", help="who the key is for (create)")
    k.add_argument("--scope", action="append", help="infer:<model>, infer:*, admin, or a job role: viewer, "
                   "developer, deployer (repeatable)")
    k.add_argument("--team", help="the team the key belongs to (job roles need one), e.g. vision")
    k.add_argument("--expires-in", type=duration, help="lifetime, e.g. 30d, 12h, 3600 (default: no expiry)")
    k.add_argument("--rate-limit", type=float, help="requests per second per replica (default: none)")
    k.add_argument("--burst", type=int, help="requests allowed at once (default 2x the rate)")
    k.add_argument("--quiet", action="store_true", help="print only the key")
    k.set_defaults(fn=keys_command)

    a = sub.add_parser("audit", help="the hash-chained audit log: verify it, or show recent events")
    a.add_argument("action", choices=["verify", "tail"])
    a.add_argument("-n", type=int, default=20, help="events to show (tail)")
    a.add_argument("--filter", help="only actions starting with this, e.g. auth. or model.")
    a.set_defaults(fn=audit_command)
