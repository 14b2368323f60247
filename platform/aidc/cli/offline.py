"""`aidc model export` and `aidc model compare` (offline and edge deployment, aidc.export / aidc.compress)."""

from __future__ import annotations

import sys


def add_offline_args(m) -> None:
    """Options of the export/compare actions on the `aidc model` parser."""
    m.add_argument("other", nargs="?", help="compare: the second model reference")
    m.add_argument("--format", choices=["onnx", "edge", "hf"], help="export: ONNX file, edge bundle (ONNX + "
                   "preprocessing + numpy/onnxruntime runner) or Hugging Face GPT-2 folder")
    m.add_argument("--out", help="export: output folder")


def model_command(args) -> int:
    from aidc import storage
    from aidc.registry import tracking_uri

    root = storage.storage_root(args.storage)
    uri = tracking_uri(args.tracking_uri, root)
    if args.action == "export":
        if not (args.format and args.out):
            print("error: aidc model export needs --format onnx|edge|hf and --out DIR", file=sys.stderr)
            return 2
        from aidc.export import export_model

        r = export_model(args.path, args.format, args.out, uri=uri, root=root)
        parity = (f"; onnxruntime vs torch on {r['rows']} test rows: max abs difference {r['max_abs_diff']:.2e}"
                  if "max_abs_diff" in r else "")
        print(f"exported {r['name']} version {r['version']} as {args.format} to {r['out']}{parity}")
        return 0
    if not args.other:
        print("error: aidc model compare needs two model references, e.g. aidc model compare digits-cnn@champion "
              "digits-cnn@int8", file=sys.stderr)
        return 2
    from aidc.compress.compare import compare, format_comparison

    fa, fb = compare([args.path, args.other], uri, root)
    print("\n".join(format_comparison(fa, fb)))
    print("(latency: median of interleaved CPU forward passes in this process; other load on the machine "
          "shifts both alike)")
    return 0
