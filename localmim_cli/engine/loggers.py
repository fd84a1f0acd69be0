"""Where a run's metrics go besides metrics.jsonl: TensorBoard, MLflow, W&B, or a plugin.

A logger is found by name in the entry-point group `localmim.loggers`; the entry point names a
factory `(run_dir, settings_dict, start_step) -> RunLogger`. Built-ins register the same way.
`start_step` is the step a resumed run continues after, so a logger can drop what the crashed
process wrote past the checkpoint and the curves continue without a fold (TensorBoard's purge
step; MLflow and W&B reuse the run id kept in the run directory).

Every logger sees the records metrics.jsonl gets: training lines ({"epoch", "step", "loss",
"loss_scaleK", "lr", "grad_norm", "images_per_s", "data_wait"}) and evaluation lines with a
"kind" ("val", "monitor"), logged under "<kind>/<key>". Images (reconstruction figures) come as
PNG files. A logger that fails to start is reported by name and the run goes on without it.
"""

from __future__ import annotations

import json
import os
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Protocol

from localmim_cli.engine.resumes import flatten
from localmim_cli.errors import PluginError

GROUP = "localmim.loggers"
SKIP = {"epoch", "step", "kind"}   # record keys that are positions, not values


class RunLogger(Protocol):
    def log_metrics(self, record: dict[str, Any]) -> None: ...
    def log_image(self, tag: str, png: Path, step: int) -> None: ...
    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a record, named as the logger shows them ("monitor/knn_top1")."""
    prefix = f"{record['kind']}/" if "kind" in record else ""
    return {prefix + k: float(v) for k, v in record.items()
            if k not in SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardLogger:
    """Event files in RUN/tensorboard (`tensorboard --logdir RUN`)."""

    def __init__(self, run_dir: Path, settings: dict[str, Any], start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: on resume, events after the checkpoint's step (written by the process
        # that died; the resumed run logs those steps again) are dropped from the curves
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log_metrics(self, record: dict[str, Any]) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])
        self.writer.flush()

    def log_image(self, tag: str, png: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(png) as img:
            self.writer.add_image(tag, np.asarray(img.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


_RUN_STORES: set[str] = set()   # tracking URIs this process set for runs' own RUN/mlruns


class MLflowLogger:
    """An MLflow run in RUN/mlruns (a file store: no server needed; `mlflow ui --backend-store-uri
    RUN/mlruns`), or at $MLFLOW_TRACKING_URI when that is set. Needs `pip install mlflow-skinny`."""

    def __init__(self, run_dir: Path, settings: dict[str, Any], start_step: int):
        import mlflow

        # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, so a second run in this
        # process (the Python API) must tell the user's setting from the one an earlier run left.
        if os.environ.get("MLFLOW_TRACKING_URI") in (None, "", *_RUN_STORES):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")   # the offline store we ask for
            uri = (run_dir / "mlruns").resolve().as_uri()
            _RUN_STORES.add(uri)
            mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("localmim")
        id_file = run_dir / "mlflow_run_id"
        run_id = id_file.read_text().strip() if start_step and id_file.is_file() else None
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_dir.name)
        id_file.write_text(self.run.info.run_id)
        if run_id is None:
            flat = {k: json.dumps(v) if isinstance(v, (list, dict)) else v
                    for k, v in flatten(settings).items()}
            mlflow.log_params({k: v for k, v in flat.items() if v is not None})

    def log_metrics(self, record: dict[str, Any]) -> None:
        self.mlflow.log_metrics({k.replace("/", "."): v for k, v in scalars(record).items()}, step=record["step"])

    def log_image(self, tag: str, png: Path, step: int) -> None:
        self.mlflow.log_artifact(str(png), artifact_path=f"{tag}/step-{step:08d}")

    def close(self) -> None:
        self.mlflow.end_run()


class WandbLogger:
    """A Weights & Biases run, offline unless WANDB_MODE says otherwise (files in RUN/wandb;
    `wandb sync` uploads them later). Needs `pip install wandb`."""

    def __init__(self, run_dir: Path, settings: dict[str, Any], start_step: int):
        import wandb

        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id)
        self.wandb = wandb
        self.run = wandb.init(project="localmim", name=run_dir.name, id=run_id, resume="allow",
                              dir=str(run_dir), config=settings, mode=os.environ.get("WANDB_MODE", "offline"))

    def log_metrics(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=record["step"])

    def log_image(self, tag: str, png: Path, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(png))}, step=step)

    def close(self) -> None:
        self.run.finish()


def factory(name: str) -> Callable[[Path, dict[str, Any], int], RunLogger]:
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    if name not in found:
        raise PluginError(f"no logger named {name!r}; installed: {', '.join(sorted(found)) or 'none'} "
                          "(train.loggers)")
    return found[name].load()


class Loggers:
    """Every configured logger, each started, fed and closed on its own: one that fails says so
    (with `warn`) and is dropped, so a tracker's trouble never stops training."""

    def __init__(self, names: list[str], run_dir: Path, settings: dict[str, Any], start_step: int,
                 warn: Callable[[str], None]):
        self.warn = warn
        self.active: dict[str, RunLogger] = {}
        for name in names:
            try:
                self.active[name] = factory(name)(run_dir, settings, start_step)
            except ImportError as exc:
                warn(f"logger {name!r} is not available ({exc}); the run goes on without it")
            except Exception as exc:   # noqa: BLE001 - a tracker must not take the run down
                warn(f"logger {name!r} failed to start: {type(exc).__name__}: {exc}")

    def _each(self, call: Callable[[RunLogger], None], what: str) -> None:
        for name, logger in list(self.active.items()):
            try:
                call(logger)
            except Exception as exc:   # noqa: BLE001
                self.warn(f"logger {name!r} failed to {what} and is switched off: {type(exc).__name__}: {exc}")
                del self.active[name]

    def log_metrics(self, record: dict[str, Any]) -> None:
        self._each(lambda logger: logger.log_metrics(record), "log metrics")

    def log_image(self, tag: str, png: Path, step: int) -> None:
        self._each(lambda logger: logger.log_image(tag, png, step), "log an image")

    def close(self) -> None:
        self._each(lambda logger: logger.close(), "close")
