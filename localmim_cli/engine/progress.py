"""Progress for long work: a rich bar on a terminal, plain periodic lines elsewhere (CI, SLURM)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


def _fmt(metrics: dict[str, Any]) -> str:
    parts = [f"loss {metrics['loss']:.4f}", f"lr {metrics['lr']:.2e}",
             f"{metrics['images_per_s']:.1f} img/s", f"data-wait {100 * metrics['data_wait']:.0f}%"]
    return "  ".join(parts)


class StepProgress:
    """Context manager; `advance(n)` per optimizer step, `update(metrics)` per logged step."""

    def __init__(self, console: Console, total: int, done: int, enabled: bool, label: str = "pretrain"):
        self.console, self.total, self.done, self.enabled, self.label = console, total, done, enabled, label
        self.bar = enabled and console.is_terminal
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> "StepProgress":
        if self.bar:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), console=self.console, transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=self.total, completed=self.done,
                                                 metrics="")
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._progress is not None:
            self._progress.update(self._task, advance=n)

    def update(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, metrics=_fmt(metrics))
        else:
            self.console.print(f"epoch {metrics['epoch']} step {metrics['step']}/{self.total}  "
                               f"{_fmt(metrics)}", highlight=False)

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)
