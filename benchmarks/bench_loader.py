"""Does data loading keep up with training? Loader images/s against step images/s, same process.

    python benchmarks/bench_loader.py [DATA] [--preset demo] [--steps 10] [--workers 2]

DATA defaults to the built-in sample photos. A ratio above 1 means the loader outruns the model.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from localmim_cli.model.build import build_model
from localmim_cli.data.images import pretrain_dataset
from localmim_cli.config.layers import resolve
from localmim_cli.config.presets import load_preset
from localmim_cli.config.schema import PretrainSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    info, preset = load_preset(args.preset)
    flags = {"data.workers": args.workers, **({"data.path": args.data} if args.data else {})}
    settings: PretrainSettings = resolve(PretrainSettings, preset=preset, preset_name=info.name,
                                         flags=flags).settings
    device = torch.device(args.device)
    model = build_model(settings.model).to(device)
    dataset, _ = pretrain_dataset(settings.data, settings.model.img_size, model.num_units, 0)
    batch = settings.train.batch_size
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=args.workers, collate_fn=dataset.collate(),
                        drop_last=True, persistent_workers=args.workers > 0)

    def loader_rate() -> float:
        it = iter(loader)
        next(it)  # workers started
        start, n = time.perf_counter(), 0
        while n < args.steps * batch:
            try:
                n += next(it)["image"].shape[0]
            except StopIteration:
                it = iter(loader)
        return n / (time.perf_counter() - start)

    sample = next(iter(loader))
    images, noise = sample["image"].to(device), sample["noise"].to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step_rate() -> float:
        def one() -> None:
            out = model(images, noise=noise)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        one()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            one()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.steps * batch / (time.perf_counter() - start)

    load, step = loader_rate(), step_rate()
    print(f"preset {info.name}, {len(dataset)} samples/epoch, batch {batch}, {args.workers} workers, {device}")
    print(f"loader: {load:8.1f} img/s")
    print(f"step:   {step:8.1f} img/s")
    print(f"loader / step: {load / step:.2f}x ({'keeps up' if load >= step else 'the loader is the bottleneck'})")


if __name__ == "__main__":
    main()
