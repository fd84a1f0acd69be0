"""What localmim never does, tried as a hostile user would, through the real CLI.

Each numbered case builds the hostile input (a misused --out, a corrupt run file, weights that
are not weights), runs the command line, and asserts the refusal (one line naming the path, exit
2) or the safe, documented result, and that every file that was there before is byte for byte
what it was (`Tree`). The README's "What localmim never does" points here.

One tiny pretrain run serves the module (tiny_runs.py); each case corrupts its own copy. The
first command of each case runs in a fresh interpreter (`run_cli`), its variants through the
console entry point in this process (`run_main`: the same code, no interpreter start-up).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import cli_env, run_cli
from localmim_cli.engine import checkpoints
from tiny_runs import photo_sets, run_main, tiny_pretrain_run

pytestmark = pytest.mark.usefixtures("one_thread")

LOCK = ".localmim.lock"   # a run's lock file: whoever held it last writes its pid there, by design


class Tree:
    """The bytes of every file under a folder (symlinks as their targets), taken now; `kept()`
    asserts that every one of them is still there, unchanged (new files are allowed unless
    `nothing_new`). The lock file is left out: it is localmim's own, rewritten by every run."""

    def __init__(self, root: Path, *, skip: tuple[Path, ...] = ()):
        self.root, self.skip = root, tuple(p.resolve() for p in skip)
        self.files = self._read()

    def _read(self) -> dict[str, bytes | str]:
        files: dict[str, bytes | str] = {}
        for folder, dirs, names in os.walk(self.root):
            here = Path(folder)
            for name in names + [d for d in dirs if (here / d).is_symlink()]:
                path = here / name
                if name == LOCK or any(s == path.resolve() or s in path.resolve().parents for s in self.skip):
                    continue
                rel = str(path.relative_to(self.root))
                files[rel] = f"-> {os.readlink(path)}" if path.is_symlink() else path.read_bytes()
        return files

    def kept(self, *, nothing_new: bool = True) -> None:
        after = self._read()
        lost = sorted(k for k in self.files if k not in after)
        changed = sorted(k for k in self.files if k in after and after[k] != self.files[k])
        assert not lost and not changed, f"lost {lost}, changed {changed}"
        if nothing_new:
            new = sorted(set(after) - set(self.files))
            assert not new, f"written: {new}"


def refused(result: subprocess.CompletedProcess | tuple[int, str], *phrases: str | Path) -> str:
    """Exit 2, one message (a soft-wrapped line) and no traceback, holding every phrase."""
    code, err = (result.returncode, result.stderr) if isinstance(result, subprocess.CompletedProcess) else result
    message = " ".join(err.split())
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 4, err
    for phrase in phrases:
        assert str(phrase) in message, f"{phrase!r} not in: {message}"
    return message


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return tiny_pretrain_run(tmp_path_factory)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return photo_sets(tmp_path_factory)[0]


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """This case's own copy of the tiny run."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run", symlinks=True))


def step_folder(run: Path) -> Path:
    return checkpoints.load(run).path


def an_image(photos: Path) -> Path:
    return sorted(photos.rglob("*.png"))[0]


def rewrite_weights(model_file: Path, change) -> None:
    state = load_file(str(model_file))
    save_file(change(state), str(model_file))


def with_nan(state: dict) -> dict:
    """One NaN in the encoder's first block: what every command would compute with."""
    key = next(k for k in sorted(state) if k.startswith("encoder.blocks.0."))
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    return state


# --- data loss -----------------------------------------------------------------------------------

def test_1_export_never_writes_over_or_inside_its_source_run(run, tmp_path, capsys):
    tree = Tree(tmp_path)
    refused(run_cli("export", run, "--out", run, "--overwrite"), run.resolve(), "which this command reads")
    refused(run_main(capsys, "export", run, "--out", run / "exported"), "lies inside", run.resolve())
    refused(run_main(capsys, "export", step_folder(run), "--out", run, "--overwrite"), run.resolve(),
            "the run")   # named by a checkpoint of it: still the run
    tree.kept()


def test_2_only_an_earlier_export_is_replaced_and_only_a_run_by_a_run(run, tmp_path, capsys, photos):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    tree = Tree(tmp_path)
    refused(run_cli("export", run, "--out", mine, "--overwrite"), mine, "not a localmim export folder",
            "refusing to delete")
    refused(run_main(capsys, "export", run, "--out", mine), mine, "not empty")
    refused(run_main(capsys, "export", run, "--out", notes, "--overwrite"), notes, "is a file")
    # the same rule for the run directory of pretrain and finetune (and an --init is never replaced)
    refused(run_main(capsys, "pretrain", "--out", mine, "--overwrite", "--dry-run"), mine, "not a localmim run")
    refused(run_main(capsys, "finetune", photos, "--init", run, "--out", run, "--overwrite", "--device", "cpu"),
            run.resolve(), "which this command reads")
    tree.kept()

    # The safe result: an earlier export is replaced by a new one; nothing else changes.
    exported = tmp_path / "exported"
    assert run_main(capsys, "export", run, "--out", exported)[0] == 0
    earlier = (exported / "config.json").read_bytes()
    (exported / "model.safetensors").write_bytes(b"an old export")
    tree = Tree(tmp_path, skip=(exported,))
    assert run_main(capsys, "export", run, "--out", exported, "--overwrite")[0] == 0
    tree.kept()
    assert json.loads((exported / "config.json").read_text())["localmim"] == json.loads(earlier)["localmim"]
    assert load_file(str(exported / "model.safetensors"))   # the new weights, readable


def test_3_nothing_is_written_inside_checkpoints(run, tmp_path, capsys, photos):
    tree = Tree(tmp_path)
    model_file = step_folder(run) / "model.safetensors"
    refused(run_cli("visualize", run, an_image(photos), "--out", model_file), model_file, "inside",
            "checkpoints")
    for out in (run / "checkpoints" / "figure.png", step_folder(run) / "figure.png"):
        refused(run_main(capsys, "visualize", run, an_image(photos), "--out", out), "nothing is ever written")
    refused(run_main(capsys, "export", run, "--out", run / "checkpoints" / "exported"), "inside")
    refused(run_main(capsys, "evaluate", run, photos, "--out", step_folder(run) / "r.json"), "inside")
    refused(run_main(capsys, "pretrain", "--out", run / "checkpoints", "--overwrite", "--dry-run"), "inside")
    tree.kept()


def test_4_a_file_is_overwritten_only_when_localmim_wrote_it_and_overwrite_says_so(run, tmp_path, capsys,
                                                                                  photos):
    from PIL import Image

    existing = tmp_path / "existing.txt"
    existing.write_text("a file of mine")
    holiday = tmp_path / "holiday.png"
    Image.new("RGB", (8, 8), "red").save(holiday)
    (tmp_path / "notes.json").write_text('{"mine": true}')
    image = an_image(photos)
    tree = Tree(tmp_path)
    refused(run_cli("visualize", run, image, "--out", existing), existing, "not a figure written by")
    for args in (["--out", holiday], ["--out", holiday, "--overwrite"]):   # a PNG, but not ours
        refused(run_main(capsys, "visualize", run, image, *args), holiday, "refusing to overwrite")
    refused(run_main(capsys, "visualize", run, image, "--out", tmp_path / "notes.png"),   # its sidecar is
            tmp_path / "notes.json", "not a figure sidecar")                                 # the user's
    refused(run_main(capsys, "evaluate", run, photos, "--out", existing, "--overwrite"), existing,
            "not a results file")
    tree.kept()

    # Figures: a rerun never replaces an earlier one unless --overwrite; then only that one.
    fig = tmp_path / "fig.png"
    assert run_main(capsys, "visualize", run, image, "--out", fig)[0] == 0
    tree = Tree(tmp_path)
    refused(run_main(capsys, "visualize", run, image, "--out", fig, "--seed", 1), fig, "pass --overwrite")
    tree.kept()
    tree = Tree(tmp_path, skip=(fig, fig.with_suffix(".json")))
    assert run_main(capsys, "visualize", run, image, "--out", fig, "--seed", 1, "--overwrite")[0] == 0
    assert json.loads(fig.with_suffix(".json").read_text())["seed"] == 1
    # the default figure: the next free name when one is there
    assert run_main(capsys, "visualize", run, image)[0] == 0
    assert run_main(capsys, "visualize", run, image)[0] == 0
    assert (run / "figures" / "reconstruction.png").is_file() and (run / "figures" / "reconstruction-2.png").is_file()
    tree.kept(nothing_new=False)

    # Results files alike.
    results = tmp_path / "results.json"
    knn = ("--protocol", "knn", "--workers", 0, "--device", "cpu", "--no-cache")
    assert run_main(capsys, "evaluate", run, photos, *knn, "--out", results)[0] == 0
    tree = Tree(tmp_path)
    refused(run_main(capsys, "evaluate", run, photos, *knn, "--out", results), results, "pass --overwrite")
    tree.kept()
    tree = Tree(tmp_path, skip=(results,))
    assert run_main(capsys, "evaluate", run, photos, *knn, "--out", results, "--overwrite")[0] == 0
    tree.kept()


# --- tracebacks -----------------------------------------------------------------------------------

def test_5_a_settings_json_that_is_not_json_is_one_line(run, tmp_path):
    (run / "settings.json").write_text('{"train": {"epochs": 2,')
    tree = Tree(tmp_path)
    refused(run_cli("pretrain", "--out", run, "--resume", "--epochs", 2), run / "settings.json", "not valid JSON")
    tree.kept()


def test_6_a_checkpoint_position_of_the_wrong_types_is_one_line(run, tmp_path, capsys):
    meta_file = step_folder(run) / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["position"] = {"epoch": "x", "step": -5, "micro_step": None}
    meta_file.write_text(json.dumps(meta))
    tree = Tree(tmp_path)
    refused(run_cli("pretrain", "--out", run, "--resume", "--epochs", 2), meta_file,
            "position.epoch = 'x'", "position.step = -5", "position.micro_step = None")
    refused(run_main(capsys, "export", run, "--out", tmp_path / "exported"), meta_file, "position.epoch")
    tree.kept()


# --- silent success on garbage ---------------------------------------------------------------------

def test_7_pointers_never_lead_out_of_the_run(run, tmp_path, capsys, photos):
    other = Path(shutil.copytree(run, tmp_path / "other-run", symlinks=True))
    other_tree = Tree(other)
    link = run / "checkpoints" / "step-00000999"
    link.symlink_to(step_folder(other), target_is_directory=True)
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"name": link.name}))
    tree = Tree(tmp_path)
    refused(run_cli("export", run, "--out", tmp_path / "exported"), link, "leads outside", run / "checkpoints")
    for args in (["pretrain", "--out", run, "--resume", "--epochs", 3],
                 ["evaluate", run, photos, "--protocol", "knn", "--workers", 0, "--device", "cpu"],
                 ["visualize", run, an_image(photos), "--out", tmp_path / "fig.png"],
                 ["finetune", photos, "--init", run, "--dry-run", "--device", "cpu"]):
        refused(run_main(capsys, *args), link, "leads outside")
    tree.kept()
    # a file of a checkpoint folder, linked out of the run, alike
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"name": step_folder(other).name}))
    model_file = step_folder(run) / "model.safetensors"
    model_file.unlink()
    model_file.symlink_to(step_folder(other) / "model.safetensors")
    refused(run_main(capsys, "export", run, "--out", tmp_path / "exported"), model_file, "leads outside")
    # the other run, named itself, is read as itself; and nothing of it changed
    assert run_main(capsys, "export", step_folder(other), "--out", tmp_path / "exported")[0] == 0
    other_tree.kept()


def test_8_a_broken_manifest_is_refused_not_rewritten(run, tmp_path, capsys):
    manifest = run / "manifest.json"
    manifest.write_text('{"localmim": "0.1", "started": ')
    tree = Tree(tmp_path)
    refused(run_cli("pretrain", "--out", run, "--resume", "--epochs", 2), manifest, "not a readable run record",
            "does not rewrite it")
    manifest.write_text('{"localmim": "0.1", "resumes": "not a list"}')
    tree = Tree(tmp_path)
    refused(run_main(capsys, "pretrain", "--out", run, "--resume", "--epochs", 2), manifest, "resumes")
    tree.kept()
    # Documented way on: move it away; the resume starts a new one that records the resume.
    manifest.rename(tmp_path / "manifest.broken.json")
    tree = Tree(tmp_path, skip=(run,))
    assert run_main(capsys, "pretrain", "--out", run, "--resume", "--epochs", 2)[0] == 0
    fresh = json.loads(manifest.read_text())
    assert fresh["resumes"][0]["position"]["epoch"] == 1 and fresh["localmim"]
    tree.kept()


def test_9_weights_that_are_not_finite_floats_are_refused_by_every_command(run, tmp_path, capsys, photos):
    model_file = step_folder(run) / "model.safetensors"
    rewrite_weights(model_file, with_nan)
    tree = Tree(tmp_path)
    refused(run_cli("evaluate", run, photos, "--protocol", "knn", "--workers", 0, "--device", "cpu"),
            model_file, "not finite")
    for args in (["visualize", run, an_image(photos), "--out", tmp_path / "fig.png"],
                 ["export", run, "--out", tmp_path / "exported"],
                 ["pretrain", "--out", run, "--resume", "--epochs", 2]):
        refused(run_main(capsys, *args), model_file, "not finite")
    tree.kept()
    rewrite_weights(model_file, lambda state: {k: v.nan_to_num().to(torch.int64) for k, v in state.items()})
    tree = Tree(tmp_path)
    for args in (["evaluate", run, photos, "--protocol", "knn", "--workers", 0, "--device", "cpu"],
                 ["visualize", run, an_image(photos), "--out", tmp_path / "fig.png"],
                 ["export", run, "--out", tmp_path / "exported"]):
        refused(run_main(capsys, *args), model_file, "not floating point", "int64 vs float32")
    tree.kept()


class Payload:
    """Creates a file while being unpickled, were it ever unpickled with plain pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_no_code_is_loaded_from_a_checkpoint(run, tmp_path, capsys):
    ran = tmp_path / "code-ran"
    pth = tmp_path / "evil.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 8)}, "args": Payload(ran)}, pth)
    training = step_folder(run) / "training.pt"
    torch.save({"optimizer": {}, "scaler": {}, "extra": Payload(ran)}, training)
    tree = Tree(tmp_path)
    refused(run_cli("export", pth, "--out", tmp_path / "exported"), pth, "refused to load", "open")
    refused(run_main(capsys, "pretrain", "--out", run, "--resume", "--epochs", 2), training)
    assert not ran.exists()
    tree.kept()


def test_10_counts_have_an_upper_bound(tmp_path, tiny_config, capsys):
    tree = Tree(tmp_path)
    refused(run_cli("pretrain", "--config", tiny_config, "--out", tmp_path / "r", "--dry-run",
                    "--set", "train.epochs=99999999999999999999999"), "train.epochs", "less than or equal to 100000")
    for args in (["--epochs", 10**22], ["--set", "data.repeats=10000000"], ["--batch-size", 10**12],
                 ["--seed", 10**30], ["--workers", 10**6]):
        refused(run_main(capsys, "pretrain", "--config", tiny_config, "--out", tmp_path / "r", *args),
                "less than or equal to")
    tree.kept()
    assert not (tmp_path / "r").exists()


def test_11_a_dry_run_checks_that_the_output_can_be_written(tmp_path, tiny_config, capsys, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    tree = Tree(tmp_path)
    result = run_cli("pretrain", "--config", tiny_config, "--dry-run",
                     env=cli_env(LOCALMIM_HOME="/proc/nonexistent"))
    refused(result, "/proc/nonexistent/runs/", "cannot be written")
    refused(run_main(capsys, "pretrain", "--config", tiny_config, "--dry-run", "--out", tmp_path / "a-file" / "run"),
            tmp_path / "a-file", "is a file")
    monkeypatch.setenv("LOCALMIM_HOME", str(tmp_path / "home"))
    code, _ = run_main(capsys, "pretrain", "--config", tiny_config, "--dry-run")
    assert code == 0
    tree.kept()   # a dry run that passes creates nothing either
    assert not (tmp_path / "home").exists()


def test_12_a_preset_of_the_other_command_is_refused_with_its_kind(tmp_path, tiny_config, capsys):
    preset = tmp_path / "mine.toml"
    preset.write_text('[preset]\nname = "mine"\nkind = "finetune"\nsummary = "s"\ndescription = "d"\n'
                      '[settings]\ntrain = { epochs = 1 }\n')
    tree = Tree(tmp_path)
    refused(run_cli("pretrain", "--preset", preset, "--config", tiny_config, "--dry-run", "--out", tmp_path / "r"),
            preset, "kind = 'finetune'", "localmim finetune")
    refused(run_main(capsys, "finetune", tmp_path, "--preset", "demo", "--dry-run"), "preset demo",
            "kind = 'pretrain'")
    tree.kept()


def test_13_non_finite_initial_weights_are_named_not_called_a_divergence(run, tmp_path, photos):
    model_file = step_folder(run) / "model.safetensors"
    rewrite_weights(model_file, with_nan)
    tree = Tree(tmp_path)
    message = refused(run_cli("finetune", photos, "--init", run, "--out", tmp_path / "ft", "--epochs", 1,
                              "--device", "cpu", "--workers", 0),
                      "the initial weights are not finite", model_file)
    assert "learning rate" not in message and "lr" not in message.split()
    tree.kept()
    assert not (tmp_path / "ft").exists()
