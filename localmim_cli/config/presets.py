"""Named recipes: the TOML files in `presets/`, shipped inside the package as `localmim_cli.presets`.

A preset file has two tables:

    [preset]     name, kind ("pretrain" | "finetune"), summary (one line), description (what it
                 is for, where its numbers come from, the hardware it assumes), and optionally
                 world_size (how many processes the recipe was written for; default 1) and,
                 for kind "finetune", task (which fine-tuning task: default "classification")
    [settings]   values nested like the settings schema; they form the "preset" layer

A preset name may also be the path of such a file (a user's own preset). The batch and lr
arithmetic the recipes are written in lives here too (`effective_batch`, `scaled_lr`):
effective batch = batch_size (per device) x accum_steps x world size, and the learning rate is
optim.lr when that is set (absolute), else base_lr x effective batch / 256 (MAE's rule, which
the published recipes follow).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib.resources import files
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from localmim_cli.config.tasks import DEFAULT_TASK, FINETUNE_TASKS
from localmim_cli.errors import PresetError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

PACKAGE = "localmim_cli.presets"


class _Header(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    kind: Literal["pretrain", "finetune"]
    summary: str = Field(min_length=1)
    description: str = Field(min_length=1)
    world_size: int = Field(1, ge=1)
    task: str | None = None

    @field_validator("task")
    @classmethod
    def _task_of_finetune(cls, task: str | None, info: ValidationInfo) -> str | None:
        if task is not None and info.data.get("kind") != "finetune":
            raise ValueError(f"{task!r}: only finetune presets name a task")
        if task is not None and task not in FINETUNE_TASKS:
            raise ValueError(f"{task!r} is not a fine-tuning task; choose one of {', '.join(FINETUNE_TASKS)}")
        return task


@dataclass(frozen=True)
class PresetInfo:
    name: str
    kind: str             # which command's settings: "pretrain" or "finetune"
    summary: str          # one line
    description: str      # paragraphs separated by blank lines, each on one line
    path: str             # where it was read from
    world_size: int = 1   # processes (GPUs) the recipe assumes
    builtin: bool = True
    task: str | None = None   # a finetune preset's task (classification, segmentation, ...)


def _builtin_files() -> dict[str, Traversable]:
    return {f.name[:-len(".toml")]: f for f in files(PACKAGE).iterdir()
            if f.name.endswith(".toml") and f.is_file()}


def _read(source: Traversable | Path, builtin: bool) -> tuple[PresetInfo, dict[str, Any]]:
    where = str(source)
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PresetError(f"preset {where}: cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"preset {where}: not valid TOML: {exc}") from None
    extra = sorted(set(data) - {"preset", "settings"})
    if extra or "preset" not in data or "settings" not in data:
        raise PresetError(f"preset {where}: expected exactly a [preset] and a [settings] table"
                          + (f"; found also {extra}" if extra else ""))
    try:
        header = _Header.model_validate(data["preset"])
    except ValidationError as exc:
        lines = "; ".join(f"preset.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise PresetError(f"preset {where}: {lines}") from None
    if not isinstance(data["settings"], dict):
        raise PresetError(f"preset {where}: [settings] must be a table")
    task = header.task or (DEFAULT_TASK if header.kind == "finetune" else None)
    info = PresetInfo(header.name, header.kind, " ".join(header.summary.split()),
                      _unwrap(header.description), where, header.world_size, builtin, task)
    return info, data["settings"]


def _unwrap(text: str) -> str:
    """Paragraphs joined into single lines (files wrap them at 100 columns; terminals rewrap)."""
    paragraphs = [" ".join(p.split()) for p in text.strip().split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p)


def _is_path(name: str) -> bool:
    return name.endswith(".toml") or "/" in name or "\\" in name


def list_presets(kind: str | None = None, task: str | None = None) -> list[PresetInfo]:
    """The shipped presets, by name; only those for `kind` ("pretrain", "finetune") and
    fine-tuning `task` when given."""
    infos = [_read(f, builtin=True)[0] for _, f in sorted(_builtin_files().items())]
    return [i for i in infos if (kind is None or i.kind == kind) and (task is None or i.task == task)]


def load_preset(name: str) -> tuple[PresetInfo, dict[str, Any]]:
    """(info, settings dict nested like the schema) for a shipped preset name or a .toml path."""
    if _is_path(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise PresetError(f"preset file {name}: no such file")
        return _read(path, builtin=False)
    available = _builtin_files()
    if name not in available:
        close = difflib.get_close_matches(name, list(available), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise PresetError(f"no preset named {name!r}; {hint}available: {', '.join(sorted(available))} "
                          f"(or give the path of a preset .toml file)")
    info, values = _read(available[name], builtin=True)
    if info.name != name:
        raise PresetError(f"preset {info.path}: its [preset] name is {info.name!r}, not {name!r}")
    return info, values


# ---------------------------------------------------------------------------------------------
# Batch and lr arithmetic (MAE's convention: lr = base_lr x effective batch / 256)


def _lookup(settings: Any, dotted: str) -> Any:
    """settings.train.batch_size from a settings object or the same path in a nested dict."""
    node = settings
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
        if node is None:
            return None
    return node


def effective_batch(settings: Any, world_size: int = 1) -> int:
    """Images per optimizer step: batch_size (per device) x accum_steps x world_size."""
    if world_size < 1:
        raise ValueError(f"world size must be at least 1, got {world_size}")
    batch = _lookup(settings, "train.batch_size")
    accum = _lookup(settings, "train.accum_steps") or 1
    if batch is None:
        raise ValueError("settings have no train.batch_size")
    return int(batch) * int(accum) * int(world_size)


def scaled_lr(settings: Any, world_size: int = 1) -> float:
    """optim.lr when set (absolute), else optim.base_lr x effective batch / 256."""
    lr = _lookup(settings, "optim.lr")
    if lr is not None:
        return float(lr)
    base_lr = _lookup(settings, "optim.base_lr")
    if base_lr is None:
        raise ValueError("settings have neither optim.lr nor optim.base_lr")
    return float(base_lr) * effective_batch(settings, world_size) / 256


def scaling_line(settings: Any, world_size: int = 1) -> str:
    """The arithmetic of `effective_batch` and `scaled_lr` for `world_size` processes, as one
    line: "effective batch B per device x A accumulation x W devices = E; lr = base_lr x E / 256
    = lr", or the absolute optim.lr when that is set."""
    batch = _lookup(settings, "train.batch_size")
    accum = _lookup(settings, "train.accum_steps") or 1
    eff = effective_batch(settings, world_size)
    line = (f"effective batch {batch} per device x {accum} accumulation x {world_size} "
            f"device{'s' if world_size != 1 else ''} = {eff}; ")
    if _lookup(settings, "optim.lr") is not None:
        return line + f"lr {scaled_lr(settings, world_size):.4g} (set directly by optim.lr)"
    return line + (f"lr = {_lookup(settings, 'optim.base_lr'):.4g} x {eff} / 256 = "
                   f"{scaled_lr(settings, world_size):.4g}")
