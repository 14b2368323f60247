"""A registered language-model version as the Hugging Face folder vLLM loads.

`materialize(ref)` fetches the version from the registry - which verifies its signature (trusted keys) and
its sha256 manifest, so a tampered version is refused here, before any engine reads a byte - and writes
the folder vLLM reads: an aidc GPT is exported as a GPT-2 folder with its own tokenizer
(aidc.hf.gpt2, the same files `aidc model export --format hf` writes). Each call writes a fresh
folder from freshly verified files; nothing earlier left in the cache is trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aidc.errors import AidcError

logger = logging.getLogger(__name__)

# Head sizes vLLM's CPU attention kernels take (vllm.v1.attention.backends.cpu_attn, 0.29); on GPUs the
# flash-attention backends take more, but a model that must also run on CPU nodes keeps to these.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass
class HFModel:
    """A verified registry version laid out as a Hugging Face folder."""

    name: str
    version: str
    folder: Path
    max_model_len: int
    head_dim: int
    vocab_size: int | None = None
    digest: str = ""  # of the version's sha256 manifest (fetch verified every file against it): its content


def cache_root() -> Path:
    """Where materialized folders go: $AIDC_CACHE/hf (default ~/.cache/aidc/hf), on each node."""
    base = os.environ.get("AIDC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "aidc")
    return Path(base, "hf")


def materialize(ref: str, uri: str | None = None, gpu: bool = False) -> HFModel:
    """Fetch + verify `ref` (name@alias or name/version), check that vLLM can run it on this kind of node
    (`gpu`), and write its Hugging Face folder; returns it."""
    from safetensors.torch import load_file

    from aidc.hf.gpt2 import export_hf
    from aidc.registry import CONFIG, MANIFEST, SPEC, WEIGHTS, fetch, tracking_uri
    from aidc.security.signing import SIGNATURE

    uri = tracking_uri(uri)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        mv, files = fetch(ref, uri, dst=tmp)  # signature, then sha256 manifest: AidcError when tampered
        spec = json.loads((files / SPEC).read_text())
        digest = hashlib.sha256((files / MANIFEST).read_bytes()).hexdigest()[:16]
        if spec.get("task") != "language_model":
            raise AidcError(f"{mv.name}/{mv.version} is a {spec.get('task')} model, not a language model; "
                            "serve it with the tensors or predictor app instead")
        m = spec["model"]
        head_dim = int(m.get("head_dim") or m["d_model"] // m["heads"])
        check_head_dim(f"{mv.name}/{mv.version}", head_dim, int(m.get("d_model") or 0), gpu)
        out = Path(tempfile.mkdtemp(prefix=f"{mv.name}-v{mv.version}-", dir=root))
        if spec.get("format") == "peft-lora":  # a fine-tuned LoRA adapter: folded into its (verified) base
            merge_adapter(files, spec["base"], out, gpu)
        elif spec.get("format") == "huggingface":  # imported as it is (aidc.hf.import_as_is): its own files
            for p in files.iterdir():
                if p.is_file() and p.name not in (SPEC, CONFIG, MANIFEST, SIGNATURE):
                    shutil.copy2(p, out / p.name)
        else:  # an aidc GPT: exported as a GPT-2 folder with its own tokenizer
            export_hf(load_file(str(files / WEIGHTS)), spec, out)
    logger.info("materialized %s/%s for vLLM at %s", mv.name, mv.version, out)
    vocab = spec["features"].get("vocab_size")
    return HFModel(mv.name, str(mv.version), out, int(spec["features"]["block_size"]), head_dim,
                   int(vocab) if vocab else None, digest)


def merge_adapter(adapter: Path, base: dict, out: Path, gpu: bool) -> None:
    """Write base + LoRA adapter (PEFT's merge_and_unload) as a plain folder, with the adapter's tokenizer files:
    an adapter version as a model of its own (batch inference, export). The llm app does not use this: it serves
    adapters multi-LoRA on one engine of their base (aidc.serving.llm.app.split_adapters)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = materialize(base["ref"], base.get("uri"), gpu).folder if "ref" in base else Path(base["path"])
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, local_files_only=True)
        PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(str(out))
    finally:
        if "ref" in base:
            shutil.rmtree(base_dir, ignore_errors=True)
    for p in adapter.iterdir():
        if p.is_file() and p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy2(p, out / p.name)


def check_head_dim(version: str, head_dim: int, width: int, gpu: bool) -> None:
    """vLLM's CPU attention takes only some head sizes: refuse others at deploy, naming the fix."""
    if gpu or head_dim in CPU_HEAD_SIZES:
        return
    fix = (f"e.g. --set model.heads={width // 32} (heads of 32)" if width and width % 32 == 0
           else "model.d_model a multiple of 32")
    raise AidcError(f"{version} has attention heads of size {head_dim} "
                    f"(model.d_model / model.heads); vLLM on CPU takes head sizes {list(CPU_HEAD_SIZES)}. "
                    f"Serve it on a GPU replica (num_gpus > 0), or train it with {fix}")


def remove(model: HFModel) -> None:
    shutil.rmtree(model.folder, ignore_errors=True)
