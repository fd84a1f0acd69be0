"""`localmim plot`: loss curves (total and per scale), learning rate, throughput and monitor
accuracy of one or more runs, overlaid, as one PNG.

Reads each run's metrics.jsonl: training lines have "step", "loss" and "loss_scaleK" (pretrain) or
"loss" (finetune), "lr", "images_per_s"; lines with a "kind" ("val", "monitor") carry evaluations
at a step. A half-written last line (a run killed mid-write) is skipped, not an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localmim_cli.engine import atomic
from localmim_cli.errors import DataError

PANEL_INCHES = (5.0, 3.2)


@dataclass
class RunCurves:
    name: str
    train: list[dict[str, Any]] = field(default_factory=list)   # training lines, in step order
    evals: list[dict[str, Any]] = field(default_factory=list)   # lines with a "kind"

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in self.train if isinstance(r.get(key), (int, float))]
        return [p[0] for p in points], [p[1] for p in points]

    @property
    def scale_keys(self) -> list[str]:
        keys = {k for r in self.train for k in r if k.startswith("loss_scale")}
        return sorted(keys, key=lambda k: int(k[len("loss_scale"):]))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of a metrics.jsonl; raises DataError naming a bad line that is
    not the last (a torn last line is what a crash leaves, and is skipped)."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                break
            raise DataError(f"{path}:{number}: not a JSON line") from None
    return records


def load_run(run: Path) -> RunCurves:
    run = Path(run)
    metrics = run / "metrics.jsonl" if run.is_dir() else run
    if not metrics.is_file():
        raise DataError(f"{run}: no metrics.jsonl here; pass a run directory (or its metrics.jsonl)")
    records = read_metrics(metrics)
    curves = RunCurves(name=(run if run.is_dir() else run.parent).name)
    for r in records:
        (curves.evals if "kind" in r else curves.train).append(r)
    curves.train.sort(key=lambda r: r.get("step", 0))
    return curves


def _panels(runs: list[RunCurves]) -> list[str]:
    panels = ["loss"]
    panels += sorted({k for run in runs for k in run.scale_keys}, key=lambda k: int(k[len("loss_scale"):]))
    panels += ["lr", "images_per_s"]
    if any(e.get("kind") == "monitor" for run in runs for e in run.evals):
        panels.append("monitor")
    if any(e.get("kind") == "val" for run in runs for e in run.evals):
        panels.append("val")
    return panels


TITLES = {"loss": "loss (sum over scales)", "lr": "learning rate", "images_per_s": "images / s",
          "monitor": "k-NN top-1 (%), online monitor", "val": "validation top-1 (%)"}


def plot_runs(runs: list[Path | str], out: Path | str, title: str | None = None) -> dict[str, Any]:
    """Draw the runs' curves into one PNG at `out`; returns {"out", "panels", "runs"}."""
    import matplotlib
    matplotlib.use("Agg")   # no display: files only
    import matplotlib.pyplot as plt

    curves = [load_run(Path(r)) for r in runs]
    if not any(c.train for c in curves):
        raise DataError("no training steps logged yet in " + ", ".join(str(r) for r in runs))
    panels = _panels(curves)
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows),
                             squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for run in curves:
            if panel in ("monitor", "val"):
                points = [(e["step"], e.get("knn_top1", e.get("val_top1"))) for e in run.evals
                          if e.get("kind") == panel]
                floor = [e["random_init_top1"] for e in run.evals if "random_init_top1" in e]
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                ax.plot(xs, ys, marker="o", label=run.name)
                if floor:
                    ax.axhline(floor[0], linestyle="--", linewidth=1, color=ax.lines[-1].get_color(),
                               label=f"{run.name}: random init")
            else:
                xs, ys = run.series(panel)
                ax.plot(xs, ys, label=run.name)
        ax.set_title(TITLES.get(panel, panel.replace("loss_scale", "loss, scale ")))
        ax.set_xlabel("step")
        if panel.startswith("loss") and all(y > 0 for run in curves for y in run.series(panel)[1]):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(curves) > 1 or panel in ("monitor",):
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title or ", ".join(c.name for c in curves))
    fig.tight_layout()
    out = Path(out)
    atomic.write_with(out, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)
    return {"out": str(out), "panels": panels, "runs": [c.name for c in curves]}
