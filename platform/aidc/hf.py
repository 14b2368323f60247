"""Import a Hugging Face GPT-2-architecture checkpoint folder into the aidc registry.

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

_LAYER = re.compile(r"^h\.(\d+)\.(.+)$")
_NAMES = {"ln_1": "ln1", "ln_2": "ln2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
          "mlp.c_fc": "mlp.0", "mlp.c_proj": "mlp.2"}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


def _read(directory: Path) -> tuple[dict, dict, str, dict]:
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (directory / f).is_file()]
    if missing:
        raise RegistryError(f"{directory} lacks {missing}: a Hugging Face GPT-2 folder needs config.json, "
                            "model.safetensors and tokenizer.json (save_pretrained + tokenizer.save)")
    from safetensors.torch import load_file

    config = json.loads((directory / "config.json").read_text())
    extra = directory / "tokenizer_config.json"
    tok_cfg = json.loads(extra.read_text()) if extra.is_file() else {}
    return config, load_file(str(directory / "model.safetensors")), (directory / "tokenizer.json").read_text(), tok_cfg


def convert_gpt2(directory: Path) -> tuple[dict, dict]:
    """(state_dict for aidc's GPT, model spec) from a Hugging Face GPT-2 folder; refuses other architectures."""
    config, weights, tokenizer_json, tok_cfg = _read(directory)
    if config.get("model_type") != "gpt2":
        raise RegistryError(f"{directory}/config.json has model_type {config.get('model_type')!r}; only GPT-2 "
                            "architecture checkpoints (model_type 'gpt2') can be imported")
    act = config.get("activation_function", "gelu_new")
    if act not in _GELU:
        raise RegistryError(f"activation_function {act!r} is not supported; use one of {sorted(_GELU)}")
    if abs(config.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise RegistryError("layer_norm_epsilon must be 1e-5 (torch's LayerNorm default) to import exactly")
    state = {}
    for key, value in weights.items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue  # causal-mask buffers; the head is tied to wte
        m = _LAYER.match(key)
        if m:
            layer, rest = m.groups()
            if rest in _CONV1D:
                value = value.t()
            part, _, leaf = rest.rpartition(".")
            if part not in _NAMES:
                raise RegistryError(f"unexpected tensor {key!r} in {directory}/model.safetensors")
            state[f"blocks.{layer}.{_NAMES[part]}.{leaf}"] = value.contiguous()
        elif key in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
            state[{"wte.weight": "tokens.weight", "wpe.weight": "positions.weight"}.get(key, key)] = value
        else:
            raise RegistryError(f"unexpected tensor {key!r} in {directory}/model.safetensors")
    state["head.weight"] = state["tokens.weight"]
    vocab, block = int(config["vocab_size"]), int(config["n_positions"])
    tok = json.loads(tokenizer_json)
    specials = sorted({int(t["id"]) for t in tok.get("added_tokens", []) if t.get("special")})
    eos = config.get("eos_token_id")
    tokenizer = {"kind": "bpe", "json": tokenizer_json, "vocab_size": vocab, "lowercase": False,
                 "pad_id": config.get("pad_token_id"), "unk_id": None, "eos_id": eos,
                 "special_ids": sorted(set(specials) | ({eos} if eos is not None else set())),
                 **({"chat_template": tok_cfg["chat_template"]} if isinstance(tok_cfg.get("chat_template"), str)
                    else {}),
                 **{k: tok_cfg[k] for k in ("bos_token", "eos_token") if isinstance(tok_cfg.get(k), str)}}
    spec = {
        "task": "language_model",
        "model": {"arch": "gpt", "d_model": int(config["n_embd"]), "heads": int(config["n_head"]),
                  "layers": int(config["n_layer"]), "dropout": 0.0, "activation_checkpointing": False,
                  "gelu": _GELU[act]},
        "features": {"vocab_size": vocab, "block_size": block, "tokenizer": "bpe"},
        "transform": {"tokenizer": tokenizer, "block_size": block},
        "dataset": None,
        "source": {"format": "huggingface-gpt2", "path": str(directory.resolve())},
        "metrics": {},
    }
    return state, spec


def import_hf_model(directory: str | Path, name: str, alias: str = "champion", uri: str | None = None,
                    root: str | None = None):
    """Convert, check that aidc's GPT loads the weights exactly, export and register; returns the version."""
    from aidc.config import GPTConfig
    from aidc.registry import export_model_dir, register_model_dir
    from aidc.tasks import get_task

    directory = Path(directory)
    state, spec = convert_gpt2(directory)
    GPTConfig.model_validate(spec["model"])  # the same checks a training config gets
    model = get_task("language_model").build_model(spec["model"], spec["features"])
    model.load_state_dict(state, strict=True)  # every tensor present and the right shape
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp, "model")
        config_yaml = f"# imported from a Hugging Face GPT-2 folder\nsource: {directory.resolve()}\n"
        export_model_dir(model_dir, state_dict=model.state_dict(), spec=spec, config_yaml=config_yaml)
        version = register_model_dir(model_dir, name, alias, uri=uri, root=root, run_name=f"import-{name}",
                                     tags={"source": "huggingface-gpt2"}, description="imported GPT-2 model")
    logger.info("imported %s as %s", directory, version.ref)
    return version
