"""`localmim benchmark`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from localmim_cli.cli.options import NO_VALUE, BatchOpt, ConfigOpt, DeviceOpt, PrecisionOpt, PresetOpt, SetOpt
from localmim_cli.cli.output import console, note_others_env
from localmim_cli.cli.bench_format import human_size, local_decoders_line, measure_and_report, ratio_text
from localmim_cli.errors import UsageError


def benchmark(
    data: Annotated[Optional[Path], typer.Argument(
        help="Folder of images whose loading is measured against the step. "
             "Leave out to use the built-in sample photos.", show_default=False)] = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    against: Annotated[Optional[str], typer.Option(
        "--against", help="Also time this configuration's step and give the ratio: a preset name, "
                          "a preset .toml file or a settings file. It runs at the benchmarked "
                          "batch size, device and precision; --set changes only the benchmarked one.")] = None,
    steps: Annotated[int, typer.Option(help="Timed steps per configuration (the median is reported).")] = 10,
    warmup: Annotated[int, typer.Option(help="Untimed steps before timing.")] = 3,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    compile_: Annotated[Optional[str], typer.Option(
        "--compile", help="torch.compile the benchmarked step: off, default or max-autotune (sets "
                          "train.compile). When on, the same step uncompiled is timed too, and the "
                          "report gives compiled / eager beside compiled / baseline.",
        show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", metavar=NO_VALUE,
                                          help="Print one JSON object and nothing else on "
                                                         "stdout.")] = False,
) -> None:
    """Time the configured training step against the published eager path, in the same run.

    One step: masking, encoder, decoders, targets, loss, backward and AdamW, on a synthetic
    batch on the device. The baseline is the same model at fp32 (fp16 autocast on CUDA) with
    the HOG target computed the published way (per scale and per colour channel), eager, with
    torch's default AdamW. --precision and --compile change the benchmarked step only, so
    e.g. `--precision bf16 --compile default` gives bf16-compiled / baseline and, timed in the
    same run, bf16-compiled / bf16-eager. Prints
    images/s, median step time, peak memory, FLOPs per image and achieved TFLOP/s, each with its
    ratio to the baseline; then the loader's images/s over DATA against the step's, and the
    share of time the step waits for data when the loader feeds it.

    A segmentation or detection preset (seg-*, det-*) times that task's training step instead
    (the model from model.arch, a synthetic batch, backward and AdamW) against the
    classification fine-tune step of the same ViT at the same batch, size and precision, in the
    same process: images/s, step time, peak memory and FLOPs per image, each as task /
    classification. Shrink it with --batch-size and --set model.img_size=N (or model.arch).
    """
    if steps < 1:   # before torch is imported: a typo costs no start-up
        raise UsageError(f"--steps must be at least 1, got {steps}")
    if warmup < 0:
        raise UsageError(f"--warmup must be 0 or more, got {warmup}")
    from localmim_cli.cli import task_benchmark
    from localmim_cli.config.resolve import resolve_settings
    from localmim_cli.config.schema import PretrainSettings
    from localmim_cli.tasks import benchmark as task

    flags = {"data.path": str(data) if data else None, "train.batch_size": batch_size,
             "train.device": device, "train.precision": precision, "train.compile": compile_}
    if dense := task_benchmark.dense_task_of(preset):   # a segmentation / detection preset: its own step
        return task_benchmark.benchmark(dense, preset, set_, flags, data=data, against=against, steps=steps,
                                        warmup=warmup, as_json=as_json)
    resolved = resolve_settings(PretrainSettings, preset, config, set_, flags)
    note_others_env(resolved)
    second = task.against_settings(against, resolved.settings) if against else None
    label = preset or (config.name if config else "defaults")
    if set_:
        label += f" + {len(set_)} --set"
    measure_and_report(lambda progress: task.benchmark(resolved, label=label, against=second,
                                                       against_label=against or "", steps=steps,
                                                       warmup=warmup, progress=progress),
                       as_json, print_report)


def print_report(result: dict[str, Any]) -> None:
    from rich.table import Table

    t = result["threads"]
    console.print(f"device {result['device']} ({result['device_name']}), torch {result['torch']}; "
                  f"batch {result['batch_size']}, median of {result['steps']} steps after "
                  f"{result['warmup']} warm-up; {t['intra_op']} intra-op thread(s) ({t['reason']})",
                  highlight=False)
    table = Table(show_lines=False)
    for column in ("step", "img/s", "step ms", "peak mem", "GFLOP/img", "TFLOP/s"):
        table.add_column(column, justify="left" if column == "step" else "right")
    conf = result["configured"]
    table.add_row(*_row(result["baseline"]))
    table.add_row(*_row(conf))
    table.add_row(f"{conf['label']} / baseline", *_ratios(result["vs_baseline"]), style="bold")
    if "eager" in result:
        table.add_row(*_row(result["eager"]))
        table.add_row(f"{conf['label']} / eager", *_ratios(result["vs_eager"]), style="bold")
    if "against" in result:
        table.add_row(*_row(result["against"]))
        table.add_row(f"{conf['label']} / {result['against']['label']}", *_ratios(result["vs_against"]),
                      style="bold")
    if "top_only" in result:
        table.add_row(*_row(result["top_only"]))
    console.print(table)
    if (cost := result.get("local_decoders_cost")) is not None:
        console.print(local_decoders_line(cost, result["local_decoders_flops"]), highlight=False)
    for key in ("baseline", "configured", "eager", "against", "top_only"):
        if e := result.get(key):
            how = f", compile {e['compile']}, {e['optimizer']}" if "compile" in e else ""
            console.print(f"{e['label']}: {e['encoder']} encoder, {e['target']} target, {e['img_size']} px, "
                          f"{e['parameters'] / 1e6:.2f} M parameters, {e['precision']}{how}; {e['what']}",
                          highlight=False)
    console.print(f"peak memory: {result['memory_method']}", highlight=False)
    if data := result.get("data"):
        keeps_up = "keeps up" if data["loader_over_step"] > 1 else "is the bottleneck"
        console.print(f"data ({data['source']}, {data['images']} images, {data['workers']} worker(s)): "
                      f"loader {data['loader_img_per_s']:.1f} img/s alone vs step {data['step_img_per_s']:.1f} "
                      f"img/s = {data['loader_over_step']:.2f}x (the loader {keeps_up}); feeding the step: "
                      f"{data['fed_img_per_s']:.1f} img/s, {100 * data['data_wait_share']:.0f}% of the time "
                      "waiting for data", highlight=False)
        if (result["device"] == "cpu" and data["fed_img_per_s"] < 0.9 * data["step_img_per_s"]
                and data["data_wait_share"] < 0.1):
            console.print("  (on a CPU the loader workers and the step share the cores: a slower fed step "
                          "with little data-wait is that sharing, not the loader falling behind)", highlight=False)


def _row(e: dict[str, Any]) -> list[str]:
    return [e["label"], f"{e['img_per_s']:.1f}", f"{e['step_ms']:.1f}", human_size(e["peak_memory_bytes"]),
            f"{e['flops_per_image'] / 1e9:.3g}", f"{e['tflops']:.3g}"]


def _ratios(r: dict[str, float | None]) -> list[str]:
    return [ratio_text(r[k]) for k in ("img_per_s", "step_ms", "peak_memory_bytes", "flops_per_image", "tflops")]
