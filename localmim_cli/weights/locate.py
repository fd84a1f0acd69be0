"""What a path a user gives holds: the one place that tells checkpoints apart.

    run directory (has checkpoints/)          }
    its checkpoints/ folder (latest.json)     }  CheckpointFolder: one of our checkpoints, its
    a checkpoint folder (meta.json)           }  kind ("pretrain", "finetune") from meta.json
    that folder's model.safetensors           }
    exported encoder (`localmim export`)         ExportFolder: config.json + model.safetensors,
                                                 no meta.json
    .pth / .pt / .safetensors file               TensorFile, by its keys: the authors' LocalMIM ViT
                                                 or Swin layout, a ViT in timm's/MAE's names, or
                                                 our own layout away from its meta.json

Anything else is refused here with a CheckpointError naming the path and listing what is
accepted. Which of these a command can use is the command's business (visualize needs
decoders, export an encoder); this module only says what is there.

Every command reads a run's checkpoints through here, so the run's rules live here too: a
checkpoint folder of a run (reached through latest.json, the newest step-*, or named as
checkpoints/step-N or checkpoints/best) must lie, symlinks followed, inside that run's
checkpoints/ folder, files included (`_contained`); and meta.json is validated like user input
(`CheckpointMeta`: its position, kind and settings), a broken one a CheckpointError naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from localmim_cli.errors import CheckpointError

if TYPE_CHECKING:
    import torch

ACCEPTED = ("a run directory, its checkpoints/ folder, a checkpoint folder (checkpoints/step-N) or its "
            "model.safetensors, an exported encoder folder (config.json + model.safetensors), or a "
            "published LocalMIM ViT or Swin, or MAE, checkpoint file (.pth, .pt or .safetensors)")
TENSOR_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
LATEST = "latest.json"   # {"name": "step-N"} in a checkpoints/ folder (engine/checkpoints.py writes it)

GivenAs = Literal["run", "checkpoints", "checkpoint", "model_file"]
# localmim_vit / localmim_swin: the authors' pretraining layouts (published_*.py);
# vit: a ViT in timm's/MAE's names (MAE pretraining, fine-tuned models, timm);
# ours: localmim's own keys (encoder.*, decoders.*), but no meta.json to rebuild the model from.
Layout = Literal["localmim_vit", "localmim_swin", "vit", "ours"]


@dataclass(frozen=True)
class CheckpointFolder:
    path: Path              # as given
    given_as: GivenAs
    folder: Path            # the checkpoint folder: meta.json, model.safetensors, ...
    meta: dict[str, Any] = field(repr=False)

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "pretrain"))

    @property
    def run_dir(self) -> Path | None:
        """The run directory the checkpoint belongs to, when the layout is a run's."""
        parent = self.folder.parent
        if parent.name == "checkpoints" and (parent.parent / "settings.json").is_file():
            return parent.parent
        return None


@dataclass(frozen=True)
class ExportFolder:
    path: Path              # as given
    folder: Path            # config.json + model.safetensors


@dataclass(frozen=True)
class TensorFile:
    path: Path              # the file read
    layout: Layout
    state: dict[str, "torch.Tensor"] = field(repr=False)
    args: dict[str, Any] = field(repr=False)    # the published run's args ({} when the file has none)


Located = CheckpointFolder | ExportFolder | TensorFile


def unusable(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {why}; pass {ACCEPTED}")


def without_meta(path: Path) -> CheckpointError:
    return CheckpointError(f"{path}: weights in localmim's own key layout but no meta.json beside them, so "
                           "the model cannot be rebuilt; pass the checkpoint folder that holds both, or its "
                           "run directory")


def locate(path: Path | str) -> Located:
    """What `path` holds; a CheckpointError naming it when nothing usable."""
    path = Path(path).expanduser()
    if not path.exists():
        raise unusable(path, "no such checkpoint file or folder")
    if path.is_dir():
        if _ours(path):
            return checkpoint_folder(path)
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return ExportFolder(path, path)
        if (path / "model.safetensors").is_file():
            return tensor_file(path / "model.safetensors")
        raise unusable(path, "a folder with neither checkpoints/ nor meta.json nor model.safetensors")
    if path.name == "model.safetensors":
        if (path.parent / "meta.json").is_file():
            return checkpoint_folder(path)
        if (path.parent / "config.json").is_file():
            return ExportFolder(path, path.parent)
    if path.suffix not in TENSOR_SUFFIXES:
        raise unusable(path, f"not a checkpoint file ({', '.join(TENSOR_SUFFIXES)})")
    return tensor_file(path)


def _ours(folder: Path) -> bool:
    return (folder / "checkpoints").is_dir() or (folder / LATEST).is_file() or folder.name == "checkpoints" \
        or (folder / "meta.json").is_file()


class Position(BaseModel):
    """Where a checkpoint stands in its run (engine.task.Position): whole numbers, none negative."""

    model_config = ConfigDict(extra="forbid", strict=True)

    epoch: int = Field(0, ge=0)
    micro_step: int = Field(0, ge=0)
    step: int = Field(0, ge=0)


class CheckpointMeta(BaseModel):
    """What meta.json must hold for a command to use it; the rest (classes, timm, ...) the task
    that wrote it reads back."""

    model_config = ConfigDict(extra="allow", strict=True)

    format: int | None = None
    kind: str = "pretrain"
    position: Position | None = None
    settings: dict[str, Any] | None = None


def read_meta(meta_file: Path) -> dict[str, Any]:
    """A checkpoint's meta.json, validated (CheckpointMeta); a CheckpointError naming the file
    and the entry when it is not what this program writes."""
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{meta_file}: unreadable metadata ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file}: unreadable metadata (not a JSON object)")
    try:
        CheckpointMeta.model_validate(meta)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: missing" if e["type"] == "missing" else
                             f"{'.'.join(map(str, e['loc']))} = {e['input']!r}: {e['msg']}" for e in exc.errors())
        raise CheckpointError(f"{meta_file}: not valid checkpoint metadata ({problems}); the checkpoint cannot "
                              "be used: restore the file, or use another checkpoint") from None
    return meta


def checkpoint_folder(path: Path | str) -> CheckpointFolder:
    """One of our checkpoints: a run directory's latest, a checkpoints/ folder's latest, a
    checkpoint folder, or its model.safetensors. CheckpointError when `path` is none of these."""
    path = given = Path(path).expanduser()
    given_as: GivenAs = "checkpoint"
    if path.is_file() and path.name == "model.safetensors":
        path, given_as = path.parent, "model_file"
    if (path / "checkpoints").is_dir():
        path, given_as = path / "checkpoints", "run"
    if (path / LATEST).is_file() or path.name == "checkpoints":
        given_as = "run" if given_as == "run" else "checkpoints"
        path = path / _latest(path)
    if path.parent.name == "checkpoints":   # a run's checkpoint: it reads nothing outside the run
        _contained(path, path.parent)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: not a localmim checkpoint (no meta.json); pass a run directory, its "
                              "checkpoints/ folder, a checkpoint folder (checkpoints/step-N) or its model.safetensors")
    return CheckpointFolder(given, given_as, path, read_meta(meta_file))


CHECKPOINT_FILES = ("meta.json", "model.safetensors", "training.pt")


def _contained(folder: Path, checkpoints: Path) -> None:
    """Refuse a checkpoint folder of a run, or a file in it, that leads (through a symlink)
    outside the run's checkpoints/ folder: another run's weights are never read as this run's."""
    root = checkpoints.resolve()
    for item in (folder, *(folder / name for name in CHECKPOINT_FILES)):
        if not (item.exists() or item.is_symlink()):
            continue
        real = item.resolve()
        if root not in real.parents:
            raise CheckpointError(f"{item}: leads outside {checkpoints} (to {real}); a run's checkpoints are "
                                  "read only from its own checkpoints/ folder: replace the link with the "
                                  f"checkpoint itself, or pass {real} directly")


def read_latest(checkpoints: Path) -> str | None:
    """The checkpoint name latest.json holds; None when the file is missing or unreadable (a
    crash before its first write). A name that leads outside the folder is refused: latest.json
    names a sibling folder, nothing else."""
    try:
        name = json.loads((checkpoints / LATEST).read_text())["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(name, str):
        return None
    if Path(name).name != name or name in ("", ".", "..") or name.startswith("."):
        raise CheckpointError(f"{checkpoints / LATEST}: names {name!r}, which is not a checkpoint folder "
                              f"inside {checkpoints}; fix or delete latest.json (the newest step-* is then used)")
    return name


def _latest(checkpoints: Path) -> str:
    """The checkpoint latest.json points at; the newest complete one when it is gone or broken."""
    name = read_latest(checkpoints)
    if name is not None and (checkpoints / name / "meta.json").is_file():
        return name
    found = sorted(p.name for p in checkpoints.glob("step-*") if (p / "meta.json").is_file())
    if not found:
        raise CheckpointError(f"{checkpoints}: no checkpoint here yet")
    return found[-1]


def tensor_file(path: Path) -> TensorFile:
    """A tensor file read safely (published.read_published), told apart by its keys."""
    from localmim_cli.weights.published import VIT_KEYS, is_published_layout, read_published
    from localmim_cli.weights.published_swin import is_published_swin

    state, args = read_published(path)
    layout: Layout
    if is_published_layout(state):
        layout = "localmim_vit"
    elif is_published_swin(state):
        layout = "localmim_swin"
    elif any(k.startswith(("decoders.", "encoder.tap_norms.")) for k in state):
        layout = "ours"
    elif all(k in state for k in VIT_KEYS):
        layout = "vit"
    else:
        keys = sorted(state)
        held = f"{len(keys)} tensors such as {keys[0]!r}" if keys else "no tensors"
        raise unusable(path, f"its keys are in no layout this program reads ({held})")
    return TensorFile(path, layout, state, args)
