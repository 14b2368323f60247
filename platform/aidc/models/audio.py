"""Speech classifiers over log-mel frames (batch, frames, n_mels) padded to a common length, with each
recording's true frame count: a recurrent network (GRU or LSTM) and a small CNN over the spectrogram."""

from __future__ import annotations

import torch
from torch import nn


def last_valid(out: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """out (batch, frames, width) -> each row's output at its last real frame (batch, width)."""
    idx = (lengths.long().clamp(min=1) - 1).view(-1, 1, 1).expand(-1, 1, out.shape[2])
    return out.gather(1, idx).squeeze(1)


def reverse_valid(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each row's real frames in reverse order (its padding after them), so a forward pass over the result reads
    the recording backwards and stops at its first frame: the backward direction, exact for any padding."""
    t = torch.arange(x.shape[1], device=x.device).view(1, -1)
    idx = (lengths.long().view(-1, 1) - 1 - t).clamp(min=0)
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))


class SpeechRNN(nn.Module):
    """Stacked GRU/LSTM over the frames; the state after each recording's last real frame (and, bidirectional,
    after its first frame read backwards) -> linear classifier. Padding never reaches a state that is read, so
    the prediction is the same at any padded length (the masking is gathers, which ONNX exports)."""

    def __init__(self, n_mels: int, num_classes: int, hidden: int = 64, layers: int = 2, cell: str = "gru",
                 bidirectional: bool = False, dropout: float = 0.1):
        super().__init__()
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]
        kw = dict(input_size=n_mels, hidden_size=hidden, num_layers=layers, batch_first=True,
                  dropout=dropout if layers > 1 else 0.0)
        self.forward_rnn = rnn(**kw)
        self.backward_rnn = rnn(**kw) if bidirectional else None
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, _ = self.forward_rnn(x)
        feats = [last_valid(out, lengths)]
        if self.backward_rnn is not None:
            back, _ = self.backward_rnn(reverse_valid(x, lengths))
            feats.append(last_valid(back, lengths))
        return self.head(self.dropout(torch.cat(feats, dim=1)))


class SpeechCNN(nn.Module):
    """Conv blocks over the (frames x mels) spectrogram, then the mean over each recording's real frames."""

    def __init__(self, n_mels: int, num_classes: int, channels: list[int] | tuple[int, ...] = (16, 32),
                 hidden: int = 64, dropout: float = 0.1):
        super().__init__()
        blocks, c_in = [], 1
        for c in channels:
            blocks += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                       nn.MaxPool2d((1, 2))]  # pool the mel axis only: frames stay aligned with lengths
            c_in = c
        self.features = nn.Sequential(*blocks)
        width = c_in * (n_mels // 2 ** len(channels))
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.features(x.unsqueeze(1))  # (batch, channels, frames, mels')
        h = h.permute(0, 2, 1, 3).flatten(2)  # (batch, frames, channels x mels')
        mask = (torch.arange(h.shape[1], device=h.device).view(1, -1) < lengths.view(-1, 1)).to(h.dtype)
        pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return self.head(pooled)
