"""Import a Hugging Face causal-LM checkpoint folder into the aidc registry.

Any architecture `transformers` knows (Llama, Qwen2, Mistral, ...) is registered as the folder itself: its
files, signed and under a sha256 manifest like every version, served by the llm app on vLLM. A GPT-2 folder
is converted onto aidc's own GPT instead, as follows, so every aidc tool (export, compression, the other
apps) takes it too.

The folder holds config.json + model.safetensors + tokenizer.json (+ tokenizer_config.json for a chat
template). Its weights are renamed onto aidc.models.gpt.GPT (same pre-norm block, fused qkv, tied head;
GPT-2's Conv1D weights are transposed, its GELU is the tanh form), the tokenizer travels as our `bpe`
tokenizer state with its own special ids, and the result is an ordinary registered version (weights as
safetensors, model.json, config, sha256 manifest) that every aidc server loads the same way. Nothing is
downloaded; no pickle is read.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

from aidc.errors import RegistryError

logger = logging.getLogger(__name__)

# the files of a Hugging Face folder a registered version carries (the rest - READMEs, images - stays behind)
HF_FILES = re.compile(r"^(config\.json|generation_config\.json|.*\.safetensors|model\.safetensors\.index\.json|"
                      r"tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|vocab\.json|merges\.txt|"
                      r"tokenizer\.model|chat_template\.jinja)$")


def hf_spec(config: dict, directory: Path) -> dict:
    """The model.json of a version that is a Hugging Face folder as it is (format huggingface)."""
    heads = int(config.get("num_attention_heads") or config.get("n_head") or 1)
    width = int(config.get("hidden_size") or config.get("n_embd") or 0)
    context = config.get("max_position_embeddings") or config.get("n_positions") or config.get("seq_length")
    return {"task": "language_model", "format": "huggingface",
            "model": {"arch": "huggingface", "model_type": config.get("model_type"),
                      "architectures": config.get("architectures"), "d_model": width, "heads": heads,
                      "head_dim": int(config.get("head_dim") or (width // heads if width else 0)),
                      "layers": config.get("num_hidden_layers") or config.get("n_layer")},
            "features": {"vocab_size": config.get("vocab_size"), "block_size": int(context or 2048)},
            "transform": {}, "dataset": None, "metrics": {},
            "source": {"format": "huggingface", "path": str(directory.resolve())}}


def import_as_is(directory: Path, name: str, alias: str, uri: str | None, root: str | None):
    """Register a Hugging Face causal-LM folder as it is (any architecture transformers knows)."""
    import shutil

    from aidc.registry import CONFIG, SPEC, register_model_dir, write_manifest

    config = json.loads((directory / "config.json").read_text())
    archs = config.get("architectures") or []
    if not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        raise RegistryError(f"{directory}/config.json names architectures {archs}; aidc serves causal language "
                            "models (e.g. LlamaForCausalLM)")
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - an unknown model_type, a broken config
        raise RegistryError(f"transformers cannot read {directory}/config.json: {exc}") from None
    files = [p for p in sorted(directory.iterdir()) if p.is_file() and HF_FILES.match(p.name)]
    if not any(p.suffix == ".safetensors" for p in files) or not any(
            p.name in ("tokenizer.json", "tokenizer.model", "vocab.json") for p in files):
        raise RegistryError(f"{directory} needs safetensors weights and a tokenizer (tokenizer.json) "
                            "(save_pretrained + tokenizer.save_pretrained)")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp, "model")
        model_dir.mkdir()
        for p in files:
            shutil.copy2(p, model_dir / p.name)
        (model_dir / SPEC).write_text(json.dumps(hf_spec(config, directory), indent=2))
        (model_dir / CONFIG).write_text(f"# a Hugging Face {config.get('model_type')} folder, as it is\n"
                                        f"source: {directory.resolve()}\n")
        write_manifest(model_dir)
        version = register_model_dir(model_dir, name, alias, uri=uri, root=root, run_name=f"import-{name}",
                                     tags={"source": f"huggingface-{config.get('model_type')}"},
                                     description=f"imported {config.get('model_type')} model")
    logger.info("imported %s (%s, as it is) as %s", directory, config.get("model_type"), version.ref)
    return version


def import_hf_model(directory: str | Path, name: str, alias: str = "champion", uri: str | None = None,
                    root: str | None = None):
    """GPT-2: convert, check that aidc's GPT loads the weights exactly, export and register. Another
    architecture: register the folder as it is. Returns the version."""
    from aidc.config import model_schema
    from aidc.hf.gpt2 import convert_gpt2
    from aidc.models.gpt import build_gpt
    from aidc.registry import export_model_dir, register_model_dir

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise RegistryError(f"{directory} has no config.json: not a Hugging Face model folder")
    if json.loads((directory / "config.json").read_text()).get("model_type") != "gpt2":
        return import_as_is(directory, name, alias, uri, root)
    state, spec = convert_gpt2(directory)
    model_schema("gpt").model_validate(spec["model"])  # the same checks a training config gets
    model = build_gpt(spec["model"], spec["features"])
    model.load_state_dict(state, strict=True)  # every tensor present and the right shape
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp, "model")
        config_yaml = f"# imported from a Hugging Face GPT-2 folder\nsource: {directory.resolve()}\n"
        export_model_dir(model_dir, state_dict=model.state_dict(), spec=spec, config_yaml=config_yaml)
        version = register_model_dir(model_dir, name, alias, uri=uri, root=root, run_name=f"import-{name}",
                                     tags={"source": "huggingface-gpt2"}, description="imported GPT-2 model")
    logger.info("imported %s as %s", directory, version.ref)
    return version
