"""What every `localmim benchmark` report shares: progress by phase on stderr, sizes and ratios
as the tables print them."""

from __future__ import annotations

import json
from typing import Any, Callable

from localmim_cli.cli.output import err_console


class Phases:
    """Progress on stderr, so stdout keeps only the result: a bar per phase on a terminal, one
    line per phase elsewhere (logs, CI)."""

    def __init__(self, bar: bool):
        self.bar = bar
        self._progress = None

    def __enter__(self) -> "Phases":
        if self.bar:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=err_console, transient=True)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start(self, phase: str, total: int):
        if self._progress is None:
            err_console.print(f"{phase} ...", highlight=False)
            return lambda: None
        task_id = self._progress.add_task(phase, total=total)
        return lambda: self._progress.update(task_id, advance=1)


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def ratio_text(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def local_decoders_line(step_ratio: float, flop_ratio: float) -> str:
    """The cost of the decoders below the top one: measured, and the FLOP floor beside it."""
    return (f"local decoders: LocalMIM step / same model top-only = {step_ratio:.2f}x "
            f"(FLOPs {flop_ratio:.2f}x: the floor of the computation)")


def measure_and_report(measure: Callable[[Callable], dict[str, Any]], as_json: bool,
                       report: Callable[[dict[str, Any]], None]) -> None:
    """Run `measure(progress)` with progress on stderr; its result as one JSON object on stdout
    (--json) or as `report` prints it."""
    with Phases(bar=err_console.is_terminal) as phases:
        result = measure(phases.start)
    if as_json:
        print(json.dumps(result))
    else:
        report(result)
