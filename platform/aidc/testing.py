"""Helpers that tests and benchmarks share (as torch.testing): a free local port, and tiny randomly initialised
Hugging Face model folders made locally (nothing is downloaded from a model hub).

Nothing in the platform imports this module.
"""

from __future__ import annotations

import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

SENTENCES = ["the quick brown fox jumps over the lazy dog", "to be or not to be, that is the question",
             "all the world's a stage, and all the men and women merely players", "hello world"] * 4


def make_tiny_gpt2(directory: Path, n_positions: int = 64, n_embd: int = 32, n_layer: int = 2,
                   n_head: int = 4) -> Path:
    """config.json + model.safetensors (GPT2LMHeadModel.save_pretrained) + a byte-level BPE tokenizer.json
    trained on a few sentences, whose end-of-text token is its last id (as in GPT-2)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    tok.add_special_tokens(["<|endoftext|>"])
    eos = tok.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, bos_token_id=eos, eos_token_id=eos)
    directory.mkdir(parents=True, exist_ok=True)
    GPT2LMHeadModel(cfg).save_pretrained(str(directory))
    tok.save(str(directory / "tokenizer.json"))
    return directory


def make_tiny_llama(directory: Path, max_positions: int = 512, hidden: int = 64, layers: int = 2,
                    heads: int = 2) -> Path:
    """A tiny randomly initialised Llama-architecture folder (LlamaForCausalLM.save_pretrained) with the same
    kind of byte-level BPE tokenizer, its special tokens and a chat template in tokenizer_config.json."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    gpt2 = make_tiny_gpt2(directory)  # its tokenizer.json; the GPT-2 weights are replaced below
    for f in ("model.safetensors", "config.json", "generation_config.json"):
        (gpt2 / f).unlink(missing_ok=True)
    vocab = len(json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]) + 1
    eos = vocab - 1
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
                      bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(str(directory))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
        "model_max_length": max_positions,
        "chat_template": "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}"}))
    return directory
