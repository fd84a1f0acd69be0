"""HOG target: ours (one gradient pass per image, pooled per scale) against the published way
(the full pipeline once per scale and per colour channel), timed in the same process.

    python benchmarks/bench_hog.py [--batch 32] [--size 224] [--device cpu]

Prints each time and the speed-up ratio; checks both give the same targets.
"""

from __future__ import annotations

import argparse
import time

import torch

from localmim_cli.targets.hog import HOGOptions, HOGTarget
from localmim_cli.targets.hog_reference import PublishedHOG


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    cells = [4, 8, 16, 32]
    ours = HOGTarget(HOGOptions(nbins=9), cells).to(device)
    published = PublishedHOG(9, cells).to(device)
    for a, b in zip(ours(images), published(images)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    t_pub = timed(lambda: published(images), args.repeats, device)
    t_ours = timed(lambda: ours(images), args.repeats, device)
    print(f"device {device}, batch {args.batch} x {args.size}px, 4 scales, 9 bins")
    print(f"published-style: {1e3 * t_pub:8.1f} ms/batch")
    print(f"localmim:        {1e3 * t_ours:8.1f} ms/batch")
    print(f"speed-up:        {t_pub / t_ours:8.2f}x")


if __name__ == "__main__":
    main()
