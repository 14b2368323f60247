"""What the train loop asks of compression: the loss to minimise and what to do after each optimizer step.

The loop's config may carry `compress` (set by aidc.compress.job):
- `init_state`: weights to start from (a pruned copy of the source model);
- `masks`: {parameter name: 0/1 tensor}; pruned weights are put back to zero after every optimizer step,
  so a fine-tune keeps the sparsity the magnitude pruning chose;
- `teacher`: {model, features, spec, state} of a registered model; the loss becomes
  (1 - alpha) * task loss + alpha * soft-target loss (KL at `temperature`, scaled by T^2, as in Hinton et
  al.; mean squared error to the teacher's output for regression outputs such as ratings).
Without it the loss is the task's own and nothing happens after a step.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    if student.dim() >= 2 and student.shape[-1] > 1:  # logits over classes / vocabulary
        t = temperature
        log_p = F.log_softmax(student.float() / t, dim=-1).flatten(0, -2)
        q = F.softmax(teacher.float() / t, dim=-1).flatten(0, -2)
        return F.kl_div(log_p, q, reduction="batchmean") * t * t
    return F.mse_loss(student.float(), teacher.float())


def training_hooks(config: dict, task, model: torch.nn.Module, device):
    """(compute_loss(model, batch), after_step()) for this run; plain training when there is no `compress`."""
    c = config.get("compress") or {}

    def plain(m, batch):
        return task.loss(task.forward(m, batch), batch)

    if not c:
        return plain, lambda: None
    if c.get("init_state") is not None:
        model.load_state_dict(c["init_state"])
    params = dict(model.named_parameters())
    masked = [(params[name], mask.to(device=device, dtype=params[name].dtype)) for name, mask in
              (c.get("masks") or {}).items()]

    def after_step() -> None:
        with torch.no_grad():
            for p, mask in masked:
                p.mul_(mask)

    teacher_cfg = c.get("teacher")
    if not teacher_cfg:
        return plain, after_step
    from aidc.models.quantize import load_weights

    device = torch.device(device)
    teacher = task.build_model(teacher_cfg["model"], teacher_cfg["features"])
    teacher = load_weights(teacher, teacher_cfg["state"], teacher_cfg["spec"], device).eval().requires_grad_(False)
    if device.type != "cpu" or not teacher_cfg["spec"].get("quantization"):  # int8 runs on CPU; a GPU takes floats
        teacher = teacher.to(device)
    alpha, temperature = float(c["alpha"]), float(c["temperature"])

    def distill(m, batch):
        out = task.forward(m, batch)
        with torch.no_grad():
            t_out = task.forward(teacher, batch)
        return (1 - alpha) * task.loss(out, batch) + alpha * soft_target_loss(out, t_out, temperature)

    return distill, after_step
