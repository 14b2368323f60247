"""Transformer-encoder text classifier: token + position embeddings, encoder, masked mean pool, head."""

from __future__ import annotations

import torch
from torch import nn


class TextTransformer(nn.Module):
    def __init__(self, vocab_size: int, max_length: int, num_classes: int, d_model: int = 64, heads: int = 4,
                 layers: int = 2, dropout: float = 0.1, pad_id: int = 0):
        super().__init__()
        self.pad_id = pad_id
        self.tokens = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.positions = nn.Embedding(max_length, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pad = input_ids == self.pad_id
        # one row of positions per sample (same values): per-sample gradients (DP-SGD, Opacus) need a batch dim
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        h = self.encoder(self.tokens(input_ids) + self.positions(pos), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.head(self.norm(pooled))
