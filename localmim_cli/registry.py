"""Finds encoders and targets through entry points, loading each lazily and in isolation.

Built-in plugins register through the same groups as third-party ones (see pyproject.toml).
A plugin that fails to import, has the wrong type or was written for another interface version
is recorded with its error and skipped; it never takes the program down.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from localmim_cli.plugin_api import EncoderPlugin, TargetPlugin

GROUPS = {"encoders": ("localmim.encoders", EncoderPlugin),
          "targets": ("localmim.targets", TargetPlugin)}


class PluginError(LookupError):
    """A plugin asked for by name is missing or broken; the message says which and why."""


@dataclass
class PluginRecord:
    kind: str                      # "encoders" or "targets"
    name: str
    value: str                     # "module:attr" the entry point names
    distribution: str
    version: str
    plugin: EncoderPlugin | TargetPlugin | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.plugin is not None


def _load(kind: str, ep: EntryPoint) -> PluginRecord:
    dist = ep.dist
    record = PluginRecord(kind, ep.name, ep.value, dist.name if dist else "?",
                          dist.version if dist else "?")
    expected_type = GROUPS[kind][1]
    try:
        obj = ep.load()
    except Exception as exc:  # a plugin's import may fail in any way; report it, never crash
        record.error = f"failed to import {ep.value}: {type(exc).__name__}: {exc}"
        return record
    if not isinstance(obj, expected_type):
        record.error = (f"{ep.value} is a {type(obj).__name__}, not a "
                        f"localmim_cli.plugin_api.{expected_type.__name__}")
    elif obj.api_version != expected_type.expected_api_version:
        record.error = (f"written for {kind[:-1]} interface version {obj.api_version}; this localmim "
                        f"speaks version {expected_type.expected_api_version}")
    elif obj.name != ep.name:
        record.error = f"entry point is named {ep.name!r} but the plugin calls itself {obj.name!r}"
    else:
        record.plugin = obj
    return record


@functools.cache
def discover(kind: str) -> tuple[PluginRecord, ...]:
    """Every entry point of the group, loaded; duplicates of one name are all marked broken."""
    group = GROUPS[kind][0]
    records = [_load(kind, ep) for ep in entry_points(group=group)]
    by_name: dict[str, list[PluginRecord]] = {}
    for r in records:
        by_name.setdefault(r.name, []).append(r)
    for name, same in by_name.items():
        if len(same) > 1:
            owners = ", ".join(f"{r.distribution} ({r.value})" for r in same)
            for r in same:
                r.plugin = None
                r.error = f"name {name!r} is claimed by more than one plugin: {owners}"
    return tuple(records)


def get(kind: str, name: str) -> EncoderPlugin | TargetPlugin:
    records = [r for r in discover(kind) if r.name == name]
    if not records:
        available = sorted(r.name for r in discover(kind) if r.ok)
        raise PluginError(f"no {kind[:-1]} named {name!r}; installed: {', '.join(available) or 'none'}")
    if not records[0].ok:
        raise PluginError(f"{kind[:-1]} {name!r} from {records[0].distribution} is broken: "
                          f"{records[0].error}")
    return records[0].plugin


def encoder(name: str) -> EncoderPlugin:
    return get("encoders", name)


def target(name: str) -> TargetPlugin:
    return get("targets", name)
