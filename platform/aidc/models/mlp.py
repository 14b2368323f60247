"""Tabular MLP: standardized numeric features + embedded categorical columns -> classes."""

from __future__ import annotations

import torch
from torch import nn


class TabularMLP(nn.Module):
    def __init__(self, num_numeric: int, cardinalities: list[int], num_classes: int,
                 hidden: tuple[int, ...] = (128, 64), dropout: float = 0.1, embed_dim: int = 8):
        super().__init__()
        # Index 0 of every categorical column is "unseen in training".
        self.embeddings = nn.ModuleList(nn.Embedding(c + 1, embed_dim) for c in cardinalities)
        layers: list[nn.Module] = []
        prev = num_numeric + embed_dim * len(cardinalities)
        for width in hidden:
            layers += [nn.Linear(prev, width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            prev = width
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor | None = None) -> torch.Tensor:
        parts = [numeric]
        if self.embeddings:
            parts += [emb(categorical[:, i]) for i, emb in enumerate(self.embeddings)]
        return self.net(torch.cat(parts, dim=1))
