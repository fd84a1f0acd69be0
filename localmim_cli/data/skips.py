"""Files left out during training (with skip_unreadable): listed in skipped.jsonl, counted at the end.

The pre-flight check before training reads headers only (`data.check = header`), so a file can
pass it and still fail to decode when its turn comes (a truncated JPEG). With skip_unreadable the
loader then reads the next readable file instead; the batch carries the file's name, and this
log writes it once per process into RUN/skipped.jsonl (one JSON object a line: file, why, rank).
At the end of the run the count goes into manifest.json and is said on the console.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from localmim_cli.engine import atomic

if TYPE_CHECKING:
    from rich.console import Console

    from localmim_cli.engine.distributed import World

SKIPPED_NAME = "skipped.jsonl"


class SkipLog:
    def __init__(self, run_dir: Path, world: World):
        self.path = Path(run_dir) / SKIPPED_NAME
        self.rank = world.rank
        self.seen: set[str] = set()

    def add(self, entries: list[tuple[str, str]]) -> None:
        new = [(file, why) for file, why in entries if file not in self.seen]
        if not new:
            return
        self.seen.update(file for file, _ in new)
        with open(self.path, "a", encoding="utf-8") as f:  # appends of whole lines: ranks may share it
            for file, why in new:
                f.write(json.dumps({"file": file, "why": why, "rank": self.rank}) + "\n")
            f.flush()

    def files(self) -> list[str]:
        """Every file listed so far by any process (of this run and the runs it resumed)."""
        if not self.path.is_file():
            return []
        listed: dict[str, None] = {}
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                listed[json.loads(line)["file"]] = None
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
        return list(listed)

    def report(self, console: Console, is_main: bool) -> None:
        """Say how many files were left out during training and record it in manifest.json."""
        if not is_main:
            return
        files = self.files()
        manifest_path = self.path.parent / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            manifest = None
        if manifest is not None and isinstance(manifest.get("data"), dict):
            manifest["data"]["skipped_during_training"] = len(files)
            atomic.write_json(manifest_path, manifest)
        if files:
            console.print(f"[yellow]{len(files)} image(s) could not be decoded during training and were "
                          f"replaced by the next readable one[/] (listed in {self.path})")
