"""Task registry: ``task.name`` -> a built :class:`Task`.

    addition | reverse | sort     procedural (see :mod:`mhpo.tasks.procedural`), args e.g. {digits: 3}
    count_shapes | compare_counts | bar_chart | add_numbers
                                  procedural with an image (see :mod:`mhpo.tasks.visual`)
    rg:<dataset>                  a reasoning-gym dataset by name, args = its config fields
    dataset                       rows from task.path (JSONL, Parquet, saved HF dataset, hub id)
    image_dataset                 Geometry3K / MathVista-style rows: image, question, choices, answer
                                  (see :mod:`mhpo.tasks.image_datasets`)

An example with an image carries it in ``Example.columns['image']`` (a path, bytes or a PIL image);
the vision prompt encoder (:class:`mhpo.models.multimodal.VisionPromptEncoder`) turns it into pixel inputs.
"""

from __future__ import annotations

from collections.abc import Callable

from mhpo.tasks.base import Example, GeneratorSource, IndexSource, PromptSource, Task
from mhpo.tasks.datasets import build_dataset_task
from mhpo.tasks.image_datasets import build_image_dataset_task
from mhpo.tasks.procedural import PROCEDURAL, build_procedural
from mhpo.tasks.reasoning_gym import PREFIX as RG_PREFIX
from mhpo.tasks.reasoning_gym import build_reasoning_gym
from mhpo.tasks.visual import VISUAL

PROCEDURAL.update(VISUAL)  # visual tasks are procedural tasks whose examples carry an image

# Non-procedural kinds: name -> builder(task_config) -> Task.
KINDS: dict[str, Callable] = {
    "dataset": lambda cfg: build_dataset_task(
        cfg.path, cfg.prompt_column, cfg.answer_column, cfg.split, cfg.eval_split
    ),
    "image_dataset": build_image_dataset_task,
}
# Kinds that take task.args (the others reject them).
KINDS_WITH_ARGS = ("image_dataset",)


def task_names() -> list[str]:
    return [*PROCEDURAL, *KINDS, RG_PREFIX + "<dataset>"]


def build_task(cfg) -> Task:
    """Build the task named by ``cfg.name`` (a TaskConfig); ValueError with one line otherwise."""
    name = cfg.name
    if name in PROCEDURAL:
        return build_procedural(name, cfg.args)
    if name.startswith(RG_PREFIX):
        return build_reasoning_gym(name[len(RG_PREFIX) :], cfg.args, cfg.train_size)
    if name in KINDS:
        if not cfg.path:
            raise ValueError(
                f"task {name!r} needs task.path (a .jsonl / .parquet file, a saved dataset dir or a hub id)"
            )
        if cfg.args and name not in KINDS_WITH_ARGS:
            raise ValueError(f"task {name!r} takes no task.args (got {', '.join(cfg.args)})")
        return KINDS[name](cfg)
    from mhpo.errors import did_you_mean

    raise ValueError(f"unknown task {name!r}{did_you_mean(name, task_names())}; valid tasks: {', '.join(task_names())}")


__all__ = [
    "Example",
    "Task",
    "PromptSource",
    "GeneratorSource",
    "IndexSource",
    "build_task",
    "task_names",
    "PROCEDURAL",
]
