"""GPT-2 folders <-> aidc's GPT, both ways: `convert_gpt2` reads a Hugging Face GPT-2 folder onto aidc's GPT
(`aidc model import`, aidc.hf.importer); `export_hf` writes an aidc GPT as a GPT-2 folder (config.json,
model.safetensors, tokenizer.json) - `aidc model export --format hf`, and what the llm app gives vLLM.

One name table, Conv1D transposes and GELU forms serve both directions, so the two cannot drift apart. A character tokenizer is written as a `tokenizers` WordLevel
model over single characters (with a Fuse decoder), a BPE one as it is. `transformers` then loads the folder
with GPT2LMHeadModel / AutoTokenizer, and so does any engine that reads that format.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from aidc.data.tokenizer import SPECIALS
from aidc.errors import RegistryError

# aidc's own models, trained on plain text: one `role: content` line per message, then `assistant:`
DEFAULT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

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


_OURS = {ours: theirs for theirs, ours in _NAMES.items()}
_ACTIVATION = {"tanh": "gelu_new", "none": "gelu"}
assert all(_GELU[v] == k for k, v in _ACTIVATION.items())


def gpt2_state(state: dict) -> dict:
    """aidc GPT state dict -> GPT-2 tensor names (Conv1D weights transposed; the tied head left out)."""
    out = {}
    for key, value in state.items():
        if key == "head.weight":
            continue  # tied to wte (tie_word_embeddings)
        if key.startswith("blocks."):
            _, layer, rest = key.split(".", 2)
            part, _, leaf = rest.rpartition(".")
            theirs = f"{_OURS[part]}.{leaf}"
            value = value.t() if theirs in _CONV1D else value
            out[f"transformer.h.{layer}.{theirs}"] = value.detach().contiguous().clone()
        else:
            name = {"tokens.weight": "wte.weight", "positions.weight": "wpe.weight"}.get(key, key)
            out[f"transformer.{name}"] = value.detach().contiguous().clone()
    return out


def tokenizer_json(tok: dict) -> str:
    if tok["kind"] == "bpe":
        return tok["json"]
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {c: i for i, c in enumerate(tok["vocab"])}
    t = Tokenizer(models.WordLevel(vocab, unk_token=tok["vocab"][tok["unk_id"]]))
    if tok.get("lowercase"):
        t.normalizer = normalizers.Lowercase()
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character a token
    t.decoder = decoders.Fuse()
    t.add_special_tokens(tok["vocab"][:3])
    return t.to_str()


def tokenizer_config(tok: dict, max_length: int) -> dict:
    """tokenizer_config.json for the exported tokenizer.json (what the llm app's /tokenizer_info answers too):
    the special tokens by role - an imported tokenizer's own (eos/bos), else ours (<pad>, <unk>, <eos>:
    ids 0, 1, 2 in aidc.data.tokenizer; <eos> begins a sequence too) - and the chat template, when there is one."""
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
           "clean_up_tokenization_spaces": False}
    if tok.get("eos_token"):
        cfg.update(eos_token=tok["eos_token"], bos_token=tok.get("bos_token", tok["eos_token"]))
    elif tok["kind"] == "bpe" and tok.get("json"):  # the tokenizer's own special tokens, by their ids
        names = {t["id"]: t["content"] for t in json.loads(tok["json"]).get("added_tokens", [])}
        roles = {"pad_token": tok.get("pad_id"), "unk_token": tok.get("unk_id"), "eos_token": tok.get("eos_id"),
                 "bos_token": tok.get("eos_id")}
        cfg.update({role: names[i] for role, i in roles.items() if i in names})
    else:
        pad, unk, eos = SPECIALS
        cfg.update(pad_token=pad, unk_token=unk, eos_token=eos, bos_token=eos)
    # the model's own template, else aidc's plain `role: content` lines (what it was trained to continue):
    # vLLM, transformers and lm-eval then render chat the same way
    cfg["chat_template"] = tok.get("chat_template") or DEFAULT_TEMPLATE
    return cfg


def export_hf(state: dict, spec: dict, out: Path) -> Path:
    """Write the folder of an aidc GPT (its state dict and model.json); returns it."""
    from safetensors.torch import save_file

    if spec["task"] != "language_model":
        raise RegistryError(f"--format hf exports GPT language models; this is a {spec['task']} model "
                            "(use --format onnx)")
    if spec.get("quantization"):
        raise RegistryError("this is an int8 version; export its float source version to Hugging Face format")
    m, f, tok = spec["model"], spec["features"], spec["transform"]["tokenizer"]
    out.mkdir(parents=True, exist_ok=True)
    save_file(gpt2_state(state), str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": f["vocab_size"],
              "n_positions": f["block_size"], "n_ctx": f["block_size"], "n_embd": m["d_model"],
              "n_layer": m["layers"], "n_head": m["heads"], "n_inner": None,
              "activation_function": _ACTIVATION[m.get("gelu", "none")], "resid_pdrop": 0.0, "embd_pdrop": 0.0,
              "attn_pdrop": 0.0, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
              "bos_token_id": tok.get("eos_id"), "eos_token_id": tok.get("eos_id"), "pad_token_id": tok.get("pad_id"),
              "tie_word_embeddings": True, "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer.json").write_text(tokenizer_json(tok))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok, f["block_size"]), indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
         "pad_token_id": config["pad_token_id"]}, indent=2))
    return out
