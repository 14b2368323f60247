"""Export an aidc GPT as a Hugging Face GPT-2 folder: config.json, model.safetensors, tokenizer.json.

The inverse of `aidc model import` (aidc.hf): the same name table, Conv1D transposes and GELU forms, read
backwards, so the two cannot drift apart. A character tokenizer is written as a `tokenizers` WordLevel
model over single characters (with a Fuse decoder), a BPE one as it is. `transformers` then loads the folder
with GPT2LMHeadModel / AutoTokenizer, and so does any engine that reads that format.
"""

from __future__ import annotations

import json
from pathlib import Path

from aidc.data.text import SPECIALS
from aidc.errors import RegistryError
from aidc.hf import _CONV1D, _GELU, _NAMES

# aidc's own models, trained on plain text: one `role: content` line per message, then `assistant:`
DEFAULT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

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
    ids 0, 1, 2 in aidc.data.text; <eos> begins a sequence too) - and the chat template, when there is one."""
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


def export_hf(loaded, out: Path) -> Path:
    """Write the folder; returns it."""
    from safetensors.torch import save_file

    spec = loaded.spec
    if spec["task"] != "language_model":
        raise RegistryError(f"--format hf exports GPT language models; this is a {spec['task']} model "
                            "(use --format onnx)")
    if spec.get("quantization"):
        raise RegistryError("this is an int8 version; export its float source version to Hugging Face format")
    m, f, tok = spec["model"], spec["features"], spec["transform"]["tokenizer"]
    out.mkdir(parents=True, exist_ok=True)
    save_file(gpt2_state(loaded.model.state_dict()), str(out / "model.safetensors"), metadata={"format": "pt"})
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
