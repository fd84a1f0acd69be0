"""How long `localmim --help` takes in a fresh process: this checkout against an older commit.

    python benchmarks/bench_help.py [--before REF] [--runs 7]

The older commit (default: the last one before the command line was split into cli/) is checked
out into a temporary git worktree and run from there with the same interpreter, so both sides
share everything but the package code. Prints the median wall time of each side and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE = "0650b20"   # flat localmim_cli/cli.py that imported every command module at start


def median_seconds(source: Path, runs: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(source)}
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "localmim_cli", "--help"], env=env, cwd=source,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help="git ref to compare against")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.before], cwd=REPO, check=True,
                       capture_output=True)
        try:
            median_seconds(REPO, 1)   # warm the file cache for both sides alike
            median_seconds(old, 1)
            before = median_seconds(old, args.runs)
            after = median_seconds(REPO, args.runs)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, check=False,
                           capture_output=True)
    print(f"localmim --help, median of {args.runs} fresh processes:")
    print(f"  before ({args.before}): {before:.3f} s")
    print(f"  after  (this checkout): {after:.3f} s")
    print(f"  after / before = {after / before:.2f}  (before / after = {before / after:.1f}x faster)")


if __name__ == "__main__":
    main()
