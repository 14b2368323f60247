"""Exports of registered versions: ONNX (checked against onnxruntime), the numpy+onnxruntime edge bundle,
and the Hugging Face GPT-2 folder for language models (`aidc model export`)."""

from aidc.export.api import export_model

__all__ = ["export_model"]
