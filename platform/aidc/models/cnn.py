"""A small convolutional classifier for low-resolution images (digits 8x8, MNIST 28x28)."""

from __future__ import annotations

import math

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Conv blocks (conv-norm-ReLU, 2x2 max-pool while the map is larger than 2x2) then an MLP head.

    norm: batch (BatchNorm) or group (GroupNorm, 8 groups or fewer): per-sample, so DP-SGD can train it."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        num_classes: int = 10,
        channels: tuple[int, ...] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.1,
        norm: str = "batch",
    ):
        super().__init__()
        layers: list[nn.Module] = []
        size, prev = image_size, in_channels
        for ch in channels:
            normalize = nn.BatchNorm2d(ch) if norm == "batch" else nn.GroupNorm(math.gcd(ch, 8), ch)
            layers += [nn.Conv2d(prev, ch, 3, padding=1), normalize, nn.ReLU(inplace=True)]
            if size >= 4:  # pool only while it leaves at least a 2x2 map
                layers.append(nn.MaxPool2d(2))
                size //= 2
            prev = ch
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(prev * size * size, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
