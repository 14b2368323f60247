"""eval.robustness: a classifier's accuracy under adversarial perturbations of its test inputs.

The attacks are the Adversarial Robustness Toolbox's (FGSM: one signed-gradient step of size eps; PGD, Madry et
al.: `pgd_steps` steps of 2.5 eps / steps, projected back into the eps ball, from the clean input) against the
model in its own input space scaled to 0..1 (Task.attack_space); each attack uses the true labels (no label
leaking). A PGD that scores above FGSM at the same eps would mean the attack is not wired right: the test suite
checks it never does.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from aidc.errors import ConfigError

logger = logging.getLogger(__name__)


def metric_name(attack: str, eps: float) -> str:
    return f"robust_accuracy_{attack}_eps{eps:g}"


def check_supported(task) -> None:
    """Refuse eval.robustness for a workload whose inputs are not continuous, before anything trains."""
    from aidc.tasks.base import Task

    if type(task).attack_space is Task.attack_space:
        raise ConfigError(f"eval.robustness: gradient attacks need continuous inputs; task {task.name} reads "
                          f"ids (tokens, users, items): remove eval.robustness from this config")


def robustness(task, model: torch.nn.Module, features: dict, transform: dict, rows: dict, rc) -> dict[str, float]:
    """Accuracy on the first rc.samples test rows, clean and under each attack and eps (metric_name)."""
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    check_supported(task)
    module, to_unit = task.attack_space(model, features, transform)
    n = min(rc.samples, len(rows["label"]))
    x, y = to_unit(rows[task.input_column][:n]), np.asarray(rows["label"][:n], dtype=np.int64)
    module = module.float().eval()
    classifier = PyTorchClassifier(model=module, loss=torch.nn.CrossEntropyLoss(), input_shape=x.shape[1:],
                                   nb_classes=features["num_classes"], clip_values=(0.0, 1.0),
                                   device_type="gpu" if torch.cuda.is_available() else "cpu")
    labels = np.eye(features["num_classes"], dtype=np.float32)[y]

    def accuracy(inputs: np.ndarray) -> float:
        return float((classifier.predict(inputs, batch_size=256).argmax(axis=1) == y).mean())

    out = {"robust_clean_accuracy": accuracy(x), "robust_samples": float(n)}
    for eps in rc.eps:
        for attack in rc.attacks:
            if attack == "fgsm":
                method = FastGradientMethod(classifier, eps=eps, batch_size=256)
            else:
                method = ProjectedGradientDescent(classifier, eps=eps, eps_step=2.5 * eps / rc.pgd_steps,
                                                  max_iter=rc.pgd_steps, num_random_init=0, batch_size=256,
                                                  verbose=False)
            out[metric_name(attack, eps)] = accuracy(method.generate(x=x, y=labels))
    logger.info("robustness on %d test rows: %s", n, out)
    return out
