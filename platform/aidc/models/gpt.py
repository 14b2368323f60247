"""GPT-style decoder-only language model (nanoGPT shape): pre-norm blocks, causal self-attention,
weight-tied head, and generation with a key/value cache. From a few hundred K parameters to
GPT-2-small size (d_model 768, 12 layers, 12 heads) by config."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, cache: tuple | None = None):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        if cache is not None:  # generation: attend to everything cached so far
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=cache is None or t > 1, dropout_p=self.dropout if self.training else 0.0
        ) if cache is None or t > 1 else F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c)), (k, v)


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float, gelu: str = "none"):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(approximate=gelu),
                                 nn.Linear(4 * d_model, d_model), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, cache: tuple | None = None):
        a, new_cache = self.attn(self.ln1(x), cache)
        x = x + a
        return x + self.mlp(self.ln2(x)), new_cache


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, d_model: int = 128, heads: int = 4, layers: int = 4,
                 dropout: float = 0.1, activation_checkpointing: bool = False, gelu: str = "none"):
        super().__init__()
        self.block_size = block_size
        self.activation_checkpointing = activation_checkpointing
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, heads, dropout, gelu) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tokens.weight  # weight tying
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, caches: list | None = None, start: int = 0):
        """Logits (b, t, vocab). With `caches` (generation) also returns the updated key/value caches."""
        t = idx.shape[1]
        pos = torch.arange(start, start + t, device=idx.device)
        x = self.drop(self.tokens(idx) + self.positions(pos))
        new_caches = []
        for i, block in enumerate(self.blocks):
            if caches is None and self.activation_checkpointing and self.training:
                x, _ = checkpoint(block, x, use_reentrant=False)
            else:
                x, kv = block(x, None if caches is None else caches[i])
                new_caches.append(kv)
        logits = self.head(self.ln_f(x))
        return logits if caches is None else (logits, new_caches)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample continuations with a KV cache: one forward over the prompt, then one token per step."""
        idx = idx[:, -self.block_size:]
        logits, caches = self(idx, caches=[None] * len(self.blocks))
        out = idx
        for _ in range(max_new_tokens):
            if out.shape[1] >= self.block_size:  # window full: recompute the cache over the last block
                logits, caches = self(out[:, -self.block_size + 1:], caches=[None] * len(self.blocks))
            step = logits[:, -1, :] / max(temperature, 1e-6)
            if top_k:
                v, _ = torch.topk(step, min(top_k, step.shape[-1]))
                step = step.masked_fill(step < v[:, [-1]], float("-inf"))
            nxt = torch.multinomial(F.softmax(step, dim=-1), 1, generator=generator)
            out = torch.cat([out, nxt], dim=1)
            pos = min(out.shape[1], self.block_size) - 1
            logits, caches = self(nxt, caches=caches, start=pos)
        return out


def build_gpt(model_cfg: dict, features: dict) -> GPT:
    """aidc's GPT from a version's model.json entries (`model` without `arch`; vocab and context from `features`)."""
    cfg = {k: v for k, v in model_cfg.items() if k != "arch"}
    return GPT(vocab_size=features["vocab_size"], block_size=features["block_size"], **cfg)
