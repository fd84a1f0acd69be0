"""What a `--resume` keeps and what it adds to the run directory's records.

A run's manifest.json and settings.provenance.json describe how it was started: its start time,
command line, versions and the layers every setting came from. A resume keeps all of that and
appends one record to a `resumes` list in each (when, the command, every setting that changed
with its old and new value, and the position it continued from); settings.json holds the values
the run continues with, so it stays usable as --config.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from localmim_cli.engine import atomic
from localmim_cli.errors import RunDirError


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as {"a.b.c": value}; plugin `options` stay whole, as one value."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "options":
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{dotted field: {"old": ..., "new": ...}} for every setting that differs."""
    before, now = flatten(saved), flatten(current)
    return {k: {"old": before.get(k), "new": now.get(k)}
            for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)}


def resume_record(changed: dict[str, dict[str, Any]], provenance: dict[str, str],
                  position: dict[str, int], **extra: Any) -> dict[str, Any]:
    """One entry of the `resumes` lists; each changed field also names the layer that changed it."""
    return {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": sys.argv,
            "changed": {k: {**v, "from": provenance.get(k)} for k, v in changed.items()},
            "position": position, **extra}


RECORDS = ("manifest.json", "settings.provenance.json")


class RunRecord(BaseModel):
    """What a resume needs of manifest.json and settings.provenance.json: a JSON object whose
    `resumes`, when there, is a list of records. The rest is kept as it is."""

    model_config = ConfigDict(extra="allow", strict=True)

    resumes: list[dict[str, Any]] = []


def read_record(path: Path) -> dict[str, Any] | None:
    """A run record, validated (RunRecord); None when the file is missing (a run from an older
    version). A file that is there but broken is refused, naming it, rather than rewritten: it
    holds how the run was started, which nothing else records."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        reason = f"not valid JSON: {exc}"
    else:
        try:
            RunRecord.model_validate(data)
            return data
        except ValidationError as exc:
            reason = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'the file'}: {e['msg']}" for e in exc.errors())
    raise RunDirError(f"{path}: not a readable run record ({reason}); it holds how the run was started, so "
                      f"--resume does not rewrite it: restore it, or move it out of {path.parent} to start a "
                      "new one, then --resume again")


def check_records(run_dir: Path) -> None:
    """Refuse a resume before anything is written when a record it appends to is broken."""
    for name in RECORDS:
        read_record(run_dir / name)


def append_resume(run_dir: Path, settings_json: str, record: dict[str, Any],
                  fresh_manifest: dict[str, Any], fresh_provenance: dict[str, Any]) -> None:
    """Write the continued run's settings.json and append `record` to the `resumes` of
    manifest.json and settings.provenance.json. A missing file (a run from an older version)
    is started afresh from `fresh_*`; a broken one is refused (`read_record`), never replaced."""
    check_records(run_dir)   # all read before any is written
    atomic.write_text(run_dir / "settings.json", settings_json)
    for name, fresh in zip(RECORDS, (fresh_manifest, fresh_provenance)):
        data = read_record(run_dir / name) or {**fresh, "resumes": []}
        data["resumes"] = [*data.get("resumes", []), record]
        atomic.write_json(run_dir / name, data)


def last_metrics(run_dir: Path) -> dict[str, Any]:
    """The last training record of metrics.jsonl (validation lines skipped), or {}."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "loss" in record:
            return record
    return {}
