"""Faults and bad input: each is one clear line naming the file or setting, a non-zero exit, no
traceback, and nothing lost. Through the real CLI (a subprocess) for each kind of fault; the
matrix of broken checkpoint files through the console entry point in this process (same code
path, no interpreter start per case)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import cli_env, run_cli
from fake_plugins import install_fake
from localmim_cli.engine import checkpoints, runs
from localmim_cli.errors import CheckpointError
from tiny_runs import photo_sets, run_main, tiny_pretrain_run

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_user_error(result: subprocess.CompletedProcess, *phrases: str, code: int = 2) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    message = " ".join(result.stderr.split())
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in: {message}"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A real finished pretrain run (built once per session); tests corrupt copies of it."""
    return tiny_pretrain_run(tmp_path_factory)


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# --- settings: refused at once, naming the field -------------------------------------------------

def test_non_finite_and_out_of_range_settings_are_refused_by_dry_run(tmp_path, tiny_config):
    r = run_cli("pretrain", "--config", tiny_config, "--dry-run", "--out", tmp_path / "r",
                "--set", "optim.base_lr=Infinity", "--set", "optim.weight_decay=nan",
                "--set", "train.device=banana", "--set", "model.encoder.options.depth=0",
                "--set", "model.encoder.options.drop_path=2")
    assert_user_error(r, "optim.base_lr = inf", "finite", "optim.weight_decay", "train.device = 'banana'",
                      "model.encoder.options.depth = 0", "model.encoder.options.drop_path = 2")
    r = run_cli("pretrain", "--config", tiny_config, "--dry-run", "--out", tmp_path / "r",
                "--set", "optim.min_lr=1")
    assert_user_error(r, "optim.min_lr 1 is above the peak lr")
    assert not (tmp_path / "r").exists()


def test_encoder_options_given_are_used_not_replaced_by_the_arch():
    from localmim_cli.encoders.vit import ViTOptions

    opts = ViTOptions(arch="vit_base", depth=3)
    assert (opts.depth, opts.embed_dim) == (3, 768)
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        ViTOptions(arch="vit_base", depth=0)


def test_min_lr_above_absolute_lr_is_refused():
    from localmim_cli.config.schema import OptimSettings
    with pytest.raises(ValueError, match="optim.min_lr"):
        OptimSettings(lr=1e-4, min_lr=1e-3)


# --- divergence: no checkpoint ever holds NaN weights --------------------------------------------

def test_an_update_that_overflows_the_weights_is_caught_before_the_save(tmp_path):
    """The loss of a step is computed before its update, so an update that breaks the weights
    (an infinite lr here) is invisible to the loss check; the save must look at the weights."""
    from localmim_cli.engine.compiling import Compilation
    from localmim_cli.engine.distributed import World
    from localmim_cli.engine.loop import Placement, RunOutput, Trainer, run_loop
    from localmim_cli.engine.plan import StepPlan
    from localmim_cli.engine.task import Position, TrainingTask
    from localmim_cli.errors import TrainingDiverged

    class Line(TrainingTask):
        kind = "pretrain"
        loss_count = 1

        def __init__(self):
            self.model = torch.nn.Linear(3, 1)
            self.dataset = list(range(4))

        def param_groups(self):
            return [{"params": list(self.model.parameters()), "weight_decay": 0.0, "lr_scale": float("inf")}]

        def forward(self, net, batch, epoch, micro_step):
            loss = net(batch).pow(2).mean()
            return loss, loss.detach()[None], batch.shape[0]

        def loss_fields(self, losses):
            return {"loss": losses[0]}

    class Quiet:
        def advance(self): pass
        def update(self, record): pass
        def note(self, text): pass

    task, saved = Line(), []
    plan = StepPlan(steps_per_epoch=2, accum_steps=1, epochs=1, effective_batch=2, lr=1e-3, min_lr=0.0,
                    warmup_epochs=0, scaling="")
    optimizer = torch.optim.AdamW(task.param_groups(), lr=1e-3)
    trainer = Trainer(task=task, net=task.model, no_sync=contextlib.nullcontext,
                      compilation=Compilation(task.model, "off", torch.device("cpu"), print), optimizer=optimizer,
                      scaler=torch.amp.GradScaler("cpu", enabled=False), clip_grad=None,
                      placement=Placement(World(), torch.device("cpu"), "fp32"), plan=plan, log_every=5,
                      checkpoint_every=1, batches=lambda epoch, start: [torch.ones(2, 3)] * (2 - start),
                      save=saved.append, ckpt_dir=tmp_path / "checkpoints",
                      output=RunOutput(runs.MetricsLog(tmp_path / "metrics.jsonl"), Quiet(), True))
    with pytest.raises(TrainingDiverged, match="weights became NaN or infinite by step 1"):
        run_loop(trainer, Position())
    assert saved == []


# --- the run directory: --overwrite, the lock, a torn metrics line, a partial checkpoint -----------

def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, tiny_config):
    out = tmp_path / "photos-of-mine"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    r = run_cli("pretrain", "--config", tiny_config, "--out", out, "--overwrite")
    assert_user_error(r, str(out), "not a localmim run directory", "refusing to delete")
    assert (out / "holiday.jpg").read_bytes() == b"precious"


def test_overwrite_replaces_a_run_directory_keeping_its_lock(tmp_path):
    out = tmp_path / "old-run"
    (out / "checkpoints" / "step-00000001").mkdir(parents=True)
    (out / "settings.json").write_text("{}")
    (out / "metrics.jsonl").write_text("{}\n")
    with runs.prepare(out, resume=False, overwrite=True):
        assert [p.name for p in out.iterdir()] == [runs.LOCK]
        with pytest.raises(runs.RunDirError, match="in use by another localmim run"):
            runs.prepare(out, resume=False, overwrite=True)
    with runs.prepare(out, resume=False, overwrite=False):   # only the lock file: an empty folder
        pass


def test_a_second_run_on_a_locked_directory_fails_at_once_naming_the_holder(tmp_path, tiny_run):
    run = copy_run(tiny_run, tmp_path / "run")
    with runs.RunLock(run).acquire():   # this test process plays the first run
        r = run_cli("pretrain", "--out", run, "--resume", timeout=120)
    assert_user_error(r, str(run), "in use by another localmim run", f"pid {os.getpid()}")
    assert (run / "metrics.jsonl").read_text() == (tiny_run / "metrics.jsonl").read_text()


def test_resume_drops_a_torn_metrics_line_and_ignores_a_partial_checkpoint(tmp_path, tiny_run):
    run = copy_run(tiny_run, tmp_path / "run")
    whole = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(whole + '{"epoch": 0, "step": 11, "lo')   # a crash mid-write
    partial = run / "checkpoints" / ".tmp-step-00000011-4242"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 1000)   # what a full disk left
    r = run_cli("pretrain", "--out", run, "--resume", "--epochs", "2", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    out = " ".join(r.stdout.split())
    assert f"{run / 'metrics.jsonl'}: dropped a half-written last line" in out
    assert not partial.exists()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert lines[:len(whole.splitlines())] == whole.splitlines() and steps == sorted(set(steps))
    assert checkpoints.load(run).meta["position"]["epoch"] == 2


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 320 vs 256\n"
                 "PytorchStreamWriter failed writing file data/0: file write failed"),
], ids=["ENOSPC", "torch-enforce-fail"])
def test_a_full_disk_removes_the_partial_checkpoint_and_says_so(tmp_path, monkeypatch, failure):
    folder = tmp_path / "checkpoints"
    checkpoints.save(folder, "step-00000001", {"w": torch.ones(3)}, {"position": {"step": 1}}, {"optimizer": {}})

    def full(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise failure

    monkeypatch.setattr(checkpoints.torch, "save", full)
    with pytest.raises(CheckpointError) as caught:
        checkpoints.save(folder, "step-00000002", {"w": torch.zeros(3)}, {"position": {"step": 2}},
                         {"optimizer": {}})
    message = str(caught.value)
    assert "disk full" in message and str(folder / "step-00000002") in message
    assert "step-00000001 is intact" in message
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "step-00000001"]


# --- broken checkpoints: one line naming the file, for every command that reads them -------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _reshape_one(path: Path) -> None:
    from safetensors.torch import load_file, save_file
    state = load_file(str(path))
    key = next(k for k in sorted(state) if k.endswith("cls_token"))
    state[key] = torch.zeros(1, 1, 7)
    save_file(state, str(path))


CORRUPTIONS = {   # name -> (what to do to a copy of the run, the file the message must name)
    "truncated-model": (lambda ck: _truncate(ck / "model.safetensors"), "model.safetensors"),
    "wrong-shape-model": (lambda ck: _reshape_one(ck / "model.safetensors"), "model.safetensors"),
    "missing-training-state": (lambda ck: (ck / "training.pt").unlink(), "training.pt"),
    "truncated-training-state": (lambda ck: _truncate(ck / "training.pt"), "training.pt"),
    "garbage-meta": (lambda ck: (ck / "meta.json").write_text("{not json"), "meta.json"),
    "latest-outside": (lambda ck: (ck.parent / "latest.json").write_text('{"name": "../../other_run"}'),
                       "latest.json"),
}
COMMANDS = {   # name -> arguments, given the run and the photos; the corruptions each must catch
    # more epochs than the finished run had: a resume that trains on, so it needs the training state
    "resume": (lambda run, photos, tmp: ["pretrain", "--out", run, "--resume", "--epochs", 50], set(CORRUPTIONS)),
    "export": (lambda run, photos, tmp: ["export", run, "--out", tmp / "exported"],
               set(CORRUPTIONS) - {"missing-training-state", "truncated-training-state", "wrong-shape-model"}),
    "finetune": (lambda run, photos, tmp: ["finetune", photos, "--init", run, "--dry-run", "--device", "cpu"],
                 {"truncated-model", "garbage-meta", "latest-outside"}),
    "evaluate": (lambda run, photos, tmp: ["evaluate", run, photos, "--protocol", "knn", "--device", "cpu",
                                           "--workers", 0], {"truncated-model", "latest-outside"}),
}
CASES = [(command, corruption) for command, (_, caught) in COMMANDS.items() for corruption in sorted(caught)]


@pytest.mark.parametrize(("command", "corruption"), CASES, ids=[f"{c}-{k}" for c, k in CASES])
def test_broken_checkpoint_is_one_line_naming_the_file(tmp_path, tiny_run, tmp_path_factory, capsys,
                                                       command, corruption):
    run = copy_run(tiny_run, tmp_path / "run")
    ckpt = checkpoints.load(run).path
    corrupt, named = CORRUPTIONS[corruption]
    corrupt(ckpt)
    photos, _ = photo_sets(tmp_path_factory)
    args, _ = COMMANDS[command]
    code, err = run_main(capsys, *args(run, photos, tmp_path))
    message = " ".join(err.split())
    assert code == 2, message
    assert "Traceback" not in err and named in message, message
    assert len(err.strip().splitlines()) <= 3, err   # one message (soft-wrapped), not a dump


def test_broken_checkpoint_through_the_real_cli(tmp_path, tiny_run):
    run = copy_run(tiny_run, tmp_path / "run")
    ckpt = checkpoints.load(run).path
    _truncate(ckpt / "training.pt")
    r = run_cli("pretrain", "--out", run, "--resume", "--epochs", "2", timeout=120)
    assert_user_error(r, str(ckpt / "training.pt"), "unreadable training state")


def test_latest_json_is_read_in_one_place_and_refuses_to_leave_its_folder(tmp_path):
    from localmim_cli.weights.locate import read_latest
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "latest.json").write_text('{"name": "step-00000003"}')
    assert checkpoints.read_latest_name(folder) == read_latest(folder) == "step-00000003"
    for outside in ("../../other_run", "/etc", ".."):
        (folder / "latest.json").write_text(json.dumps({"name": outside}))
        with pytest.raises(CheckpointError, match="latest.json"):
            checkpoints.read_latest_name(folder)


# --- signals: save at the step boundary, say how to resume, exit 128 + signal ---------------------

def start_long_run(out: Path, tiny_config: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "localmim_cli", "pretrain", "--config", str(tiny_config),
                             "--set", "train.epochs=50", "--out", str(out)], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").is_file():
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, tiny_config, signum):
    out = tmp_path / "run"
    proc = start_long_run(out, tiny_config)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    message = " ".join(err.split())
    step = checkpoints.load(out).meta["position"]["step"]
    assert f"stopped by {signal.Signals(signum).name} after step {step}" in message
    assert f"localmim pretrain --out {out} --resume" in message
    assert step < 50 * 7


def test_a_second_ctrl_c_aborts_at_once(tmp_path, tiny_config):
    out = tmp_path / "run"
    proc = start_long_run(out, tiny_config)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and ("aborted" in err or "stopped by SIGINT" in err), err


def test_slurm_variables_map_onto_torchrun_names():
    from localmim_cli.engine.distributed import slurm_variables
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7"}
    assert slurm_variables(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                    "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": str(29500 + 3456)}
    assert slurm_variables({**env, "MASTER_ADDR": "head", "MASTER_PORT": "1234"})["MASTER_ADDR"] == "head"
    assert slurm_variables({**env, "WORLD_SIZE": "2"}) == {}        # torchrun's own take precedence
    assert slurm_variables({**env, "SLURM_NTASKS": "1"}) == {}      # one task: a plain run
    assert slurm_variables({}) == {}


# --- a plugin whose import hangs, exits or raises KeyboardInterrupt --------------------------------

HOSTILE = {
    "hang": "import time\ntime.sleep(600)\n",
    "quit": "import os\nos._exit(3)\n",
    "ctrlc": "raise KeyboardInterrupt\n",
}


@pytest.fixture(scope="module")
def hostile_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile_plugins")
    for name, code in HOSTILE.items():
        install_fake(root, f"{name}-encoder", f"{name}_encoder", code + "plugin = None\n",
                     {"localmim.encoders": {name: "plugin"}})
    return root


def test_plugins_list_survives_plugins_that_hang_exit_or_interrupt(hostile_site):
    r = run_cli("plugins", "list", env=cli_env(PYTHONPATH=str(hostile_site), COLUMNS="1000"), timeout=120)
    assert r.returncode == 0, r.stderr   # from metadata: nothing imported, so nothing can hang
    assert all(name in r.stdout for name in HOSTILE) and "not imported" in r.stdout
    r = run_cli("plugins", "list", "--check", env=cli_env(PYTHONPATH=str(hostile_site), COLUMNS="1000",
                                               LOCALMIM_PLUGIN_IMPORT_TIMEOUT="6"), timeout=300)
    assert r.returncode == 0, r.stderr
    rows = {line.split("│")[2].strip(): line for line in r.stdout.splitlines() if line.count("│") >= 5}
    assert "did not finish within 6 s" in rows["hang"]
    assert "ended the process (exit status 3" in rows["quit"]
    assert "KeyboardInterrupt" in rows["ctrlc"]
    for name in ("vit", "swin", "hog", "pixel"):
        assert " ok " in rows[name], rows[name]


def test_a_run_imports_only_the_plugins_it_uses(hostile_site, tmp_path, tiny_config):
    out = tmp_path / "run"
    r = run_cli("pretrain", "--config", tiny_config, "--set", "train.epochs=1", "--out", out,
                env=cli_env(PYTHONPATH=str(hostile_site)), timeout=180)
    assert r.returncode == 0, r.stderr
    plugins = json.loads((out / "manifest.json").read_text())["plugins"]
    assert plugins["encoders/vit"]["ok"] is True and plugins["targets/hog"]["ok"] is True
    assert plugins["encoders/hang"] == {"distribution": "hang-encoder", "version": "0.1", "ok": None}


def _saved(obj) -> bytes:
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("content", [b"not a checkpoint at all", _saved([1, 2, 3]),
                                     _saved({"model": {"weight": "not a tensor"}})],
                         ids=["garbage", "a-list", "no-tensors"])
def test_an_odd_pth_is_one_line_naming_it(tmp_path, capsys, content):
    odd = tmp_path / "odd.pth"
    odd.write_bytes(content)
    code, err = run_main(capsys, "export", odd, "--out", tmp_path / "exported")
    assert code == 2 and "Traceback" not in err and str(odd) in " ".join(err.split()), err
