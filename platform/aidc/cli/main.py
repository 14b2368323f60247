"""`aidc` command: thin; each subcommand parses its arguments and calls the library."""

from __future__ import annotations

import argparse
import os
import sys

from aidc.cli.ops import add_parsers as add_ops_parsers
from aidc.cluster import default_cluster_path
from aidc.cli.security import add_parsers as add_security_parsers
from aidc.cli.tenancy import add_parsers as add_tenancy_parsers
from aidc.cli.offline import add_offline_args, model_command
from aidc.errors import AidcError


def _plan(args) -> int:
    from aidc.config import load_config
    from aidc.plan import format_plans, make_plans  # imports aidc.tasks: the workloads are registered

    cfg = load_config(args.config, args.overrides)
    plans = make_plans(cfg, None if args.local else args.cluster)
    print(format_plans(cfg, plans))
    return 0 if any(p.fits for p in plans) else 3


def _cluster(args) -> int:
    from aidc.cluster import format_summary, inspect_cluster

    summary = inspect_cluster(args.path)
    if args.action == "describe":
        print(format_summary(summary))
    else:
        print(f"{args.path}: valid ({summary.provider} provider, {len(summary.node_types)} node types)")
        for w in summary.warnings:
            print(f"  warning: {w}")
    return 0


def _data(args) -> int:
    from aidc import storage
    from aidc.data.dataset import names, open_dataset, versions
    from aidc.data.pipeline import summary_lines

    if args.action == "prepare":
        from aidc.tasks import preprocess
        from aidc.entry import run_job

        def prepare(cfg, job_args) -> None:
            dv, reused = preprocess(cfg, force=job_args.force)
            print("\n".join(summary_lines(dv, reused)))

        return run_job("aidc data prepare", "Preprocess a dataset into a versioned Parquet dataset", prepare,
                       argv=args.rest, extra_args=lambda p: p.add_argument("--force", action="store_true"))
    if args.action == "keygen":
        from aidc.data.encryption import key_env, keygen

        path = keygen(args.dataset)
        print(f"wrote a new 256-bit key {args.dataset!r} to {path} (mode 0600). Use it with data.encryption.key: "
              f"{args.dataset}; every node that reads or writes the dataset needs this file (or {key_env(args.dataset)})")
        return 0
    root = storage.storage_root(args.storage)
    if args.action == "list":
        found = names(root)
        if not found:
            print(f"no datasets under {root}; run python -m jobs.preprocess --config jobs/configs/digits.yaml")
        for name in found:
            print(f"{name}: {', '.join(versions(root, name))}")
        return 0
    name, _, version = args.dataset.partition("@")
    dv = open_dataset(root, name, version or None)
    print("\n".join(summary_lines(dv, reused=True)))
    sample = dv.read_numpy("train")
    print("  sample rows (train):")
    for i in range(min(3, len(next(iter(sample.values()))))):
        row = {k: (f"<{v[i].shape} array>" if getattr(v[i], "ndim", 0) else v[i].item() if hasattr(v[i], "item")
                   else v[i]) for k, v in sample.items()}
        print("   ", row)
    return 0


def _predict(args) -> int:
    """Send held-out rows of a dataset to a served model over HTTP and report accuracy."""
    import numpy as np
    import requests

    from aidc import storage
    from aidc.data.dataset import open_dataset

    name, _, version = args.dataset.partition("@")
    dv = open_dataset(storage.storage_root(args.storage), name, version or None)
    rows = dv.read_numpy(args.split)
    x, y = rows["image"][: args.limit], rows["label"][: args.limit]
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        resp = requests.post(args.url, json={"instances": x.tolist()}, headers=headers, timeout=60)
    except requests.RequestException as exc:
        print(f"error: cannot reach {args.url}: {exc.__class__.__name__}; is the Serve app deployed "
              "(serve deploy serve_apps/config.yaml) and the URL right?", file=sys.stderr)
        return 1
    if resp.status_code != 200:
        print(f"error: HTTP {resp.status_code}: {resp.text}", file=sys.stderr)
        return 1
    body = resp.json()
    preds = np.array([p["class"] for p in body["predictions"]])
    for i in range(min(len(preds), args.show)):
        conf = max(body["predictions"][i]["probabilities"])
        mark = "ok " if preds[i] == y[i] else "BAD"
        print(f"  {mark} digit #{rows['id'][i]}: true {y[i]}  predicted {preds[i]}  (p={conf:.3f})")
    acc = float((preds == y).mean())
    model = body["model"]
    print(f"{model['name']} v{model['version']}: accuracy {acc:.4f} on {len(y)} held-out {args.split} digits "
          f"from {dv.uri} via {args.url}")
    return 0


def _model(args) -> int:
    import aidc.tasks  # noqa: F401 - registers the model schemas an imported GPT-2's section is checked against
    from aidc.hf import import_hf_model

    if args.action in ("export", "compare"):  # aidc.cli.offline
        return model_command(args)
    if args.action == "verify":
        from aidc.cli.security import model_verify

        return model_verify(args)
    if not args.name:
        print("error: aidc model import needs --name (the registered model name)", file=sys.stderr)
        return 2

    version = import_hf_model(args.path, args.name, args.alias, uri=args.tracking_uri, root=args.storage)
    print(f"registered {version.name} version {version.version} as {version.ref}; serve it with the llm app "
          f"(args: models: [{version.ref}])")
    return 0


def _chat(args) -> int:
    """Stream a chat completion from the OpenAI-compatible llm app with the official openai client."""
    import openai

    client = openai.OpenAI(base_url=args.url, api_key=args.api_key or "none", max_retries=0, timeout=120)
    try:
        limit = {"max_completion_tokens": args.max_tokens} if args.max_tokens else {}  # default: the context left
        stream = client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": args.message}],
                                                temperature=args.temperature, seed=args.seed, stream=True, **limit)
        text, finish = "", None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                print(chunk.choices[0].delta.content, end="", flush=True)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
    except openai.APIConnectionError:
        print(f"error: cannot reach {args.url}; is the llm app deployed (serve deploy serve_apps/config.yaml)?",
              file=sys.stderr)
        return 1
    except openai.APIStatusError as exc:
        print(f"error: HTTP {exc.status_code}: {exc.response.text[:500]}", file=sys.stderr)
        return 1
    print()
    if not text.strip():  # say so rather than leave a blank line: a small model may end its reply at once
        print(f"(empty reply: the model ended it at once, finish_reason {finish!r}; try another --seed)")
    return 0


def _sweeps(args) -> int:
    from aidc.tune.results import leaderboard_lines, list_sweeps, load_sweep

    if args.action == "list":
        found = list_sweeps(args.storage)
        if not found:
            print("no sweeps yet; run python -m jobs.tune --config jobs/configs/digits.yaml")
        for s in found:
            print(f"{s['name']}: {s['trials']} trials ({s['search']}/{s['scheduler']}), best {s.get('best_trial')}, "
                  f"registered {s.get('registered', '-')}")
        return 0
    if not args.name:
        print("error: aidc sweeps show needs a sweep name (see aidc sweeps list)", file=sys.stderr)
        return 2
    from aidc import storage
    from aidc.tune.live import live_lines
    from aidc.tune.sweep import sweep_dir

    live = live_lines(sweep_dir(storage.storage_root(args.storage), args.name))
    if live and not live[0].startswith("finished"):  # still running: no leaderboard yet
        print(f"sweep {args.name}: " + "\n".join(live))
        return 0
    info, table = load_sweep(args.storage, args.name)
    print(f"sweep {info['name']}: {info['trials']} trials, {info['search']} search, {info['scheduler']} scheduler, "
          f"{info['mode']} {info['metric']}; registered {info.get('registered', '-')}")
    print("\n".join(leaderboard_lines(table, info["metric"], top=args.top)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aidc", description="aidc: preprocess, train and serve on a Ray cluster")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("cluster", help="check and summarise a cluster.yaml")
    c.add_argument("action", choices=["describe", "validate"])
    c.add_argument("path", nargs="?", default="cluster.yaml")
    c.set_defaults(fn=_cluster)

    pl = sub.add_parser("plan", help="predict a training job's memory, step time, cost and energy per node type",
                        description="Per worker: peak memory (parameters, gradients, optimizer, activations, "
                        "framework) against the device's, step time, wall-clock, cost and energy, for each node "
                        "type of the cluster that could run the job, and the smallest change that makes a plan "
                        "that cannot fit fit. Exit 0 when some node type fits, 3 when none does.")
    pl.add_argument("--config", required=True, help="job config YAML, e.g. jobs/configs/shakespeare-gpt.yaml")
    pl.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                    help="override a config field (repeatable)")
    pl.add_argument("--cluster", default=default_cluster_path(), help="cluster.yaml to plan for (default: "
                    "$AIDC_CLUSTER_CONFIG or cluster.yaml); node labels aidc.io/* describe devices and prices")
    pl.add_argument("--local", action="store_true", help="plan for this machine instead of a cluster.yaml")
    pl.set_defaults(fn=_plan)

    d = sub.add_parser("data", help="prepare, list and inspect versioned datasets; make a dataset encryption key",
                       epilog="prepare takes the job options: --config FILE [--set a.b=v] [--force] [--dry-run]; "
                       "keygen KEY_ID writes a new master key for data.encryption.key (mode 0600, $AIDC_KEYS_DIR "
                       "or ~/.aidc/keys)")
    d.add_argument("action", choices=["prepare", "list", "inspect", "keygen"])
    d.add_argument("dataset", nargs="?", help="name or name@version (inspect); the key id (keygen)")
    d.add_argument("--storage", help="storage root (default $AIDC_STORAGE or ~/.aidc)")
    d.set_defaults(fn=_data)

    pr = sub.add_parser("predict", help="send held-out rows to a served model and report accuracy")
    pr.add_argument("--url", default="http://127.0.0.1:8000/digits/predict")
    pr.add_argument("--dataset", default="digits", help="name or name@version")
    pr.add_argument("--split", default="test")
    pr.add_argument("--limit", type=int, default=100)
    pr.add_argument("--show", type=int, default=10, help="predictions to print")
    pr.add_argument("--storage", help="storage root (default $AIDC_STORAGE or ~/.aidc)")
    pr.add_argument("--api-key", default=os.environ.get("AIDC_API_KEY"), help="API key (default $AIDC_API_KEY)")
    pr.set_defaults(fn=_predict)

    sw = sub.add_parser("sweeps", help="list Ray Tune sweeps; show a sweep's leaderboard")
    sw.add_argument("action", choices=["list", "show"])
    sw.add_argument("name", nargs="?", help="sweep name (run.name of the jobs.tune run)")
    sw.add_argument("--top", type=int, default=20, help="leaderboard rows to print")
    sw.add_argument("--storage", help="storage root (default $AIDC_STORAGE or ~/.aidc)")
    sw.set_defaults(fn=_sweeps)

    ch = sub.add_parser("chat", help="stream a chat completion from the OpenAI-compatible llm app")
    ch.add_argument("message", help="the user message")
    ch.add_argument("--url", default="http://127.0.0.1:8000/v1", help="base URL of the llm app")
    ch.add_argument("--model", default="shakespeare-gpt", help="served model name (GET /v1/models)")
    ch.add_argument("--max-tokens", type=int, help="most tokens to generate (default: what the context leaves)")
    ch.add_argument("--temperature", type=float, default=0.8)
    ch.add_argument("--seed", type=int, default=0)
    ch.add_argument("--api-key", default=os.environ.get("AIDC_API_KEY"), help="API key (default $AIDC_API_KEY)")
    ch.set_defaults(fn=_chat)

    m = sub.add_parser("model", help="import a Hugging Face GPT-2 folder into the registry; verify a version")
    m.add_argument("action", choices=["import", "verify", "export", "compare"])
    m.add_argument("path", help="import: a Hugging Face causal-LM folder (config.json, *.safetensors, tokenizer.json); "
                   "verify: a model reference (name@alias or name/version)")
    m.add_argument("--name", help="registered model name (import)")
    m.add_argument("--alias", default="champion", help="alias to point at the new version")
    m.add_argument("--tracking-uri", help="MLflow registry (default $MLFLOW_TRACKING_URI or sqlite under storage)")
    m.add_argument("--storage", help="storage root (default $AIDC_STORAGE or ~/.aidc)")
    add_offline_args(m)  # export/compare options (aidc.cli.offline)
    m.set_defaults(fn=_model)
    add_security_parsers(sub)  # aidc keys, aidc audit (aidc.cli.security)
    add_ops_parsers(sub)  # aidc status (aidc.cli.ops)
    add_tenancy_parsers(sub)  # aidc gateway, teams, queue, usage (aidc.cli.tenancy)
    return p


def main(argv: list[str] | None = None) -> int:
    from aidc.telemetry import setup_logging

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    preparing = args.command == "data" and args.action == "prepare"  # takes the job options, parsed by run_job
    if rest and not preparing:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if preparing:
        args.rest = rest + ([args.dataset] if args.dataset else [])
        return args.fn(args)
    setup_logging("WARNING")
    if args.command == "data" and args.action in ("inspect", "keygen") and not args.dataset:
        what = "a dataset name, e.g. aidc data inspect digits" if args.action == "inspect" else \
            "a key id, e.g. aidc data keygen team-a"
        print(f"error: aidc data {args.action} needs {what}", file=sys.stderr)
        return 2
    try:
        return args.fn(args)
    except AidcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
