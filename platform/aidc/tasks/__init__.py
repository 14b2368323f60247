"""One module per workload: the glue between a dataset, a model, a loss, metrics and request shapes.

TASKS maps the `task` field of a job config to its implementation.
"""

from aidc.tasks.base import Task
from aidc.tasks.image import ImageClassification

TASKS: dict[str, Task] = {"image_classification": ImageClassification()}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}") from None


__all__ = ["TASKS", "Task", "get_task"]
