"""Which settings schema a command reads; for `finetune`, which task's.

Fine-tuning tasks (classification, segmentation, ...) are siblings: each has its own settings
schema here and its own recipe under `tasks/<name>/`, and `localmim finetune --task NAME` picks
one. Adding a task is one `FinetuneTaskInfo` in `FINETUNE_TASKS`, a settings module and a task
package (with, optionally, the figure `localmim visualize` draws of its runs); nothing else
branches on the task's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from localmim_cli.config.detection import DetectionSettings
from localmim_cli.config.schema import EvaluateSettings, FinetuneSettings, PretrainSettings, Strict
from localmim_cli.config.segmentation import SegmentationSettings
from localmim_cli.errors import UsageError

DEFAULT_TASK = "classification"


@dataclass(frozen=True)
class FinetuneTaskInfo:
    name: str
    schema: type[Strict]   # what `localmim finetune --task NAME` reads
    recipe: str            # "module:attribute" of its `tasks.recipe.Recipe`, imported when a run starts
    summary: str           # one line, for --help and errors
    checkpoint_kind: str   # the `kind` its checkpoints record in meta.json
    evaluator: str         # module with its `evaluate` and `print_table` (`localmim evaluate`)
    figure: str | None = None   # "module:attribute" of its `tasks.task_figure.TaskFigure` (`visualize`)


FINETUNE_TASKS: dict[str, FinetuneTaskInfo] = {info.name: info for info in (
    FinetuneTaskInfo("classification", FinetuneSettings, "localmim_cli.tasks.classification.recipe:RECIPE",
                     "an image classifier on a folder with one subfolder per class", "finetune",
                     "localmim_cli.tasks.classification.evaluate"),
    FinetuneTaskInfo("segmentation", SegmentationSettings, "localmim_cli.tasks.segmentation.recipe:RECIPE",
                     "a semantic segmenter (UperNet) on images with per-pixel class masks", "segmentation",
                     "localmim_cli.tasks.segmentation.evaluate", "localmim_cli.tasks.segmentation.figure:FIGURE"),
    FinetuneTaskInfo("detection", DetectionSettings, "localmim_cli.tasks.detection.recipe:RECIPE",
                     "an object detector with instance masks (Mask R-CNN) on COCO-format annotations", "detection",
                     "localmim_cli.tasks.detection.evaluate", "localmim_cli.tasks.detection.figure:FIGURE"),
)}

# Protocols of `localmim evaluate` that score an encoder (not a fine-tuned model) on another task's data.
PROBE_TASKS: dict[str, str] = {"seg-linear": "segmentation"}


def evaluating_task(checkpoint_kind: str | None, protocol: str) -> FinetuneTaskInfo:
    """The task whose evaluator scores a checkpoint of `checkpoint_kind` (None: not one of ours,
    e.g. a published .pth) under `protocol`: a fine-tuned model's own task, else the probe's."""
    for info in FINETUNE_TASKS.values():
        if info.checkpoint_kind == checkpoint_kind:
            return info
    return FINETUNE_TASKS[PROBE_TASKS.get(protocol, DEFAULT_TASK)]


COMMANDS: dict[str, type[Strict]] = {"pretrain": PretrainSettings, "finetune": FinetuneSettings,
                                     "evaluate": EvaluateSettings}


def finetune_task(name: str | None, flag: str = "--task") -> FinetuneTaskInfo:
    """The fine-tuning task `name` (None: classification); `flag` names where it came from."""
    name = name or DEFAULT_TASK
    if name not in FINETUNE_TASKS:
        raise UsageError(f"{flag} {name!r}: choose one of {', '.join(FINETUNE_TASKS)}")
    return FINETUNE_TASKS[name]


def command_of(schema: type) -> str | None:
    """The command whose settings `schema` is (every fine-tuning task's is `finetune`'s)."""
    if any(info.schema is schema for info in FINETUNE_TASKS.values()):
        return "finetune"
    return next((name for name, s in COMMANDS.items() if s is schema), None)


def all_schemas() -> list[type[Strict]]:
    """The settings of every command and fine-tuning task."""
    return list(dict.fromkeys([*COMMANDS.values(), *(info.schema for info in FINETUNE_TASKS.values())]))


def schema_for(command: str, task: str | None = None, flag: str = "command") -> type[Strict]:
    """The settings model of a command (of fine-tuning `task` for `finetune`); `flag` names
    where the command name came from."""
    if command not in COMMANDS:
        raise UsageError(f"{flag} {command!r}: choose one of {', '.join(COMMANDS)}")
    if command == "finetune":
        return finetune_task(task).schema
    if task is not None:
        raise UsageError(f"--task {task!r}: only finetune has tasks, not {command}")
    return COMMANDS[command]
