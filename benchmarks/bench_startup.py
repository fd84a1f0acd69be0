"""Time to the first training step on a large folder: this checkout against an older commit.

    python benchmarks/bench_startup.py [--before main] [--images 50000] [--workers 0] [--repeats 3]

Makes N small JPEGs (64x48 crops of the sample photos; cached under ~/.cache/localmim-bench, so
later runs skip it), then times `localmim pretrain` (a tiny model, 32 px) from process start to
the first metrics.jsonl line, for a first start and for a `--resume` of that run (to the first
step after the checkpoint). The older commit runs from a temporary git worktree with the same
interpreter, so both sides share everything but the package code. Each process is killed once
its step is recorded. The two sides alternate; prints the median seconds and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "localmim-bench"

TINY = """
[model]
img_size = 32
taps = [1, 2]
scales = [2.0, 1.0]
[model.encoder]
name = "vit"
options = { arch = "vit_tiny", patch_size = 8, embed_dim = 32, depth = 2, num_heads = 2 }
[model.decoder]
width = 32
num_heads = 2
[optim]
warmup_epochs = 1
[train]
epochs = 1
batch_size = 16
log_every = 1
checkpoint_every = 1
device = "cpu"
precision = "fp32"
"""


def make_images(n: int) -> Path:
    """n JPEGs of 64x48 in 100 subfolders, cut from the sample photos; made once, then reused."""
    folder = CACHE / f"jpegs-{n}"
    if (folder / ".done").exists():
        return folder
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from localmim_cli.data.sample_photos import sample_photo_paths

    shutil.rmtree(folder, ignore_errors=True)
    photos = [Image.open(p).convert("RGB") for p in sample_photo_paths()]
    rng = random.Random(0)
    t0 = time.perf_counter()
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = rng.randint(64, photo.width // 2), 0
        h = w * 3 // 4
        x, y = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
        sub = folder / f"{i % 100:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        photo.crop((x, y, x + w, y + h)).resize((64, 48), Image.BILINEAR).save(sub / f"{i:06d}.jpg", quality=90)
    (folder / ".done").touch()
    print(f"made {n} JPEGs in {folder} ({time.perf_counter() - t0:.0f} s)")
    return folder


def last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError, IndexError):
        return 0


def seconds_to_step(source: Path, args: list[str], run_dir: Path, after: int) -> float:
    """Wall time from starting `localmim pretrain ARGS` (code from `source`) until metrics.jsonl
    records a step past `after` and a checkpoint for it exists; then the process is killed."""
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "localmim_cli", "pretrain", *args], env=env, cwd=source,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = None
    try:
        while True:
            if elapsed is None and last_step(run_dir / "metrics.jsonl") > after:
                elapsed = time.perf_counter() - t0
            if elapsed is not None and (run_dir / "checkpoints" / "latest.json").exists():
                return elapsed
            if proc.poll() is not None:
                raise RuntimeError(f"pretrain ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


def measure(source: Path, data: Path, tmp: Path, workers: int, attempt: int) -> tuple[float, float]:
    run_dir = tmp / f"run-{source.name}-{attempt}"
    config = tmp / "tiny.toml"
    config.write_text(TINY)
    first = seconds_to_step(source, [str(data), "--config", str(config), "--out", str(run_dir),
                                     "--workers", str(workers)], run_dir, after=0)
    resumed_from = last_step(run_dir / "metrics.jsonl")
    resume = seconds_to_step(source, ["--out", str(run_dir), "--resume"], run_dir, after=resumed_from)
    return first, resume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="main", help="git ref to compare against")
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=0, help="data.workers for both sides")
    parser.add_argument("--repeats", type=int, default=3, help="alternating before/after; medians shown")
    args = parser.parse_args()
    data = make_images(args.images)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        old = tmp / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.before], cwd=REPO, check=True,
                       capture_output=True)
        try:
            times: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
            for attempt in range(args.repeats):  # alternating, so load drifting falls on both alike
                times["before"].append(measure(old, data, tmp, args.workers, attempt))
                times["after"].append(measure(REPO, data, tmp, args.workers, attempt))
            before, after = ([statistics.median(t[k] for t in times[side]) for k in (0, 1)]
                             for side in ("before", "after"))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, check=False,
                           capture_output=True)
    print(f"time to the first training step, {args.images} JPEGs of 64x48 (tiny model, CPU), "
          f"median of {args.repeats}:")
    for label, b, a in (("first start", before[0], after[0]), ("--resume   ", before[1], after[1])):
        print(f"  {label}: before ({args.before}) {b:6.1f} s, after (this checkout) {a:6.1f} s, "
              f"before / after = {b / a:.1f}x")


if __name__ == "__main__":
    main()
