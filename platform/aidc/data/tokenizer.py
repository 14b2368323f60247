"""Tokenizers: byte-level BPE trained with Hugging Face `tokenizers`, or a character vocabulary.

The fitted tokenizer is plain JSON in the dataset manifest and travels with the model, so
preprocessing, training and serving encode text identically.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

import numpy as np

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
SPECIALS = [PAD, UNK, EOS]  # ids 0, 1, 2 in both kinds
_SPECIAL_SET = frozenset(SPECIALS)
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIALS) + ")")


def train_tokenizer(texts, kind: str, vocab_size: int, lowercase: bool) -> dict:
    """Fit a tokenizer on training texts only; returns its JSON-able state."""
    if kind == "char":
        chars = sorted({c for t in texts for c in (t.lower() if lowercase else t)})
        vocab = SPECIALS + chars
        return {"kind": "char", "vocab": vocab, "vocab_size": len(vocab), "lowercase": lowercase,
                "pad_id": 0, "unk_id": 1, "eos_id": 2}
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return {"kind": "bpe", "json": tok.to_str(), "vocab_size": tok.get_vocab_size(), "lowercase": lowercase,
            "pad_id": 0, "unk_id": 1, "eos_id": 2}


@lru_cache(maxsize=8)
def _bpe(serialized: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(serialized)


@lru_cache(maxsize=8)
def _char_index(vocab_json: str) -> dict[str, int]:
    return {c: i for i, c in enumerate(json.loads(vocab_json))}


def encode(texts, state: dict) -> list[list[int]]:
    texts = [str(t) for t in texts]
    if state["kind"] == "bpe":
        return [e.ids for e in _bpe(state["json"]).encode_batch(texts)]
    index = _char_index(json.dumps(state["vocab"]))
    unk, lower = state["unk_id"], state["lowercase"]

    specials = state["vocab"][:len(SPECIALS)] == SPECIALS

    def chars(t: str) -> list[int]:
        return [index.get(c, unk) for c in (t.lower() if lower else t)]

    def one(t: str) -> list[int]:
        # special tokens written in the text are those tokens, as in the BPE kind and the Hugging Face export
        # (`tokenizers` matches added tokens before normalizing): "<eos>" is id 2, not five characters
        if not specials or "<" not in t:
            return chars(t)
        ids = []
        for part in _SPECIAL_SPLIT.split(t):
            ids.extend([index[part]] if part in _SPECIAL_SET else chars(part))
        return ids

    return [one(t) for t in texts]


def decode(ids, state: dict) -> str:
    """Token ids -> text, dropping special tokens: the state's `special_ids` (an imported tokenizer's own,
    e.g. GPT-2's 50256), else ours, 0..2."""
    specials = set(state.get("special_ids", range(len(SPECIALS))))
    ids = [int(i) for i in ids if int(i) not in specials]
    if state["kind"] == "bpe":
        return _bpe(state["json"]).decode(ids)
    vocab = state["vocab"]
    return "".join(vocab[i] for i in ids if i < len(vocab))


def pad_truncate(seqs: list[list[int]], length: int, pad_id: int) -> np.ndarray:
    out = np.full((len(seqs), length), pad_id, dtype=np.int32)
    for i, s in enumerate(seqs):
        s = s[:length]
        out[i, : len(s)] = s
    return out


def pack_blocks(seqs: list[list[int]], block_size: int, eos_id: int) -> np.ndarray:
    """Concatenate documents (eos-separated) and cut (block_size + 1)-token windows, stride block_size,
    so every token is a target once; the tail shorter than a block is dropped."""
    stream = np.fromiter((t for s in seqs for t in (*s, eos_id)), dtype=np.int32)
    n = (len(stream) - 1) // block_size
    if n <= 0:
        return np.zeros((0, block_size + 1), dtype=np.int32)
    idx = np.arange(block_size + 1)[None, :] + block_size * np.arange(n)[:, None]
    return stream[idx]
