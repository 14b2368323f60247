"""Matrix factorization recommender: rating = global mean + user bias + item bias + <user, item>."""

from __future__ import annotations

import torch
from torch import nn


class MatrixFactorization(nn.Module):
    def __init__(self, num_users: int, num_items: int, dim: int = 32, dropout: float = 0.0, global_mean: float = 3.5):
        super().__init__()
        # Index 0 is "unseen in training": its embedding stays near zero, so cold users/items get biases only.
        self.users, self.items = nn.Embedding(num_users + 1, dim), nn.Embedding(num_items + 1, dim)
        self.user_bias, self.item_bias = nn.Embedding(num_users + 1, 1), nn.Embedding(num_items + 1, 1)
        for emb in (self.users, self.items):
            nn.init.normal_(emb.weight, 0.0, 0.05)
        for emb in (self.user_bias, self.item_bias):
            nn.init.zeros_(emb.weight)
        self.drop = nn.Dropout(dropout)
        self.register_buffer("global_mean", torch.tensor(float(global_mean)))

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        u, i = self.drop(self.users(user)), self.drop(self.items(item))
        return (u * i).sum(-1) + self.user_bias(user).squeeze(-1) + self.item_bias(item).squeeze(-1) + self.global_mean
