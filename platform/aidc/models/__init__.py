"""nn.Modules only: no I/O, no Ray, no distributed code. MODELS maps an arch name to its class."""

from aidc.models.audio import SpeechCNN, SpeechRNN
from aidc.models.cnn import SmallCNN
from aidc.models.gpt import GPT
from aidc.models.mf import MatrixFactorization
from aidc.models.mlp import TabularMLP
from aidc.models.transformer import TextTransformer

MODELS = {"cnn": SmallCNN, "mlp": TabularMLP, "transformer": TextTransformer, "gpt": GPT, "mf": MatrixFactorization,
          "speech_rnn": SpeechRNN, "speech_cnn": SpeechCNN}

__all__ = ["GPT", "MODELS", "MatrixFactorization", "SmallCNN", "SpeechCNN", "SpeechRNN", "TabularMLP", "TextTransformer"]
