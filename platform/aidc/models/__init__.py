"""nn.Modules only: no I/O, no Ray, no distributed code. MODELS maps an arch name to its builder."""

from aidc.models.cnn import SmallCNN

MODELS = {"cnn": SmallCNN}

__all__ = ["MODELS", "SmallCNN"]
