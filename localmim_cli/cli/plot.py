"""`localmim plot`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from localmim_cli.cli.output import console


def plot(
    runs: Annotated[list[Path], typer.Argument(
        help="Run directories (or their metrics.jsonl); several are overlaid for comparison.",
        show_default=False)],
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="PNG to write. Default: RUN/figures/curves.png for one run, "
                            "./curves.png for several.", show_default=False)] = None,
    title: Annotated[Optional[str], typer.Option(help="Figure title (default: the run names).")] = None,
) -> None:
    """Plot loss curves (total and per scale), learning rate, throughput and monitor accuracy."""
    from localmim_cli.tasks.plot import plot_runs

    if out is None:
        out = runs[0] / "figures" / "curves.png" if len(runs) == 1 and runs[0].is_dir() else Path("curves.png")
    report = plot_runs(runs, out, title)
    console.print(f"wrote {report['out']}: {', '.join(report['panels'])} for {', '.join(report['runs'])}",
                  highlight=False)
