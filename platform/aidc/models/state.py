"""Loading a run's weights into a model that has frozen parts (a LoRA-wrapped base): only its trained
parameters are checkpointed, so only they are loaded back. Training, registration and evaluation share it."""

from __future__ import annotations

from torch import nn


def has_frozen(model: nn.Module) -> bool:
    """Whether part of the model does not train (LoRA: the base): its state is the base's, never checkpointed."""
    return any(not p.requires_grad for p in model.parameters())


def load_trained(model: nn.Module, model_sd: dict) -> None:
    """Load a state dict; where the model has frozen parameters, one of its trained parameters only (every one of
    them present, nothing else)."""
    if not has_frozen(model):
        model.load_state_dict(model_sd)
        return
    missing, unexpected = model.load_state_dict(model_sd, strict=False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    lost = sorted(trained & set(missing))
    if lost or unexpected:
        raise RuntimeError(f"checkpoint does not fit the model's trained parameters: missing {lost[:5]}, "
                           f"unexpected {list(unexpected)[:5]}")
