"""Hugging Face folders and aidc's registry, both ways.

importer.py  `aidc model import`: a causal-LM folder into the registry (a GPT-2 onto aidc's GPT, any other
             architecture as it is)
gpt2.py      GPT-2 folders <-> aidc's GPT (names, Conv1D transposes, tokenizer files)
folder.py    a registered language-model version as the folder vLLM (and transformers) load
"""

from aidc.hf.importer import import_hf_model

__all__ = ["import_hf_model"]
