"""What LocalMIM's local decoders cost: its step against the same encoder with one top decoder.

LocalMIM: four taps, four scales, HOG. Top-only: the same encoder, one decoder on the last layer
at scale 1, the same HOG. Both steps are pretraining's (decoders predict only the cells the loss
reads); LocalMIM is also timed with its decoders predicting every cell, as published ("all
cells"). All are built in one process and timed in interleaved rounds (one step of each per
round, AdamW included; median over rounds), at the demo preset's ViT and at a ViT 192 wide, 12
layers, 224 px (and ViT-B/16, 224 px, decoders 256 wide). Next to the measured wall ratio stands
the FLOP ratio of the two steps (matrix products, convolutions, attention; forward and backward):
the floor no rewrite goes under, since four decoders do four decoders' work; and that of the
all-cells step. With --profile, a torch.profiler table of one step of each by module.

    OMP_NUM_THREADS=2 python benchmarks/bench_local_decoders.py [--rounds 9] [--flops-only vit-b] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from localmim_cli.config.resolve import resolve_settings
from localmim_cli.config.schema import PretrainSettings
from localmim_cli.model.build import build_model
from localmim_cli.tasks.benchmark import count_flops, synthetic_batch, training_step

SIZES = {
    "demo": ("demo", []),   # 96 wide, 6 layers, 64 px, patch 8, decoders 64 wide
    "vit-192": ("demo", ["model.img_size=224", "model.taps=[2,4,10,12]",
                         "model.encoder.options.patch_size=16", "model.encoder.options.embed_dim=192",
                         "model.encoder.options.depth=12",
                         "model.decoder.width=128"]),
    "vit-b": ("vit-b16-hog-100ep", []),   # 768 wide, 12 layers, 224 px, patch 16, decoders 256 wide
}


def settings(size: str, top_only: bool) -> PretrainSettings:
    preset, sets = SIZES[size]
    s = resolve_settings(PretrainSettings, preset=preset, sets=sets,
                         flags={"train.batch_size": 16, "train.precision": "fp32", "train.device": "cpu"}).settings
    if top_only:
        depth = s.model.encoder.options.get("depth") or build_model(s.model).encoder.tap_layers[-1]
        s = s.model_copy(update={"model": s.model.model_copy(update={"taps": [depth], "scales": [1.0]})})
    return s


# the contenders: (top-only, decoders predicting only what the loss reads)
LOCAL, ALL_CELLS, TOP = (False, True), (False, False), (True, True)


def prepare(s: PretrainSettings, loss_only: bool = True):
    torch.manual_seed(0)
    model = build_model(s.model).train()
    step = training_step(model, s, "fp32", torch.device("cpu"), loss_only=loss_only)
    images, noise = synthetic_batch(16, s.model.img_size, model.num_units, 0, torch.device("cpu"))
    return model, (lambda: step(images, noise))


def flop_ratios(size: str) -> tuple[float, float]:
    """FLOPs of one LocalMIM step, and of one all-cells step, over one top-only step."""
    local, all_cells, top = (count_flops(prepare(settings(size, top), loss_only)[1])
                             for top, loss_only in (LOCAL, ALL_CELLS, TOP))
    return local / top, all_cells / top


def measure(size: str, rounds: int) -> tuple[float, float, float]:
    """img/s of LocalMIM, LocalMIM all cells and top-only."""
    runs = [prepare(settings(size, top), loss_only)[1] for top, loss_only in (LOCAL, ALL_CELLS, TOP)]
    for run in runs:   # warm-up: allocator, optimizer state
        run(), run()
    seconds: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for i, run in enumerate(runs):
            t0 = time.perf_counter()
            run()
            seconds[i].append(time.perf_counter() - t0)
    local, all_cells, top = (16 / statistics.median(s) for s in seconds)
    return local, all_cells, top


def profile(size: str) -> None:
    """Self CPU time by module (record_function scopes from module names) for one step each."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    for top in (False, True):
        model, run = prepare(settings(size, top))
        run(), run()
        hooks = _scope_modules(model)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                run()
        for h in hooks:
            h.remove()
        print(f"\n## {size}, {'top-only' if top else 'LocalMIM'}: 3 steps")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=40))


def _scope_modules(model):
    """Forward spans per module of interest, named 'M:<name>' (backward shows as autograd ops)."""
    wanted = {"encoder": model.encoder, "target": model.target,
              **{f"decoder{k}": d for k, d in enumerate(model.decoders)}}
    handles = []
    for name, module in wanted.items():
        state = {}

        def pre(mod, args, name=name, state=state):
            state["r"] = torch.profiler.record_function(f"M:{name}")
            state["r"].__enter__()

        def post(mod, args, out, state=state):
            state["r"].__exit__(None, None, None)
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--flops-only", nargs="*", default=["vit-b"], metavar="SIZE",
                        help="sizes counted but not timed (default: vit-b, slow on a CPU)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}, fp32, batch 16, median of {args.rounds} interleaved rounds")
    print("| size | LocalMIM img/s | all cells img/s | top-only img/s | wall ratio | FLOP ratio (floor) "
          "| all cells: wall, FLOP ratio |\n|---|---|---|---|---|---|---|")
    for size in args.sizes:
        floor, floor_all = flop_ratios(size)
        if size in args.flops_only:
            print(f"| {size} | - | - | - | - | {floor:.2f}x | -, {floor_all:.2f}x |", flush=True)
            continue
        local, all_cells, top = measure(size, args.rounds)
        print(f"| {size} | {local:.1f} | {all_cells:.1f} | {top:.1f} | {top / local:.2f}x | {floor:.2f}x "
              f"| {top / all_cells:.2f}x, {floor_all:.2f}x |", flush=True)
    if args.profile:
        for size in args.sizes:
            profile(size)


if __name__ == "__main__":
    main()
