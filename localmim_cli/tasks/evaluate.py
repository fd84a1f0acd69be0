"""`localmim evaluate`: how good a checkpoint is on a labelled folder.

Each fine-tuning task scores its own models (config/tasks.py names its evaluator module):
    classification  a fine-tuned classifier's head, or knn / linear / fewshot probes of an
                    encoder (tasks/classification/evaluate.py)
    segmentation    a segmenter's mIoU, mAcc, aAcc and per-class IoU, whole-image or sliding
                    window; the seg-linear probe of an encoder (tasks/segmentation/evaluate.py)
    detection       a detector's COCO box and mask AP (tasks/detection/evaluate.py)
The checkpoint's recorded kind picks the task; an encoder (a pretrain run, a published or
exported one) goes to classification, or to the task whose probe `--protocol` names.

Results go to a table on the terminal and to JSON: one new file per evaluation,
`<run dir>/evaluations/<UTC time>-<protocol>.json` (`./evaluations/...` for a checkpoint outside a
run), so a rerun never overwrites an earlier result; or the file `--out` names (replaced only
with `--overwrite`, and only when it is an earlier results file: engine/outputs.py).
"""

from __future__ import annotations

import datetime as dt
import importlib
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from localmim_cli.config.schema import EvaluateSettings


def evaluator_for(checkpoint: Path, protocol: str) -> ModuleType:
    """The evaluator module of the task `checkpoint` was fine-tuned for (an encoder's: by `protocol`)."""
    from localmim_cli.config.tasks import evaluating_task
    from localmim_cli.errors import CheckpointError
    from localmim_cli.weights.locate import checkpoint_folder

    try:
        kind: str | None = checkpoint_folder(checkpoint).kind
    except CheckpointError:   # not one of ours (a published .pth, an export): an encoder
        kind = None
    return importlib.import_module(evaluating_task(kind, protocol).evaluator)


def default_output(run_dir: Path | None, protocol: str, now: dt.datetime | None = None) -> Path:
    """A file no earlier evaluation wrote: evaluations/<UTC time>-<protocol>[-N].json."""
    base = (run_dir if run_dir is not None else Path.cwd()) / "evaluations"
    stamp = (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    path, n = base / f"{stamp}-{protocol}.json", 1
    while path.exists():
        n += 1
        path = base / f"{stamp}-{protocol}-{n}.json"
    return path


def run_evaluation(checkpoint: Path, data: Path, settings: "EvaluateSettings", console: "Console",
                   out: Path | None = None, overwrite: bool = False) -> tuple[dict[str, Any], Path]:
    """Evaluate, write the JSON, return (results, path written). An existing `out` is replaced
    only when it is an earlier results file of localmim's and `overwrite` is set."""
    from localmim_cli.engine import atomic, outputs
    from localmim_cli.version import __version__

    if out is not None:   # before any work: an --out that will be refused costs nothing
        outputs.check_file(out, outputs.EVALUATION, overwrite)
    evaluator = evaluator_for(checkpoint, settings.protocol)
    found, run_dir = evaluator.evaluate(checkpoint, data, settings, console)
    results: dict[str, Any] = {
        outputs.WRITTEN_BY: outputs.mark("evaluate"),   # what lets a later --overwrite replace this file
        "protocol": found["protocol"], "checkpoint": str(checkpoint), **found,
        "localmim": __version__, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings.model_dump(mode="json"),
    }
    path = out or default_output(run_dir, results["protocol"])
    outputs.check_file(path, outputs.EVALUATION, overwrite)   # still so after the work
    atomic.write_json(path, results)
    return results, path


def print_results(results: dict[str, Any], path: Path, console: "Console") -> None:
    """The evaluating task's tables, then where the JSON is."""
    evaluator_for(Path(results["checkpoint"]), results["protocol"]).print_table(results, console)
    console.print(f"results: {path}")


def evaluate(checkpoint: Path | str, data: Path | str, settings: "EvaluateSettings | None" = None,
             out: Path | str | None = None, console: "Console | None" = None,
             overwrite: bool = False) -> tuple[dict[str, Any], Path]:
    """Evaluate a checkpoint on a labelled folder; returns (results, the JSON file written)."""
    from rich.console import Console

    from localmim_cli.config.schema import EvaluateSettings

    console = console or Console(soft_wrap=True)
    return run_evaluation(Path(checkpoint), Path(data), settings or EvaluateSettings(), console,
                          Path(out) if out is not None else None, overwrite)
