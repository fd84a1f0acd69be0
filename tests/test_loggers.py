"""Loggers: TensorBoard and MLflow files written offline and read back with their own readers."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image

from localmim_cli.engine.loggers import Loggers, scalars

RECORDS = [{"epoch": 0, "step": s, "loss": 2.0 / s, "loss_scale0": 1.0 / s, "loss_scale1": 1.0 / s,
            "lr": 1e-3 * s, "grad_norm": 0.5, "images_per_s": 30.0, "data_wait": 0.1} for s in (1, 2, 3)]
MONITOR = {"kind": "monitor", "epoch": 1, "step": 3, "knn_top1": 62.5}


def write_png(path):
    Image.fromarray(np.full((16, 24, 3), 200, np.uint8)).save(path)
    return path


def test_scalars_name_evaluations_by_kind():
    assert scalars(MONITOR) == {"monitor/knn_top1": 62.5}
    assert set(scalars(RECORDS[0])) == {"loss", "loss_scale0", "loss_scale1", "lr", "grad_norm",
                                        "images_per_s", "data_wait"}


def _tensorboard_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_events_hold_every_tag_and_resume_continues_the_curve(tmp_path):
    warnings = []
    logs = Loggers(["tensorboard"], tmp_path, {}, 0, warnings.append)
    for record in RECORDS + [MONITOR]:
        logs.log_metrics(record)
    logs.log_image("reconstruction", write_png(tmp_path / "fig.png"), 3)
    logs.close()
    assert warnings == []
    acc = _tensorboard_scalars(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "loss_scale0", "loss_scale1", "lr", "grad_norm", "images_per_s", "data_wait",
            "monitor/knn_top1"} <= tags
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    assert acc.Tags()["images"] == ["reconstruction"]

    # resumed from a checkpoint at step 2: step 3 is logged again, once. TensorBoard reads event
    # files in name order, whose second-resolution time comes first (then a per-process counter,
    # compared as text): a resume is never in the same second as its run's start, nor here.
    time.sleep(1.1)
    logs = Loggers(["tensorboard"], tmp_path, {}, 2, warnings.append)
    logs.log_metrics({**RECORDS[2], "loss": 0.25})
    logs.close()
    loss = _tensorboard_scalars(tmp_path).Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3] and loss[-1].value == pytest.approx(0.25)


def test_mlflow_run_is_written_offline_and_read_back(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logs = Loggers(["mlflow"], tmp_path, {"train": {"epochs": 2}, "model": {"taps": [1, 2]}}, 0, print)
    for record in RECORDS + [MONITOR]:
        logs.log_metrics(record)
    logs.log_image("reconstruction", write_png(tmp_path / "fig.png"), 3)
    logs.close()
    run_id = (tmp_path / "mlflow_run_id").read_text()
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert client.get_metric_history(run_id, "monitor.knn_top1")[0].value == 62.5
    run = client.get_run(run_id)
    assert run.data.params["train.epochs"] == "2"
    assert any(a.path.startswith("reconstruction") for a in client.list_artifacts(run_id))


def test_two_runs_in_one_process_each_keep_their_own_mlflow_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("first", "second"):   # as two `localmim_cli.pretrain(...)` calls in a notebook
        logs = Loggers(["mlflow"], tmp_path / name, {}, 0, print)
        logs.log_metrics(RECORDS[0])
        logs.close()
    for name in ("first", "second"):
        client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / name / "mlruns").as_uri())
        run_id = (tmp_path / name / "mlflow_run_id").read_text()
        assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)   # what mlflow exported for the runs


def test_a_logger_that_cannot_start_is_named_and_skipped(tmp_path):
    warnings = []
    logs = Loggers(["nope", "tensorboard"], tmp_path, {}, 0, warnings.append)
    logs.log_metrics(RECORDS[0])
    logs.close()
    assert len(warnings) == 1 and "'nope'" in warnings[0]
    assert os.listdir(tmp_path / "tensorboard")
