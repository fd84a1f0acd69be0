"""README's "Using it" commands, run line by line as written, on the built-in sample photos.

Each line runs in bash, in order, in a scratch folder that holds what the lines name (~/photos,
some.jpg, more/, LABELLED/). What would take hours at the recipes' sizes is shrunk only through
the documented environment layer (LOCALMIM_SECTION__FIELD, above the preset, below the flags), so
the command text is exactly the README's and every setting it resolves is shown by
`config show` with its env:... label.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env
from labelled_photos import make_labelled_sample_set
from localmim_cli.data.sample_photos import sample_photo_paths

README = Path(__file__).resolve().parent.parent / "README.md"

# Per command, the LOCALMIM_* variables that shrink it: a 32 px, 4-layer, 32-wide ViT, one epoch
# of batches of 4 on the CPU, no loader processes.
TINY = {
    "pretrain": {"MODEL__IMG_SIZE": "32", "MODEL__TAPS": "[1, 2, 3, 4]",
                 "MODEL__ENCODER__OPTIONS": '{"patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}',
                 "MODEL__DECODER__WIDTH": "32", "MODEL__DECODER__NUM_HEADS": "2",
                 "TRAIN__EPOCHS": "1", "TRAIN__BATCH_SIZE": "4", "TRAIN__ACCUM_STEPS": "1",
                 "TRAIN__DEVICE": "cpu", "TRAIN__PRECISION": "fp32", "DATA__WORKERS": "0"},
    "finetune": {"TRAIN__EPOCHS": "1", "TRAIN__BATCH_SIZE": "16", "TRAIN__DEVICE": "cpu",
                 "TRAIN__PRECISION": "fp32", "DATA__WORKERS": "0"},
}


def using_it_commands() -> list[str]:
    """The command lines of the shell blocks of README's "Using it", up to its first subsection
    (### Many GPUs further down needs GPUs and a dataset; test_pretrain runs torchrun on gloo)."""
    text = README.read_text()
    section = re.search(r"^## Using it\n(.*?)(?=^##)", text, flags=re.M | re.S).group(1)
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S):
        lines += [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    return lines


def scratch(root: Path) -> None:
    """What the README lines refer to: a photo folder, single images, a labelled folder."""
    photos = root / "photos"
    photos.mkdir()
    for path in sample_photo_paths():
        shutil.copy(path, photos / path.name)
    shutil.copy(sample_photo_paths()[0], root / "some.jpg")
    (root / "more").mkdir()
    shutil.copy(sample_photo_paths()[1], root / "more" / sample_photo_paths()[1].name)
    make_labelled_sample_set(root / "LABELLED", n_per_class=10, size=48, seed=0)


def test_every_using_it_command_runs_as_written(tmp_path):
    commands = using_it_commands()
    assert len(commands) >= 10 and commands[0] == "source .venv/bin/activate"
    scratch(tmp_path)
    bin_dir = str(Path(sys.executable).parent)   # the venv's bin: what `source .venv/bin/activate` puts first
    printed = {}
    for line in commands[1:]:
        words = line.split()
        assert words[0] == "localmim", line
        env = cli_env(HOME=str(tmp_path), LOCALMIM_HOME=str(tmp_path / "home"),
                      PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
                      **{f"LOCALMIM_{k}": v for k, v in TINY.get(words[1], {}).items()})
        r = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, f"{line}\n{r.stdout}\n{r.stderr}"
        assert "Traceback" not in r.stderr, r.stderr
        printed[line.split("#")[0].strip()] = r.stdout

    # What the lines claim they leave behind.
    run = tmp_path / "runs" / "b16"
    resumed = printed["localmim pretrain ~/photos --preset vit-b16-hog-1gpu --out runs/b16 --resume"]
    assert "already finished at epoch 1" in resumed     # one tiny epoch: nothing left to continue
    assert json.loads((run / "settings.json").read_text())["model"]["encoder"]["options"]["embed_dim"] == 32
    assert (tmp_path / "fig.png").stat().st_size > 0
    assert (tmp_path / "runs" / "ft" / "checkpoints" / "best" / "model.safetensors").is_file()
    assert len(list((tmp_path / "runs" / "ft" / "evaluations").glob("*-classifier.json"))) == 1
    assert len(list((run / "evaluations").glob("*-knn.json"))) == 1
    assert (tmp_path / "exported" / "config.json").is_file()


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_tiny_overrides_are_settings_the_command_knows(command):
    """The doc test's variables must be real settings: a typo would be an error, not a no-op."""
    from localmim_cli.config.resolve import resolve_settings
    from localmim_cli.config.schema import FinetuneSettings, PretrainSettings

    schema = PretrainSettings if command == "pretrain" else FinetuneSettings
    resolved = resolve_settings(schema, environ={f"LOCALMIM_{k}": v for k, v in TINY[command].items()})
    assert {f"env:LOCALMIM_{k}" for k in TINY[command]} <= set(resolved.provenance.values())


# The segmentation block's variables: the tiny ViT above, 64 px crops, 6 iterations.
SEGMENT = {"MODEL__IMG_SIZE": "64", "DATA__SCALE": "[128, 64]", "MODEL__DECODER_CHANNELS": "32",
           "MODEL__AUX_CHANNELS": "16", "TRAIN__ITERATIONS": "6", "OPTIM__WARMUP_STEPS": "2",
           "VAL__EVERY": "3", "VAL__STRIDE": "43", "TRAIN__BATCH_SIZE": "4", "TRAIN__DEVICE": "cpu",
           "TRAIN__PRECISION": "fp32", "DATA__WORKERS": "0", "TRAIN__LOGGERS": "[]"}


# `benchmark --preset seg-/det-...` lines: the recipe's step on a ViT-Ti/16 at 64 px, batch 2, small heads.
BENCH = {"MODEL__ARCH": "vit_tiny_patch16_224", "MODEL__IMG_SIZE": "64", "TRAIN__BATCH_SIZE": "2",
         "TRAIN__DEVICE": "cpu", "TRAIN__PRECISION": "fp32"}
BENCH_SEG = {**BENCH, "VAL__STRIDE": "43", "MODEL__DECODER_CHANNELS": "32", "MODEL__AUX_CHANNELS": "16"}
BENCH_DET = {**BENCH, "MODEL__NECK_CHANNELS": "16", "MODEL__BOX_FC": "32", "MODEL__MASK_CONVS": "1"}


def section_commands(title: str) -> list[str]:
    text = README.read_text()
    section = re.search(rf"^## {title}\n(.*?)(?=^## )", text, flags=re.M | re.S).group(1)
    return [line for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S)
            for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_every_segmentation_command_runs_as_written(tmp_path):
    from segmentation_photos import make_ade20k_set, make_pairs_set

    commands = section_commands("Segmentation")
    assert len(commands) >= 5
    (tmp_path / "photos").mkdir()
    for path in sample_photo_paths():
        shutil.copy(path, tmp_path / "photos" / path.name)
    make_pairs_set(tmp_path / "SCENES", 12, 96)
    make_ade20k_set(tmp_path / "ADEChallengeData2016", 4, 2, 96, ade_ids=(3, 13, 127, 143))
    bin_dir = str(Path(sys.executable).parent)
    printed = {}
    for line in commands:
        words = line.split()
        assert words[0] == "localmim", line
        shrink = (TINY["pretrain"] if words[1] == "pretrain" else BENCH_SEG if words[1] == "benchmark"
                  else {} if "ade20k" in line else SEGMENT)
        env = cli_env(HOME=str(tmp_path), LOCALMIM_HOME=str(tmp_path / "home"),
                      PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
                      **{f"LOCALMIM_{k}": v for k, v in shrink.items()})
        r = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{line}\n{r.stdout}\n{r.stderr}"
        assert "Traceback" not in r.stderr, r.stderr
        printed[line.split("#")[0].strip()] = r.stdout

    run = tmp_path / "runs" / "seg"
    assert json.loads((run / "settings.json").read_text())["task"] == "segmentation"
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
    assert "already finished" in printed["localmim finetune SCENES/ --preset seg-small --out runs/seg --resume"]
    plan = printed["localmim finetune ADEChallengeData2016/ --preset seg-vit-b-ade20k --dry-run"]
    assert "ade20k layout, 150 classes" in plan and "160000 steps" in plan
    figure = json.loads((run / "figures" / "segmentation.json").read_text())
    assert [Path(i["mask"]).name for i in figure["images"]] == ["scene_0000.png", "scene_0001.png"]
    assert "segmentation / classification" in printed["localmim benchmark --preset seg-vit-b-ade20k --steps 5"]


# The detection block's variables: the tiny ViT above, 64 px crops, a small neck, 4 iterations.
DETECT = {"MODEL__IMG_SIZE": "64", "MODEL__NECK_CHANNELS": "16", "MODEL__BOX_FC": "32", "MODEL__MASK_CONVS": "1",
          "MODEL__ROI_BATCH": "32", "MODEL__ANCHOR_SIZES": "[8, 16, 32, 64, 128]", "TRAIN__ITERATIONS": "4",
          "OPTIM__WARMUP_STEPS": "1", "VAL__EVERY": "2", "TRAIN__BATCH_SIZE": "2", "TRAIN__DEVICE": "cpu",
          "TRAIN__PRECISION": "fp32", "DATA__WORKERS": "0", "TRAIN__LOGGERS": "[]"}


def test_every_detection_command_runs_as_written(tmp_path):
    from detection_photos import make_detection_set

    commands = section_commands("Detection")
    assert len(commands) >= 6
    (tmp_path / "photos").mkdir()
    for path in sample_photo_paths():
        shutil.copy(path, tmp_path / "photos" / path.name)
    make_detection_set(tmp_path / "SHAPES", 6, 2, 64)
    make_detection_set(tmp_path / "coco", 4, 2, 64, layout="coco")
    bin_dir = str(Path(sys.executable).parent)
    env = cli_env(HOME=str(tmp_path), LOCALMIM_HOME=str(tmp_path / "home"),
                  PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
                  **{f"LOCALMIM_{k}": v for k, v in TINY["pretrain"].items()})
    r = subprocess.run(["bash", "-c", "localmim pretrain ~/photos --preset demo --out runs/demo"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    printed = {}
    for line in commands:
        words = line.split()
        assert words[0] == "localmim", line
        shrink = (DETECT if words[1] == "finetune" and "det-vit-b-coco" not in line
                  else BENCH_DET if words[1] == "benchmark" else {})
        env = cli_env(HOME=str(tmp_path), LOCALMIM_HOME=str(tmp_path / "home"),
                      PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
                      **{f"LOCALMIM_{k}": v for k, v in shrink.items()})
        r = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{line}\n{r.stdout}\n{r.stderr}"
        assert "Traceback" not in r.stderr, r.stderr
        printed[line.split("#")[0].strip()] = r.stdout

    run = tmp_path / "runs" / "det"
    assert json.loads((run / "settings.json").read_text())["task"] == "detection"
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
    assert "already finished" in printed["localmim finetune SHAPES/ --preset det-small --out runs/det --resume"]
    assert (tmp_path / "exports" / "det-d2" / "model_final.pth").is_file()
    assert (tmp_path / "exports" / "demo-mmdet" / "backbone.pth").is_file()
    plan = printed["localmim finetune coco/ --preset det-vit-b-coco --dry-run"]
    assert "coco layout, 3 categories" in plan and "184375 steps" in plan
    figure = json.loads((run / "figures" / "detections.json").read_text())
    assert len(figure["images"]) == 2 and figure["score_threshold"] == 0.3
    assert "detection / classification" in printed["localmim benchmark --preset det-vit-b-coco --steps 5"]
