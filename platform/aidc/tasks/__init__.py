"""One module per workload: the glue between a dataset, a model, a loss, metrics and request shapes.

TASKS maps the `task` field of a job config to its implementation; importing this package registers each
task with aidc.config (its model schemas and config rules), so a new workload is a task module, a model module
and a YAML.
"""

import aidc.data.sources  # noqa: F401 - registers the named datasets data.source takes
from aidc.config import register_workload
from aidc.tasks.base import Task
from aidc.tasks.causal_lm import CausalLM
from aidc.tasks.image import ImageClassification
from aidc.tasks.lm import LanguageModel
from aidc.tasks.recsys import Recommendation
from aidc.tasks.speech import SpeechClassification
from aidc.tasks.tabular import TabularClassification
from aidc.tasks.text import TextClassification

TASKS: dict[str, Task] = {
    t.name: t
    for t in (ImageClassification(), TextClassification(), LanguageModel(), Recommendation(), TabularClassification(),
              CausalLM(), SpeechClassification())
}
for _task in TASKS.values():  # job configs can name them now (aidc.config reads their schemas and rules)
    register_workload(_task)


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}") from None


def preprocess(cfg, root: str | None = None, force: bool = False):
    """Build (or reuse) the dataset version of job config `cfg`, encoded by its task; returns (version, reused).
    (aidc.data.pipeline.preprocess with the workload looked up: the data layer imports no task.)"""
    from aidc.data.pipeline import preprocess as run_pipeline

    return run_pipeline(cfg, get_task(cfg.task), root=root, force=force)


__all__ = ["TASKS", "Task", "get_task", "preprocess"]
