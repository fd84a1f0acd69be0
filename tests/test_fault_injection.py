"""Fault injection: SIGKILL a tiny pretrain over and over at random moments (inside checkpoint
writes among them: it saves after every step), resume it each time, and require the final
weights to be bitwise those of a run never interrupted, and metrics.jsonl to hold each step once.

Seeded, so a failure reproduces: `LOCALMIM_FAULT_SEED=N`. It takes about a minute on an idle
2-core machine (every restart pays an interpreter start), so the default suite leaves it out:

    LOCALMIM_FAULT_INJECTION=1 python -m pytest tests/test_fault_injection.py -q -s
    python tests/test_fault_injection.py          # the same, as a script
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_TOML, cli_env, run_cli  # noqa: E402
from localmim_cli.engine import checkpoints  # noqa: E402
from test_pretrain import final_weights, metrics  # noqa: E402

KILLS = 10
SEED = int(os.environ.get("LOCALMIM_FAULT_SEED", "0"))
# 7 steps per epoch, a checkpoint after every one: most of a step is spent writing it.
SETTINGS = ["--set", "train.checkpoint_every=1", "--set", "train.epochs=6", "--set", "train.keep_last=2"]
pytestmark = pytest.mark.skipif(not os.environ.get("LOCALMIM_FAULT_INJECTION"),
                                reason="about a minute; set LOCALMIM_FAULT_INJECTION=1 to run")


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def start(out: Path, config: Path) -> subprocess.Popen:
    """Resume when a complete checkpoint exists; else start over (a kill before the first one)."""
    has_checkpoint = (out / "checkpoints").is_dir() and checkpoints.list_checkpoints(out / "checkpoints")
    if not has_checkpoint:
        shutil.rmtree(out, ignore_errors=True)
    args = ["--out", str(out), "--resume"] if has_checkpoint else \
        ["--config", str(config), *SETTINGS, "--out", str(out)]
    return subprocess.Popen([sys.executable, "-m", "localmim_cli", "pretrain", *args], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_at_random(out: Path, config: Path, rng: random.Random) -> dict[str, int]:
    """Kill the run KILLS times, each a random moment after it has trained a step (so every
    life makes progress), then let it finish. Returns counts of what the kills hit."""
    hits = {"kills": 0, "mid_write": 0, "finished_first": 0}
    while hits["kills"] < KILLS:
        before = lines(out / "metrics.jsonl")
        proc = start(out, config)
        deadline = time.time() + 120
        while proc.poll() is None and lines(out / "metrics.jsonl") <= before and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.12))
        if proc.poll() is not None:   # it finished (or failed) first
            _, err = proc.communicate()
            assert proc.returncode == 0, err
            hits["finished_first"] += 1
            break
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        hits["kills"] += 1
        hits["mid_write"] += any((out / "checkpoints").glob(".tmp-*"))
    proc = start(out, config)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return hits


def check_kills_leave_an_exact_run(tmp: Path) -> dict[str, int]:
    config = tmp / "tiny.toml"
    config.write_text(TINY_TOML)
    straight = tmp / "straight"
    r = run_cli("pretrain", "--config", config, *SETTINGS, "--out", straight)
    assert r.returncode == 0, r.stderr
    crashed = tmp / "crashed"
    hits = kill_at_random(crashed, config, random.Random(SEED))
    assert hits["kills"] >= KILLS, f"the run finished after {hits['kills']} kills; make it longer"
    a, b = final_weights(straight), final_weights(crashed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after {hits['kills']} kills (seed {SEED})"
    assert [m["step"] for m in metrics(crashed)] == [m["step"] for m in metrics(straight)]
    assert not list((crashed / "checkpoints").glob(".tmp-*"))
    return hits


def test_random_sigkills_leave_a_run_bitwise_equal_to_an_uninterrupted_one(tmp_path):
    hits = check_kills_leave_an_exact_run(tmp_path)
    print(f"fault injection (seed {SEED}): {hits}")


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        print(f"fault injection (seed {SEED}): {check_kills_leave_an_exact_run(Path(tmp))} "
              f"in {time.time() - t0:.0f} s")
