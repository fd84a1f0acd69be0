"""`localmim benchmark --preset <segmentation or detection preset>`: the task's step against the
classification fine-tune step at the same batch and size (tasks/task_benchmark.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from localmim_cli.cli.output import console
from localmim_cli.errors import UsageError


def dense_task_of(preset: str | None) -> str | None:
    """The fine-tuning task a preset is for, when it is a task other than classification (whose
    step is the baseline the others are timed against); else None."""
    from localmim_cli.config.presets import load_preset
    from localmim_cli.config.tasks import DEFAULT_TASK

    if not preset:
        return None
    info, _ = load_preset(preset)
    return info.task if info.kind == "finetune" and info.task != DEFAULT_TASK else None


def benchmark(task: str, preset: str, sets: list[str] | None, flags: dict[str, Any], *, data: Path | None,
              against: str | None, steps: int, warmup: int, as_json: bool) -> None:
    from localmim_cli.cli.bench_format import measure_and_report
    from localmim_cli.config.resolve import resolve_settings
    from localmim_cli.config.tasks import finetune_task
    from localmim_cli.tasks import task_benchmark

    for given, flag in ((data, "DATA"), (against, "--against"), (flags.pop("train.compile", None), "--compile")):
        if given is not None:
            raise UsageError(f"{flag}: not for a {task} preset, whose step is timed eager on a synthetic batch "
                             "against the classification fine-tune step")
    flags.pop("data.path", None)
    resolved = resolve_settings(finetune_task(task).schema, preset, None, sets, flags)
    label = preset + (f" + {len(sets)} --set" if sets else "")
    measure_and_report(lambda progress: task_benchmark.benchmark_task(resolved, label=label, steps=steps,
                                                                      warmup=warmup, progress=progress),
                       as_json, print_report)


def print_report(result: dict[str, Any]) -> None:
    from rich.table import Table

    from localmim_cli.cli.bench_format import human_size, ratio_text

    t = result["threads"]
    console.print(f"device {result['device']} ({result['device_name']}), torch {result['torch']}; {result['task']} "
                  f"step vs the classification fine-tune step of {result['arch']} at batch {result['batch_size']}, "
                  f"{result['img_size']} px, {result['precision']}; median of {result['steps']} steps after "
                  f"{result['warmup']} warm-up; {t['intra_op']} intra-op thread(s) ({t['reason']})", highlight=False)
    table = Table(show_lines=False)
    for column in ("step", "img/s", "step ms", "peak mem", "GFLOP/img"):
        table.add_column(column, justify="left" if column == "step" else "right")
    for key in ("classification", "configured"):
        e = result[key]
        table.add_row(e["label"], f"{e['img_per_s']:.2f}", f"{e['step_ms']:.1f}", human_size(e["peak_memory_bytes"]),
                      f"{e['flops_per_image'] / 1e9:.3g}")
    r = result["vs_classification"]
    table.add_row(f"{result['task']} / classification", *(ratio_text(r[k]) for k in
                                                           ("img_per_s", "step_ms", "peak_memory_bytes", "flops_per_image")),
                  style="bold")
    console.print(table)
    for key in ("classification", "configured"):
        e = result[key]
        console.print(f"{e['label']}: {e['what']}; {e['parameters'] / 1e6:.2f} M parameters, {e['optimizer']}",
                      highlight=False)
    console.print(f"peak memory: {result['memory_method']}", highlight=False)
