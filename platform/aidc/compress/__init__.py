"""Smaller and faster versions of registered models: int8 quantization, magnitude pruning, distillation,
and side-by-side comparison. Each result is registered (and signed) as a new version of the same model.

Submodules are imported where they are used (the server imports only `quantize`), so nothing here pulls in
Ray or the training stack.
"""
