"""Building blocks the Serve apps share: model loading, request validation, JSON errors."""

from aidc.serving.model import LoadedModel, load_model
from aidc.serving.http import error_body, parse_json_body

__all__ = ["LoadedModel", "error_body", "load_model", "parse_json_body"]
